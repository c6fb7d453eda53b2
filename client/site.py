"""The hospital's resident runtime: base model loaded once per process, data tokenized once.

Flower calls the ClientApp once per message; in simulation the same worker process
serves many rounds (and several simulated sites). The base model with its LoRA layers
stays resident here across rounds; each round only the adapter tensors are swapped in.
"""

from __future__ import annotations

from pathlib import Path

from fedtune.config import DPSettings, ExperimentConfig, LoraSettings, ModelSettings
from fedtune.keys import load_private, load_public
from fedtune.runfolder import RunFolder
from fedtune.runtime import SiteData, SiteRuntime, site_data
from fedtune.wire import Sealer

_RUNTIMES: dict[tuple[ModelSettings, LoraSettings], SiteRuntime] = {}
_DATA: dict[tuple[Path, str, int], SiteData] = {}
_LOADS = {"base-model": 0}
_SEALERS: dict[tuple[Path, str], Sealer] = {}


def runtime_for(model: ModelSettings, lora: LoraSettings) -> SiteRuntime:
    """The process-wide resident runtime for this model and adapter shape."""
    key = (model, lora)
    if key not in _RUNTIMES:
        _RUNTIMES.clear()  # a different model replaces the old one; never hold two
        _RUNTIMES[key] = SiteRuntime(model, lora)
        _LOADS["base-model"] += 1
    return _RUNTIMES[key]


def base_model_loads() -> int:
    """How many times this process loaded a base model (1 when residency works)."""
    return _LOADS["base-model"]


def simulated_site(run_dir: Path, partition_id: int, cfg: ExperimentConfig) -> tuple[SiteRuntime, SiteData]:
    """Runtime and data of simulated site ``partition_id`` of the run in ``run_dir``."""
    runtime = runtime_for(cfg.model, cfg.lora)
    key = (run_dir, cfg.model.source, partition_id)
    if key not in _DATA:
        folder = RunFolder(run_dir)
        site = folder.sites()[partition_id]
        train, evaluation = folder.read_site(site)
        _DATA[key] = site_data(runtime, site, train, evaluation, cfg.train.max_length)
    return runtime, _DATA[key]


def round_seed(run_seed: int, partition_id: int, server_round: int) -> int:
    """A distinct, reproducible batch-order seed per run, site and round."""
    return (run_seed * 1_000_003 + partition_id * 10_007 + server_round) % (2**31)


def simulated_ledger_path(run_dir: Path, site: str, dp: DPSettings) -> Path:
    """Where simulated hospital ``site`` keeps its privacy ledger: one file per hospital.

    ``dp.ledger_dir`` (absolute once the run is prepared) lets ledgers outlive a run, as a
    real hospital's does; the default keeps them in the run folder.
    """
    folder = Path(dp.ledger_dir) if dp.ledger_dir else run_dir / "privacy"
    return folder / f"{site}.json"


def simulated_audit_path(run_dir: Path, site: str) -> Path:
    """Where simulated hospital ``site`` keeps its audit trail of outgoing messages."""
    return run_dir / "audit" / f"{site}.jsonl"


def simulated_sealer(run_dir: Path, site: str) -> Sealer:
    """Simulated hospital ``site``'s keys and the coordinator's public identity, from the run folder."""
    key = (run_dir, site)
    if key not in _SEALERS:
        folder = RunFolder(run_dir)
        keys = load_private(folder.hospital_key(site))
        if keys.name != site:
            raise ValueError(f"{folder.hospital_key(site)} holds the key of {keys.name!r}, not {site!r}")
        _SEALERS[key] = Sealer(keys, load_public(folder.coordinator_key.with_suffix(".pub")))
    return _SEALERS[key]
