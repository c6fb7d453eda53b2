"""What does an exact LoRA merge cost the coordinator? fedavg, ffa and svd side by side,
then the `svd` merge of a LLaMA-7B-shaped adapter, dense against factored.

1. For SmolLM2's adapter layout (rank 8 on q/k/v/o of 30 layers, built without loading
   weights) and three hospitals, this times the coordinator's whole merge of one round
   through the same rule objects a run uses (reply -> update -> weighted mean -> apply) and
   prints each rule's time as a ratio to `fedavg`'s, measured in the same run.
2. For a LLaMA-7B-shaped adapter (32 layers of q/k/v/o 4096 x 4096, gate/up 11008 x 4096,
   down 4096 x 11008: 224 modules, rank 16, random float32 factors: a systems measurement,
   nothing about quality) and 4 and 16 hospitals, it runs the `svd` merge of one round
   (updates -> weighted mean -> next global adapter) two ways: *factored*, as a run does it
   now (QR of the stacked factors, SVD of the small core), on all 224 modules; and *dense*,
   the computation it replaced (each hospital's (alpha/r)·B·A minus the global's as a
   float64 out x in matrix, their weighted mean, re-factorised), on one module of each
   shape where it fits ``--dense-budget-gb`` (else extrapolated from the 4096 x 4096 one by
   element count), the whole adapter extrapolated from those modules and labelled so.

   Memory is peak RSS above the RSS with the global and the received adapters already in
   memory: each measurement runs in its own process, which resets its peak (``VmHWM``, by
   writing 5 to /proc/self/clear_refs) just before the merge and reads it after; glibc is
   told to give large freed blocks back (``MALLOC_MMAP_THRESHOLD_``), so RSS follows what
   is live.

Usage: python benchmarks/merge.py [--repeats 3] [--no-7b] [--threads N] [--dense-budget-gb 3]
Writes benchmarks/results/merge.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedtune.lora.aggregate import weighted_mean
from fedtune.lora.factored import mean
from fedtune.lora.merge import MergeRule, effective, make_rule, merge

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = [160.0, 160.0, 160.0]
LLAMA_7B = {  # module -> (out, in)
    "q_proj": (4096, 4096),
    "k_proj": (4096, 4096),
    "v_proj": (4096, 4096),
    "o_proj": (4096, 4096),
    "gate_proj": (11008, 4096),
    "up_proj": (11008, 4096),
    "down_proj": (4096, 11008),
}
LAYERS, RANK, ALPHA = 32, 16, 32.0
SHAPES = {"q_proj": "4096x4096", "gate_proj": "11008x4096", "down_proj": "4096x11008"}  # one module of each shape
MB = 1e6


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


# -- the 7B part: one process per measurement ------------------------------------------------


def llama7b_adapter(seed: int, only: str) -> dict[str, torch.Tensor]:
    """A rank-16 adapter of LLaMA-7B's shapes, random factors (B off zero, as after training);
    ``only``: "all" for the 224 modules, or one module name for that module of layer 0."""
    g = torch.Generator().manual_seed(seed)
    names = [(i, n) for i in range(LAYERS) for n in LLAMA_7B] if only == "all" else [(0, only)]
    out = {}
    for layer, name in names:
        rows, cols = LLAMA_7B[name]
        out[f"layers.{layer}.{name}.lora_A.weight"] = torch.randn(RANK, cols, generator=g) / cols**0.5
        out[f"layers.{layer}.{name}.lora_B.weight"] = torch.randn(rows, RANK, generator=g) * 0.01
    return out


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _merge_once(path: str, glob: dict[str, torch.Tensor], sites: list[dict[str, torch.Tensor]]) -> None:
    rule = make_rule("svd", alpha=ALPHA, rank=RANK)
    weights = [float(100 + i) for i in range(len(sites))]
    if path == "factored":  # as a run does it now
        rule.apply(glob, mean(rule.updates(glob, sites), weights))
        return
    now = effective(glob, alpha=ALPHA)  # the dense computation it replaced
    updates = [{m: v - now[m] for m, v in effective(s, alpha=ALPHA).items()} for s in sites]
    rule.apply(glob, weighted_mean(updates, weights))


def child(path: str, hospitals: int, only: str) -> None:
    """One measurement, printed as JSON: seconds, and peak RSS above the loaded adapters."""
    glob = llama7b_adapter(0, only)
    sites = [llama7b_adapter(1 + i, only) for i in range(hospitals)]
    gc.collect()
    base = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    _merge_once(path, glob, sites)
    seconds = time.perf_counter() - t0
    peak = _status("VmHWM") - base
    adapters = sum(v.numel() * v.element_size() for s in [glob, *sites] for v in s.values())
    print(json.dumps({"seconds": seconds, "peak_bytes": peak, "adapter_bytes": adapters}))


def measure(path: str, hospitals: int, only: str, threads: int) -> dict[str, float]:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    cmd = [sys.executable, __file__, "--child", path, str(hospitals), only, "--threads", str(threads)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"measurement {path} {hospitals} {only} failed:\n{done.stderr[-2000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _elements(name: str) -> int:
    rows, cols = LLAMA_7B[name]
    return rows * cols


def _count(name: str) -> int:
    """How many of the 224 modules have this module's shape."""
    return LAYERS * sum(1 for n in LLAMA_7B if LLAMA_7B[n] == LLAMA_7B[name])


def dense_modules(hospitals: int, threads: int, budget: float) -> dict[str, dict[str, float | bool]]:
    """Dense (and, for the ratio, factored) on one module of each shape; a shape whose dense
    updates would pass ``budget`` bytes is extrapolated from the 4096 x 4096 module."""
    out: dict[str, dict[str, float | bool]] = {}
    for name in SHAPES:
        fits = (hospitals + 3) * _elements(name) * 8 <= budget or name == "q_proj"
        if fits:
            dense = measure("dense", hospitals, name, threads)
        else:
            ratio = _elements(name) / _elements("q_proj")
            dense = {k: v * ratio for k, v in out["q_proj"].items() if k in ("seconds", "peak_bytes")}
        fact = measure("factored", hospitals, name, threads)
        out[name] = {
            "seconds": dense["seconds"],
            "peak_bytes": dense["peak_bytes"],
            "extrapolated": not fits,
            "factored_seconds": fact["seconds"],
            "factored_peak_bytes": fact["peak_bytes"],
        }
    return out


def _row(hospitals: int, path: str, what: str, seconds: float, peak: float, note: str) -> str:
    return f"{hospitals:>9} {path:9} {what:26} {seconds:9.2f} {peak / MB:10.0f}  {note}"


def seven_b(threads: int, budget: float) -> dict[str, object]:
    per_site = sum(4 * RANK * (r + c) for r, c in LLAMA_7B.values()) * LAYERS
    dense_site = sum(8 * _elements(n) for n in LLAMA_7B) * LAYERS
    print(
        f"\nsvd merge of a LLaMA-7B-shaped adapter: rank {RANK}, 32 layers of q/k/v/o 4096x4096, gate/up 11008x4096, "
        f"down 4096x11008 (224 modules; {per_site / MB:.0f} MB float32 per hospital; its dense float64 update "
        f"{dense_site / 1e9:.1f} GB per hospital)"
    )
    print(
        f"peak MB: peak RSS above the RSS with the global and received adapters loaded (own process, VmHWM reset "
        f"before; includes the new global adapter, {per_site / MB:.0f} MB for all 224); torch threads: {threads}"
    )
    print(f"{'hospitals':>9} {'path':9} {'modules':26} {'seconds':>9} {'peak MB':>10}  note")
    results: dict[str, object] = {}
    for hospitals in (4, 16):
        per = dense_modules(hospitals, threads, budget)
        for name, r in per.items():
            what = f"1 x {name} {SHAPES[name]}"
            note = "extrapolated from q_proj by element count" if r["extrapolated"] else "measured"
            print(_row(hospitals, "dense", what, float(r["seconds"]), float(r["peak_bytes"]), note))
            print(
                _row(
                    hospitals,
                    "factored",
                    what,
                    float(r["factored_seconds"]),
                    float(r["factored_peak_bytes"]),
                    "measured",
                )
            )
        whole = measure("factored", hospitals, "all", threads)
        # the dense code formed every module's updates before the mean: the modules' costs add up
        d_sec = sum(float(per[n]["seconds"]) * _count(n) for n in per)
        d_peak = sum(float(per[n]["peak_bytes"]) * _count(n) for n in per)
        print(_row(hospitals, "factored", "all 224", whole["seconds"], whole["peak_bytes"], "measured"))
        held = f"{hospitals} x {dense_site / 1e9:.1f} GB = {hospitals * dense_site / 1e9:.0f} GB"
        note = f"extrapolated: the modules above, summed (the hospitals' dense updates alone: {held})"
        print(_row(hospitals, "dense", "all 224", d_sec, d_peak, note))
        print(
            f"{hospitals:>9} dense / factored, whole adapter: {d_sec / whole['seconds']:.1f}x the time, "
            f"{d_peak / whole['peak_bytes']:.0f}x the memory; factored under 1 GB: "
            f"{'yes' if whole['peak_bytes'] < 1e9 else 'NO'} ({whole['peak_bytes'] / 1e9:.2f} GB, received adapters "
            f"{whole['adapter_bytes'] / 1e9:.2f} GB)"
        )
        results[str(hospitals)] = {
            "modules": per,
            "factored_all": whole,
            "dense_all_extrapolated": {"seconds": d_sec, "peak_bytes": d_peak},
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-7b", action="store_true", help="skip the LLaMA-7B-shaped adapter")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--dense-budget-gb", type=float, default=3.0, help="largest dense measurement to run")
    parser.add_argument("--child", nargs=3, metavar=("PATH", "HOSPITALS", "MODULES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    start = smollm2_adapter()
    smol = {name: time_merge(name, start, args.repeats) for name in ("fedavg", "ffa", "svd")}
    print(f"one round's merge, 3 hospitals, SmolLM2-135M adapter (rank 8, q/k/v/o, {len(start) // 2} modules)")
    print(f"{'rule':8} {'seconds':>9} {'x fedavg':>9}")
    for name, seconds in smol.items():
        print(f"{name:8} {seconds:9.3f} {seconds / smol['fedavg']:9.1f}")
    results: dict[str, object] = dict(smol)
    if not args.no_7b:
        results["llama7b"] = seven_b(args.threads or torch.get_num_threads(), args.dense_budget_gb * 1e9)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "merge.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
