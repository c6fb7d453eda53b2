"""One hospital misbehaves under `flwr run` (NaN, a huge update, a replay, a forged
signature, one per round): the global adapter ends exactly as in the run without it,
and every rejection is in the metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.checkpoint import load_checkpoint
from fedtune.config import replace
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]


def test_a_misbehaving_hospital_changes_nothing(tiny_cfg, tmp_path: Path, client_app_module) -> None:  # type: ignore[no-untyped-def]
    rounds = 4
    honest = prepare_run(replace(tiny_cfg, federation={"rounds": rounds}), run_dir=tmp_path / "two-honest")
    run_simulation(honest, say=lambda _: None)

    cfg = replace(tiny_cfg, data={"hospitals": 3}, federation={"rounds": rounds, "min_clients": 2})
    attacked = prepare_run(cfg, run_dir=tmp_path / "with-adversary")
    client_app_module("adversary_app")
    run_simulation(attacked, say=lambda _: None)
    assert (attacked.root / "adversary" / "round-4.bin").is_file()  # the adversary really ran

    expected, got = load_checkpoint(honest.root, rounds).state, load_checkpoint(attacked.root, rounds).state
    start = load_checkpoint(honest.root, 0).state
    assert any(not torch.allclose(expected[k], start[k]) for k in expected)  # training moved the adapter
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)
    records = round_records(attacked)
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    reasons = []
    for r in records:
        assert set(r["train"]) == {"st-elsewhere", "northgate-general"}
        (rejection,) = r["rejected"]
        assert "riverside-community" in rejection["site"]
        reasons.append(rejection["reason"])
    assert "NaN or Inf" in reasons[0]
    assert "median of the others" in reasons[1]
    assert "a replay" in reasons[2] or "round 2, expected 3" in reasons[2]
    assert reasons[3] == "invalid envelope"
