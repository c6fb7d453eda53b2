"""DP under `flwr run`: every round carries each site's epsilon, spent budgets stop the
federation cleanly, and a new run on the same ledgers does not start from zero."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedtune.checkpoint import latest_round
from fedtune.client.ledger import PrivacyLedger
from fedtune.config import replace
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.privacy.accounting import Mechanism, epsilon_spent

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]


def test_budgets_run_out_mid_federation_and_persist_across_runs(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # tiny_cfg: 24 records per hospital, batch 4, 2 steps a round -> q = 1/6
    per_round = Mechanism(2.0, 4 / 24, 2)
    two, three = (epsilon_spent([per_round] * k, delta=1e-5) for k in (2, 3))
    budget = (two + three) / 2  # two rounds fit, the third does not
    ledgers = tmp_path / "hospital-ledgers"
    dp = {"enabled": True, "noise_multiplier": 2.0, "budget_epsilon": budget, "ledger_dir": str(ledgers)}
    cfg = replace(tiny_cfg, federation={"rounds": 4}, dp=dp)

    lines: list[str] = []
    first = prepare_run(cfg, run_dir=tmp_path / "first")
    table = run_simulation(first, say=lines.append)
    rounds = round_records(first)
    assert [r["round"] for r in rounds] == [1, 2]
    for r, spent in zip(rounds, (epsilon_spent([per_round], delta=1e-5), two), strict=True):
        assert set(r["train"]) == set(first.sites())
        for m in r["train"].values():
            assert m["dp-epsilon"] == pytest.approx(spent) and m["dp-noise-multiplier"] == 2.0
            assert "train-loss" not in m  # nothing computed from records but the update
    latest = latest_round(first.root)
    assert latest is not None and latest[0] == 2 and "refused" in latest[1]["stopped"]
    assert any("stopped after round 2/4" in line for line in lines)
    assert any("DP eps max" in line for line in lines)
    assert first.adapter_dir.is_dir() and (first.plots_dir / "epsilon.png").is_file()
    assert f"DP eps {two:.2f}" in table

    # a new run on the same data and ledgers: the spend is still there, so round 1 is refused
    second = prepare_run(replace(cfg, run={"name": "again"}), run_dir=tmp_path / "second")
    lines.clear()
    run_simulation(second, say=lines.append)
    assert round_records(second) == []
    assert any("stopped after round 0/4" in line and "privacy-budget" in line for line in lines)
    assert not second.adapter_dir.exists()  # round 0 is the untrained adapter: nothing is exported
    for site in first.sites():
        (row,) = PrivacyLedger.open(ledgers / f"{site}.json").report()
        assert row["releases"] == 2 and row["runs"] == 1 and row["epsilon"] == pytest.approx(two)
        assert math.isclose(row["remaining"], budget - two, rel_tol=1e-9)


def test_client_level_dp_is_accounted_and_stops_at_its_limit(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.config import ClientDPSettings
    from fedtune.server.client_dp import ClientLevelDP

    probe = ClientLevelDP(ClientDPSettings(enabled=True, noise_multiplier=3.0), num_sampled=2)
    one, two = probe.epsilon(extra_rounds=1), probe.epsilon(extra_rounds=2)
    client_dp = {"enabled": True, "noise_multiplier": 3.0, "clipping_norm": 0.05, "max_epsilon": (one + two) / 2}
    folder = prepare_run(replace(tiny_cfg, federation={"rounds": 3}, client_dp=client_dp), run_dir=tmp_path / "run")
    lines: list[str] = []
    run_simulation(folder, say=lines.append)
    (record,) = round_records(folder)  # round 2 would pass max_epsilon: the federation stopped
    assert record["client-dp"]["epsilon"] == pytest.approx(one)
    assert record["client-dp"]["noise-std"] == pytest.approx(3.0 * 0.05 / 2)
    assert "train-loss" in next(iter(record["train"].values()))  # client-level DP alone: sites send their loss
    latest = latest_round(folder.root)
    assert latest is not None and latest[0] == 1
    assert latest[1]["client_dp"] == {"releases": [3.0]} and "client_dp.max_epsilon" in latest[1]["stopped"]
    assert any("stopped after round 1/3" in line for line in lines)
    assert folder.adapter_dir.is_dir()
