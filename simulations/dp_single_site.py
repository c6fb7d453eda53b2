"""Tune DP-SGD on one hospital before federating: field accuracy per (noise, batch, lr, adapter).

Trains one hospital's LoRA adapter on SmolLM2 (or any --model) for --steps DP-SGD steps
and evaluates it on that hospital's held-out notes: the quickest way to see whether a
learning rate, logical batch or adapter shape can learn anything at a given noise
multiplier before spending a federation on it. --sigma 0 trains without DP (same loop
as the federation's clients). The noise multiplier for a target epsilon comes from
``fedtune.privacy.accounting.noise_for_target`` (printed with --target-epsilon).

Usage:
  python simulations/dp_single_site.py --target-epsilon 8 --accum 4 --lr 2e-2
  python simulations/dp_single_site.py --sigma 0 --accum 4 --lr 1e-2
Appends one JSON line per run to simulations/results/dp_single_site.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "dp_single_site.jsonl"


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--site", default="st-elsewhere")
    p.add_argument("--n", type=int, default=160, help="training records")
    p.add_argument("--batch", type=int, default=4, help="physical batch")
    p.add_argument("--accum", type=int, default=4, help="logical batch = batch x accum")
    p.add_argument("--steps", type=int, default=15)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--sigma", type=float, help="noise multiplier (0: no DP)")
    group.add_argument("--target-epsilon", type=float, help="noise for this epsilon over --steps at --delta")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--clip", type=float, default=1.0, help="per-sample clipping norm")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--ffa", action="store_true", help="train only B (A frozen at its seeded start), as `ffa` does")
    p.add_argument("--schedule", default="constant", choices=("constant", "linear", "cosine"))
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps")
    p.add_argument("--eval", type=int, default=10, help="held-out records evaluated")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--grad-norms", type=int, default=0, help="print N gradient norms at the start, exit")
    return p.parse_args()


def main() -> int:
    a = _args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from fedtune.config import EvalSettings, LoraSettings, ModelSettings, TrainSettings
    from fedtune.data import clinical
    from fedtune.privacy.accounting import noise_for_target
    from fedtune.privacy.dpsgd import sample_rate
    from fedtune.runtime import SiteRuntime, site_data

    torch.manual_seed(0)
    lora = LoraSettings(rank=a.rank, alpha=2 * a.rank, target_modules=tuple(a.targets.split(",")))
    runtime = SiteRuntime(ModelSettings(source=a.model), lora)
    train, held = clinical.generate(len(clinical.HOSPITALS), n_train=a.n, n_eval=a.eval, seed=0)[a.site]
    data = site_data(runtime, a.site, train, held, a.max_length)
    runtime.load(runtime.state(), freeze_a=a.ffa)
    settings = TrainSettings(
        batch_size=a.batch,
        grad_accum=a.accum,
        local_steps=a.steps,
        lr=a.lr,
        lr_schedule=a.schedule,
        warmup_steps=a.warmup,
        max_length=a.max_length,
    )
    if a.grad_norms:
        print(json.dumps({"grad_norms": _grad_norms(runtime, data.train_tokens[: a.grad_norms])}))
        return 0
    q = sample_rate(settings, len(data.train_tokens))
    sigma = a.sigma
    if a.target_epsilon is not None:
        sigma = noise_for_target(target_epsilon=a.target_epsilon, delta=a.delta, sample_rate=q, steps=a.steps)
    start, cpu_start = time.perf_counter(), time.process_time()
    result, epsilon = _train(a, runtime, data, settings, sigma or 0.0, q)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    ev = runtime.evaluate(runtime.state(), data, EvalSettings()).as_metrics()
    row = {
        **{k: v for k, v in vars(a).items() if k != "target_epsilon"},
        "sigma": sigma or 0.0,
        "epsilon": epsilon,
        "trainable": sum(p.numel() for p in runtime.model.parameters() if p.requires_grad),
        "train_s": round(seconds),
        "train_cpu_s": round(cpu_seconds),
        "examples_seen": result.examples_seen,
        "train_loss": round(result.mean_loss, 3),
        "field_acc": round(ev["metric"], 3),
        "eval_loss": round(ev["loss"], 3),
    }
    print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


def _train(
    a: argparse.Namespace, runtime: Any, data: Any, settings: Any, sigma: float, q: float
) -> tuple[Any, float | None]:
    """DP-SGD at noise ``sigma`` (0: the federation's non-private loop); the result and epsilon spent."""
    from fedtune.privacy.accounting import Mechanism, epsilon_spent
    from fedtune.privacy.dpsgd import train_local_dp
    from fedtune.train import train_local

    pad = int(runtime.base.tokenizer.pad_token_id)
    if sigma <= 0:
        return train_local(runtime.model, data.train_tokens, settings, pad_id=pad, seed=0), None
    result, _ = train_local_dp(
        runtime.model,
        data.train_tokens,
        settings,
        noise_multiplier=sigma,
        max_grad_norm=a.clip,
        steps=a.steps,
        pad_id=pad,
    )
    return result, epsilon_spent([Mechanism(sigma, q, a.steps)], delta=a.delta)


def _grad_norms(runtime: Any, examples: list[Any]) -> list[float]:
    """Each record's gradient norm over the trainable (LoRA) values: where to put the clipping bound."""
    import torch

    from fedtune.data.tokens import collate
    from fedtune.privacy.dpsgd import per_example_loss
    from fedtune.train import autocast_dtype

    params = [p for p in runtime.model.parameters() if p.requires_grad]
    dtype = autocast_dtype(runtime.settings.precision, torch.device("cpu"))
    pad, norms = int(runtime.base.tokenizer.pad_token_id), []
    runtime.model.train()
    for example in examples:
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = per_example_loss(runtime.model, collate([example], pad_id=pad)).mean()
        loss.backward()
        norms.append(round(float(torch.sqrt(sum((p.grad.float() ** 2).sum() for p in params))), 4))
        for p in params:
            p.grad = None
    return sorted(norms)


if __name__ == "__main__":
    raise SystemExit(main())
