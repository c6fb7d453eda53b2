"""What does an exact LoRA merge cost the coordinator? fedavg, ffa and svd side by side.

For SmolLM2's adapter layout (rank 8 on q/k/v/o of 30 layers, built without loading
weights) and three hospitals, this times the coordinator's whole merge of one round
through the same rule objects a run uses (reply -> update -> weighted mean -> apply) and
prints each rule's time as a ratio to `fedavg`'s, measured in the same run. `svd` forms
the dense (alpha/r)·B·A per adapted matrix and re-factorises it, so its cost grows with
out x in x min(out, in); to show where that goes for a 7B model (Llama-2-7B: 32 layers of
four 4096 x 4096 projections), it also times one 4096 x 4096 module and multiplies by 128.

Usage: python benchmarks/merge.py [--repeats 3] [--no-7b] [--threads N]
Writes benchmarks/results/merge.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from fedtune.lora.merge import MergeRule, make_rule, merge

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = [160.0, 160.0, 160.0]


def smollm2_adapter() -> dict[str, torch.Tensor]:
    from fedtune.config import LoraSettings
    from fedtune.lora.adapter import initial_state
    from fedtune.models import load_model_config

    return initial_state(load_model_config("smollm2"), LoraSettings())


def _trained(start: dict[str, torch.Tensor], seed: int, *, rule: MergeRule) -> dict[str, torch.Tensor]:
    """A site's adapter after training: B moved off zero, A too unless the rule freezes it."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in start.items():
        frozen = rule.freeze_a and ".lora_A." in k
        out[k] = v.clone() if frozen else v + 0.01 * torch.randn(v.shape, generator=g)
    return out


def time_merge(name: str, start: dict[str, torch.Tensor], repeats: int) -> float:
    rule = make_rule(name, alpha=16, rank=8)
    sites = [_trained(start, s, rule=rule) for s in (1, 2, 3)]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        merge(rule, start, sites, WEIGHTS)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-7b", action="store_true", help="skip the 4096 x 4096 module")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    start = smollm2_adapter()
    results: dict[str, float] = {name: time_merge(name, start, args.repeats) for name in ("fedavg", "ffa", "svd")}
    print(f"one round's merge, 3 hospitals, SmolLM2-135M adapter (rank 8, q/k/v/o, {len(start) // 2} modules)")
    print(f"{'rule':8} {'seconds':>9} {'x fedavg':>9}")
    for name, seconds in results.items():
        print(f"{name:8} {seconds:9.3f} {seconds / results['fedavg']:9.1f}")
    if not args.no_7b:
        big = {"m.lora_A.weight": torch.zeros(8, 4096), "m.lora_B.weight": torch.zeros(4096, 8)}
        one = {name: time_merge(name, big, 1) for name in ("fedavg", "svd")}
        results.update({f"7b-module-{k}": v for k, v in one.items()})
        print(
            f"one 4096 x 4096 module: fedavg {one['fedavg']:.3f} s, svd {one['svd']:.2f} s "
            f"({one['svd'] / one['fedavg']:.0f} x); x 128 modules of a 7B model: "
            f"svd ~{128 * one['svd'] / 60:.1f} min a round"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
