"""The hospital's own live page, served by its daemon with the health routes (loopback only).

What it shows, and nothing more: the link's state (:class:`~fedtune.client.health_routes.Link`),
the audit trail (every message that left: its run, round, kind, size and SHA-256, and
whether the chain verifies), the runs those records name, the privacy ledger's spend and
what is left per dataset (``fedtune client privacy``'s rows), the release gate's adopted
adapter and last decision (``fedtune client release``), and the last warnings and
errors of the daemon's own log. All of it is already on this machine; the page reads the
files, never writes them, and answers GET only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune.client.health_routes import Link
from fedtune.client.hospital import HospitalConfig
from fedtune.client.release_store import release_view
from fedtune.errors import FedTuneError

MESSAGES = 200  # the newest audit records shown
ERRORS = 20  # the newest warnings and errors shown
LOG_TAIL = 1 << 20  # bytes of the daemon's log read for them
MESSAGE_FIELDS = ("seq", "time", "run", "round", "kind", "bytes", "sha256", "epsilon")


def audit_view(log: Path) -> dict[str, Any]:
    """The trail as the page shows it: verdict, totals, the newest records' fields."""
    from fedtune.client.audit import AuditLog

    trail = AuditLog(log)
    records = trail.records()
    verdict = trail.verify()
    if verdict.ok:
        said = f"{verdict.records} records, head {verdict.head[:16]}"
    else:
        kind = "interrupted" if verdict.interrupted else "broken"
        said = f"{kind} at record {verdict.bad}: {verdict.reason}"
    return {
        "path": str(log),
        "ok": verdict.ok,
        "verdict": said,
        "records": len(records),
        "bytes": sum(int(r.get("bytes", 0)) for r in records),
        "messages": [{k: r.get(k) for k in MESSAGE_FIELDS} for r in records[-MESSAGES:]][::-1],
        "runs": runs_of(records),
    }


def runs_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each run the trail names: its rounds, messages, bytes, first and last message, epsilon spent."""
    runs: dict[str, dict[str, Any]] = {}
    for r in records:
        run = runs.setdefault(
            str(r.get("run")), {"run": str(r.get("run")), "rounds": set(), "messages": 0, "bytes": 0, "epsilon": None}
        )
        run["rounds"].add(r.get("round"))
        run["messages"] += 1
        run["bytes"] += int(r.get("bytes", 0))
        run.setdefault("first", r.get("time"))
        run["last"] = r.get("time")
        if r.get("epsilon") is not None:
            run["epsilon"] = r["epsilon"]
    return [{**run, "rounds": len(run["rounds"])} for run in runs.values()][::-1]


def privacy_view(path: Path) -> dict[str, Any]:
    """``fedtune client privacy``'s rows for the hospital's ledger (none before its first DP round)."""
    from fedtune.client.ledger import PrivacyLedger

    if not path.is_file():
        return {"path": str(path), "policy": f"no privacy ledger yet at {path} (the first DP round creates it)"}
    try:
        ledger = PrivacyLedger.open(path)
        rows = ledger.report()
    except FedTuneError as err:
        return {"path": str(path), "policy": f"unreadable: {err}", "datasets": []}
    pol = ledger.policy
    policy = f"budget epsilon {pol.budget_epsilon:g} per record at delta {pol.delta:g} ({pol.accountant}); {path}"
    return {"path": str(path), "policy": policy, "datasets": rows}


def last_errors(log: Path, count: int = ERRORS) -> list[dict[str, Any]]:
    """The newest WARNING/ERROR records of the daemon's JSON log, newest first."""
    try:
        with open(log, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - LOG_TAIL))
            lines = f.read().splitlines()
    except OSError:
        return []
    found = []
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue  # the first line of the tail may be cut
        if isinstance(record, dict) and record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            found.append({k: record.get(k) for k in ("time", "level", "message")})
            if len(found) == count:
                break
    return found


def hospital_state(cfg: HospitalConfig, link: Link) -> dict[str, Any]:
    audit = audit_view(cfg.audit_path)
    return {
        "hospital": cfg.name,
        "link": {k: str(v) if k == "node_id" else v for k, v in link.snapshot().items()},  # 64-bit ids: text
        "runs": audit.pop("runs"),
        "audit": audit,
        "privacy": privacy_view(cfg.ledger_path),
        "release": release_view(cfg.release_dir),
        "errors": last_errors(cfg.log_path),
    }
