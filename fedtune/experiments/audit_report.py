"""The simulated hospitals' privacy audits (``[privacy_audit]``), read from their local files in
the run folder after the run: a table per round and hospital for ``summary.md``, and the final
round pooled over hospitals for the privacy-utility sweep.

The files are the hospitals' own (``<run>/privacy-audit/<site>.jsonl``, written inside each
simulated hospital); the researcher reads them here, on the machine that holds the run.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_bytes, atomic_write_json
from fedtune.privacy.audit import from_scores
from fedtune.privacy.audit_data import AUDIT_DIR
from fedtune.runfolder import RunFolder

NOTE = (
    "Membership inference with the base model as reference (score: base loss minus adapted loss), each "
    "hospital's training records against its held-out ones: AUC 0.5 = no signal; TPR@1%FPR: training records "
    "flagged at 1% false positives (with under 100 held-out records: at zero). 95% intervals: AUC DeLong, TPR "
    "bootstrap and Clopper-Pearson hull. Canary exposure in bits (estimated by ranking among random secrets): "
    "inserted in training / fresh, mean over canaries. Computed and kept at each hospital; nothing was sent."
)


def audit_records(folder: RunFolder) -> list[dict[str, Any]]:
    """Every hospital's audit of every round: the last line per (round, site) (a resumed round
    writes again), ordered by round then site."""
    latest: dict[tuple[int, str], dict[str, Any]] = {}
    for path in sorted((folder.root / AUDIT_DIR).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
                latest[(int(record["round"]), str(record["site"]))] = record
            except (ValueError, KeyError, TypeError):
                continue  # a line cut by a crash
    return [latest[k] for k in sorted(latest)]


def _interval(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def _exposure(record: dict[str, Any]) -> str:
    canaries = record.get("canaries")
    if not canaries:
        return ""
    return f"{canaries['inserted']['mean']:.2f} / {canaries['fresh']['mean']:.2f}"


def audit_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per round and hospital: AUC and TPR@1%FPR with intervals, canary exposures."""
    rows = []
    for r in records:
        m = r.get("membership")
        rows.append(
            {
                "round": r["round"],
                "hospital": r["site"],
                "AUC [95% CI]": _interval(m["auc"], m["auc_low"], m["auc_high"]) if m else "",
                "TPR@1%FPR [95% CI]": _interval(m["tpr_at_1fpr"], m["tpr_low"], m["tpr_high"]) if m else "",
                "members / nonmembers": f"{m['members']} / {m['nonmembers']}" if m else "",
                "canary exposure inserted / fresh (bits)": _exposure(r),
            }
        )
    return rows


def audit_summary(folder: RunFolder) -> str:
    """Add the audit table to ``summary.md`` (and ``privacy_audit.json``); return its markdown,
    or "" for a run without audits."""
    from fedtune.experiments.report import markdown_table

    rows = audit_rows(audit_records(folder))
    if not rows:
        return ""
    section = f"\n## Empirical privacy audit (at each hospital)\n\n{NOTE}\n\n{markdown_table(rows)}"
    summary = folder.root / "summary.md"
    before = summary.read_text() if summary.is_file() else ""
    atomic_write_bytes(summary, (before + section).encode())
    atomic_write_json(folder.root / "privacy_audit.json", rows)
    return section


def final_audit(root: Path) -> dict[str, Any]:
    """The last audited round pooled over hospitals (every hospital's member and nonmember scores
    together; intervals recomputed on the pool), and the mean canary exposures; {} without audits."""
    records = audit_records(RunFolder(root))
    if not records:
        return {}
    last = max(r["round"] for r in records)
    final = [r for r in records if r["round"] == last]
    out: dict[str, Any] = {"audit round": last}
    scored = [r["membership"] for r in final if "scores" in r.get("membership", {})]
    if scored:
        pooled = from_scores(
            [s for m in scored for s in m["scores"]["members"]], [s for m in scored for s in m["scores"]["nonmembers"]]
        )
        out["audit AUC [95% CI]"] = _interval(pooled.auc, pooled.auc_low, pooled.auc_high)
        out["audit TPR@1%FPR [95% CI]"] = _interval(pooled.tpr_at_1fpr, pooled.tpr_low, pooled.tpr_high)
        out["audit AUC max hospital"] = max(m["auc"] for m in scored)
    exposures = [r["canaries"] for r in final if r.get("canaries")]
    if exposures:
        mean = [statistics.fmean(e[kind]["mean"] for e in exposures) for kind in ("inserted", "fresh")]
        out["canary exposure inserted / fresh (bits)"] = f"{mean[0]:.2f} / {mean[1]:.2f}"
    return out
