"""The privacy-utility sweep: the federation without DP and at each target epsilon, one table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.errors import ConfigError
from fedtune.experiments.sweep import parse_epsilons

pytestmark = pytest.mark.timeout(600)


def test_parse_epsilons() -> None:
    assert parse_epsilons("8, 1,8") == [1.0, 8.0]
    for bad in ("", "a,b", "0", "1,inf"):
        with pytest.raises(ConfigError, match="--epsilons"):
            parse_epsilons(bad)


@pytest.mark.flower
def test_sweep_table_plot_and_resume(tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "sweep"
    argv = ["simulate", "--model", "tiny", "--hospitals", "2", "--rounds", "2", "--local-steps", "2", "--no-baselines"]
    argv += ["--set", 'model.precision="fp32"', "--set", "data.train_per_hospital=24", "--set", "eval.max_new_tokens=4"]
    argv += ["--set", "privacy_audit.membership=true", "--set", "privacy_audit.nonmembers=8"]  # the audit's column
    assert main([*argv, "--epsilons", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--- sweep run 1/2: no-dp (without DP)" in printed and "[eps-3] round 2/2" in printed
    rows = json.loads((out / "privacy_utility.json").read_text())
    assert [r["model"] for r in rows] == ["base model", "federated, no DP (2 rounds)", "federated, DP (2 rounds)"]
    _, no_dp, dp = rows
    assert no_dp["epsilon spent (max site)"] is None
    assert dp["target epsilon"] == 3.0 and 0 < dp["epsilon spent (max site)"] <= 3.0
    assert dp["noise multiplier (mean)"] > 0
    # each federation's final-round audit, pooled over its hospitals (2 x 8 members against 2 x 8 nonmembers)
    assert no_dp["audit round"] == dp["audit round"] == 2 and "audit AUC [95% CI]" not in rows[0]
    assert all(float(r["audit AUC [95% CI]"].split()[0]) <= 1.0 for r in (no_dp, dp))
    assert (out / "privacy_utility.png").stat().st_size > 10_000
    assert "| federated, DP (2 rounds) | 3.000 |" in (out / "privacy_utility.md").read_text()
    # every simulated hospital of the DP run kept its own ledger in that run's folder
    assert sorted(p.name for p in (out / "eps-3" / "privacy").glob("*.json")) == [
        "northgate-general.json",
        "st-elsewhere.json",
    ]
    # resuming a finished sweep trains nothing more and gives the same table
    before = (out / "privacy_utility.json").read_text()
    assert main(["simulate", "--resume", str(out)]) == 0
    assert "round 1/2" not in capsys.readouterr().out
    assert (out / "privacy_utility.json").read_text() == before
