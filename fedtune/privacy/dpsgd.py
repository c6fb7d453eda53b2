"""Sample-level DP-SGD on the LoRA parameters with Opacus. No Flower in here.

Each step draws a Poisson sample (every record independently with probability
q = batch_size * grad_accum / n), computes per-sample gradients of the trainable (LoRA)
parameters only, clips each to ``max_grad_norm``, sums, adds Gaussian noise with standard
deviation ``noise_multiplier * max_grad_norm`` and divides by the expected batch size:
Opacus's ``GradSampleModule`` and ``DPOptimizer`` do the clipping and noise. A sample larger
than ``batch_size`` is processed in physical chunks of ``batch_size`` whose clipped
gradients are summed before the one noisy step (Opacus's ``signal_skip_step``, as in its
``BatchMemoryManager``). A round is one :class:`~fedtune.privacy.accounting.Mechanism`
(noise_multiplier, q, steps) for the accountant.

Sampling and noise come from generators seeded by the OS's CSPRNG (never from the run's
seed, which the coordinator knows), and Opacus's ``secure_mode`` hides the noise's
floating-point fingerprint.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from peft import PeftModel

from fedtune import progress
from fedtune.config import TrainSettings
from fedtune.data.tokens import TokenizedExample, collate
from fedtune.privacy.accounting import Mechanism, secure_generator
from fedtune.train import (
    TrainResult,
    answer_token_nll,
    autocast_dtype,
    make_optimizer,
    proximal_anchor,
    proximal_pull,
    set_lr,
)


def per_example_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean answer-token loss of each example (shape: batch): one record, one gradient."""
    nll, mask = answer_token_nll(model, batch)
    return (nll * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def sample_rate(settings: TrainSettings, num_examples: int) -> float:
    """Poisson sampling rate q of one DP-SGD step: the logical batch over the records."""
    return min(1.0, settings.batch_size * settings.grad_accum / num_examples)


def train_local_dp(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    settings: TrainSettings,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    steps: int,
    pad_id: int,
    seed: int | None = None,
    precision: str = "auto",
    grad_sample_mode: str = "hooks",
    step_offset: int = 0,
    total_steps: int | None = None,
) -> tuple[TrainResult, Mechanism | None]:
    """DP-SGD on the adapter of ``model`` in place for ``steps`` steps.

    ``settings.batch_size * settings.grad_accum`` is the expected (logical) batch,
    ``settings.batch_size`` the physical one; ``settings.max_grad_norm`` is ignored in
    favour of the DP clipping bound. The noisy gradient is post-processed by
    ``settings.optimizer`` (``adamw`` or plain ``sgd``); either way the privacy guarantee
    is the mechanism's, returned with the result (None for ``noise_multiplier`` 0: clipping
    only, no privacy). ``seed`` makes sampling and noise reproducible and is for tests
    only: None (the default) draws both from the OS's CSPRNG.
    """
    if not examples:
        raise ValueError("train_local_dp needs at least one example")
    n = len(examples)
    q = sample_rate(settings, n)
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = proximal_anchor(settings, params)
    gsm, optimizer, sampler = _make_private(
        model, settings, params, noise_multiplier, max_grad_norm, grad_sample_mode=grad_sample_mode, seed=seed
    )
    total = total_steps if total_steps is not None else step_offset + steps
    losses: list[float] = []
    seen = 0
    start = time.perf_counter()
    gsm.train()
    try:
        for step in range(steps):
            lr = set_lr(optimizer, settings, step_offset + step, total_steps=total)
            chosen = (torch.rand(n, generator=sampler) < q).nonzero().flatten().tolist()
            sample = [examples[j] for j in chosen]
            step_loss = _noisy_step(gsm, optimizer, params, sample, settings.batch_size, pad_id, device, dtype)
            proximal_pull(params, anchor, lr=lr, mu=settings.proximal_mu)
            if chosen:
                losses.append(step_loss / len(chosen))
                seen += len(chosen)
            progress.step(step + 1, steps)  # no loss: under DP it stays inside the mechanism
    finally:
        _release(gsm, params)
    model.eval()
    mean_loss = sum(losses) / len(losses) if losses else float("nan")
    result = TrainResult(steps=steps, examples_seen=seen, mean_loss=mean_loss, seconds=time.perf_counter() - start)
    return result, Mechanism(noise_multiplier, q, steps) if noise_multiplier > 0 else None


def _make_private(
    model: PeftModel,
    settings: TrainSettings,
    params: list[torch.nn.Parameter],
    noise_multiplier: float,
    max_grad_norm: float,
    *,
    grad_sample_mode: str,
    seed: int | None,
) -> tuple[GradSampleModule, DPOptimizer, torch.Generator]:
    """Opacus's per-sample gradient module, its clipping and noising optimizer, and the
    generator of the Poisson samples (noise and sampling from the CSPRNG unless ``seed``)."""
    device = next(model.parameters()).device
    gsm = GradSampleModule(
        model, batch_first=True, loss_reduction="mean", strict=False, force_functorch=grad_sample_mode == "functorch"
    )
    sampler = secure_generator("cpu", None if seed is None else seed)
    noise = secure_generator(device, None if seed is None else seed + 1)
    optimizer = DPOptimizer(
        make_optimizer(settings, params),
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=settings.batch_size * settings.grad_accum,  # the logical batch
        loss_reduction="mean",
        generator=noise,
        secure_mode=True,
    )
    return gsm, optimizer, sampler


def _noisy_step(
    gsm: GradSampleModule,
    optimizer: DPOptimizer,
    params: Sequence[torch.nn.Parameter],
    sample: Sequence[TokenizedExample],
    batch_size: int,
    pad_id: int,
    device: torch.device,
    dtype: torch.dtype | None,
) -> float:
    """One DP-SGD step over a Poisson ``sample`` cut into physical batches of ``batch_size``:
    each chunk's per-sample gradients are clipped and summed, then one noisy step is taken.
    Returns the sum of the sample's per-example losses."""
    chunks = [sample[i : i + batch_size] for i in range(0, len(sample), batch_size)]
    if not chunks:
        # An empty Poisson sample is still a step: the update is pure noise. Opacus
        # would skip the noise if no parameter had a per-sample gradient.
        for p in params:
            p.grad_sample = torch.zeros((1, *p.shape), device=p.device, dtype=p.dtype)  # type: ignore[attr-defined]
    step_loss = 0.0
    for i, chunk in enumerate(chunks):
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id=pad_id).items()}
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            per_example = per_example_loss(gsm, batch)
            loss = per_example.mean()
        with warnings.catch_warnings():
            # The frozen base model's inputs need no gradient; Opacus's hooks
            # fire on module outputs, which is what they need.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            loss.backward()
        step_loss += float(per_example.detach().sum())
        if i < len(chunks) - 1:
            # Clip and sum this chunk's per-sample gradients; no noise, no step yet.
            optimizer.signal_skip_step(do_skip=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return step_loss


def _release(gsm: GradSampleModule, params: Sequence[torch.nn.Parameter]) -> None:
    """Remove Opacus's hooks and per-sample state: the resident model serves non-DP work too."""
    gsm._close()
    for p in params:
        p.grad = None
        p.grad_sample = None  # type: ignore[attr-defined]
        p.summed_grad = None  # type: ignore[attr-defined]
