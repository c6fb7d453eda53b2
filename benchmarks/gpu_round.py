"""What does a hospital's round cost on a GPU? SmolLM2 in bf16 and in 4-bit, and an 8B model's QLoRA step.

Three configurations, each in a fresh process (so its peak memory is its own), each training
the LoRA adapter for ``--steps`` local steps on the embedded clinical records, as a simulated
hospital's round does (``train.local_steps`` = 5, batch 4, 256 tokens by default):

- ``bf16``: SmolLM2 (float32 weights, bf16 autocast: ``model.precision = "bf16"``), rank 8 on
  q/k/v/o, through the same ``SiteRuntime`` a hospital trains with: the baseline;
- ``4bit``: the same with the base in NF4 (``model.quantization = "4bit"``, bf16 compute);
- ``qlora``: ``fedtune.scale``'s ``llama-8b`` (Llama-3.1-8B's shape, **random weights**:
  time and memory only, never quality) with its linear layers in NF4, peft's k-bit
  preparation, gradient checkpointing, rank 16 on all linear layers.

For each it prints the time per step, peak GPU memory (``torch.cuda.max_memory_allocated``
and ``max_memory_reserved``), tokens per second (the records' tokens, padding excluded) and
the ratios against ``bf16`` measured in the same run; it writes
``benchmarks/results/gpu_round.json``. Without CUDA it prints one line and exits 0.

``--device cpu --model tiny --scale micro`` runs the same code on the tiny test model (and a
micro LLaMA shape for the QLoRA row): a smoke test of this script, not a measurement
(``--same-process`` skips the fresh processes; the tests run it so).

Usage: python benchmarks/gpu_round.py [--steps 5] [--batch-size 4] [--max-length 256]
       [--scale llama-8b] [--device cuda|cpu] [--model smollm2|tiny] [--out FILE]
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
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
CONFIGS = ("bf16", "4bit", "qlora")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _micro_config(vocab: int) -> Any:
    """A LLaMA shape small enough for the CPU smoke run, with the tiny tokenizer's vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
    )  # fmt: skip


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peaks(device: Any) -> dict[str, float | None]:
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type != "cuda":
        return {"peak_allocated_mb": None, "peak_reserved_mb": None, "peak_rss_mb": rss}
    return {
        "peak_allocated_mb": torch.cuda.max_memory_allocated(device) / 2**20,
        "peak_reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20,
        "peak_rss_mb": rss,
    }


def _tokens_trained(examples: list[Any], settings: Any, seed: int) -> int:
    """The records' tokens (no padding) in the batches ``train_local`` draws with ``seed``."""
    from fedtune.train import _batches

    batches = _batches(len(examples), settings.batch_size, seed)
    return sum(len(examples[i].input_ids) for _ in range(settings.local_steps) for i in next(batches))


def _records() -> tuple[list[Any], list[Any]]:
    from fedtune.data import clinical

    return clinical.generate(1, n_train=64, n_eval=1, seed=0)["st-elsewhere"]


def _timed(train: Any, device: Any, examples: list[Any], settings: Any) -> dict[str, Any]:
    """One warm-up step, then ``settings.local_steps`` timed steps of ``train(settings)``."""
    import dataclasses

    import torch

    train(dataclasses.replace(settings, local_steps=1))
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = train(settings)
    _sync(device)
    seconds = time.perf_counter() - start
    tokens = _tokens_trained(examples, settings, seed=0)
    return {
        "step_s": seconds / settings.local_steps,
        "tokens_per_s": tokens / seconds,
        "loss": result.mean_loss,
        **_peaks(device),
    }


def _site_row(args: argparse.Namespace, quantization: str, settings: Any) -> dict[str, Any]:
    """SmolLM2 (or the tiny model) through a hospital's ``SiteRuntime``."""
    from fedtune.config import LoraSettings, ModelSettings
    from fedtune.lora.adapter import initial_state
    from fedtune.models import load_model_config
    from fedtune.runtime import SiteRuntime, site_data

    model = ModelSettings(source=args.model, precision="bf16", device=args.device, quantization=quantization)
    runtime = SiteRuntime(model, LoraSettings())
    data = site_data(runtime, "st-elsewhere", *_records(), args.max_length)
    examples = data.train_tokens
    start = initial_state(load_model_config(args.model), LoraSettings())  # the coordinator's round 0

    def train(s: Any) -> Any:
        return runtime.train_steps(start, data, s, steps=s.local_steps, seed=0)

    row = _timed(train, runtime.base.model.device, examples, settings)
    return {**row, "trainable": sum(p.numel() for p in runtime.model.parameters() if p.requires_grad)}


def _qlora_row(args: argparse.Namespace, settings: Any) -> dict[str, Any]:
    """A random-weight LLaMA shape in NF4: k-bit preparation, checkpointing, rank 16 on all linears."""
    import torch
    from transformers import AutoTokenizer

    from fedtune.config import LoraSettings
    from fedtune.data.tokens import tokenize
    from fedtune.lora.adapter import attach_lora
    from fedtune.models import resolve_model_dir
    from fedtune.quantize import prepare_for_training
    from fedtune.scale import build_scale_model
    from fedtune.train import train_local

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(args.model))  # the same records' tokens
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    arch = _micro_config(len(tokenizer)) if args.scale == "micro" else args.scale
    device = torch.device(args.device)
    base = build_scale_model(arch, device=args.device, dtype=torch.bfloat16, quantization="4bit")
    prepare_for_training(base, kbit_prepare=True, gradient_checkpointing=True)
    model = attach_lora(base, LoraSettings(rank=16, alpha=32, target_modules=ALL_LINEAR))
    examples = tokenize(_records()[0], tokenizer, max_length=args.max_length)

    def train(s: Any) -> Any:
        return train_local(model, examples, s, pad_id=int(pad), seed=0, precision="bf16")

    row = _timed(train, device, examples, settings)
    return {**row, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def worker(args: argparse.Namespace, name: str) -> dict[str, Any]:
    from fedtune.config import TrainSettings

    settings = TrainSettings(local_steps=args.steps, batch_size=args.batch_size, max_length=args.max_length)
    if name == "qlora":
        return _qlora_row(args, settings)
    return _site_row(args, "4bit" if name == "4bit" else "none", settings)


def _line(name: str, r: dict[str, Any], base: dict[str, Any]) -> str:
    def mb(key: str) -> str:
        return "    n/a" if r[key] is None else f"{r[key]:7.0f}"

    def ratio(key: str) -> str:
        return "  n/a" if r[key] is None or not base[key] else f"{r[key] / base[key]:5.2f}"

    return (
        f"{name:9} {r['step_s']:8.3f} s/step {r['tokens_per_s']:9.0f} tok/s  "
        f"peak alloc {mb('peak_allocated_mb')} MB  reserved {mb('peak_reserved_mb')} MB  | x bf16: "
        f"step {ratio('step_s')}  tok/s {ratio('tokens_per_s')}  alloc {ratio('peak_allocated_mb')}  "
        f"reserved {ratio('peak_reserved_mb')}"
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--model", default="smollm2", help="the hospital model: smollm2 (tiny: smoke run)")
    parser.add_argument("--scale", default="llama-8b", help="fedtune.scale shape of the QLoRA row (micro: smoke)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu_round.json")
    parser.add_argument(
        "--same-process", action="store_true", help="every configuration in this process (smoke runs: shared peaks)"
    )
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    return parser


def _run_all(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    for name in CONFIGS:
        if args.same_process:
            results[name] = worker(args, name)
            print(_line(name, results[name], results["bf16"]), flush=True)
            continue
        cmd = [sys.executable, __file__, "--worker", name, "--device", args.device, "--model", args.model]
        cmd += ["--scale", args.scale, "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        cmd += ["--max-length", str(args.max_length)]
        out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode != 0:
            sys.exit(f"gpu_round: the {name} configuration failed:\n{out.stderr[-3000:]}")
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        print(_line(name, results[name], results["bf16"]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_round: no CUDA device here; skipped (smoke test: --device cpu --model tiny --scale micro)")
            return 0
    if args.worker:
        print(json.dumps(worker(args, args.worker)))
        return 0
    print(f"{args.model} rounds and a {args.scale} QLoRA step on {args.device}: {args.steps} steps, "
          f"batch {args.batch_size}, {args.max_length} tokens; ratios against bf16, same run")  # fmt: skip
    results = _run_all(args)
    meta = {
        "device": args.device, "model": args.model, "scale": args.scale, "steps": args.steps,
        "batch": args.batch_size, "max_length": args.max_length, "gpu": _gpu_name(args.device),
        "note": "qlora: random weights, for time and memory only",
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _gpu_name(device: str) -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if device == "cuda" else None


if __name__ == "__main__":
    sys.exit(main())
