"""The local training loop: schedule, the answer-only loss, and that training learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedtune import clinical
from fedtune.config import EvalSettings, LoraSettings, ModelSettings, TrainSettings
from fedtune.data import collate
from fedtune.evaluate import field_accuracy
from fedtune.runtime import SiteRuntime, site_data
from fedtune.train import answer_nll, lr_at, steps_per_round


def test_lr_schedules() -> None:
    kw = {"base_lr": 1.0, "total_steps": 10, "warmup_steps": 0}
    assert lr_at(3, schedule="constant", **kw) == 1.0
    assert lr_at(0, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(5, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(5, schedule="linear", **kw) == pytest.approx(0.5)
    assert lr_at(1, schedule="cosine", base_lr=1.0, total_steps=10, warmup_steps=4) == pytest.approx(0.5)
    # round r of a federation continues the same curve: step offsets, not restarts
    curve = [lr_at(s, schedule="cosine", **kw) for s in range(10)]
    assert curve == sorted(curve, reverse=True)


def test_steps_per_round_from_epochs() -> None:
    assert steps_per_round(TrainSettings(local_steps=7), 100) == 7
    assert steps_per_round(TrainSettings(local_epochs=1.0, batch_size=8, grad_accum=2), 100) == math.ceil(100 / 16)


def test_field_accuracy() -> None:
    ref = '{"age": 67, "sex": "F", "bp": "142/88", "hr": 96, "dx": "pneumonia"}'
    assert field_accuracy(ref, ref) == (1.0, True)
    assert field_accuracy('{"age": 67, "sex": "f", "bp": "142/88", "hr": 95, "dx": "Pneumonia"}', ref) == (0.8, False)
    assert field_accuracy("sure! " + ref + " done", ref) == (1.0, True)
    assert field_accuracy("not json at all", ref) == (0.0, False)
    assert field_accuracy("yes", "Yes ") == (1.0, True)


@pytest.fixture(scope="module")
def runtime(tiny_dir: Path) -> SiteRuntime:
    return SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), LoraSettings(rank=4))


def test_answer_only_logits_equal_the_full_loss(runtime: SiteRuntime) -> None:
    train, _ = clinical.generate(1, n_train=6, n_eval=1, seed=0)["st-elsewhere"]
    data = site_data(runtime, "s", train, train[:1], 256)
    batch = collate(data.train_tokens[:4], pad_id=int(runtime.base.tokenizer.pad_token_id))
    with torch.no_grad():
        nll, n = answer_nll(runtime.model, batch)
        reference = runtime.model(**batch).loss  # transformers' own mean over answer tokens
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    torch.testing.assert_close(nll / n, reference, rtol=1e-5, atol=1e-6)


def test_training_lowers_held_out_loss_and_sends_a_delta(runtime: SiteRuntime) -> None:
    train, held = clinical.generate(1, n_train=32, n_eval=4, seed=0)["st-elsewhere"]
    data = site_data(runtime, "s", train, held, 256)
    start = {k: v.clone() for k, v in runtime.state().items()}
    before = runtime.evaluate(start, data, EvalSettings(batch_size=4, max_new_tokens=2))
    result = runtime.train_steps(start, data, TrainSettings(lr=1e-2, batch_size=8, max_length=256), steps=15, seed=0)
    after = runtime.evaluate(runtime.state(), data, EvalSettings(batch_size=4, max_new_tokens=2))
    assert result.steps == 15 and result.examples_seen == 15 * 8
    assert after.loss < before.loss - 0.05
    moved = [k for k in start if not torch.equal(start[k], runtime.state()[k])]
    assert moved and all(".lora_" in k for k in moved)
