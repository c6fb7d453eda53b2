"""Experiment configuration: frozen dataclasses, validated once, parsed at the edge.

A config comes from a TOML file (``simulations/default.toml`` is the reference),
from command-line overrides (``section.field=value``), or both. Nothing below the
apps reads raw TOML: they receive an :class:`ExperimentConfig`.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedtune.errors import ConfigError

PARTITIONS = ("natural", "iid", "dirichlet")
LR_SCHEDULES = ("constant", "linear", "cosine")
OPTIMIZERS = ("adamw", "sgd")
PRECISIONS = ("auto", "fp32", "bf16")
STRATEGIES = ("fedavg", "ffa", "svd")
LINEAR_STRATEGIES = ("fedavg", "ffa")  # merges that are sums of the sites' updates (secure aggregation needs one)
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi")
AGGREGATIONS = ("mean", "trimmed_mean", "median")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


@dataclass(frozen=True)
class RunSettings:
    """Name, seed and where run folders go."""

    name: str = "default"
    seed: int = 0
    output_dir: str = "runs"
    baselines: bool = True

    def __post_init__(self) -> None:
        _require(
            bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name),
            f"`run.name` must be letters, digits, '-', '_' or '.', got {self.name!r}",
        )


@dataclass(frozen=True)
class ModelSettings:
    """Which base model, at which precision, on how many threads."""

    source: str = "smollm2"
    precision: str = "auto"
    threads: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        _require(bool(self.source), "`model.source` must name a model: 'smollm2', 'tiny' or a path")
        _require(
            self.precision in PRECISIONS,
            f"`model.precision` must be one of {', '.join(PRECISIONS)}, got {self.precision!r}",
        )
        _require(self.threads >= 0, f"`model.threads` must be >= 0 (0: all cores), got {self.threads}")
        _require(
            self.device in ("auto", "cpu", "cuda"),
            f"`model.device` must be auto, cpu or cuda, got {self.device!r}",
        )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapter shape; everything here changes the adapter spec hash but dropout."""

    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    init_seed: int = 0
    site_ranks: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _require(self.rank >= 1, f"`lora.rank` must be a positive integer, got {self.rank}")
        _require(
            all(r >= 1 for r in self.site_ranks),
            "`lora.site_ranks` must list positive integers (one rank per simulated hospital), "
            f"got {list(self.site_ranks)}",
        )
        _require(self.alpha > 0, f"`lora.alpha` must be a positive integer, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, f"`lora.dropout` must be in [0, 1), got {self.dropout}")
        _require(
            len(self.target_modules) > 0,
            "`lora.target_modules` must list at least one module name, e.g. ['q_proj', 'v_proj']",
        )


@dataclass(frozen=True)
class TrainSettings:
    """The local training loop a site runs each round."""

    local_steps: int = 5
    local_epochs: float = 0.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 2e-3
    optimizer: str = "adamw"
    lr_schedule: str = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 256
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        _require(
            self.proximal_mu >= 0, f"`train.proximal_mu` must be >= 0 (0: no FedProx term), got {self.proximal_mu}"
        )
        _require(self.local_steps >= 1, f"`train.local_steps` must be >= 1, got {self.local_steps}")
        _require(self.local_epochs >= 0, f"`train.local_epochs` must be >= 0, got {self.local_epochs}")
        _require(self.batch_size >= 1, f"`train.batch_size` must be >= 1, got {self.batch_size}")
        _require(self.grad_accum >= 1, f"`train.grad_accum` must be >= 1, got {self.grad_accum}")
        _require(self.lr > 0, f"`train.lr` must be positive, got {self.lr}")
        _require(
            self.optimizer in OPTIMIZERS,
            f"`train.optimizer` must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
        )
        _require(
            self.lr_schedule in LR_SCHEDULES,
            f"`train.lr_schedule` must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}",
        )
        _require(self.warmup_steps >= 0, f"`train.warmup_steps` must be >= 0, got {self.warmup_steps}")
        _require(self.weight_decay >= 0, f"`train.weight_decay` must be >= 0, got {self.weight_decay}")
        _require(self.max_grad_norm > 0, f"`train.max_grad_norm` must be positive, got {self.max_grad_norm}")
        _require(self.max_length >= 16, f"`train.max_length` must be >= 16, got {self.max_length}")


@dataclass(frozen=True)
class DataSettings:
    """Where each site's records come from and how they are split between sites."""

    source: str = "clinical"
    files: tuple[str, ...] = ()
    hospitals: int = 3
    partition: str = "natural"
    dirichlet_alpha: float = 0.5
    train_per_hospital: int = 160
    eval_per_hospital: int = 10
    eval_fraction: float = 0.1

    def __post_init__(self) -> None:
        _require(
            self.source in ("clinical", "files"),
            f"`data.source` must be 'clinical' (embedded) or 'files', got {self.source!r}",
        )
        _require(
            self.source != "files" or len(self.files) > 0,
            "`data.files` must list one file per hospital when `data.source` is 'files'",
        )
        _require(self.hospitals >= 1, f"`data.hospitals` must be >= 1, got {self.hospitals}")
        _require(
            self.partition in PARTITIONS,
            f"`data.partition` must be one of {', '.join(PARTITIONS)}, got {self.partition!r}",
        )
        _require(self.dirichlet_alpha > 0, f"`data.dirichlet_alpha` must be positive, got {self.dirichlet_alpha}")
        _require(self.train_per_hospital >= 1, f"`data.train_per_hospital` must be >= 1, got {self.train_per_hospital}")
        _require(self.eval_per_hospital >= 1, f"`data.eval_per_hospital` must be >= 1, got {self.eval_per_hospital}")
        _require(0 < self.eval_fraction < 1, f"`data.eval_fraction` must be in (0, 1), got {self.eval_fraction}")


@dataclass(frozen=True)
class FederationSettings:
    """Rounds, who takes part in them, and how their updates are merged.

    ``strategy`` is the LoRA merge rule (``fedtune/lora_merge.py``); ``server_optimizer``
    steps the global adapter along the round's merged update with ``server_lr`` (0: the
    optimizer's usual value); ``aggregation`` combines the sites' updates (``mean``:
    weighted by records; ``trimmed_mean`` / ``median``: coordinate-wise, unweighted).
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
    fraction_train: float = 1.0
    min_clients: int = 0
    round_timeout: float = 3600.0
    join_timeout: float = 600.0

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
            0 < self.fraction_train <= 1, f"`federation.fraction_train` must be in (0, 1], got {self.fraction_train}"
        )
        _require(
            self.min_clients >= 0,
            f"`federation.min_clients` must be >= 0 (0: every sampled hospital), got {self.min_clients}",
        )
        _require(self.round_timeout > 0, f"`federation.round_timeout` must be positive, got {self.round_timeout}")
        _require(self.join_timeout > 0, f"`federation.join_timeout` must be positive, got {self.join_timeout}")


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation: teacher-forced loss and greedy generation for the task metric."""

    batch_size: int = 10
    max_new_tokens: int = 44

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"`eval.batch_size` must be >= 1, got {self.batch_size}")
        _require(self.max_new_tokens >= 1, f"`eval.max_new_tokens` must be >= 1, got {self.max_new_tokens}")


ACCOUNTANTS = ("rdp", "prv")
GRAD_SAMPLE_MODES = ("hooks", "functorch")


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


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a simulated federation needs; one section per concern."""

    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    client_dp: ClientDPSettings = field(default_factory=ClientDPSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)

    def __post_init__(self) -> None:
        if self.data.source == "files" and self.data.partition == "natural":
            _require(
                self.data.hospitals == len(self.data.files),
                f"`data.hospitals` must equal the number of `data.files` ({len(self.data.files)}) "
                f"with the natural partition, got {self.data.hospitals}",
            )
        _require(
            not (self.security.secure_aggregation and self.client_dp.enabled),
            "`client_dp.enabled` needs the coordinator to clip each update, which `security.secure_aggregation` "
            "hides from it; turn one off (sample-level `dp` works with secure aggregation)",
        )
        fed = self.federation
        if self.security.secure_aggregation:
            _require(
                fed.strategy in LINEAR_STRATEGIES,
                f"`federation.strategy` = {fed.strategy!r} is not a linear merge, and with "
                "`security.secure_aggregation` the coordinator sees only the sum of the updates; "
                f"choose one of {', '.join(LINEAR_STRATEGIES)} or turn secure aggregation off",
            )
            _require(
                fed.aggregation == "mean",
                f"`federation.aggregation` = {fed.aggregation!r} needs each hospital's update, which "
                "`security.secure_aggregation` hides; use 'mean' or turn secure aggregation off",
            )
        _require(
            not (self.client_dp.enabled and fed.aggregation != "mean"),
            f"`federation.aggregation` = {fed.aggregation!r} does not fit `client_dp` (its noise is calibrated "
            "to the mean of clipped updates); use 'mean' or turn client_dp off",
        )
        if self.lora.site_ranks:
            _require(
                fed.strategy == "svd",
                f"`lora.site_ranks` trains hospitals at different ranks, which only `federation.strategy` = 'svd' "
                f"can merge, got {fed.strategy!r}",
            )
            _require(
                len(self.lora.site_ranks) == self.data.hospitals,
                f"`lora.site_ranks` must give one rank per hospital ({self.data.hospitals}), "
                f"got {list(self.lora.site_ranks)}",
            )
        sampled = self.sampled_per_round()
        _require(
            not self.security.secure_aggregation or sampled >= 3,
            f"`security.secure_aggregation` needs at least 3 hospitals sampled per round, got {sampled}",
        )
        _require(
            self.federation.min_clients <= sampled,
            f"`federation.min_clients` ({self.federation.min_clients}) cannot exceed the hospitals sampled per "
            f"round ({sampled} = `federation.fraction_train` {self.federation.fraction_train} x `data.hospitals` "
            f"{self.data.hospitals}, at least 1); lower it or sample more",
        )

    def sampled_per_round(self) -> int:
        """Hospitals asked to train each round: int(hospitals x fraction_train), at least 1 (Flower's rule)."""
        return max(1, int(self.data.hospitals * self.federation.fraction_train))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain TOML-ready dict (tuples become lists)."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
        return out

    def to_toml(self) -> str:
        """Serialize to TOML text that :func:`parse_config` reads back to an equal config."""
        return tomli_w.dumps(self.to_dict())


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check one TOML value against a dataclass field type; ints widen to floats."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        ok = isinstance(value, annotation) and not (annotation is int and isinstance(value, bool))
        _require(ok, f"`{where}` must be {annotation.__name__}, got {value!r}")
        return value
    if typing.get_origin(annotation) is tuple:
        item = typing.get_args(annotation)[0]
        ok = isinstance(value, list | tuple) and all(
            isinstance(v, item) and not (item is int and isinstance(v, bool)) for v in value
        )
        _require(ok, f"`{where}` must be a list of {'integers' if item is int else 'strings'}, got {value!r}")
        return tuple(value)
    raise ConfigError(f"`{where}` has an unsupported type {annotation!r}")  # pragma: no cover


def _section(cls: type, table: Mapping[str, Any], name: str) -> Any:
    _require(isinstance(table, Mapping), f"`{name}` must be a table, got {table!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in table.items():
        py_key = key.replace("-", "_")
        if py_key not in known:
            raise ConfigError(f"unknown field `{name}.{key}`; known fields: {', '.join(sorted(known))}")
        kwargs[py_key] = _coerce(value, hints[py_key], f"{name}.{key}")
    return cls(**kwargs)


def config_from_dict(data: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config from a nested dict (TOML tables)."""
    sections = {f.name: f for f in dataclasses.fields(ExperimentConfig)}
    kwargs: dict[str, Any] = {}
    for name, table in data.items():
        if name not in sections:
            raise ConfigError(f"unknown section `[{name}]`; known sections: {', '.join(sections)}")
        cls = typing.get_type_hints(ExperimentConfig)[name]
        kwargs[name] = _section(cls, table, name)
    return ExperimentConfig(**kwargs)


def parse_config(text: str, *, source: str = "<config>") -> ExperimentConfig:
    """Parse TOML text; errors name the source file."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML ({err}); fix the syntax") from err
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def load_config(path: str | Path | None, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Load a TOML config (or the defaults when ``path`` is None) and apply overrides.

    ``overrides`` maps dotted keys (``"train.local_steps"``) to values.
    """
    data: dict[str, dict[str, Any]] = {}
    source = "<defaults and command line>"
    if path is not None:
        p = Path(path)
        source = str(p)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"{p}: cannot read config ({err.strerror}); check the path") from err
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"{p}: not valid TOML ({err}); fix the syntax") from err
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        _require(bool(key), f"override `{dotted}` must look like section.field")
        data.setdefault(section, {})[key] = value
    try:
        return config_from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err


def replace(cfg: ExperimentConfig, **sections: Mapping[str, Any]) -> ExperimentConfig:
    """Copy ``cfg`` with some fields of some sections changed (validated again)."""
    kwargs: dict[str, Any] = {}
    for name, changes in sections.items():
        kwargs[name] = dataclasses.replace(getattr(cfg, name), **changes)
    return dataclasses.replace(cfg, **kwargs)
