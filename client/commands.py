"""The hospital's commands (``fedtune client ...``): what the daemon's operators run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.client.ledger import PrivacyLedger
from fedtune.errors import ConfigError
from fedtune.experiments.report import markdown_table
from fedtune.privacy.accounting import Mechanism, epsilon_spent


def _ledger_text(path: Path, ledger: PrivacyLedger, rows: list[dict[str, Any]], *, history: bool) -> str:
    pol = ledger.policy
    lines = [
        f"privacy ledger {path}",
        f"budget: epsilon {pol.budget_epsilon:g} per record at delta {pol.delta:g} ({pol.accountant} accountant); "
        "epsilon is that of each dataset's worst record over everything released",
    ]
    shown = [
        {
            "dataset": r["dataset"][:12],
            "label": r["label"],
            "records": r["records"],
            "releases": r["releases"],
            "runs": r["runs"],
            "epsilon": r["epsilon"],
            "remaining": r["remaining"],
            "last release": r["last release"][:19],
        }
        for r in rows
    ]
    lines.append(markdown_table(shown))
    for r in rows if history else []:
        releases = ledger.history(r["dataset"])
        steps = [Mechanism(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in releases]
        table = [
            {
                "time": e["time"][:19],
                "run": e["run_id"],
                "round": e["server_round"],
                "noise": e["noise_multiplier"],
                "sample rate": e["sample_rate"],
                "steps": e["steps"],
                # this dataset's own releases only; the row above adds overlapping datasets
                "epsilon (this dataset)": epsilon_spent(steps[: i + 1], delta=pol.delta, accountant=pol.accountant),
            }
            for i, e in enumerate(releases)
        ]
        lines += [f"releases of dataset {r['dataset'][:12]} ({r['label'] or 'no label'}):", markdown_table(table)]
    return "\n".join(lines) + "\n"


def privacy_report(path: Path, *, history: bool = False, as_json: bool = False) -> str:
    """``fedtune client privacy``: every dataset's spend and what is left, for a ledger or a folder of them."""
    paths = sorted(path.glob("*.json")) if path.is_dir() else [path]
    if not paths:
        raise ConfigError(f"{path}: no privacy ledgers (*.json) in this folder; pass a ledger file or its folder")
    texts, reports = [], {}
    for p in paths:
        ledger = PrivacyLedger.open(p)
        rows = ledger.report()
        reports[str(p)] = rows
        texts.append(_ledger_text(p, ledger, rows, history=history))
    return json.dumps(reports, indent=2) + "\n" if as_json else "\n".join(texts)


def _audit_logs(path: Path) -> list[Path]:
    paths = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not paths or not paths[0].exists():
        raise ConfigError(
            f"{path}: no audit log here; pass an audit log (*.jsonl) or its folder (a simulation's <run>/audit)"
        )
    return paths


def audit_verify(path: Path, *, witness: Path | None = None) -> tuple[bool, str]:
    """``fedtune client audit verify``: check every log's chain and head; name the first bad record.

    With ``witness`` (a file from ``fedtune server witness``), also check the one log
    against what the coordinator received: what only a check outside the hospital can catch."""
    from fedtune.client.audit import AuditLog
    from fedtune.security.witness import load_witness

    logs = _audit_logs(path)
    seen = load_witness(witness) if witness is not None else None
    if seen is not None and (path.is_dir() or len(logs) != 1):
        raise ConfigError(
            f"{path}: `--witness` checks one hospital's trail; pass that hospital's log file, not a folder"
        )
    ok, lines = True, []
    for p in logs:
        verdict = AuditLog(p).verify()
        if verdict.ok:
            lines.append(f"{p}: OK, {verdict.records} records, head {verdict.head}")
        elif verdict.interrupted:
            ok = False
            lines.append(f"{p}: INTERRUPTED at record {verdict.bad}: {verdict.reason}")
        else:
            ok = False
            lines.append(f"{p}: BROKEN at record {verdict.bad}: {verdict.reason} ({verdict.records} good before it)")
        if seen is None:
            continue
        if not verdict.ok:
            lines.append(f"{p}: not checked against the coordinator's witness until the chain verifies")
            continue
        check = AuditLog(p).check_witness(seen)
        if check.ok:
            lines.append(
                f"{p}: WITNESSED by the coordinator for `{seen.hospital}`: {check.witnessed} sealed replies, "
                f"every record up to {check.last} anchored"
                + (f"; {check.uncovered} later record(s) of runs the witness does not cover" if check.uncovered else "")
            )
        else:
            ok = False
            lines.append(f"{p}: NOT WITNESSED at record {check.bad}: {check.reason} (witness of `{seen.hospital}`)")
    return ok, "\n".join(lines) + "\n"


def audit_recover(path: Path) -> str:
    """``fedtune client audit recover``: settle an append a crash interrupted, in every log."""
    from fedtune.client.audit import AuditLog

    lines = []
    for p in _audit_logs(path):
        done = AuditLog(p).recover()
        lines.append(f"{p}: {'recovered: ' + done if done else 'nothing to recover'}")
    return "\n".join(lines) + "\n"


def audit_show(path: Path, *, last: int = 0, as_json: bool = False) -> str:
    """``fedtune client audit show``: the records as a table (what left, when, the privacy spent)."""
    from fedtune.client.audit import AuditLog

    texts, everything = [], {}
    for p in _audit_logs(path):
        log = AuditLog(p)
        every = log.records()
        records = every[-last:] if last else every
        everything[str(p)] = records
        verdict = log.verify()
        state = (
            f"chain OK, head {verdict.head}"
            if verdict.ok
            else f"chain {'INTERRUPTED' if verdict.interrupted else 'BROKEN'} at record {verdict.bad}: {verdict.reason}"
        )
        rows = [
            {
                "seq": r.get("seq"),
                "time (UTC)": str(r.get("time", ""))[:23],
                "run": r.get("run"),
                "round": r.get("round"),
                "kind": r.get("kind"),
                "bytes": r.get("bytes"),
                "sha256": str(r.get("sha256", ""))[:16],
                "epsilon": "-" if r.get("epsilon") is None else r.get("epsilon"),
                "adapter": str(r.get("adapter_sha256", ""))[:8],
                "base model": str(r.get("base_sha256", ""))[:8],
            }
            for r in records
        ]
        sent = sum(int(r.get("bytes", 0)) for r in every)
        texts.append(
            f"audit log {p}: {len(every)} messages, {sent:,} bytes sent; {state}\n"
            + (markdown_table(rows) if rows else "(no records)")
            + "\n"
        )
    return json.dumps(everything, indent=2) + "\n" if as_json else "\n".join(texts)
