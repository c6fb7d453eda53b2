"""Is `fedtune plan` right? Its predicted peak training memory against the peak measured here.

For SmolLM2 and a random-weight LLaMA-1B (``fedtune/scale.py``: systems measurements only),
in fp32, bf16 (autocast over float32 weights, as fedtune trains) and 4-bit (NF4, double
quantization, bf16 compute, peft's k-bit preparation), each with and without gradient
checkpointing and with and without DP-SGD (Opacus, per-sample gradients of the LoRA layers),
one training step runs in a fresh process, the way ``benchmarks/quantized.py`` does, and this
prints what ``fedtune plan`` predicts for it, what was measured and the error.

What is measured, on CPU: the process's peak resident memory (``VmHWM``) during the training
step, minus its resident memory after the libraries were imported and before the model was
built. The peak counter is reset (``/proc/self/clear_refs``) once the model is loaded and the
adapter attached, so a loader's transient copies are not counted (the plan is for training)
while everything still resident (the base weights, the allocator's leftovers) is. Each worker
runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so glibc maps every tensor above 64 KiB on its own
and returns it when freed: resident memory then follows live tensors, as a GPU's peak
allocated memory does. Every position of every sequence is an answer token (the loss, and so
the logits, cover the whole batch: the plan's worst case).

Usage: python benchmarks/plan.py [--models smollm2,llama-1b] [--only fp32,4bit+ckpt+dp] [--reuse]
       [--size llama-1b=4x256 --out plan-1b-large.json]
Writes benchmarks/results/plan.json (``--reuse``: the measurements in it, predicted again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent
TOLERANCE = 0.15
# model: (batch, sequence length); the 1B model's keeps its fp32 steps to a minute or so on 2 cores
SIZES = {"smollm2": (4, 128), "llama-1b": (1, 128)}
# name: (precision, quantization)
FORMATS = {"fp32": ("fp32", "none"), "bf16": ("bf16", "none"), "4bit": ("bf16", "4bit")}
CONFIGS = [f"{f}{c}{d}" for f in FORMATS for c in ("", "+ckpt") for d in ("", "+dp")]
LORA = {"rank": 16, "alpha": 32, "target_modules": ("q_proj", "k_proj", "v_proj", "o_proj")}


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def parse(name: str) -> tuple[str, str, bool, bool]:
    """(precision, quantization, checkpointing, dp) of a configuration name."""
    parts = name.split("+")
    precision, quantization = FORMATS[parts[0]]
    return precision, quantization, "ckpt" in parts, "dp" in parts


def _build(model: str, precision: str, quantization: str, checkpointing: bool):  # noqa: ANN202 - a PeftModel
    import torch

    from fedtune.config import LoraSettings
    from fedtune.lora.adapter import attach_lora
    from fedtune.quantize import compute_dtype, prepare_for_training

    if model in ("smollm2", "tiny"):
        from fedtune.models import load_base_model

        base = load_base_model(model, quantization=quantization, precision=precision).model
    elif Path(model).is_dir():  # a model folder without a tokenizer (the test's small model)
        from transformers import AutoModelForCausalLM

        from fedtune.quantize import load_quantized

        dtype = compute_dtype(precision, torch.device("cpu"))
        if quantization == "none":
            base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        else:
            base = load_quantized(model, quantization, device=torch.device("cpu"), dtype=dtype)
    else:
        from fedtune.scale import build_scale_model

        dtype = compute_dtype(precision, torch.device("cpu")) if quantization == "4bit" else torch.float32
        base = build_scale_model(model, dtype=dtype, quantization=quantization)
    prepare_for_training(base, kbit_prepare=True, gradient_checkpointing=checkpointing)
    return attach_lora(base, LoraSettings(**LORA))  # type: ignore[arg-type]


def worker(model: str, name: str, batch: int, seq: int) -> dict[str, float]:
    import random

    import torch

    from fedtune.config import TrainSettings
    from fedtune.data.tokens import TokenizedExample
    from fedtune.privacy.dpsgd import train_local_dp
    from fedtune.train import train_local

    torch.set_num_threads(os.cpu_count() or 1)
    precision, quantization, checkpointing, dp = parse(name)
    before = _status_kb("VmRSS")
    peft_model = _build(model, precision, quantization, checkpointing)
    loaded = _status_kb("VmRSS")
    vocab = int(peft_model.config.vocab_size)
    rng = random.Random(0)
    examples = []
    for _ in range(batch):  # every token but the first is an answer token: logits over the whole sequence
        ids = tuple(rng.randrange(3, vocab) for _ in range(seq))
        examples.append(TokenizedExample(input_ids=ids, labels=(-100, *ids[1:])))
    settings = TrainSettings(batch_size=batch, local_steps=1, max_length=seq)
    _reset_peak()
    start = time.perf_counter()
    if dp:  # q = 1: all `batch` records in the one step
        train_local_dp(
            peft_model,
            examples,
            settings,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            steps=1,
            pad_id=0,
            seed=0,
            precision=precision,
        )
    else:
        train_local(peft_model, examples, settings, pad_id=0, seed=0, precision=precision)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {"measured_mb": (peak - before) / 1024, "loaded_mb": (loaded - before) / 1024, "step_s": seconds}


def predict(model: str, name: str, batch: int, seq: int) -> dict[str, float]:
    from fedtune.plan import PlanInput, hospital_peak, model_shape

    precision, quantization, checkpointing, dp = parse(name)
    plan = PlanInput(
        shape=model_shape(model),
        quantization=quantization,
        precision=precision,
        rank=int(LORA["rank"]),  # type: ignore[call-overload]
        target_modules=tuple(LORA["target_modules"]),  # type: ignore[arg-type]
        batch=batch,
        seq=seq,
        dp=dp,
        checkpointing=checkpointing,
        device="cpu",
    )
    return hospital_peak(plan)


def run_one(model: str, name: str, batch: int, seq: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--worker", name, "--model", model, "--batch", str(batch), "--seq", str(seq)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{model} {name} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(SIZES))
    parser.add_argument("--only", default="", help="comma-separated configurations (default: all 12)")
    parser.add_argument("--reuse", action="store_true", help="predict again for the measurements in --out")
    parser.add_argument("--size", action="append", default=[], metavar="MODEL=BxS", help="e.g. llama-1b=4x256")
    parser.add_argument("--out", default="plan.json", help="file in benchmarks/results/ (default plan.json)")
    parser.add_argument("--worker", metavar="CONFIG", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seq", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.model, args.worker, args.batch, args.seq)))
        return 0
    sys.path.insert(0, str(ROOT))
    configs = [c for c in args.only.split(",") if c] or CONFIGS
    sizes = {**SIZES, **{m: tuple(int(x) for x in bs.split("x")) for m, bs in (v.split("=") for v in args.size)}}
    saved: dict[tuple[str, str], dict[str, float]] = {}
    if args.reuse:  # the measurements of the last run, predicted again with today's formula
        old = json.loads((RESULTS / args.out).read_text())
        saved = {
            (r["model"], r["config"]): {k: r[k] for k in ("measured_mb", "loaded_mb", "step_s")} for r in old["rows"]
        }
        print(f"measured values reused from {RESULTS / args.out} (a run of {old['wall_s']:.0f} s); predictions new")
    started = time.perf_counter()
    rows: list[dict[str, object]] = []
    print(f"{'model':9} {'config':14} {'batch x seq':>11} {'predicted MB':>13} {'measured MB':>12} {'error':>7}")
    for model in args.models.split(","):
        batch, seq = sizes[model]
        for name in configs:
            got = saved[(model, name)] if saved else run_one(model, name, batch, seq)
            want = predict(model, name, batch, seq)
            error = want["total_mb"] / got["measured_mb"] - 1
            rows.append(
                {"model": model, "config": name, "batch": batch, "seq": seq, **got, "predicted": want, "error": error}
            )
            flag = "" if abs(error) <= TOLERANCE else "  OVER 15%"
            print(
                f"{model:9} {name:14} {f'{batch} x {seq}':>11} {want['total_mb']:13.0f} {got['measured_mb']:12.0f} "
                f"{error:+7.1%}{flag}",
                flush=True,
            )
    wall = float(old["wall_s"]) if saved else time.perf_counter() - started
    worst = max(abs(float(r["error"])) for r in rows)  # type: ignore[arg-type]
    within = sum(abs(float(r["error"])) <= TOLERANCE for r in rows)  # type: ignore[arg-type]
    print(f"\n{within} of {len(rows)} within {TOLERANCE:.0%}; worst {worst:.1%}; wall time {wall:.0f} s")
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "sizes": sizes, "lora": {**LORA, "target_modules": list(LORA["target_modules"])}}
    payload = {"meta": meta, "wall_s": wall, "tolerance": TOLERANCE, "rows": rows}
    (RESULTS / args.out).write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {RESULTS / args.out}")
    return 0 if within == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
