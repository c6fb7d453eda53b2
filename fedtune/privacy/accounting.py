"""Privacy accounting with Opacus's accountants, and the randomness DP noise needs.

A round of DP-SGD at one site is one :class:`Mechanism` (noise_multiplier, sample_rate,
steps): a Poisson-subsampled Gaussian mechanism applied ``steps`` times. Client-level DP
at the coordinator is the same with ``sample_rate = 1`` (no amplification by sampling)
and one step per round. Identical (noise, rate) pairs are merged by summing their steps
before composing: exact for both accountants (composition is commutative) and it keeps
long histories cheap. No Flower and no files in here (the ledger is the client's).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

from fedtune.config import ACCOUNTANTS
from fedtune.errors import ConfigError, PrivacyError

if TYPE_CHECKING:  # torch and Opacus load where noise is drawn or epsilon computed, not where a ledger is read
    import torch

MIN_NOISE = 0.1  # below this DP-SGD is not meaningful; the search never proposes less
MAX_NOISE = 1e3
NOISE_RTOL = 0.01


class BudgetExceeded(PrivacyError):
    """A release would push a dataset's (or the federation's) epsilon past its budget.

    ``spent``, ``after`` and ``budget`` are the numbers behind the message; they derive
    from mechanisms only, so :meth:`public_reason` may leave the hospital.
    """

    def __init__(self, message: str, *, spent: float, after: float, budget: float) -> None:
        super().__init__(message)
        self.spent, self.after, self.budget = spent, after, budget

    def public_reason(self) -> str:
        """What a refusal may tell the coordinator: the spend, nothing about the records."""
        return (
            f"privacy budget: this round would raise epsilon from {self.spent:.3f} to {self.after:.3f}, "
            f"past the hospital's budget {self.budget:g}"
        )


@dataclass(frozen=True)
class Mechanism:
    """``steps`` applications of a Gaussian mechanism, each on a Poisson sample at ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        ok = isinstance(self.noise_multiplier, int | float) and not isinstance(self.noise_multiplier, bool)
        if not (ok and math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"`noise_multiplier` must be positive, got {self.noise_multiplier!r}")
        if not (isinstance(self.sample_rate, int | float) and 0 < self.sample_rate <= 1):
            raise ConfigError(f"`sample_rate` must be in (0, 1], got {self.sample_rate!r}; use batch_size / n_records")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"`steps` must be an integer >= 1, got {self.steps!r}")


def check_accounting(*, delta: float, accountant: str) -> None:
    """Validate the (delta, accountant) pair every epsilon is reported at."""
    if accountant not in ACCOUNTANTS:
        raise ConfigError(f"`accountant` must be one of {ACCOUNTANTS}, got {accountant!r}")
    if not 0 < delta < 1:
        raise ConfigError(f"`delta` must be in (0, 1), got {delta!r}; use less than 1 / n_records")


def _merged(history: Sequence[Mechanism]) -> tuple[tuple[float, float, int], ...]:
    steps: dict[tuple[float, float], int] = {}
    for m in history:
        key = (float(m.noise_multiplier), float(m.sample_rate))
        steps[key] = steps.get(key, 0) + m.steps
    return tuple(sorted((noise, rate, n) for (noise, rate), n in steps.items()))


@lru_cache(maxsize=1024)
def _epsilon(history: tuple[tuple[float, float, int], ...], delta: float, accountant: str) -> float:
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = list(history)  # Opacus's own format: (noise_multiplier, sample_rate, steps)
    with warnings.catch_warnings():  # low-noise histories make RDP warn about its largest order
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


def epsilon_spent(history: Sequence[Mechanism], *, delta: float, accountant: str = "rdp") -> float:
    """Epsilon of the composition of ``history`` at ``delta`` (0.0 for an empty history).

    Parameters
    ----------
    history : mechanisms applied to the same records, in any order.
    delta : the delta at which epsilon is reported.
    accountant : ``"rdp"`` or ``"prv"`` (Opacus's accountants).
    """
    check_accounting(delta=delta, accountant=accountant)
    if not history:
        return 0.0
    return _epsilon(_merged(history), float(delta), accountant)


def noise_for_target(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
    prior: Sequence[Mechanism] = (),
) -> float:
    """Smallest noise multiplier (to ~1 % relative, rounded up) keeping ``prior`` + this within target.

    The returned value was itself evaluated: composing ``prior`` with
    ``Mechanism(result, sample_rate, steps)`` gives epsilon <= ``target_epsilon``. Noise below
    ``MIN_NOISE`` is never proposed. Raises :class:`PrivacyError` if even ``MAX_NOISE`` overshoots.
    """
    check_accounting(delta=delta, accountant=accountant)
    if not target_epsilon > 0:
        raise ConfigError(f"`target_epsilon` must be positive, got {target_epsilon!r}")
    Mechanism(1.0, sample_rate, steps)  # validates sample_rate and steps
    already = epsilon_spent(prior, delta=delta, accountant=accountant)
    if already >= target_epsilon:
        raise PrivacyError(
            f"`target_epsilon` = {target_epsilon:g} is already spent (epsilon {already:.4f} at delta {delta:g}); "
            "no noise can add more rounds: stop, or raise the target"
        )

    def fits(noise: float) -> bool:
        try:
            eps = epsilon_spent([*prior, Mechanism(noise, sample_rate, steps)], delta=delta, accountant=accountant)
        except (ArithmeticError, ValueError, RuntimeError):
            return False  # a failed evaluation counts as an overshoot: search toward more noise
        return eps <= target_epsilon  # NaN compares False: also an overshoot

    bracket = _bracket(fits)
    if bracket is None:
        raise PrivacyError(
            f"`target_epsilon` = {target_epsilon:g} cannot be met even with noise_multiplier {MAX_NOISE:g} "
            f"(sample_rate {sample_rate:g}, {steps} steps, prior epsilon {already:.4f}); "
            "lower the steps or sample rate, or raise the target"
        )
    lo, hi = bracket
    if lo < MIN_NOISE:
        return hi
    while hi > lo * (1 + NOISE_RTOL):  # geometric bisection: relative tolerance on the noise
        mid = math.sqrt(lo * hi)
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def _bracket(fits: Callable[[float], bool]) -> tuple[float, float] | None:
    """(lo, hi) around the smallest noise that fits, from 1.0 by halving or doubling: fits(hi)
    was evaluated True, fits(lo) False (or lo is below MIN_NOISE); None when even MAX_NOISE
    overshoots."""
    hi = 1.0
    if fits(hi):
        lo = hi / 2
        while lo >= MIN_NOISE and fits(lo):
            hi, lo = lo, lo / 2
        return lo, hi
    lo = hi
    while True:
        hi = min(lo * 2, MAX_NOISE)
        if fits(hi):
            return lo, hi
        if hi >= MAX_NOISE:
            return None
        lo = hi


def secure_generator(device: torch.device | str = "cpu", seed: int | None = None) -> torch.Generator:
    """A torch generator for DP noise or sampling, seeded from the OS's CSPRNG.

    DP noise must be unpredictable to everyone who sees the update: a seed derived from
    the run's config (which the coordinator knows) would let it regenerate and subtract
    the noise. ``seed`` exists for tests only.
    """
    import torch

    gen = torch.Generator(device=device)
    gen.manual_seed(secrets.randbits(63) if seed is None else seed)
    return gen


def gaussian_noise(reference: torch.Tensor, std: float, generator: torch.Generator) -> torch.Tensor:
    """N(0, std^2) noise shaped like ``reference``, robust to floating-point attacks.

    The sum of four N(0, std^2) draws divided by 2 is N(0, std^2) again, and hides the
    low-order bits an attacker would use to tell which draw produced a value
    (Holohan et al., arXiv:2107.10138, section 5.1; Opacus's ``secure_mode`` does the same).
    """
    import torch

    total = torch.zeros(reference.shape, dtype=torch.float64, device=reference.device)
    for _ in range(4):
        total += torch.normal(
            0.0, std, size=reference.shape, generator=generator, dtype=torch.float64, device=reference.device
        )
    return (total / 2).to(reference.dtype)
