"""Client-level DP at the coordinator: clip each hospital's delta, average, add Gaussian noise.

The mechanism is the one of Flower's ``DifferentialPrivacyServerSideFixedClipping``
(McMahan et al., arXiv:1710.06963): every update clipped to L2 norm ``S``, the mean over
the ``m`` sampled hospitals, Gaussian noise of standard deviation ``sigma * S / m``.
Flower's wrapper cannot sit on this merge as it is: it clips ``reply - current`` of
full-model replies before anything is validated (a malformed reply would reach its
arithmetic) and then calls FedAvg's weighted mean; here replies are adapter deltas,
validated first. ``tests/server/test_client_dp.py`` checks the clipped mean against Flower's
wrapper on the same updates. Two differences, both on the safe side:

- the mean divides by ``m``, the number sampled, whatever number of valid updates
  arrived, so one hospital moves the mean by at most ``S / m`` and the noise stays
  calibrated (Flower's accounted mode refuses such a round instead);
- the noise comes from a CSPRNG-seeded generator, with the floating-point-attack
  mitigation of :func:`fedtune.privacy.accounting.gaussian_noise`.

Accounting: each round is one Gaussian mechanism of noise multiplier ``sigma`` with no
amplification by sampling (sample rate 1, as Flower's fixed-clipping accounting
requires), composed by Opacus's RDP accountant. Epsilon bounds what the global adapter
reveals about any one hospital's participation; the coordinator sees clipped updates.
"""

from __future__ import annotations

from typing import Any

from fedtune.config import ClientDPSettings
from fedtune.errors import CheckpointError
from fedtune.lora.aggregate import weighted_mean
from fedtune.lora.delta import State, l2_norm
from fedtune.privacy.accounting import BudgetExceeded, Mechanism, epsilon_spent, gaussian_noise, secure_generator


def clip(delta: State, clipping_norm: float) -> tuple[State, float]:
    """``delta`` scaled to L2 norm at most ``clipping_norm`` (all tensors together), and its norm before."""
    norm = l2_norm(delta)
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return {k: v * scale for k, v in delta.items()}, norm


class ClientLevelDP:
    """Clip, average over the sampled, noise, and account; one instance per federation.

    Parameters
    ----------
    settings : the ``[client_dp]`` section.
    num_sampled : hospitals sampled per round (the mean's fixed denominator ``m``).
    seed : for tests only; None seeds the noise from the OS's CSPRNG.
    """

    def __init__(self, settings: ClientDPSettings, *, num_sampled: int, seed: int | None = None) -> None:
        if num_sampled < 1:
            raise ValueError("num_sampled must be >= 1")
        self.settings = settings
        self.num_sampled = num_sampled
        self.releases: list[float] = []  # the noise multiplier of every round released so far
        self._generator = secure_generator("cpu", seed)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise on the mean: sigma * S / m."""
        return self.settings.noise_multiplier * self.settings.clipping_norm / self.num_sampled

    def epsilon(self, *, extra_rounds: int = 0) -> float:
        """Client-level epsilon at ``settings.delta`` after the releases so far (plus ``extra_rounds``)."""
        sigmas = self.releases + [self.settings.noise_multiplier] * extra_rounds
        return epsilon_spent([Mechanism(s, 1.0, 1) for s in sigmas], delta=self.settings.delta, accountant="rdp")

    def check_next(self, server_round: int) -> None:
        """Raise BudgetExceeded if releasing round ``server_round`` would pass ``max_epsilon``."""
        limit = self.settings.max_epsilon
        if limit and self.epsilon(extra_rounds=1) > limit:
            raise BudgetExceeded(
                f"client-level DP: round {server_round} would raise epsilon from {self.epsilon():.3f} to "
                f"{self.epsilon(extra_rounds=1):.3f}, past `client_dp.max_epsilon` = {limit:g} "
                f"(delta {self.settings.delta:g})",
                spent=self.epsilon(),
                after=self.epsilon(extra_rounds=1),
                budget=limit,
            )

    def release(self, deltas: list[State]) -> tuple[State, dict[str, float]]:
        """The noisy clipped mean of ``deltas`` (at most ``num_sampled``), and what was done."""
        if not deltas or len(deltas) > self.num_sampled:
            raise ValueError(f"release needs 1 to {self.num_sampled} deltas, got {len(deltas)}")
        clipped = [clip(d, self.settings.clipping_norm) for d in deltas]
        # sum / m = (mean over the k that arrived) * k / m
        mean = weighted_mean([c for c, _ in clipped], [1.0] * len(clipped))
        std = self.noise_std
        share = len(clipped) / self.num_sampled
        out = {k: v * share + gaussian_noise(v, std, self._generator) for k, v in mean.items()}
        self.releases.append(self.settings.noise_multiplier)
        norms = [n for _, n in clipped]
        return out, {
            "epsilon": self.epsilon(),
            "delta": self.settings.delta,
            "noise-std": std,
            "clipped": float(sum(n > self.settings.clipping_norm for n in norms)),
            "max-norm": max(norms),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"releases": list(self.releases)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        releases = state.get("releases")
        if not isinstance(releases, list) or not all(isinstance(s, int | float) and s > 0 for s in releases):
            raise CheckpointError(f"client-level DP state is malformed ({state!r}); the run folder is damaged")
        self.releases = [float(s) for s in releases]
