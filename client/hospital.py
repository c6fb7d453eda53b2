"""The hospital's daemon configuration (``hospital.toml``), validated whole at start.

Everything the hospital decides for itself lives here, not in the coordinator's run
config: where the coordinator is and how to trust it, the hospital's keys, its data,
its model folder and device, its privacy policy (a lifetime budget per record and a floor
the coordinator cannot go below), and where its ledger, audit trail and logs go.
Relative paths are relative to the file's folder, whatever folder the command runs
from; they are resolved here, once, and child processes get absolute paths. Every error
is one line naming the file and the field.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.config import ModelSettings, _require, _section, parse_address
from fedtune.errors import ConfigError, FedTuneError


@dataclass(frozen=True)
class HospitalSection:
    name: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.name), "`hospital.name` is required: the name the coordinator registered")
        ok = len(self.name) <= 64 and all(c.isalnum() or c in "-_." for c in self.name) and self.name[0] != "."
        _require(ok, f"`hospital.name` must be 1-64 letters, digits, '-', '_' or '.', got {self.name!r}")


@dataclass(frozen=True)
class CoordinatorSection:
    address: str = ""
    ca: str = ""
    envelope_key: str = ""

    def __post_init__(self) -> None:
        _require(bool(self.address), "`coordinator.address` is required (HOST:PORT of the coordinator)")
        parse_address(self.address, "coordinator.address")


@dataclass(frozen=True)
class KeysSection:
    node_key: str = ""
    envelope_key: str = ""


@dataclass(frozen=True)
class HospitalData:
    train: tuple[str, ...] = ()
    eval: tuple[str, ...] = ()
    eval_fraction: float = 0.1

    def __post_init__(self) -> None:
        _require(bool(self.train), "`data.train` must list at least one file of training records")
        _require(0 < self.eval_fraction < 1, f"`data.eval_fraction` must be in (0, 1), got {self.eval_fraction}")


@dataclass(frozen=True)
class HospitalModel:
    """The hospital's model folder and how it loads it: device, precision, threads; a quantized
    base ("": the run's `model.quantization`) and gradient checkpointing (on when the run or the
    hospital turns it on): memory is the hospital's to plan, and neither changes the base hash."""

    path: str = "smollm2"
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    lora_rank: int = 0
    quantization: str = ""
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        ModelSettings(
            source=self.path,
            precision=self.precision,
            threads=self.threads,
            device=self.device,
            quantization=self.quantization or "none",
        )
        _require(self.lora_rank >= 0, f"`model.lora_rank` must be >= 0 (0: the run's rank), got {self.lora_rank}")

    def settings(self) -> ModelSettings:
        return ModelSettings(
            source=self.path,
            precision=self.precision,
            threads=self.threads,
            device=self.device,
            quantization=self.quantization or "none",
            gradient_checkpointing=self.gradient_checkpointing,
        )


@dataclass(frozen=True)
class PrivacyPolicy:
    require_dp: bool = True
    min_noise_multiplier: float = 0.0
    budget_epsilon: float = 10.0
    delta: float = 1e-5
    ledger: str = "privacy.json"

    def __post_init__(self) -> None:
        _require(self.min_noise_multiplier >= 0, "`privacy.min_noise_multiplier` must be >= 0")
        _require(self.budget_epsilon > 0, f"`privacy.budget_epsilon` must be positive, got {self.budget_epsilon}")
        _require(0 < self.delta < 1, f"`privacy.delta` must be in (0, 1), got {self.delta}")


@dataclass(frozen=True)
class AuditSection:
    log: str = "audit.jsonl"


RELEASE_METRICS = ("field_accuracy", "loss")


@dataclass(frozen=True)
class ReleasePolicy:
    """The release gate: which global adapter the hospital adopts for its own use
    (:mod:`fedtune.client.release`); it decides locally and sends nothing."""

    enabled: bool = True
    metric: str = "field_accuracy"
    max_drop: float = 0.02
    min_metric: float = 0.0
    max_audit_auc: float = 0.0
    audit_members: int = 200

    def __post_init__(self) -> None:
        _require(
            self.metric in RELEASE_METRICS,
            f"`release.metric` must be one of {', '.join(RELEASE_METRICS)}, got {self.metric!r}",
        )
        _require(
            0 <= self.max_drop < float("inf"),
            f"`release.max_drop` must be >= 0 (how much worse than the adopted adapter), got {self.max_drop}",
        )
        _require(
            0 <= self.min_metric <= 1,
            f"`release.min_metric` must be a field accuracy in [0, 1] (0: no floor), got {self.min_metric}",
        )
        _require(
            self.max_audit_auc == 0 or 0.5 < self.max_audit_auc <= 1,
            f"`release.max_audit_auc` must be 0 (no audit) or in (0.5, 1] (0.5 is chance), got {self.max_audit_auc}",
        )
        _require(
            10 <= self.audit_members <= 100_000,
            f"`release.audit_members` must be 10-100000 records per side, got {self.audit_members}",
        )


@dataclass(frozen=True)
class DaemonSection:
    state_dir: str = "state"
    health: str = "127.0.0.1:9094"
    log_file: str = ""
    log_max_mb: float = 50.0
    log_backups: int = 5

    def __post_init__(self) -> None:
        host, _ = parse_address(self.health, "daemon.health")
        _require(
            host in ("127.0.0.1", "localhost", "::1"),
            f"`daemon.health` must listen on loopback (127.0.0.1:PORT), got {self.health!r}",
        )
        _require(
            self.log_max_mb == 0 or 0.01 <= self.log_max_mb <= 100_000,
            f"`daemon.log_max_mb` must be 0 (never rotate) or 0.01-100000 (MB), got {self.log_max_mb}",
        )
        _require(
            0 <= self.log_backups <= 100, f"`daemon.log_backups` must be 0-100 rotated files, got {self.log_backups}"
        )


@dataclass(frozen=True)
class HospitalConfig:
    """A parsed, field-checked ``hospital.toml``; ``check_files`` checks what it points at."""

    hospital: HospitalSection = field(default_factory=HospitalSection)
    coordinator: CoordinatorSection = field(default_factory=CoordinatorSection)
    keys: KeysSection = field(default_factory=KeysSection)
    data: HospitalData = field(default_factory=HospitalData)
    model: HospitalModel = field(default_factory=HospitalModel)
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    audit: AuditSection = field(default_factory=AuditSection)
    release: ReleasePolicy = field(default_factory=ReleasePolicy)
    daemon: DaemonSection = field(default_factory=DaemonSection)
    source: Path = Path("hospital.toml")

    def __post_init__(self) -> None:
        # the daemon's log is rotated (renamed, dropped): it must not be a file that may never lose a line
        for f, other in (("privacy.ledger", self.ledger_path), ("audit.log", self.audit_path)):
            _require(
                self.log_path != other,
                f"`daemon.log_file` must not be the same file as `{f}` ({other}): the log is rotated",
            )

    @property
    def name(self) -> str:
        return self.hospital.name

    def path(self, value: str) -> Path:
        """A path of the config, relative to the file's folder."""
        p = Path(value).expanduser()
        return p if p.is_absolute() else (self.source.parent / p).resolve()

    @property
    def state_dir(self) -> Path:
        return self.path(self.daemon.state_dir)

    @property
    def ledger_path(self) -> Path:
        return self.path(self.privacy.ledger)

    @property
    def audit_path(self) -> Path:
        return self.path(self.audit.log)

    @property
    def release_dir(self) -> Path:
        """The release gate's state: the adopted adapter and the decisions."""
        return self.state_dir / "release"

    @property
    def log_path(self) -> Path:
        return self.path(self.daemon.log_file) if self.daemon.log_file else self.state_dir / "client.log.jsonl"

    def check_files(self, *, insecure: bool = False) -> None:
        """Everything the daemon will open: present, readable, private where secret, the right kind.

        ``insecure``: no TLS and no node authentication, so the CA and node key may be absent.
        """
        self._check_keys(insecure=insecure)
        for i, value in enumerate((*self.data.train, *self.data.eval)):
            f = f"data.train[{i}]" if i < len(self.data.train) else f"data.eval[{i - len(self.data.train)}]"
            p = self.path(value)
            if not p.is_file() or not os.access(p, os.R_OK):
                raise ConfigError(f"{self._where(f)}: {p} is not a readable file")
        if self.model.path not in ("smollm2", "tiny"):
            folder = self.path(self.model.path)
            if not (folder / "config.json").is_file():
                raise ConfigError(f"{self._where('model.path')}: {folder} is not a model folder (no config.json)")
        for f, p in (
            ("privacy.ledger", self.ledger_path.parent),
            ("audit.log", self.audit_path.parent),
            ("daemon.log_file", self.log_path.parent),
            ("daemon.state_dir", self.state_dir),
        ):
            target = p
            while not target.exists() and target != target.parent:
                target = target.parent
            if not os.access(target, os.W_OK):
                raise ConfigError(f"{self._where(f)}: {p} is not writable by this user")

    def _where(self, f: str) -> str:
        return f"{self.source}: `{f}`"

    def _check_keys(self, *, insecure: bool) -> None:
        """The CA, the coordinator's key and the hospital's own: given, present, loadable, whose they say."""
        from fedtune.security import pki
        from fedtune.security.keys import load_private, load_public

        required = {
            "coordinator.ca": self.coordinator.ca,
            "coordinator.envelope_key": self.coordinator.envelope_key,
            "keys.node_key": self.keys.node_key,
            "keys.envelope_key": self.keys.envelope_key,
        }
        if insecure:
            required = {k: v for k, v in required.items() if k not in ("coordinator.ca", "keys.node_key")}
        for f, value in required.items():
            if not value:
                raise ConfigError(
                    f"{self._where(f)} is required (TLS and node authentication are on unless --insecure); "
                    "see `fedtune client example-config`"
                )
        given = {"coordinator.ca": "ca.pem", "coordinator.envelope_key": "coordinator.pub"}
        for f, name in given.items():
            p = self.path(required[f]) if f in required else None
            if p is not None and not p.exists():  # the hospital does not make these: the coordinator gives them
                raise ConfigError(
                    f"{self._where(f)}: {p} does not exist: copy the coordinator's {name} there (it is public: the "
                    "coordinator sends it with your admission; compare its fingerprint, `fedtune pki show`)"
                )
        try:
            if not insecure:
                pki.load_cert(self.path(self.coordinator.ca), "CA certificate")
                pki.load_node_private(self.path(self.keys.node_key))
            coordinator = load_public(self.path(self.coordinator.envelope_key))
            own = load_private(self.path(self.keys.envelope_key))
        except FedTuneError as err:
            raise ConfigError(f"{self.source}: {err}") from err
        if coordinator.role != "coordinator":
            raise ConfigError(
                f"{self._where('coordinator.envelope_key')} holds a {coordinator.role} key, not the coordinator's"
            )
        if own.role != "hospital" or own.name != self.name:
            raise ConfigError(
                f"{self._where('keys.envelope_key')} is the key of {own.role} {own.name!r}, not of hospital "
                f"{self.name!r}"
            )


SECTIONS = {f.name: f for f in dataclasses.fields(HospitalConfig) if f.name != "source"}


def load_hospital_config(path: str | Path, *, check_files: bool = True, insecure: bool = False) -> HospitalConfig:
    """Read and validate ``hospital.toml``; one-line ``ConfigError`` naming the file and field."""
    source = Path(path).expanduser().resolve()
    try:
        data: dict[str, Any] = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise ConfigError(f"{source}: no such file; write one from `fedtune client example-config`") from err
    except OSError as err:
        raise ConfigError(f"{source}: cannot read the hospital config ({err.strerror})") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML ({err}); fix the syntax") from err
    hints = typing.get_type_hints(HospitalConfig)
    kwargs: dict[str, Any] = {"source": source}
    try:
        for name, table in data.items():
            if name not in SECTIONS:
                raise ConfigError(f"unknown section `[{name}]`; known sections: {', '.join(SECTIONS)}")
            kwargs[name] = _section(hints[name], table, name)
        for name in ("hospital", "coordinator"):
            if name not in kwargs:
                hints[name]()  # raises the "is required" error of the section's first field
        cfg = HospitalConfig(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{source}: {err}") from err
    if check_files:
        cfg.check_files(insecure=insecure)
    return cfg
