"""The layout of a run folder: one place that knows where each file of a run lives.

```
<run>/config.toml            the resolved experiment config (the run's identity)
<run>/data/sites.json        site ids in partition order
<run>/data/<site>/{train,eval}.jsonl
<run>/checkpoints/           round-NNNN.safetensors + latest.json
<run>/metrics.jsonl          per round: per site and pooled
<run>/witness.jsonl          every sealed reply received: its sender's audit head and content hash
<run>/status.json            the round loop's live state: round, phase, each hospital's message (fedtune.live)
<run>/progress.jsonl         (simulations) each hospital's training steps inside a round (fedtune.progress)
<run>/tracking.json          the MLflow run this folder logs into, with [tracking] (fedtune.tracking)
<run>/audit/<site>.jsonl     (simulations) each simulated hospital's audit trail, with .head
<run>/privacy-audit/<site>.jsonl   ([privacy_audit]) each simulated hospital's privacy audit per round
<run>/data/<site>/canaries.json   and audit-nonmembers.jsonl: its canaries and extra held-out records
<run>/adapter/               the final global adapter in PEFT format
<run>/baselines.json         base / local-only / centralized results
<run>/summary.md, plots/     the comparison table and PNG plots
<run>/logs/                  Flower and SuperLink logs
<run>/app/, flwr/, ray/      the Flower app bundle, FLWR_HOME, Ray's temp dir
<run>/keys/                  coordinator.{key,pub}, hospitals/<site>.{key,pub}, allowlist/<site>.pub
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fedtune.atomic import atomic_write_bytes, atomic_write_json
from fedtune.config import ExperimentConfig, load_config
from fedtune.data.records import Example, load_records, write_records
from fedtune.errors import CheckpointError, ConfigError
from fedtune.live import STATUS
from fedtune.security.keys import KeyPair, save_keys


def new_folder(root: Path | None, *, parent: str, stem: str, what: str) -> Path:
    """``root``, or ``<parent>/<stem>-<UTC time>`` when None; a ``what`` folder that already
    holds anything is refused (its work would be overwritten)."""
    if root is None:
        root = Path(parent) / f"{stem}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"
    if root.exists() and any(root.iterdir()):
        raise ConfigError(f"{what} folder {root} already exists and is not empty; use --resume or another --out")
    return root


@dataclass(frozen=True)
class RunFolder:
    """Paths inside one run folder."""

    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "config.toml"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def status_path(self) -> Path:
        return self.root / STATUS

    @property
    def witness_path(self) -> Path:
        return self.root / "witness.jsonl"

    @property
    def nodes_path(self) -> Path:
        """Deployment: which hospital each Flower node id was admitted as (written at every launch)."""
        return self.root / "nodes.json"

    def node_names(self) -> dict[int, str]:
        """Flower node id -> hospital name; empty in simulation or when unreadable (replies then name node ids)."""
        try:
            return {int(k): str(v) for k, v in json.loads(self.nodes_path.read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    @property
    def adapter_dir(self) -> Path:
        return self.root / "adapter"

    @property
    def baselines_path(self) -> Path:
        return self.root / "baselines.json"

    @property
    def plots_dir(self) -> Path:
        return self.root / "plots"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def app_dir(self) -> Path:
        return self.root / "app"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def coordinator_key(self) -> Path:
        return self.keys_dir / "coordinator.key"

    @property
    def allowlist_dir(self) -> Path:
        return self.keys_dir / "allowlist"

    def hospital_key(self, site: str) -> Path:
        return self.keys_dir / "hospitals" / f"{site}.key"

    def write_keys(self, sites: list[str]) -> None:
        """Key pairs for the coordinator and every simulated hospital, and the coordinator's allow-list.

        In a simulation every party's private key sits in this one folder; in a deployment each
        stays on its own machine (``fedtune keys create``).
        """
        save_keys(KeyPair.generate("coordinator", "coordinator"), self.keys_dir)
        for site in sites:
            pair = KeyPair.generate(site, "hospital")
            save_keys(pair, self.keys_dir / "hospitals")
            atomic_write_bytes(self.allowlist_dir / f"{site}.pub", pair.public.to_json())

    def load_config(self) -> ExperimentConfig:
        if not self.config_path.is_file():
            raise CheckpointError(f"{self.root}: no config.toml; this is not a fedtune run folder")
        return load_config(self.config_path)

    def sites(self) -> list[str]:
        path = self.data_dir / "sites.json"
        try:
            return list(json.loads(path.read_text())["sites"])
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"{path}: missing or unreadable; the run folder is incomplete") from err

    def write_sites(self, sites: dict[str, tuple[list[Example], list[Example]]]) -> None:
        """Materialise each site's train/eval split, so every process reads the same data."""
        for site, (train, evaluation) in sites.items():
            write_records(self.data_dir / site / "train.jsonl", train)
            write_records(self.data_dir / site / "eval.jsonl", evaluation)
        atomic_write_json(self.data_dir / "sites.json", {"sites": list(sites)})

    def read_site(self, site: str) -> tuple[list[Example], list[Example]]:
        folder = self.data_dir / site
        return (
            load_records(folder / "train.jsonl", site=site),
            load_records(folder / "eval.jsonl", site=site),
        )
