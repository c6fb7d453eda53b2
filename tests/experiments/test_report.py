"""The comparison table: what 'unseen sites' means, and the markdown."""

from __future__ import annotations

import math

import pytest

from fedtune.experiments.report import markdown_table, summary_rows


def _eval(**metric_by_site: float) -> dict:  # type: ignore[type-arg]
    sizes = {"a": 10, "b": 30, "c": 10}
    out = {s: {"metric": m, "exact": m, "loss": 1 - m, "n": sizes[s]} for s, m in metric_by_site.items()}
    n = sum(v["n"] for v in out.values())
    pooled = sum(v["metric"] * v["n"] for v in out.values()) / n
    out["pooled"] = {"metric": pooled, "exact": pooled, "loss": 1 - pooled, "n": n}
    return out


def test_unseen_sites_is_the_example_weighted_mean_over_other_sites() -> None:
    baselines = {"base": _eval(a=0.1, b=0.1, c=0.1), "local:a": _eval(a=1.0, b=0.5, c=0.2)}
    rounds = [{"round": 1, "eval": _eval(a=0.9, b=0.9, c=0.9)}]
    rows = {r["model"]: r for r in summary_rows(rounds, baselines, ["a", "b", "c"])}
    assert rows["local only: a"]["unseen sites field acc"] == pytest.approx((0.5 * 30 + 0.2 * 10) / 40)
    assert math.isnan(rows["base model"]["unseen sites field acc"])
    assert rows["federated (1 round)"]["pooled field acc"] == pytest.approx(0.9)
    assert list(rows) == ["base model", "local only: a", "federated (1 round)"]
    table = markdown_table(list(rows.values()))
    assert table.splitlines()[0].startswith("| model | pooled field acc |")
    assert "| local only: a | 0.540 |" in table  # (1.0*10 + 0.5*30 + 0.2*10) / 50


def test_a_private_federation_is_labelled_with_its_epsilon_and_the_baselines_as_non_private() -> None:
    from fedtune.experiments.report import round_line

    baselines = {"local:a": _eval(a=1.0, b=0.5, c=0.2), "centralized": _eval(a=1.0, b=1.0, c=1.0)}
    train = {s: {"dp-epsilon": e, "steps": 5.0} for s, e in (("a", 1.5), ("b", 2.25), ("c", 2.0))}
    rounds = [
        {"round": 1, "eval": _eval(a=0.5, b=0.5, c=0.5), "train": train, "seconds": 3.0},
        {"round": 2, "eval": _eval(a=0.6, b=0.6, c=0.6), "train": {}, "seconds": 3.0, "client-dp": {"epsilon": 4.0}},
    ]
    models = [r["model"] for r in summary_rows(rounds, baselines, ["a", "b", "c"], private=True)]
    assert models == [
        "local only: a (no DP)",
        "federated (2 rounds, DP eps 2.25, client-level eps 4.00)",
        "centralized (pooled data) (no DP)",
    ]
    line = round_line(rounds[0], 2)
    assert "train loss" not in line and "DP eps max 2.25" in line  # DP replies carry no loss
    assert "client-level eps 4.00" in round_line(rounds[1], 2)
