"""The hospital's resident runtime: base model loaded once per process, data tokenized once.

Flower calls the ClientApp once per message; in simulation the same worker process
serves many rounds (and several simulated sites). The base model with its LoRA layers
stays resident here across rounds; each round only the adapter tensors are swapped in.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

from fedtune.client.audit import AuditLog
from fedtune.client.dp_round import open_ledger, plan_mechanism
from fedtune.client.hospital import HospitalConfig, load_hospital_config
from fedtune.config import DPSettings, ExperimentConfig, LoraSettings, ModelSettings, parse_config, replace
from fedtune.data.partition import split_train_eval
from fedtune.data.records import load_records, record_digests
from fedtune.errors import ConfigError, PrivacyError
from fedtune.lora.merge import MergeRule, make_rule
from fedtune.runfolder import RunFolder
from fedtune.runtime import SiteData, SiteRuntime, site_data
from fedtune.security.keys import load_private, load_public
from fedtune.wire import Identity, Sealer

_RUNTIMES: dict[tuple[ModelSettings, LoraSettings], SiteRuntime] = {}
_DATA: dict[tuple[Path, str, int], SiteData] = {}
_LOADS = {"base-model": 0}
_SEALERS: dict[tuple[Path, str], Sealer] = {}


def runtime_for(model: ModelSettings, lora: LoraSettings) -> SiteRuntime:
    """The process-wide resident runtime for this model and adapter shape."""
    key = (model, lora)
    if key not in _RUNTIMES:
        if any(m != model for m, _ in _RUNTIMES):
            _RUNTIMES.clear()  # a different model replaces the old one; never hold two
        # the same model with other LoRA layers (simulated hospitals at their own ranks) is kept beside
        _RUNTIMES[key] = SiteRuntime(model, lora)
        _LOADS["base-model"] += 1
    return _RUNTIMES[key]


def base_model_loads() -> int:
    """How many times this process loaded a base model (1 when residency works)."""
    return _LOADS["base-model"]


def simulated_site(
    run_dir: Path, partition_id: int, cfg: ExperimentConfig, *, rank: int = 0
) -> tuple[SiteRuntime, SiteData]:
    """Runtime (at ``rank``; 0: the run's) and data of simulated site ``partition_id`` of the run in ``run_dir``."""
    runtime = runtime_for(cfg.model, site_lora(cfg, rank))
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
class Site:
    """Everything a ClientApp process holds for the hospital a message is for."""

    cfg: ExperimentConfig  # the run's settings as this hospital applies them (its model, its DP policy)
    seed_index: int  # the simulated site's index; a real hospital's from its name
    runtime: SiteRuntime  # the base model with this hospital's LoRA layers (its own rank under `svd`)
    data: SiteData
    run_id: str
    sealer: Sealer | None
    ledger_path: Path
    audit_path: Path
    refusal: str = ""  # the hospital's policy refuses this run's rounds, and says why

    @property
    def rule(self) -> MergeRule:
        """The run's merge rule, for the run's (global) adapter."""
        lora = self.cfg.lora
        return make_rule(self.cfg.federation.strategy, alpha=lora.alpha, rank=lora.rank, seed=lora.init_seed)

    def identity(self) -> Identity:
        return self.runtime.identity(self.data.site, run_lora=self.cfg.lora)

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.audit_path)

    def privacy_spent(self) -> tuple[float | None, float | None, int | None]:
        """Epsilon spent so far on this hospital's training records, at the policy's delta, and
        how many releases its ledger holds (what the audit trail records; None without DP)."""
        if not self.cfg.dp.enabled:
            return None, None, None
        ledger = open_ledger(self.ledger_path, self.cfg.dp)
        dataset = ledger.register(record_digests(self.data.train), label=self.data.site)
        return ledger.spent(dataset), self.cfg.dp.delta, ledger.releases()


def site_lora(cfg: ExperimentConfig, rank: int = 0) -> LoraSettings:
    """The adapter a hospital trains: the run's, at ``rank`` (0: the run's rank)."""
    return dataclasses.replace(cfg.lora, rank=rank or cfg.lora.rank, site_ranks=())


def simulated(run_dir: Path, partition_id: int) -> Site:
    """Simulated hospital ``partition_id`` of the run in ``run_dir``, with everything it holds."""
    cfg = RunFolder(run_dir).load_config()
    ranks = cfg.lora.site_ranks
    runtime, data = simulated_site(run_dir, partition_id, cfg, rank=ranks[partition_id] if ranks else 0)
    sealer = simulated_sealer(run_dir, data.site) if cfg.security.seal else None
    return Site(
        cfg,
        partition_id,
        runtime,
        data,
        run_dir.name,
        sealer,
        simulated_ledger_path(run_dir, data.site, cfg.dp),
        simulated_audit_path(run_dir, data.site),
    )


_HOSPITALS: dict[tuple[Path, str, str], Site] = {}


def policy_refusal(hospital: HospitalConfig, cfg: ExperimentConfig, *, num_examples: int) -> str:
    """Why this hospital's privacy policy refuses the run's rounds ("" when it does not).

    ``cfg`` is the run as this hospital applies it (its delta and budget) and
    ``num_examples`` its number of training examples: with ``dp.target_epsilon`` the noise
    is this hospital's own plan (:func:`plan_mechanism`: its examples, the run's rounds,
    steps and batch size), and the floor holds for that noise just as for a fixed
    ``dp.noise_multiplier``.
    """
    policy = hospital.privacy
    rank = hospital.model.lora_rank
    if rank and rank != cfg.lora.rank and cfg.federation.strategy != "svd":
        return (
            f"this hospital trains at rank {rank} (`model.lora_rank`) but the run's strategy "
            f"{cfg.federation.strategy!r} needs rank {cfg.lora.rank}; only 'svd' merges mixed ranks"
        )
    if policy.require_dp and not cfg.dp.enabled:
        return "this hospital trains only with DP-SGD (`privacy.require_dp`) and the run has `dp.enabled = false`"
    if not cfg.dp.enabled:
        return ""
    try:
        planned = plan_mechanism(cfg.dp, cfg.train, num_examples=num_examples, num_rounds=cfg.federation.rounds)
    except (ConfigError, PrivacyError) as err:
        return f"this hospital cannot plan the run's DP-SGD noise: {err}"
    if planned.noise_multiplier >= policy.min_noise_multiplier:
        return ""
    if cfg.dp.noise_multiplier > 0:
        noise = f"the run's noise multiplier {planned.noise_multiplier:g}"
    else:
        noise = (
            f"the noise multiplier {planned.noise_multiplier:.4g} this hospital plans for the run's "
            f"`dp.target_epsilon` = {cfg.dp.target_epsilon:g} over {cfg.federation.rounds} rounds "
            f"({num_examples} training examples)"
        )
    return (
        f"{noise} is below this hospital's floor {policy.min_noise_multiplier:g} "
        "(`privacy.min_noise_multiplier`); it trains only with at least that much noise"
    )


def hospital_site(config: Path, experiment: str, run_dir: str) -> Site:
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
    misfit = ""
    try:
        cfg = replace(
            run_cfg,
            model={"source": source, "device": model.device, "precision": model.precision, "threads": model.threads},
            dp={"budget_epsilon": hospital.privacy.budget_epsilon, "delta": hospital.privacy.delta, "ledger_dir": ""},
        )
    except ConfigError as err:
        misfit = f"the run's DP settings do not fit this hospital's policy: {err}"
        cfg = replace(run_cfg, model={"source": source, "device": model.device, "precision": model.precision})
    # its own rank where the run can merge it (svd); a refused run keeps the run's, unused
    rank = hospital.model.lora_rank if cfg.federation.strategy == "svd" else 0
    runtime = runtime_for(cfg.model, site_lora(cfg, rank))
    train = [e for f in hospital.data.train for e in load_records(hospital.path(f), site=hospital.name)]
    if hospital.data.eval:
        held = [e for f in hospital.data.eval for e in load_records(hospital.path(f), site=hospital.name)]
    else:
        train, held = split_train_eval(train, eval_fraction=hospital.data.eval_fraction, seed=cfg.run.seed)
    data = site_data(runtime, hospital.name, train, held, cfg.train.max_length)
    # decided once per run, here where the planned noise is known: it needs the run's settings and this data
    refusal = misfit or policy_refusal(hospital, cfg, num_examples=len(data.train_tokens))
    sealer = None
    if cfg.security.seal:
        own = load_private(hospital.path(hospital.keys.envelope_key))
        sealer = Sealer(own, load_public(hospital.path(hospital.coordinator.envelope_key)))
    seed_index = int.from_bytes(hashlib.sha256(hospital.name.encode()).digest()[:4], "big") % 10_007
    site = Site(
        cfg,
        seed_index,
        runtime,
        data,
        Path(run_dir).name,
        sealer,
        hospital.ledger_path,
        hospital.audit_path,
        refusal,
    )
    _HOSPITALS.clear()  # one run at a time keeps its data resident
    _HOSPITALS[key] = site
    return site
