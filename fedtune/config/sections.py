"""The sections of a site's work: run, model, LoRA adapter, local training, data, evaluation."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config.names import (
    LR_SCHEDULES,
    MAX_CLINICAL_HOSPITALS,
    OPTIMIZERS,
    PARTITIONS,
    PRECISIONS,
    QUANTIZATIONS,
)
from fedtune.errors import ConfigError


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
    """Which base model, at which precision, on how many threads, and how it is held in memory.

    ``quantization`` loads the frozen base through bitsandbytes (``4bit``: NF4 with double
    quantization, computing in ``precision``'s dtype; ``8bit``: LLM.int8); ``kbit_prepare``
    applies peft's ``prepare_model_for_kbit_training`` to a quantized base (norms and
    embeddings in float32); ``gradient_checkpointing`` recomputes activations in the
    backward pass (less memory, more time, the same gradients).
    """

    source: str = "smollm2"
    precision: str = "auto"
    threads: int = 0
    device: str = "auto"
    quantization: str = "none"
    kbit_prepare: bool = True
    gradient_checkpointing: bool = False

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
        _require(
            self.quantization in QUANTIZATIONS,
            f"`model.quantization` must be one of {', '.join(QUANTIZATIONS)}, got {self.quantization!r}",
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
            self.source != "clinical" or self.hospitals <= MAX_CLINICAL_HOSPITALS,
            f"`data.hospitals` must be at most {MAX_CLINICAL_HOSPITALS} with the embedded clinical task "
            f"(that many distinct hospital profiles), got {self.hospitals}",
        )
        _require(
            self.partition in PARTITIONS,
            f"`data.partition` must be one of {', '.join(PARTITIONS)}, got {self.partition!r}",
        )
        _require(self.dirichlet_alpha > 0, f"`data.dirichlet_alpha` must be positive, got {self.dirichlet_alpha}")
        _require(self.train_per_hospital >= 1, f"`data.train_per_hospital` must be >= 1, got {self.train_per_hospital}")
        _require(self.eval_per_hospital >= 1, f"`data.eval_per_hospital` must be >= 1, got {self.eval_per_hospital}")
        _require(0 < self.eval_fraction < 1, f"`data.eval_fraction` must be in (0, 1), got {self.eval_fraction}")


@dataclass(frozen=True)
class EvalSettings:
    """Held-out evaluation: teacher-forced loss and greedy generation for the task metric."""

    batch_size: int = 10
    max_new_tokens: int = 44

    def __post_init__(self) -> None:
        _require(self.batch_size >= 1, f"`eval.batch_size` must be >= 1, got {self.batch_size}")
        _require(self.max_new_tokens >= 1, f"`eval.max_new_tokens` must be >= 1, got {self.max_new_tokens}")


def parse_address(value: str, where: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) with a port in 1-65535."""
    host, sep, port = value.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    ok = bool(sep and host and port.isdigit() and 0 < int(port) < 65536) and not any(c in host for c in " /@")
    _require(ok, f"`{where}` must be HOST:PORT (no scheme), got {value!r}")
    return host, int(port)
