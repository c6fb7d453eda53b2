"""The local training loop: schedule, the answer-only loss, and that training learns."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedtune import progress
from fedtune.config import EvalSettings, LoraSettings, ModelSettings, TrainSettings
from fedtune.data import clinical
from fedtune.data.tokens import collate
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
    steps: list[tuple[int, int, float | None]] = []
    with progress.reporting(lambda *step: steps.append(step)):
        result = runtime.train_steps(
            start, data, TrainSettings(lr=1e-2, batch_size=8, max_length=256), steps=15, seed=0
        )
    assert [(done, total) for done, total, _ in steps] == [(i, 15) for i in range(1, 16)]
    assert all(loss is not None and loss > 0 for _, _, loss in steps)
    after = runtime.evaluate(runtime.state(), data, EvalSettings(batch_size=4, max_new_tokens=2))
    assert result.steps == 15 and result.examples_seen == 15 * 8
    assert after.loss < before.loss - 0.05
    moved = [k for k in start if not torch.equal(start[k], runtime.state()[k])]
    assert moved and all(".lora_" in k for k in moved)


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5


def test_fedprox_keeps_the_adapter_closer_to_the_round_start(runtime: SiteRuntime) -> None:
    train, held = clinical.generate(1, n_train=16, n_eval=1, seed=0)["st-elsewhere"]
    data = site_data(runtime, "s", train, held, 256)
    start = {k: v + 0.01 * (k.count("lora_B")) for k, v in runtime.state().items()}  # B off zero: A gets gradients
    moved = {}
    for mu in (0.0, 20.0):
        settings = TrainSettings(lr=1e-2, batch_size=4, max_length=256, optimizer="sgd", proximal_mu=mu)
        runtime.train_steps(start, data, settings, steps=6, seed=0)
        moved[mu] = _distance(runtime.state(), start)
    assert 0 < moved[20.0] < 0.9 * moved[0.0], moved  # same batches, the pull shrinks the step away


def test_ffa_trains_only_b_and_svd_starts_a_smaller_site_at_its_rank(runtime: SiteRuntime) -> None:
    from fedtune.lora.merge import effective, make_rule, rank_of
    from fedtune.wire import RoundInstruction

    train, held = clinical.generate(1, n_train=16, n_eval=1, seed=0)["st-elsewhere"]
    data = site_data(runtime, "s", train, held, 256)
    start = runtime.state()
    instruction = RoundInstruction(state=start, server_round=1, num_rounds=1)
    settings = TrainSettings(lr=1e-2, batch_size=4, max_length=256, local_steps=3)
    sent, _ = runtime.train_round(instruction, data, settings, seed=0, rule=make_rule("ffa", alpha=16, rank=4))
    assert set(sent) == {k for k in start if ".lora_B." in k} and any(float(v.abs().sum()) > 0 for v in sent.values())
    assert all(torch.equal(runtime.state()[k], start[k]) for k in start if ".lora_A." in k)  # A was frozen
    # a rank-4 site in an svd run of global rank 8 starts from the rank-4 truncation and sends its factors
    wide = make_rule("svd", alpha=16, rank=8)
    glob = {k: torch.randn(8, v.shape[1]) if ".lora_A." in k else torch.randn(v.shape[0], 8) for k, v in start.items()}
    sent, _ = runtime.train_round(
        RoundInstruction(state=glob, server_round=1, num_rounds=1), data, settings, seed=0, rule=wide
    )
    assert rank_of(sent) == 4 and set(sent) == set(start)
    wide.check(sent, glob)
    assert set(effective(sent, alpha=16)) == set(effective(glob, alpha=16))
