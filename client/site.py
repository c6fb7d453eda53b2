"""The hospital's resident runtime: base model loaded once per process, data tokenized once.

Flower calls the ClientApp once per message; in simulation the same worker process
serves many rounds (and several simulated sites). The base model with its LoRA layers
stays resident here across rounds; each round only the adapter tensors are swapped in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import DPSettings, ExperimentConfig, LoraSettings, ModelSettings, parse_config, replace
from fedtune.data import load_records, split_train_eval
from fedtune.errors import ConfigError
from fedtune.hospital import HospitalConfig, load_hospital_config
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


@dataclass(frozen=True)
class HospitalSite:
    """A real hospital's view of a run: its own settings over the coordinator's."""

    hospital: HospitalConfig
    cfg: ExperimentConfig
    seed_index: int
    runtime: SiteRuntime
    data: SiteData
    run_id: str
    sealer: Sealer | None
    refusal: str


_HOSPITALS: dict[tuple[Path, str, str], HospitalSite] = {}


def policy_refusal(hospital: HospitalConfig, cfg: ExperimentConfig) -> str:
    """Why this hospital's privacy policy refuses the run's rounds ("" when it does not)."""
    policy = hospital.privacy
    if policy.require_dp and not cfg.dp.enabled:
        return "this hospital trains only with DP-SGD (`privacy.require_dp`) and the run has `dp.enabled = false`"
    if cfg.dp.enabled and 0 < cfg.dp.noise_multiplier < policy.min_noise_multiplier:
        return (
            f"the run's noise multiplier {cfg.dp.noise_multiplier:g} is below this hospital's floor "
            f"{policy.min_noise_multiplier:g} (`privacy.min_noise_multiplier`)"
        )
    return ""


def hospital_site(config: Path, experiment: str, run_dir: str) -> HospitalSite:
    """The resident view of hospital ``config`` for the run whose settings are ``experiment``.

    The hospital's model folder, device and precision replace the run's; its privacy
    budget and delta replace the run's (the ledger is the hospital's, across all runs).
    """
    key = (config, experiment, run_dir)
    if key in _HOSPITALS:
        return _HOSPITALS[key]
    hospital = load_hospital_config(config)
    run_cfg = parse_config(experiment, source="the coordinator's run settings")
    model = hospital.model
    source = model.path if model.path in ("smollm2", "tiny") else str(hospital.path(model.path))
    refusal = policy_refusal(hospital, run_cfg)
    try:
        cfg = replace(
            run_cfg,
            model={"source": source, "device": model.device, "precision": model.precision, "threads": model.threads},
            dp={"budget_epsilon": hospital.privacy.budget_epsilon, "delta": hospital.privacy.delta, "ledger_dir": ""},
        )
    except ConfigError as err:
        refusal = refusal or f"the run's DP settings do not fit this hospital's policy: {err}"
        cfg = replace(run_cfg, model={"source": source, "device": model.device, "precision": model.precision})
    runtime = runtime_for(cfg.model, cfg.lora)
    train = [e for f in hospital.data.train for e in load_records(hospital.path(f), site=hospital.name)]
    if hospital.data.eval:
        held = [e for f in hospital.data.eval for e in load_records(hospital.path(f), site=hospital.name)]
    else:
        train, held = split_train_eval(train, eval_fraction=hospital.data.eval_fraction, seed=cfg.run.seed)
    data = site_data(runtime, hospital.name, train, held, cfg.train.max_length)
    sealer = None
    if cfg.security.seal:
        own = load_private(hospital.path(hospital.keys.envelope_key))
        sealer = Sealer(own, load_public(hospital.path(hospital.coordinator.envelope_key)))
    seed_index = int.from_bytes(hashlib.sha256(hospital.name.encode()).digest()[:4], "big") % 10_007
    site = HospitalSite(hospital, cfg, seed_index, runtime, data, Path(run_dir).name, sealer, refusal)
    _HOSPITALS.clear()  # one run at a time keeps its data resident
    _HOSPITALS[key] = site
    return site
