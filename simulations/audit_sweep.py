"""The membership audit of a finished privacy-utility sweep's final adapters, after the fact.

A sweep run with ``[privacy_audit] membership = true`` audits inside each simulated hospital
as it goes. This script does the same audit afterwards for a sweep that ran without it: for
every sub-run (``no-dp``, ``eps-E``) and every hospital, the final round's global adapter
scores a seeded subset of the hospital's training records against as many new held-out
records of the same hospital (the continuation of its generator, exactly as
``[privacy_audit]`` makes them), with the frozen base model as reference. The base model's
losses are the same for every sub-run, so they are computed once per record, not once per
sub-run. Each result is appended to ``<sub-run>/privacy-audit/<site>.jsonl`` in the format the
simulated hospitals write, so ``fedtune simulate --resume SWEEP`` then rewrites the sweep's
table with the audit columns. Nothing here leaves the machine.

Usage:
  python simulations/audit_sweep.py runs/dp-realistic-sweep --nonmembers 100
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="a finished sweep folder (holds sweep.json)")
    p.add_argument("--nonmembers", type=int, default=100, help="new held-out records per hospital (as many members)")
    p.add_argument("--runs", default="", help="comma-separated sub-runs to audit (default: every finished one)")
    return p.parse_args()


def main() -> int:
    a = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from fedtune.atomic import atomic_write_json
    from fedtune.checkpoint import latest_round, load_checkpoint
    from fedtune.config import replace
    from fedtune.runfolder import RunFolder
    from fedtune.runtime import SiteRuntime

    plan = json.loads((a.sweep / "sweep.json").read_text())
    names = [str(r["name"]) for r in plan["runs"] if (a.sweep / str(r["name"]) / "checkpoints").is_dir()]
    if a.runs:
        names = [n for n in names if n in a.runs.split(",")]
    first = RunFolder(a.sweep / names[0])
    cfg = first.load_config()
    cfg = replace(cfg, privacy_audit={"membership": True, "nonmembers": a.nonmembers})
    runtime = SiteRuntime(cfg.model, cfg.lora)
    records = _records(cfg, first, runtime)
    cache = a.sweep / f"audit-base-losses-{a.nonmembers}.json"  # the base model's: one computation per sweep
    if cache.is_file():
        base = json.loads(cache.read_text())
    else:
        start = time.process_time()
        base = {site: _losses(runtime, toks, cfg, adapter=False) for site, toks in records.items()}
        atomic_write_json(cache, base)
        print(f"base model losses: {time.process_time() - start:.0f} CPU-s", flush=True)
    for name in names:
        folder = RunFolder(a.sweep / name)
        last = latest_round(folder.root)
        if last is None:
            print(f"{name}: no checkpoint, skipped", flush=True)
            continue
        state = load_checkpoint(folder.root, last[0]).state
        runtime.load(state, freeze_a=False)
        for site, toks in records.items():
            t0 = time.process_time()
            adapted = _losses(runtime, toks, cfg, adapter=True)
            _write(folder, site, last[0], base[site], adapted, len(records[site]["members"]), seed=cfg.run.seed)
            print(f"{name} {site}: {time.process_time() - t0:.0f} CPU-s", flush=True)
    return 0


def _records(cfg: Any, folder: Any, runtime: Any) -> dict[str, dict[str, list[Any]]]:
    """Per hospital: the tokenized members (a seeded subset of its training records) and nonmembers."""
    from fedtune.data import clinical
    from fedtune.privacy.audit import member_subset
    from fedtune.privacy.audit_data import extra_nonmembers

    out = {}
    for index, site in enumerate(folder.sites()):
        if clinical.site_id(index) != site:
            raise SystemExit(f"{folder.root}: site {index} is {site!r}, not the embedded task's; audit it in the run")
        train, _ = folder.read_site(site)
        nonmembers = extra_nonmembers(cfg, index)
        members = [train[i] for i in member_subset(len(nonmembers), len(train), seed=cfg.run.seed)]
        out[site] = {
            "members": runtime.tokenize(members, cfg.train.max_length),
            "nonmembers": runtime.tokenize(nonmembers, cfg.train.max_length),
        }
    return out


def _losses(runtime: Any, toks: dict[str, list[Any]], cfg: Any, *, adapter: bool) -> dict[str, list[float]]:
    from fedtune.privacy.audit import record_losses

    kw: dict[str, Any] = {
        "pad_id": int(runtime.base.tokenizer.pad_token_id),
        "batch_size": cfg.eval.batch_size,
        "precision": cfg.model.precision,
    }
    if adapter:
        return {k: record_losses(runtime.model, v, **kw) for k, v in toks.items()}
    with runtime.model.disable_adapter():
        return {k: record_losses(runtime.model, v, **kw) for k, v in toks.items()}


def _write(folder: Any, site: str, server_round: int, base: Any, adapted: Any, count: int, *, seed: int) -> None:
    """One record in the format simulated hospitals write (client/sim_audit.py)."""
    from fedtune.privacy.audit import from_scores
    from fedtune.privacy.audit_data import results_path
    from fedtune.progress import append_record

    scores = {k: [b - x for b, x in zip(base[k], adapted[k], strict=True)] for k in ("members", "nonmembers")}
    result = from_scores(scores["members"], scores["nonmembers"], seed=seed + server_round)
    membership = {**result.as_dict(), "scores": {k: [round(v, 6) for v in vs] for k, vs in scores.items()}}
    path = results_path(folder.root, site)
    path.parent.mkdir(parents=True, exist_ok=True)
    append_record(path, {"round": server_round, "site": site, "membership": membership, "after_the_fact": True})
    print(f"  {site}: AUC {result.auc:.3f} [{result.auc_low:.3f}, {result.auc_high:.3f}] ({count} vs {count})")


if __name__ == "__main__":
    raise SystemExit(main())
