"""``fedtune client privacy-audit``: a hospital measures what an adapter reveals about its own
training records, on its own machine. Nothing is sent anywhere.

Members are a seeded random subset of the hospital's training records, nonmembers its
held-out records (``data.eval``, or the ``data.eval_fraction`` split exactly as the daemon
makes it for a run with ``run.seed`` = ``--run-seed``); the test is
:func:`fedtune.privacy.audit.membership_audit` (the frozen base model as reference). The
report goes to ``<daemon.state_dir>/privacy-audits/<time>.json``, written atomically.
"""

from __future__ import annotations

import datetime
import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.atomic import atomic_write_json
from fedtune.client.hospital import HospitalConfig, load_hospital_config
from fedtune.client.site import hospital_records
from fedtune.config import LoraSettings
from fedtune.errors import CheckpointError, ConfigError, FedTuneError, ModelMismatchError
from fedtune.lora.adapter import CONFIG_FILE, WEIGHTS_FILE

if TYPE_CHECKING:
    from fedtune.runtime import SiteRuntime

AUDITS_DIR = "privacy-audits"
MEANINGS = (
    "AUC: the chance that a random training record scores above a random held-out one "
    "(score: base loss minus adapted loss); 0.5 = the adapter does not tell them apart, 1 = it always does",
    "TPR@1%FPR: the share of training records an attacker flags while flagging at most 1% of held-out ones; "
    "about 0.01 = no better than guessing",
    "[low, high]: 95% intervals (AUC: DeLong; TPR: bootstrap and Clopper-Pearson hull); "
    "few records give wide intervals",
)


def adapter_lora(adapter_dir: Path) -> LoraSettings:
    """The LoRA shape a PEFT adapter folder declares (``adapter_config.json``)."""
    config, weights = adapter_dir / CONFIG_FILE, adapter_dir / WEIGHTS_FILE
    for path in (config, weights):
        if not path.is_file():
            raise CheckpointError(
                f"{path}: no such file; --adapter must be a PEFT adapter folder (as `fedtune` exports)"
            )
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
        targets = data["target_modules"]
        targets = [targets] if isinstance(targets, str) else sorted(targets)
        return LoraSettings(rank=int(data["r"]), alpha=int(data["lora_alpha"]), target_modules=tuple(targets))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{config}: not a LoRA adapter config ({type(err).__name__}: {err})") from err
    except ConfigError as err:
        raise CheckpointError(f"{config}: {err}") from err


def load_adapter(hospital: HospitalConfig, adapter_dir: Path) -> SiteRuntime:
    """The hospital's base model with ``adapter_dir`` loaded (a ``SiteRuntime``); one-line
    errors naming the adapter's file when it was trained on another base or has other shapes."""
    from fedtune.lora.adapter import load_exported
    from fedtune.runtime import SiteRuntime

    lora = adapter_lora(adapter_dir)
    try:
        runtime = SiteRuntime(hospital.model.settings(), lora)
        load_exported(runtime.model, adapter_dir, base_sha256=runtime.base.sha256)
    except ModelMismatchError as err:
        raise ModelMismatchError(
            f"{adapter_dir / WEIGHTS_FILE}: does not fit `model.path` of {hospital.source}: {err}"
        ) from err
    return runtime


def privacy_audit(
    config: Path,
    adapter_dir: Path,
    *,
    members: int = 0,
    run_seed: int = 0,
    seed: int = 0,
    max_length: int = 256,
) -> tuple[dict[str, Any], Path]:
    """Audit ``adapter_dir`` on hospital ``config``'s records; the report and where it was written."""
    from fedtune.privacy.audit import member_subset, membership_audit

    hospital = load_hospital_config(config, check_files=False)  # no keys needed: nothing is sent
    if members < 0:
        raise ConfigError(f"--members must be >= 0 (0: as many as the held-out records), got {members}")
    train, held = hospital_records(hospital, seed=run_seed)
    if not train or not held:
        raise ConfigError(
            f"{hospital.source}: the audit needs training and held-out records (`data.train`, `data.eval`)"
        )
    chosen = member_subset(members or len(held), len(train), seed=seed)
    runtime = load_adapter(hospital, adapter_dir)
    try:
        member_tokens = runtime.tokenize([train[i] for i in chosen], max_length)
        held_tokens = runtime.tokenize(held, max_length)
    except FedTuneError as err:
        raise ConfigError(f"{hospital.source}: {err}") from err
    result = membership_audit(
        runtime.model,
        member_tokens,
        held_tokens,
        pad_id=int(runtime.base.tokenizer.pad_token_id),
        precision=hospital.model.precision,
        seed=seed,
    )
    now = datetime.datetime.now(datetime.UTC)
    report = {
        "kind": "membership-audit",
        "time": now.isoformat(timespec="seconds"),
        "hospital": hospital.name,
        "adapter": str(adapter_dir.resolve()),
        "adapter_sha256": hashlib.sha256((adapter_dir / WEIGHTS_FILE).read_bytes()).hexdigest(),
        "base_sha256": runtime.base.sha256,
        "nonmembers_from": "data.eval" if hospital.data.eval else f"data.eval_fraction split, run seed {run_seed}",
        "members_of": len(train),
        "seed": seed,
        "audit": result.as_dict(),
    }
    path = _report_path(hospital.state_dir / AUDITS_DIR, now)
    atomic_write_json(path, report)
    return report, path


def _report_path(folder: Path, now: datetime.datetime) -> Path:
    stem = now.strftime("%Y%m%dT%H%M%SZ")
    path, n = folder / f"{stem}.json", 1
    while path.exists():
        n += 1
        path = folder / f"{stem}-{n}.json"
    return path


def format_report(report: dict[str, Any], path: Path) -> str:
    """The audit as a small table, what each number means, and where the report is."""
    a = report["audit"]
    lines = [
        f"privacy audit of {report['adapter']} on hospital {report['hospital']}'s records (nothing was sent)",
        f"  members     {a['members']:>6}  training records scored (a seeded subset of {report['members_of']})",
        f"  nonmembers  {a['nonmembers']:>6}  held-out records ({report['nonmembers_from']})",
        f"  AUC         {a['auc']:6.3f}  [{a['auc_low']:.3f}, {a['auc_high']:.3f}]",
        f"  TPR@1%FPR   {a['tpr_at_1fpr']:6.3f}  [{a['tpr_low']:.3f}, {a['tpr_high']:.3f}]",
        *(f"  {line}" for line in MEANINGS),
    ]
    if a["nonmembers"] < 100:
        lines.append(
            f"  {a['nonmembers']} held-out records resolve false-positive rates down to {a['fpr_resolution']:.3f}, "
            "not 1%: the TPR is at zero false positives"
        )
    lines.append(f"report: {path}")
    return "\n".join(lines) + "\n"
