"""How a round's valid updates become the next global adapter, as :class:`Merge`: the
LoRA merge rule, the norm bounds, the combine (or client-level DP) and the server
optimizer, built once from the run's config (steps 1-4 of :mod:`fedtune.server.strategy`)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fedtune.lora.aggregate import COMBINES
from fedtune.lora.delta import State
from fedtune.lora.merge import MergeRule, make_rule
from fedtune.lora.optimizers import DEFAULT_LR, ServerOptimizer, make_server_optimizer
from fedtune.server.client_dp import ClientLevelDP

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig


@dataclass(frozen=True)
class NormBounds:
    """``relative``: over this many times the median norm of the round's others (0: off);
    ``absolute``: over this L2 norm (0: off)."""

    relative: float = 0.0
    absolute: float = 0.0

    def violation(self, norm: float, others: list[float]) -> str:
        """Why an update of L2 norm ``norm`` is out of bounds, or "" when it is not."""
        if self.absolute and norm > self.absolute:
            return f"update norm {norm:.4g} is over `security.max_update_norm` = {self.absolute:g}"
        if self.relative and others:
            median = statistics.median(others)
            if norm > self.relative * median:
                return (
                    f"update norm {norm:.4g} is over {self.relative:g} x the median of the others "
                    f"({median:.4g}; `security.norm_bound`)"
                )
        return ""


@dataclass(frozen=True)
class Combine:
    """How the round's updates are combined: ``mean`` (weighted by records),
    ``trimmed_mean`` (``trim_fraction`` cut at each end) or ``median``, coordinate-wise."""

    rule: str = "mean"
    trim_fraction: float = 0.2

    def __call__(self, updates: list[State], weights: list[float]) -> State:
        return COMBINES[self.rule](updates, weights, trim_fraction=self.trim_fraction)


def _plain_step() -> ServerOptimizer:
    return make_server_optimizer("none", lr=1.0)


@dataclass(frozen=True)
class Merge:
    """The round's merge, in the rule's update space.

    Parameters
    ----------
    rule
        The LoRA merge rule (default ``fedavg``).
    bounds
        Norm bounds beyond which an update is rejected.
    combine
        How the valid updates are combined (ignored under client-level DP).
    client_dp
        Client-level DP's noisy clipped mean instead of ``combine``, or None.
    optimizer
        The server optimizer (default: the plain step, server learning rate 1).
    """

    rule: MergeRule = MergeRule(alpha=1.0, rank=1)
    bounds: NormBounds = NormBounds()
    combine: Combine = Combine()
    client_dp: ClientLevelDP | None = None
    optimizer: ServerOptimizer = field(default_factory=_plain_step)

    @classmethod
    def from_config(cls, cfg: ExperimentConfig, *, client_dp: ClientLevelDP | None = None) -> Merge:
        """The run's merge: ``federation.strategy`` over ``lora``, ``security``'s bounds,
        ``federation.aggregation`` and ``federation.server_*``."""
        fed = cfg.federation
        optimizer = make_server_optimizer(
            fed.server_optimizer,
            lr=fed.server_lr or DEFAULT_LR[fed.server_optimizer],
            momentum=fed.server_momentum,
            beta1=fed.server_beta1,
            beta2=fed.server_beta2,
            tau=fed.server_tau,
        )
        return cls(
            rule=make_rule(fed.strategy, alpha=cfg.lora.alpha, rank=cfg.lora.rank, seed=cfg.lora.init_seed),
            bounds=NormBounds(relative=cfg.security.norm_bound, absolute=cfg.security.max_update_norm),
            combine=Combine(fed.aggregation, fed.trim_fraction),
            client_dp=client_dp,
            optimizer=optimizer,
        )

    def combined(self, updates: list[State], weights: list[float]) -> tuple[State, dict[str, float]]:
        """The updates combined, and client-level DP's account of the release ({} without it)."""
        if self.client_dp is not None:
            return self.client_dp.release(updates)
        return self.combine(updates, weights), {}

    def step(self, current: State, combined: State) -> State:
        """The next global adapter: the server optimizer's step along ``combined``, applied by the rule."""
        return self.rule.apply(current, self.optimizer.step(combined))
