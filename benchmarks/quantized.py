"""What does a quantized base or gradient checkpointing buy? Peak memory and step time of LoRA training.

For one model (SmolLM2 by default) this trains the same rank-8 LoRA adapter on the same
clinical records with the base in float32, in bf16 autocast, and in NF4 (4-bit, double
quantization, bf16 compute), each with and without gradient checkpointing, every
configuration in a fresh process so its peak resident memory (ru_maxrss) is its own, and
prints the ratios against float32 without checkpointing measured in the same run.

On CPU, peak RSS includes the Python process, torch and the tokenizer: the fixed part is
in every row, so the ratios understate what quantization saves on the weights alone; the
resident memory after loading is printed too.

Usage: python benchmarks/quantized.py [--model smollm2] [--steps 3] [--batch-size 8]
Writes benchmarks/results/quantized.json.
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
# name: (model.precision, model.quantization, model.gradient_checkpointing)
CONFIGS = {
    "fp32": ("fp32", "none", False),
    "fp32+ckpt": ("fp32", "none", True),
    "bf16": ("bf16", "none", False),
    "bf16+ckpt": ("bf16", "none", True),
    "4bit": ("bf16", "4bit", False),
    "4bit+ckpt": ("bf16", "4bit", True),
}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _weights_mb(model: object) -> float:
    """The model's own tensors (NF4 weights as their packed bytes, plus their quantization
    constants): what the base costs in memory, apart from the process and the allocator."""
    import torch

    assert isinstance(model, torch.nn.Module)
    total = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    for module in model.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:  # absmax (and its own quantization with double quantization), code
            packed = state.as_dict(packed=True).values()
            total += sum(t.numel() * t.element_size() for t in packed if torch.is_tensor(t))
    return total / 2**20


def worker(model: str, name: str, steps: int, batch: int) -> dict[str, float]:
    from fedtune.config import LoraSettings, ModelSettings, TrainSettings
    from fedtune.data import clinical
    from fedtune.lora.adapter import initial_state
    from fedtune.models import load_model_config
    from fedtune.runtime import SiteRuntime, site_data

    precision, quantization, checkpointing = CONFIGS[name]
    settings = ModelSettings(
        source=model, precision=precision, quantization=quantization, gradient_checkpointing=checkpointing
    )
    runtime = SiteRuntime(settings, LoraSettings())
    loaded = _rss_mb()
    weights = _weights_mb(runtime.model)
    train, held = clinical.generate(1, n_train=64, n_eval=1, seed=0)["st-elsewhere"]
    data = site_data(runtime, "s", train, held, 256)
    train_settings = TrainSettings(batch_size=batch, max_length=256)
    start_state = initial_state(load_model_config(model), LoraSettings())  # the coordinator's seeded round 0
    runtime.train_steps(start_state, data, train_settings, steps=1, seed=0)  # warm-up
    start = time.perf_counter()
    result = runtime.train_steps(start_state, data, train_settings, steps=steps, seed=0)
    seconds = (time.perf_counter() - start) / steps
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "step_s": seconds,
        "peak_rss_mb": peak,
        "loaded_rss_mb": loaded,
        "weights_mb": weights,
        "loss": result.mean_loss,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.steps, args.batch_size)))
        return 0
    results: dict[str, dict[str, float]] = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--worker", name, "--model", args.model]
        cmd += ["--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        results[name] = r = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{name:10} {r['step_s']:7.2f} s/step  peak {r['peak_rss_mb']:6.0f} MB  "
            f"after load {r['loaded_rss_mb']:6.0f} MB  weights {r['weights_mb']:6.1f} MB  loss {r['loss']:.3f}",
            flush=True,
        )
    base = results["fp32"]
    print(f"\n{args.model}: against fp32 without checkpointing, same run")
    print(f"{'config':10} {'step time':>10} {'peak RSS':>9} {'RSS after load':>15} {'weights':>8}")
    for name, r in results.items():
        print(
            f"{name:10} {r['step_s'] / base['step_s']:10.2f} {r['peak_rss_mb'] / base['peak_rss_mb']:9.2f} "
            f"{r['loaded_rss_mb'] / base['loaded_rss_mb']:15.2f} {r['weights_mb'] / base['weights_mb']:8.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "model": args.model, "steps": args.steps, "batch": args.batch_size}
    (RESULTS / "quantized.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'quantized.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
