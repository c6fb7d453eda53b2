"""Sample-level DP-SGD on the LoRA parameters with Opacus. No Flower in here.

Each step draws a Poisson sample (every record independently with probability
q = batch_size / n), computes per-sample gradients of the trainable (LoRA) parameters
only, clips each to ``max_grad_norm``, sums, adds Gaussian noise with standard
deviation ``noise_multiplier * max_grad_norm`` and divides by the expected batch size:
Opacus's ``GradSampleModule`` and ``DPOptimizer`` do the clipping and noise. A round is
one Gaussian mechanism (noise_multiplier, q, steps) for the accountant.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from peft import PeftModel

from fedtune.config import TrainSettings
from fedtune.data import TokenizedExample, collate
from fedtune.train import TrainResult, answer_token_nll, autocast_dtype, lr_at, make_optimizer


@dataclass(frozen=True)
class DPStep:
    """The privacy mechanism a run of DP-SGD applied: what the accountant composes."""

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int


def per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token loss of each example (shape: batch): one record, one gradient."""
    nll, mask = answer_token_nll(model, batch)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def train_local_dp(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    settings: TrainSettings,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    steps: int,
    pad_id: int,
    seed: int,
    precision: str = "auto",
    grad_sample_mode: str = "hooks",
    step_offset: int = 0,
    total_steps: int | None = None,
) -> tuple[TrainResult, DPStep]:
    """DP-SGD on the adapter of ``model`` in place for ``steps`` steps.

    Gradient accumulation does not apply (a Poisson sample is one logical batch);
    ``settings.max_grad_norm`` is ignored in favour of the DP clipping bound. The noisy
    gradient is post-processed by ``settings.optimizer`` (``adamw`` or plain ``sgd``);
    either way the privacy guarantee is the mechanism's.
    """
    if not examples:
        raise ValueError("train_local_dp needs at least one example")
    n = len(examples)
    sample_rate = min(1.0, settings.batch_size / n)
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", strict=False, force_functorch=grad_sample_mode == "functorch"
    )
    sampler = torch.Generator().manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    optimizer = DPOptimizer(
        make_optimizer(settings, params),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=settings.batch_size,
        loss_reduction="mean",
        generator=noise,
    )
    total = total_steps if total_steps is not None else step_offset + steps
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    gsm.train()
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = lr_at(
                    step_offset + step,
                    base_lr=settings.lr,
                    total_steps=total,
                    warmup_steps=settings.warmup_steps,
                    schedule=settings.lr_schedule,
                )
            chosen = (torch.rand(n, generator=sampler) < sample_rate).nonzero().flatten().tolist()
            if chosen:
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in chosen], pad_id=pad_id).items()}
                with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    loss = per_example_loss(gsm, batch).mean()
                with warnings.catch_warnings():
                    # The frozen base model's inputs need no gradient; Opacus's hooks
                    # fire on module outputs, which is what they need.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing")
                    loss.backward()
                losses.append(float(loss.detach()))
                seen += len(chosen)
            else:
                # An empty Poisson sample is still a step: the update is pure noise. Opacus
                # would skip the noise if no parameter had a per-sample gradient.
                for p in params:
                    p.grad_sample = torch.zeros((1, *p.shape), device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    finally:
        gsm._close()  # remove Opacus's hooks: the resident model serves non-DP work too
        for p in params:
            p.grad = None
            p.grad_sample = None  # type: ignore[attr-defined]
    model.eval()
    result = TrainResult(
        steps=steps,
        examples_seen=seen,
        mean_loss=sum(losses) / len(losses) if losses else float("nan"),
        seconds=time.perf_counter() - start,
    )
    return result, DPStep(noise_multiplier, max_grad_norm, sample_rate, steps)
