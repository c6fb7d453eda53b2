"""What does secure aggregation cost? Its quantization error and its time, against plain FedAvg.

For each model, two real 3-hospital federations of one round each under `flwr run` (local
SuperLink, simulation), identical but for `security.secure_aggregation`: the sealed
weighted mean and Flower's SecAgg+. Training is deterministic, so the two global adapters
differ only by what SecAgg+'s clipping and quantization did. Prints the largest and mean
absolute difference, the bound from `fedtune.server.secagg.quantization_error_bound`, the
size of the update itself, and the train phase of the secure round against the plain one.

Usage: python benchmarks/secagg.py [--models tiny smollm2]
Writes benchmarks/results/secagg.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(model: str, root: Path) -> dict[str, float]:
    from fedtune.checkpoint import load_checkpoint
    from fedtune.config import load_config, replace
    from fedtune.experiments.report import round_records
    from fedtune.experiments.simulate import prepare_run, run_simulation
    from fedtune.server.secagg import quantization_error_bound

    cfg = load_config(
        None,
        {
            "model.source": model,
            "data.hospitals": 3,
            "federation.rounds": 1,
            "run.baselines": False,
            "eval.max_new_tokens": 4,
        },
    )
    plain = prepare_run(cfg, run_dir=root / f"{model}-plain")
    run_simulation(plain, say=lambda _: None)
    secure = prepare_run(replace(cfg, security={"secure_aggregation": True}), run_dir=root / f"{model}-secure")
    run_simulation(secure, say=lambda _: None)
    start = load_checkpoint(plain.root, 0).state
    exact, masked = load_checkpoint(plain.root, 1).state, load_checkpoint(secure.root, 1).state
    diffs = [(masked[k] - exact[k]).abs() for k in exact]
    update = [(exact[k] - start[k]).abs() for k in exact]
    sizes = [int(m["num-examples"]) for m in round_records(plain)[0]["train"].values()]
    t_plain = round_records(plain)[0]["train-seconds"]
    t_secure = round_records(secure)[0]["train-seconds"]
    return {
        "max_abs_error": max(float(d.max()) for d in diffs),
        "mean_abs_error": float(sum(d.sum() for d in diffs) / sum(d.numel() for d in diffs)),
        "bound": quantization_error_bound(cfg.security, sizes),
        "max_abs_update": max(float(u.max()) for u in update),
        "mean_abs_update": float(sum(u.sum() for u in update) / sum(u.numel() for u in update)),
        "train_s_plain": t_plain,
        "train_s_secure": t_secure,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    with tempfile.TemporaryDirectory(prefix="fedtune-secagg-") as tmp:
        for model in args.models:
            results[model] = measure(model, Path(tmp))
            print(f"measured {model}", file=sys.stderr, flush=True)
    print(
        f"{'model':8} {'max |err|':>10} {'mean |err|':>10} {'bound':>10} {'mean |update|':>13} "
        f"{'err/update':>10} {'train s plain':>13} {'secure':>7} {'ratio':>6}"
    )
    for model, r in results.items():
        print(
            f"{model:8} {r['max_abs_error']:10.2e} {r['mean_abs_error']:10.2e} {r['bound']:10.2e} "
            f"{r['mean_abs_update']:13.2e} {r['mean_abs_error'] / r['mean_abs_update']:10.2e} "
            f"{r['train_s_plain']:13.2f} {r['train_s_secure']:7.2f} {r['train_s_secure'] / r['train_s_plain']:6.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "secagg.json").write_text(json.dumps({"cpus": os.cpu_count(), "results": results}, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'secagg.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
