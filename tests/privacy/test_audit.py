"""The empirical privacy audit: its statistics against hand-computed values, and the test
itself on the tiny model (no signal without training on the scored records, a clear one when
overfitted; inserted canaries more exposed than fresh ones)."""

from __future__ import annotations

import itertools
import json
import math
import random
import statistics
from pathlib import Path

import numpy as np
import pytest
import torch

from fedtune.config import LoraSettings, ModelSettings, TrainSettings
from fedtune.data import clinical
from fedtune.data.records import Example
from fedtune.privacy import audit_stats
from fedtune.privacy.audit import (
    MembershipAudit,
    from_scores,
    member_subset,
    membership_audit,
    record_losses,
    record_scores,
)
from fedtune.privacy.canaries import canary_exposure, exposure_summary, inserted_records, make_canaries
from fedtune.runtime import SiteRuntime, site_data

# --- the statistics, by hand -------------------------------------------------------------


def pairwise_auc(pos: list[float], neg: list[float]) -> float:
    """The definition: the share of (member, nonmember) pairs the member wins, ties half."""
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_midranks_share_ties() -> None:
    assert audit_stats.midranks(np.array([3.0, 1.0, 2.0, 2.0])).tolist() == [4.0, 1.0, 2.5, 2.5]


def test_auc_by_hand() -> None:
    assert audit_stats.auc([3, 2], [1, 0]) == 1.0
    assert audit_stats.auc([1, 0], [3, 2]) == 0.0
    assert audit_stats.auc([1, 2], [1, 0]) == 3.5 / 4  # (1,1) is a tie: half a win
    assert audit_stats.auc([5, 5], [5, 5]) == 0.5


def test_auc_is_the_pairwise_definition_with_ties() -> None:
    rng = random.Random(3)
    for _ in range(50):
        pos = [float(rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        neg = [float(rng.randint(0, 6)) for _ in range(rng.randint(1, 12))]
        assert audit_stats.auc(pos, neg) == pytest.approx(pairwise_auc(pos, neg))


def test_delong_interval_by_hand() -> None:
    # members beat (3, 3, 2) of 3 nonmembers; nonmembers are beaten by (2, 3, 3) of 3 members:
    # AUC 8/9, S10 = S01 = 1/27, variance 1/81 + 1/81, half-width 1.96 * sqrt(2) / 9
    low, high = audit_stats.auc_interval([0.9, 0.8, 0.3], [0.7, 0.2, 0.1])
    assert low == pytest.approx(8 / 9 - audit_stats.Z95 * math.sqrt(2) / 9)
    assert high == 1.0  # clipped


def test_perfect_separation_gets_a_clopper_pearson_interval_not_zero_width() -> None:
    low, high = audit_stats.auc_interval([9, 8, 7, 6, 5, 4, 3, 2], [1, 0, -1, -2, -3, -4, -5, -6, -7, -8])
    assert high == 1.0
    assert low == pytest.approx(0.025 ** (1 / 8))  # 8 of 8 trials: lower end (alpha/2)^(1/n)


def test_clopper_pearson_reference_values() -> None:
    assert audit_stats.clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025**0.1))
    assert audit_stats.clopper_pearson(10, 10) == pytest.approx((0.025**0.1, 1.0))
    # 5 of 10: the textbook (0.187, 0.813) (Beta(5, 6) and Beta(6, 5) quantiles)
    low, high = audit_stats.clopper_pearson(5, 10)
    assert low == pytest.approx(0.18709, abs=1e-5) and high == pytest.approx(0.81291, abs=1e-5)
    assert audit_stats.clopper_pearson(0, 0) == (0.0, 1.0)


def test_tpr_at_one_percent_fpr() -> None:
    nonmembers = [float(i) for i in range(100)]  # 1% of 100: one may lie above the threshold
    assert audit_stats.threshold_at_fpr(nonmembers) == 98.0
    assert audit_stats.tpr_at_fpr([98.5, 99.5, 50.0], nonmembers) == pytest.approx(2 / 3)
    # under 100 nonmembers the threshold is their highest score: no false positive at all
    assert audit_stats.threshold_at_fpr(nonmembers[:50]) == 49.0
    assert audit_stats.tpr_at_fpr([49.0, 49.5], nonmembers[:50]) == 0.5


def test_tpr_interval_is_seeded_and_holds_the_estimate() -> None:
    rng = random.Random(0)
    members = [rng.gauss(1.0, 1.0) for _ in range(60)]
    nonmembers = [rng.gauss(0.0, 1.0) for _ in range(200)]
    tpr = audit_stats.tpr_at_fpr(members, nonmembers)
    low, high = audit_stats.tpr_interval(members, nonmembers, seed=1)
    assert low <= tpr <= high and high - low > 0.05
    assert audit_stats.tpr_interval(members, nonmembers, seed=1) == (low, high)
    # every member above every nonmember: still an interval, not a point
    assert audit_stats.tpr_interval([5.0] * 10, [0.0] * 10)[0] == pytest.approx(0.025**0.1)


def test_scores_must_be_there_and_finite() -> None:
    with pytest.raises(ValueError, match="at least one member"):
        audit_stats.auc([], [1.0])
    with pytest.raises(ValueError, match="finite"):
        audit_stats.auc([math.nan], [1.0])


def test_members_are_a_seeded_subset() -> None:
    assert member_subset(5, 12, seed=0) == member_subset(5, 12, seed=0) != member_subset(5, 12, seed=1)
    assert len(set(member_subset(5, 12, seed=0))) == 5
    assert member_subset(50, 12, seed=0) == list(range(12))


def test_the_report_is_json_numbers() -> None:
    report = from_scores([3.0, 2.0, 1.5], [1.0, 0.0, 2.5], seed=0)
    assert isinstance(report, MembershipAudit) and (report.members, report.nonmembers) == (3, 3)
    data = report.as_dict()
    assert data["auc"] == pytest.approx(pairwise_auc([3.0, 2.0, 1.5], [1.0, 0.0, 2.5]))
    assert data["fpr_resolution"] == pytest.approx(1 / 3)
    assert json.loads(json.dumps(data)) == data


# --- the test on the tiny model ----------------------------------------------------------

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OVERFIT = TrainSettings(lr=1e-2, batch_size=6, max_length=256, lr_schedule="constant")


@pytest.fixture(scope="module")
def runtime(tiny_dir: Path) -> SiteRuntime:
    # every linear layer, rank 16: enough capacity for the 0.3M-parameter model to memorise
    lora = LoraSettings(rank=16, alpha=32, target_modules=ALL_LINEAR)
    return SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), lora)


@pytest.fixture(scope="module")
def start(runtime: SiteRuntime) -> dict[str, torch.Tensor]:
    return runtime.state()


@pytest.fixture(scope="module")
def records() -> tuple[list[Example], list[Example]]:
    return clinical.generate(1, n_train=70, n_eval=40, seed=0)["st-elsewhere"]


def pad(runtime: SiteRuntime) -> int:
    return int(runtime.base.tokenizer.pad_token_id)


def test_scores_are_base_minus_adapted_loss(runtime: SiteRuntime, start: dict[str, torch.Tensor], records) -> None:  # type: ignore[no-untyped-def]
    train, _ = records
    tokens = runtime.tokenize(train[:5], 256)
    runtime.load(start, freeze_a=False)  # B = 0: the adapter is the base model
    assert record_scores(runtime.model, tokens, pad_id=pad(runtime)) == pytest.approx([0.0] * 5, abs=1e-6)
    data = site_data(runtime, "s", train[:5], train[:1], 256)
    runtime.train_steps(start, data, OVERFIT, steps=3, seed=0)
    adapted = record_losses(runtime.model, tokens, pad_id=pad(runtime), batch_size=2)
    with runtime.model.disable_adapter():
        base = record_losses(runtime.model, tokens, pad_id=pad(runtime), batch_size=5)
    scores = record_scores(runtime.model, tokens, pad_id=pad(runtime), batch_size=3)
    assert scores == pytest.approx([b - a for b, a in zip(base, adapted, strict=True)], abs=1e-5)
    assert any(abs(s) > 1e-3 for s in scores)


def test_no_signal_for_records_the_adapter_never_saw(runtime: SiteRuntime, start, records) -> None:  # type: ignore[no-untyped-def]
    train, held = records
    # trained on 20 other records; members and nonmembers are both unseen
    runtime.train_steps(start, site_data(runtime, "s", train[:20], held[:1], 256), OVERFIT, steps=40, seed=0)
    report = membership_audit(
        runtime.model, runtime.tokenize(train[20:60], 256), runtime.tokenize(held[:40], 256), pad_id=pad(runtime)
    )
    assert report.auc_low < 0.5 < report.auc_high
    assert report.auc_high - report.auc_low < 0.4  # an interval that says something
    assert (report.members, report.nonmembers) == (40, 40)


def test_a_clear_signal_when_overfitted_on_a_few_records(runtime: SiteRuntime, start, records) -> None:  # type: ignore[no-untyped-def]
    train, held = records
    few = train[:12]
    runtime.train_steps(start, site_data(runtime, "s", few, held[:1], 256), OVERFIT, steps=40, seed=0)
    report = membership_audit(
        runtime.model, runtime.tokenize(few, 256), runtime.tokenize(held[:12], 256), pad_id=pad(runtime)
    )
    assert report.auc_low > 0.5 and report.auc > 0.9
    assert report.tpr_at_1fpr > 0.5 and report.tpr_low > 0.0


def test_inserted_canaries_are_more_exposed_than_fresh_ones(runtime: SiteRuntime, start, records) -> None:  # type: ignore[no-untyped-def]
    train, held = records
    canaries = make_canaries(16, tag="t17", seed=2)
    inserted, fresh = canaries[:8], canaries[8:]
    data = site_data(runtime, "s", train[:16] + inserted_records(inserted, 8), held[:1], 256)
    runtime.train_steps(start, data, OVERFIT, steps=60, seed=0)
    tokenizer = runtime.base.tokenizer
    seen = canary_exposure(runtime.model, inserted, tokenizer=tokenizer, pad_id=pad(runtime), candidates=100)
    unseen = canary_exposure(runtime.model, fresh, tokenizer=tokenizer, pad_id=pad(runtime), candidates=100)
    assert all(0.0 <= e <= math.log2(101) + 1e-9 for e in seen + unseen)
    assert exposure_summary(seen)["mean"] > exposure_summary(unseen)["mean"] + 1.0
    assert statistics.median(seen) > statistics.median(unseen)


def test_canaries_are_distinct_secret_like_records() -> None:
    canaries = make_canaries(5, tag="x", seed=0)
    assert len({c.secret for c in canaries}) == 5
    assert all(len(c.secret) == 9 and c.secret.isdigit() for c in canaries)
    assert make_canaries(5, tag="x", seed=0) == canaries and make_canaries(5, tag="x", seed=1) != canaries
    assert "canary set x" in canaries[0].prompt and canaries[0].example().target == canaries[0].secret
    assert len(inserted_records(canaries[:2], 3)) == 6
    assert exposure_summary([])["count"] == 0
