"""The local training loop a site runs each round. No Flower in here.

The optimizer (AdamW over the LoRA parameters only) is fresh every round, as in
FedAvg; the learning-rate schedule runs over the whole federation, so round r starts
at step (r - 1) * local_steps of the same curve.
"""

from __future__ import annotations

import functools
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from peft import PeftModel

from fedtune import progress
from fedtune.config import TrainSettings
from fedtune.data.tokens import TokenizedExample, collate


@functools.cache
def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """Compute dtype for autocast, or None for plain float32.

    ``auto`` picks bf16 where the hardware does it natively (CUDA with bf16, CPUs
    with AVX512-BF16 or AMX); ``benchmarks/round_overhead.py`` prints the bf16/fp32
    step-time ratio. Weights stay float32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if _cpu_has_bf16() else None


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based) of ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if schedule == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, settings: TrainSettings, step: int, *, total_steps: int) -> float:
    """Put step ``step``'s learning rate of the run's schedule into ``optimizer``; return it."""
    lr = lr_at(
        step,
        base_lr=settings.lr,
        total_steps=total_steps,
        warmup_steps=settings.warmup_steps,
        schedule=settings.lr_schedule,
    )
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def steps_per_round(settings: TrainSettings, num_examples: int) -> int:
    """``local_steps``, or the steps that make ``local_epochs`` passes over the data."""
    if settings.local_epochs > 0:
        per_step = settings.batch_size * settings.grad_accum
        return max(1, math.ceil(settings.local_epochs * num_examples / per_step))
    return settings.local_steps


def _batches(n: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless shuffled mini-batches of indices, reshuffled at every epoch."""
    rng = random.Random(seed)
    while True:
        order = list(range(n))
        rng.shuffle(order)
        for i in range(0, n, batch_size):
            yield order[i : i + batch_size]


def answer_token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of the answer tokens, shape (batch, positions),
    zero off the answer, and the matching 0/1 mask.

    Only positions that predict an answer token need logits: the batch keeps the last
    ``width - first + 1`` positions (``first`` = earliest answer token in the batch), so
    the vocabulary projection and softmax skip most of the prompt. For SmolLM2 the LM
    head is ~21% of a token's multiply-adds (576 x 49152 = 28.3M of ~134.5M: 30 layers x
    3.54M + the head) and answers are ~40 of ~200 tokens. Equals the full-logit loss (tested).
    """
    labels = batch["labels"]
    answer = (labels != -100).any(dim=0).nonzero()
    if answer.numel() == 0:
        empty = labels.new_zeros((labels.shape[0], 0), dtype=torch.float32)
        return empty, empty
    first = max(1, int(answer[0]))
    keep = labels.shape[1] - first + 1
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    target = labels[:, first:]
    nll = torch.nn.functional.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view(target.shape)
    return nll, (target != -100).float()


def answer_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of negative log-likelihood over the batch's answer tokens, their number)."""
    nll, mask = answer_token_nll(model, batch)
    return nll.sum(), int(mask.sum())


def make_optimizer(settings: TrainSettings, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The local optimizer over the adapter's parameters, fresh each round."""
    if settings.optimizer == "sgd":
        return torch.optim.SGD(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)


def proximal_anchor(settings: TrainSettings, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """The round's starting values of ``params`` when FedProx is on (``train.proximal_mu``), else []."""
    return [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []


def proximal_pull(params: list[torch.nn.Parameter], anchor: list[torch.Tensor], *, lr: float, mu: float) -> None:
    """FedProx's proximal term mu/2 * ||w - w_round||^2, as a decoupled step after the optimizer's:
    w <- w - lr * mu * (w - w_round).

    For SGD this is the gradient step on the proximal term (to first order in lr); with Adam
    it is kept out of the adaptive scaling, like AdamW's weight decay. It uses no data, so
    under DP-SGD it is post-processing and costs no privacy.
    """
    if not anchor:
        return
    with torch.no_grad():
        for p, a in zip(params, anchor, strict=True):
            p.sub_((lr * mu) * (p - a))


@dataclass(frozen=True)
class TrainResult:
    """What one local training run did."""

    steps: int
    examples_seen: int
    mean_loss: float
    seconds: float


def train_local(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    settings: TrainSettings,
    *,
    pad_id: int,
    seed: int,
    precision: str = "auto",
    step_offset: int = 0,
    total_steps: int | None = None,
) -> TrainResult:
    """Train the adapter of ``model`` in place for one round of local steps."""
    if not examples:
        raise ValueError("train_local needs at least one example")
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    steps = steps_per_round(settings, len(examples))
    total = total_steps if total_steps is not None else step_offset + steps
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(settings, params)
    anchor = proximal_anchor(settings, params)
    batches = _batches(len(examples), settings.batch_size, seed)
    model.train()
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    for step in range(steps):
        lr = set_lr(optimizer, settings, step_offset + step, total_steps=total)
        step_loss = 0.0
        for _ in range(settings.grad_accum):
            idx = next(batches)
            batch = {k: v.to(device) for k, v in collate([examples[i] for i in idx], pad_id=pad_id).items()}
            with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                nll, count = answer_nll(model, batch)
                loss = nll / max(count, 1) / settings.grad_accum
            loss.backward()
            step_loss += float(loss.detach())
            seen += len(idx)
        torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        proximal_pull(params, anchor, lr=lr, mu=settings.proximal_mu)
        losses.append(step_loss)
        progress.step(step + 1, steps, step_loss)
    model.eval()
    return TrainResult(
        steps=steps,
        examples_seen=seen,
        mean_loss=sum(losses) / len(losses),
        seconds=time.perf_counter() - start,
    )
