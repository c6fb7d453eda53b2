"""What does sample-level DP-SGD cost? Step time and peak memory, DP over non-DP.

For each model (tiny, SmolLM2) and each Opacus grad-sample mode (hooks, functorch) this
trains the same LoRA adapter on the same clinical records for a few steps, each
configuration in a fresh process so its peak resident memory (ru_maxrss) is its own, and
prints the ratios against non-private training measured in the same run.

Usage: python benchmarks/dp_overhead.py [--models tiny smollm2] [--steps 4] [--batch-size 4]
Writes benchmarks/results/dp_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("off", "hooks", "functorch")


def worker(model: str, mode: str, steps: int, batch: int) -> dict[str, float]:
    from fedtune.config import LoraSettings, ModelSettings, TrainSettings
    from fedtune.data import clinical
    from fedtune.privacy.dpsgd import train_local_dp
    from fedtune.runtime import SiteRuntime, site_data
    from fedtune.train import train_local

    runtime = SiteRuntime(ModelSettings(source=model), LoraSettings())
    train, held = clinical.generate(1, n_train=64, n_eval=1, seed=0)["st-elsewhere"]
    data = site_data(runtime, "s", train, held, 256)
    settings = TrainSettings(batch_size=batch, local_steps=1, max_length=256)
    pad = int(runtime.base.tokenizer.pad_token_id)

    def run(n: int) -> None:
        if mode == "off":
            train_local(runtime.model, data.train_tokens, settings, pad_id=pad, seed=0, step_offset=0, total_steps=n)
            for _ in range(n - 1):
                train_local(runtime.model, data.train_tokens, settings, pad_id=pad, seed=0)
        else:
            train_local_dp(
                runtime.model,
                data.train_tokens,
                settings,
                noise_multiplier=1.0,
                max_grad_norm=1.0,
                steps=n,
                pad_id=pad,
                seed=0,
                grad_sample_mode=mode,
            )

    run(1)  # warm-up
    start = time.perf_counter()
    run(steps)
    seconds = (time.perf_counter() - start) / steps
    return {"step_s": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], args.worker[1], args.steps, args.batch_size)))
        return 0
    results: dict[str, dict[str, dict[str, float]]] = {}
    for model in args.models:
        results[model] = {}
        for mode in MODES:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                model,
                mode,
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
            ]
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
            )
            results[model][mode] = json.loads(out.stdout.strip().splitlines()[-1])
            print(
                f"{model:8} {mode:10} {results[model][mode]['step_s']:.3f} s/step  "
                f"peak {results[model][mode]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    print(f"\n{'model':8} {'mode':10} {'step DP/non-DP':>15} {'peak mem DP/non-DP':>19}")
    for model, by_mode in results.items():
        base = by_mode["off"]
        for mode in MODES[1:]:
            r = by_mode[mode]
            print(
                f"{model:8} {mode:10} {r['step_s'] / base['step_s']:15.2f} "
                f"{r['peak_rss_mb'] / base['peak_rss_mb']:19.2f}"
            )
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "steps": args.steps, "batch": args.batch_size}
    (RESULTS / "dp_overhead.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'dp_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
