"""A run folder as the live page draws it: where the run is, each hospital in the round,
and one point per finished round (loss and task metric pooled and per site, epsilon per
site, bytes, duration), with the baselines a simulation has.

Everything comes from files the run already writes: ``status.json`` (:mod:`fedtune.live`),
``metrics.jsonl``, ``baselines.json`` and ``config.toml``. Reading them never changes them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from fedtune.errors import FedTuneError
from fedtune.experiments.report import live_rows, round_records, run_status, site_epsilons
from fedtune.live import read_status
from fedtune.runfolder import RunFolder


def round_point(record: dict[str, Any]) -> dict[str, Any]:
    """One finished round of ``metrics.jsonl`` as the page's charts and tables take it."""
    evaluation: dict[str, Any] = record.get("eval", {})
    train: dict[str, Any] = record.get("train", {})
    losses = [m["train-loss"] for m in train.values() if "train-loss" in m]
    upload = sum(int(m.get("upload-bytes", 0)) for m in train.values())
    sent = len(train) + len(record.get("rejected", [])) + len(record.get("refused", []))
    return {
        "round": record["round"],
        "loss": {site: v.get("loss") for site, v in evaluation.items()},
        "metric": {site: v.get("metric") for site, v in evaluation.items()},
        "train-loss": sum(losses) / len(losses) if losses else None,
        "epsilon": site_epsilons(record),
        "client-epsilon": record.get("client-dp", {}).get("epsilon"),
        "upload-bytes": upload,
        "download-bytes": int(record.get("download-bytes", 0)) * sent,
        "seconds": record.get("seconds"),
        "accepted": sorted(train),
        "rejected": record.get("rejected", []),
        "refused": record.get("refused", []),
    }


def baseline_lines(folder: RunFolder) -> dict[str, dict[str, float]]:
    """The baselines' pooled loss and metric: base model, centralized, local only (mean over sites)."""
    try:
        done: dict[str, Any] = json.loads(folder.baselines_path.read_text())
    except (OSError, ValueError):
        return {}
    lines = {name: done[key]["pooled"] for key, name in (("base", "base model"), ("centralized", "centralized"))}
    locals_ = [v["pooled"] for k, v in done.items() if k.startswith("local:")]
    if locals_:
        lines["local only (mean)"] = {
            key: sum(p[key] for p in locals_) / len(locals_) for key in ("loss", "metric") if key in locals_[0]
        }
    return {name: {"loss": p["loss"], "metric": p["metric"]} for name, p in lines.items()}


def run_view(root: Path, *, names: dict[int, str] | None = None, now: float | None = None) -> dict[str, Any]:
    """Everything the page shows of one run; ``names``: hospital names by Flower node id."""
    folder = RunFolder(root)
    now = time.time() if now is None else now
    try:
        total: int | None = folder.load_config().federation.rounds
    except FedTuneError:
        total = None
    live = read_status(root) or {}
    known = {**folder.node_names(), **(names or {})}
    hospitals = live_rows(live, known)
    for row, (_, entry) in zip(hospitals, sorted(live.get("hospitals", {}).items()), strict=True):
        seen = entry.get("seen")
        row["last seen (s ago)"] = round(now - float(seen), 1) if seen else None
    points = [round_point(r) for r in round_records(folder)]
    return {
        "run": root.name,
        "state": run_status(root)["state"],
        "round": live.get("round", len(points)),
        "rounds": total,
        "done": points[-1]["round"] if points else 0,
        "phase": live.get("phase", "not started"),
        "phase-for": round(now - float(live["since"]), 1) if live.get("since") else None,
        "reason": live.get("reason", ""),
        "hospitals": hospitals,
        "points": points,
        "baselines": baseline_lines(folder),
    }


def simulation_state(root: Path) -> dict[str, Any]:
    """The page's JSON for one simulation (``fedtune simulate --watch``): no SuperLink, no registry."""
    return {
        "title": f"fedtune simulation {root.name}",
        "kind": "simulation",
        "superlink": None,
        "registry": None,
        "runs": [run_status(root)],
        "view": run_view(root),
    }
