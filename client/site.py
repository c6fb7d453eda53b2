"""The hospital's resident runtime: base model loaded once per process, data tokenized once.

Flower calls the ClientApp once per message; in simulation the same worker process
serves many rounds (and several simulated sites). The base model with its LoRA layers
stays resident here across rounds; each round only the adapter tensors are swapped in.
All of it sits in one :class:`Sites` cache, which the ClientApp holds
(``client_app.SITES``); each message builds its :class:`Site` from it once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.audit import AuditLog
from fedtune.client.dp_round import open_ledger
from fedtune.client.hospital import HospitalConfig, load_hospital_config
from fedtune.client.policy import hospital_run, policy_refusal
from fedtune.config import DPSettings, ExperimentConfig, LoraSettings, ModelSettings
from fedtune.data.partition import split_train_eval
from fedtune.data.records import Example, load_records, record_digests
from fedtune.lora.merge import MergeRule, make_rule
from fedtune.progress import PROGRESS_FILE
from fedtune.runfolder import RunFolder
from fedtune.runtime import SiteData, SiteRuntime, site_data
from fedtune.security.keys import load_private, load_public
from fedtune.wire import Identity, Sealer


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
    progress_file: Path | None = None  # a simulated hospital's training steps go here (fedtune.progress)
    hospital: HospitalConfig | None = None  # a real hospital's hospital.toml (None: a simulated site)

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


class Sites:
    """What one ClientApp process keeps resident across messages and rounds.

    - one base model: a runtime per adapter shape of it (simulated hospitals at their own
      ranks keep theirs beside each other); a different model replaces them all, never two;
    - each simulated site's tokenized data and keys;
    - a real hospital's site for its current run (one run at a time keeps its data resident);
    - the site of the message in progress: the ``audited`` mod and the handler share it.
    """

    def __init__(self) -> None:
        self._runtimes: dict[tuple[ModelSettings, LoraSettings], SiteRuntime] = {}
        self._data: dict[tuple[Path, str, int], SiteData] = {}
        self._sealers: dict[tuple[Path, str], Sealer] = {}
        self._hospital: tuple[tuple[Path, str, str], Site] | None = None
        self._message: tuple[weakref.ref[object], Site] | None = None
        self.base_model_loads = 0  # how many times this process loaded a base model (1 when residency works)
        # a hospital's daemon: where its training steps are logged (fedtune.progress records)
        self.progress_log: Callable[[dict[str, Any]], None] | None = None
        # a hospital's daemon: where the release gate's lines go (level, message), beside Flower's log
        self.event_log: Callable[[str, str], None] | None = None

    def once(self, message: object, build: Callable[[], Site]) -> Site:
        """The site of ``message``, built by ``build`` the first time it is asked for.

        Held by a weak reference: the site of a message that is gone is never handed out.
        """
        held = self._message
        if held is not None and held[0]() is message:
            return held[1]
        site = build()
        self._message = (weakref.ref(message), site)
        return site

    def runtime(self, model: ModelSettings, lora: LoraSettings) -> SiteRuntime:
        """The process-wide resident runtime for this model and adapter shape."""
        key = (model, lora)
        if key not in self._runtimes:
            if any(m != model for m, _ in self._runtimes):
                self._runtimes.clear()  # a different model replaces the old one; never hold two
            # the same model with other LoRA layers (simulated hospitals at their own ranks) is kept beside
            self._runtimes[key] = SiteRuntime(model, lora)
            self.base_model_loads += 1
        return self._runtimes[key]

    # -- simulated hospitals -------------------------------------------------------------
    def simulated(self, run_dir: Path, partition_id: int) -> Site:
        """Simulated hospital ``partition_id`` of the run in ``run_dir``, with everything it holds."""
        cfg = RunFolder(run_dir).load_config()
        ranks = cfg.lora.site_ranks
        runtime = self.runtime(cfg.model, site_lora(cfg, ranks[partition_id] if ranks else 0))
        key = (run_dir, cfg.model.source, partition_id)
        if key not in self._data:
            folder = RunFolder(run_dir)
            site = folder.sites()[partition_id]
            train, evaluation = folder.read_site(site)
            self._data[key] = site_data(runtime, site, train, evaluation, cfg.train.max_length)
        data = self._data[key]
        sealer = self._simulated_sealer(run_dir, data.site) if cfg.security.seal else None
        return Site(
            cfg,
            partition_id,
            runtime,
            data,
            run_dir.name,
            sealer,
            simulated_ledger_path(run_dir, data.site, cfg.dp),
            simulated_audit_path(run_dir, data.site),
            progress_file=run_dir / PROGRESS_FILE,
        )

    def _simulated_sealer(self, run_dir: Path, site: str) -> Sealer:
        """Simulated hospital ``site``'s keys and the coordinator's public identity, from the run folder."""
        key = (run_dir, site)
        if key not in self._sealers:
            folder = RunFolder(run_dir)
            keys = load_private(folder.hospital_key(site))
            if keys.name != site:
                raise ValueError(f"{folder.hospital_key(site)} holds the key of {keys.name!r}, not {site!r}")
            self._sealers[key] = Sealer(keys, load_public(folder.coordinator_key.with_suffix(".pub")))
        return self._sealers[key]

    # -- a real hospital -----------------------------------------------------------------
    def hospital(self, config: Path, experiment: str, run_dir: str) -> Site:
        """The resident view of hospital ``config`` for the run whose settings are ``experiment``.

        Its own settings over the run's (:func:`hospital_run`); its policy's verdict on the
        run decided once, here where the planned noise is known (it needs this data).
        """
        key = (config, experiment, run_dir)
        if self._hospital is not None and self._hospital[0] == key:
            return self._hospital[1]
        hospital = load_hospital_config(config)
        cfg, misfit = hospital_run(hospital, experiment)
        # its own rank where the run can merge it (svd); a refused run keeps the run's, unused
        rank = hospital.model.lora_rank if cfg.federation.strategy == "svd" else 0
        runtime = self.runtime(cfg.model, site_lora(cfg, rank))
        train, held = hospital_records(hospital, seed=cfg.run.seed)
        data = site_data(runtime, hospital.name, train, held, cfg.train.max_length)
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
            hospital=hospital,
        )
        self._hospital = (key, site)
        return site


def hospital_records(hospital: HospitalConfig, *, seed: int) -> tuple[list[Example], list[Example]]:
    """The hospital's training and held-out records: its eval files, or a split of its training records."""
    train = [e for f in hospital.data.train for e in load_records(hospital.path(f), site=hospital.name)]
    if hospital.data.eval:
        held = [e for f in hospital.data.eval for e in load_records(hospital.path(f), site=hospital.name)]
        return train, held
    return split_train_eval(train, eval_fraction=hospital.data.eval_fraction, seed=seed)


def site_lora(cfg: ExperimentConfig, rank: int = 0) -> LoraSettings:
    """The adapter a hospital trains: the run's, at ``rank`` (0: the run's rank)."""
    return dataclasses.replace(cfg.lora, rank=rank or cfg.lora.rank, site_ranks=())


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
