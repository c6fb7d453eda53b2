"""How a round's valid updates become the next global adapter, as :class:`Merge`: the
LoRA merge rule, the norm bounds, the combine (or client-level DP) and the server
optimizer, built once from the run's config (steps 1-4 of :mod:`fedtune.server.strategy`).

The ``svd`` rule's updates are factored (:mod:`fedtune.lora.factored`); the weighted mean,
the norm bounds and the plain server step keep them so. What needs each coordinate (the
robust combines, client-level DP's clip-and-noise, the moments of ``fedavgm``, ``fedadam``
and ``fedyogi``) gets them as float64 out x in matrices, refused before the first round when
one such copy of the adapter's update is over ``federation.svd_dense_limit_mb``."""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fedtune.errors import ConfigError
from fedtune.lora.aggregate import COMBINES
from fedtune.lora.delta import State
from fedtune.lora.factored import Factored, Update, dense_bytes, mean
from fedtune.lora.merge import MergeRule, make_rule, modules
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
    dense_limit_mb
        The largest dense copy of a factored update (MiB of float64) a dense path may form.
    """

    rule: MergeRule = MergeRule(alpha=1.0, rank=1)
    bounds: NormBounds = NormBounds()
    combine: Combine = Combine()
    client_dp: ClientLevelDP | None = None
    optimizer: ServerOptimizer = field(default_factory=_plain_step)
    dense_limit_mb: float = 2048.0

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
            dense_limit_mb=fed.svd_dense_limit_mb,
        )

    def dense_reason(self) -> str:
        """Which setting makes the rule's factored updates dense ("" when none does)."""
        if not self.rule.factored:
            return ""
        if self.client_dp is not None:
            return "`client_dp`"
        if self.combine.rule != "mean":
            return f"`federation.aggregation` = {self.combine.rule!r}"
        if not self.optimizer.factored:
            return f"`federation.server_optimizer` = {self.optimizer.name!r}"
        return ""

    def require_fits(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """ConfigError, before any round, when a dense path would form the adapter
        ``global_state``'s update as float64 matrices over ``dense_limit_mb``."""
        pairs = modules(global_state).values()
        self._check_dense(dense_bytes((global_state[b].shape[0], global_state[a].shape[1]) for a, b in pairs))

    def _check_dense(self, size: int) -> None:
        why = self.dense_reason()
        if why and size > self.dense_limit_mb * 2**20:
            raise ConfigError(
                f"`federation.strategy` = 'svd' with {why} needs each update as dense float64 matrices, "
                f"{size / 2**30:.2f} GiB per copy for this adapter, over `federation.svd_dense_limit_mb` = "
                f"{self.dense_limit_mb:g}; use aggregation 'mean', server_optimizer 'none' and no client_dp "
                "(the merge then stays factored) or raise the limit"
            )

    def _dense(self, update: Update) -> State:
        if isinstance(update, Factored):
            self._check_dense(update.dense_bytes())
            return update.dense()
        return update

    def combined(self, updates: list[Update], weights: list[float]) -> tuple[Update, dict[str, float]]:
        """The updates combined, and client-level DP's account of the release ({} without it).
        Factored updates stay factored under the plain weighted mean; else they are densified."""
        if self.client_dp is None and self.combine.rule == "mean":
            return mean(updates, weights), {}
        dense = [self._dense(u) for u in updates]
        if self.client_dp is not None:
            return self.client_dp.release(dense)
        return self.combine(dense, weights), {}

    def step(self, current: State, combined: Update) -> State:
        """The next global adapter: the server optimizer's step along ``combined``, applied by the rule."""
        if isinstance(combined, Factored) and not self.optimizer.factored:
            combined = self._dense(combined)
        return self.rule.apply(current, self.optimizer.step(combined))
