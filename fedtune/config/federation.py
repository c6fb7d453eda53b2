"""The sections of a federation's rounds and protection: merge, sample-level DP,
client-level DP, sealing and secure aggregation."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedtune.config.names import (
    ACCOUNTANTS,
    AGGREGATIONS,
    GRAD_SAMPLE_MODES,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    WIRE_DTYPES,
)
from fedtune.config.sections import _require


@dataclass(frozen=True)
class FederationSettings:
    """Rounds, who takes part in them, and how their updates are merged.

    ``strategy`` is the LoRA merge rule (``fedtune/lora/merge.py``); ``server_optimizer``
    steps the global adapter along the round's merged update with ``server_lr`` (0: the
    optimizer's usual value); ``aggregation`` combines the sites' updates (``mean``:
    weighted by records; ``trimmed_mean`` / ``median``: coordinate-wise, unweighted).
    ``svd_dense_limit_mb`` bounds one dense float64 copy of an ``svd`` update, which only the
    robust combines, ``client_dp`` and the momentum/Adam server optimizers need.
    ``wire_dtype``: what a hospital's delta travels in (``bfloat16`` / ``float16``: half the
    bytes of ``float32``, rounded to 8 / 11 bits); the coordinator decodes it to float32.
    """

    rounds: int = 3
    strategy: str = "fedavg"
    server_optimizer: str = "none"
    server_lr: float = 0.0
    server_momentum: float = 0.9
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    aggregation: str = "mean"
    trim_fraction: float = 0.2
    svd_dense_limit_mb: float = 2048.0
    fraction_train: float = 1.0
    min_clients: int = 0
    round_timeout: float = 3600.0
    join_timeout: float = 600.0
    wire_dtype: str = "float32"

    def __post_init__(self) -> None:
        _require(self.rounds >= 1, f"`federation.rounds` must be >= 1, got {self.rounds}")
        _require(
            self.strategy in STRATEGIES,
            f"`federation.strategy` must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}",
        )
        _require(
            self.server_optimizer in SERVER_OPTIMIZERS,
            f"`federation.server_optimizer` must be one of {', '.join(SERVER_OPTIMIZERS)}, "
            f"got {self.server_optimizer!r}",
        )
        _require(
            math.isfinite(self.server_lr) and self.server_lr >= 0,
            f"`federation.server_lr` must be >= 0 (0: the optimizer's default), got {self.server_lr}",
        )
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            value = getattr(self, name)
            _require(0 <= value < 1, f"`federation.{name}` must be in [0, 1), got {value}")
        _require(
            math.isfinite(self.server_tau) and self.server_tau > 0,
            f"`federation.server_tau` must be positive, got {self.server_tau}",
        )
        _require(
            self.aggregation in AGGREGATIONS,
            f"`federation.aggregation` must be one of {', '.join(AGGREGATIONS)}, got {self.aggregation!r}",
        )
        _require(
            0 <= self.trim_fraction < 0.5,
            f"`federation.trim_fraction` must be in [0, 0.5) (share trimmed at each end), got {self.trim_fraction}",
        )
        _require(
            math.isfinite(self.svd_dense_limit_mb) and self.svd_dense_limit_mb > 0,
            f"`federation.svd_dense_limit_mb` must be positive (MiB), got {self.svd_dense_limit_mb}",
        )
        _require(
            0 < self.fraction_train <= 1, f"`federation.fraction_train` must be in (0, 1], got {self.fraction_train}"
        )
        _require(
            self.min_clients >= 0,
            f"`federation.min_clients` must be >= 0 (0: every sampled hospital), got {self.min_clients}",
        )
        _require(self.round_timeout > 0, f"`federation.round_timeout` must be positive, got {self.round_timeout}")
        _require(self.join_timeout > 0, f"`federation.join_timeout` must be positive, got {self.join_timeout}")
        _require(
            self.wire_dtype in WIRE_DTYPES,
            f"`federation.wire_dtype` must be one of {', '.join(WIRE_DTYPES)}, got {self.wire_dtype!r}",
        )
        _require(
            self.wire_dtype == "float32" or self.strategy != "svd",
            f"`federation.wire_dtype` = {self.wire_dtype!r} rounds what a hospital sends, and with "
            "`federation.strategy` = 'svd' that is its whole adapter, not a delta: use 'float32' with svd",
        )


@dataclass(frozen=True)
class DPSettings:
    """Sample-level DP-SGD at each site (Opacus), accounted in the site's privacy ledger.

    Exactly one of ``noise_multiplier`` (fixed noise) and ``target_epsilon`` (noise
    computed so the run's planned rounds spend at most this epsilon) is set when enabled.
    ``budget_epsilon`` is each hospital's lifetime budget per record, across all runs; in
    a simulation every simulated hospital keeps its ledger in ``ledger_dir``.
    """

    enabled: bool = False
    noise_multiplier: float = 0.0
    target_epsilon: float = 0.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    grad_sample_mode: str = "hooks"
    budget_epsilon: float = 10.0
    ledger_dir: str = ""

    def __post_init__(self) -> None:
        _require(self.noise_multiplier >= 0, f"`dp.noise_multiplier` must be >= 0, got {self.noise_multiplier}")
        _require(self.target_epsilon >= 0, f"`dp.target_epsilon` must be >= 0, got {self.target_epsilon}")
        if self.enabled:
            _require(
                (self.noise_multiplier > 0) != (self.target_epsilon > 0),
                "set exactly one of `dp.noise_multiplier` and `dp.target_epsilon` when `dp.enabled` is true, got "
                f"noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon}",
            )
            _require(
                self.target_epsilon <= self.budget_epsilon,
                f"`dp.target_epsilon` ({self.target_epsilon}) is above `dp.budget_epsilon` ({self.budget_epsilon}): "
                "the run would be refused before its last round; lower the target or raise the budget",
            )
        _require(0 < self.delta < 1, f"`dp.delta` must be in (0, 1), got {self.delta}")
        _require(self.max_grad_norm > 0, f"`dp.max_grad_norm` must be positive, got {self.max_grad_norm}")
        _require(
            self.accountant in ACCOUNTANTS,
            f"`dp.accountant` must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}",
        )
        _require(
            self.grad_sample_mode in GRAD_SAMPLE_MODES,
            f"`dp.grad_sample_mode` must be one of {', '.join(GRAD_SAMPLE_MODES)}, got {self.grad_sample_mode!r}",
        )
        _require(self.budget_epsilon > 0, f"`dp.budget_epsilon` must be positive, got {self.budget_epsilon}")


@dataclass(frozen=True)
class ClientDPSettings:
    """Client-level DP at the coordinator: each site's update clipped, Gaussian noise on the mean.

    Protects whole hospitals (every record of a site at once) against whoever sees the
    global adapter; the coordinator itself sees the clipped, un-noised updates.
    ``max_epsilon`` > 0 stops the federation before a round that would exceed it.
    """

    enabled: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 0.1
    delta: float = 1e-5
    max_epsilon: float = 0.0

    def __post_init__(self) -> None:
        _require(
            self.noise_multiplier > 0, f"`client_dp.noise_multiplier` must be positive, got {self.noise_multiplier}"
        )
        _require(self.clipping_norm > 0, f"`client_dp.clipping_norm` must be positive, got {self.clipping_norm}")
        _require(0 < self.delta < 1, f"`client_dp.delta` must be in (0, 1), got {self.delta}")
        _require(self.max_epsilon >= 0, f"`client_dp.max_epsilon` must be >= 0 (0: no limit), got {self.max_epsilon}")


@dataclass(frozen=True)
class SecuritySettings:
    """Sealed replies and the checks on every update beyond keys, shapes and finiteness.

    ``norm_bound``: an update whose L2 norm is over this many times the median norm of the
    round's other valid updates is rejected (0: off). ``max_update_norm``: an absolute bound
    on one update's L2 norm (0: off). ``secure_aggregation``: train through Flower's SecAgg+
    so the coordinator sees only the weighted mean of the deltas; ``secagg_threshold`` is the
    share of a hospital's key shares needed to unmask it (or a dropped one), and values are
    clipped to +-``secagg_clipping_range`` and quantized to ``secagg_quantization_bits`` bits.
    """

    seal: bool = True
    norm_bound: float = 10.0
    max_update_norm: float = 0.0
    secure_aggregation: bool = False
    secagg_threshold: float = 0.5
    secagg_clipping_range: float = 8.0
    secagg_quantization_bits: int = 22

    def __post_init__(self) -> None:
        _require(
            0 < self.secagg_threshold <= 1,
            f"`security.secagg_threshold` must be in (0, 1] (share of key shares needed), got {self.secagg_threshold}",
        )
        _require(
            self.secagg_clipping_range > 0,
            f"`security.secagg_clipping_range` must be positive, got {self.secagg_clipping_range}",
        )
        _require(
            8 <= self.secagg_quantization_bits <= 30,
            f"`security.secagg_quantization_bits` must be in [8, 30], got {self.secagg_quantization_bits}",
        )
        _require(
            self.norm_bound == 0 or self.norm_bound > 1,
            f"`security.norm_bound` must be 0 (off) or above 1, got {self.norm_bound}",
        )
        _require(
            self.max_update_norm >= 0, f"`security.max_update_norm` must be >= 0 (0: off), got {self.max_update_norm}"
        )
