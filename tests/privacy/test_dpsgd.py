"""DP-SGD: per-sample clipping bounds one record's influence; noise and sampling are real."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from fedtune import progress
from fedtune.config import LoraSettings, ModelSettings, TrainSettings
from fedtune.data import clinical
from fedtune.data.records import Example
from fedtune.lora.delta import compute_delta, l2_norm
from fedtune.privacy.dpsgd import train_local_dp
from fedtune.runtime import SiteRuntime, site_data
from fedtune.train import train_local

C = 0.05  # clipping bound
LR = 0.5


@pytest.fixture(scope="module")
def setup(tiny_dir: Path):  # type: ignore[no-untyped-def]
    rt = SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), LoraSettings(rank=4))
    # a non-zero B so both LoRA factors get gradients
    state = {
        k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in rt.state().items()
    }
    train, _ = clinical.generate(1, n_train=6, n_eval=1, seed=0)["st-elsewhere"]
    outlier = Example.from_instruction(clinical.INSTRUCTION, "zzzz " * 40, "9" * 60)  # far from the data
    normal = site_data(rt, "s", train, train[:1], 256).train_tokens
    with_outlier = site_data(rt, "s", [*train, outlier], train[:1], 256).train_tokens
    return rt, state, normal, with_outlier


def _update(rt, state, tokens, *, dp: bool, batch: int):  # type: ignore[no-untyped-def]
    from fedtune.lora import adapter

    adapter.set_state(rt.model, state)
    settings = TrainSettings(lr=LR, optimizer="sgd", batch_size=batch, lr_schedule="constant", max_grad_norm=1e9)
    pad = int(rt.base.tokenizer.pad_token_id)
    if dp:  # batch_size >= n: sample rate 1, every record in the one step; no noise
        train_local_dp(
            rt.model,
            tokens,
            settings,
            noise_multiplier=0.0,
            max_grad_norm=C,
            steps=1,
            pad_id=pad,
            seed=0,
            precision="fp32",
        )
    else:  # the same plain SGD step, without per-sample clipping
        train_local(
            rt.model, tokens, dataclasses.replace(settings, local_steps=1), pad_id=pad, seed=0, precision="fp32"
        )
    return compute_delta(adapter.get_state(rt.model), state)


def test_one_records_influence_is_bounded_by_the_clipping_norm(setup) -> None:  # type: ignore[no-untyped-def]
    rt, state, normal, with_outlier = setup
    batch = len(with_outlier)  # expected batch size B for both runs
    without = _update(rt, state, normal, dp=True, batch=batch)
    with_ = _update(rt, state, with_outlier, dp=True, batch=batch)
    influence = l2_norm({k: with_[k] - without[k] for k in without})
    # one step of SGD: the outlier adds at most one clipped gradient, divided by B
    bound = LR * C / batch
    assert 0 < influence <= bound * (1 + 1e-4)

    # Without DP the same outlier moves the adapter far more than that bound.
    plain_without = _update(rt, state, normal, dp=False, batch=len(normal))
    plain_with = _update(rt, state, with_outlier, dp=False, batch=len(with_outlier))
    assert l2_norm({k: plain_with[k] - plain_without[k] for k in plain_without}) > 10 * bound


def test_noisy_steps_move_the_adapter_report_the_mechanism_and_unhook(setup) -> None:  # type: ignore[no-untyped-def]
    rt, state, normal, _ = setup
    from fedtune.lora import adapter

    adapter.set_state(rt.model, state)
    settings = TrainSettings(lr=LR, optimizer="sgd", batch_size=1, lr_schedule="constant")
    steps: list[tuple[int, int, float | None]] = []
    with progress.reporting(lambda *step: steps.append(step)):
        result, mech = train_local_dp(
            rt.model,
            normal[:1],
            settings,
            noise_multiplier=1.0,
            max_grad_norm=C,
            steps=3,
            pad_id=int(rt.base.tokenizer.pad_token_id),
            seed=123,
            precision="fp32",
        )
    assert steps == [(1, 3, None), (2, 3, None), (3, 3, None)]  # every step reported, no loss under DP
    moved = l2_norm(compute_delta(adapter.get_state(rt.model), state))
    assert moved > 0  # noise moved the adapter whatever was sampled
    assert (mech.noise_multiplier, mech.sample_rate, mech.steps) == (1.0, 1.0, 3)
    assert result.steps == 3
    # Opacus's hooks are gone: the resident model trains normally afterwards
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in rt.model.parameters())


def _dp_delta(rt, state, tokens, settings: TrainSettings, *, noise: float, seed: int | None):  # type: ignore[no-untyped-def]
    from fedtune.lora import adapter

    adapter.set_state(rt.model, state)
    train_local_dp(
        rt.model,
        tokens,
        settings,
        noise_multiplier=noise,
        max_grad_norm=C,
        steps=2,
        pad_id=int(rt.base.tokenizer.pad_token_id),
        seed=seed,
        precision="fp32",
    )
    return compute_delta(adapter.get_state(rt.model), state)


def test_a_logical_batch_in_physical_chunks_equals_one_batch(setup) -> None:  # type: ignore[no-untyped-def]
    rt, state, normal, _ = setup
    base = TrainSettings(lr=LR, optimizer="sgd", lr_schedule="constant")
    # sample rate 1 both ways (logical batch 8 >= 6 records): the same records every step
    one = _dp_delta(rt, state, normal, dataclasses.replace(base, batch_size=8), noise=0.0, seed=0)
    chunked = _dp_delta(rt, state, normal, dataclasses.replace(base, batch_size=2, grad_accum=4), noise=0.0, seed=0)
    for k in one:
        torch.testing.assert_close(chunked[k], one[k], rtol=1e-4, atol=1e-7)
    assert l2_norm(one) > 0


def test_noise_is_fresh_unless_a_test_seeds_it(setup) -> None:  # type: ignore[no-untyped-def]
    rt, state, normal, _ = setup
    settings = TrainSettings(lr=LR, optimizer="sgd", lr_schedule="constant", batch_size=2)
    a = _dp_delta(rt, state, normal, settings, noise=1.0, seed=None)
    b = _dp_delta(rt, state, normal, settings, noise=1.0, seed=None)
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the coordinator cannot replay the noise
    c = _dp_delta(rt, state, normal, settings, noise=1.0, seed=7)
    d = _dp_delta(rt, state, normal, settings, noise=1.0, seed=7)
    assert all(torch.equal(c[k], d[k]) for k in c)
