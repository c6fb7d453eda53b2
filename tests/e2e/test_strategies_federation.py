"""The LoRA merge strategies in whole federations of the tiny model: hospitals at ranks 4,
8 and 16 under `svd`, and `ffa` with a server optimizer whose state survives a resume."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.atomic import atomic_write_json
from fedtune.checkpoint import CHECKPOINTS, LATEST, checkpoint_path, load_checkpoint
from fedtune.config import replace
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.lora.adapter import read_exported
from fedtune.lora.merge import rank_of

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]
RANKS = [4, 8, 16]


def test_svd_federation_of_mixed_ranks_gives_each_hospital_its_own(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(
        tiny_cfg,
        data={"hospitals": 3},
        lora={"rank": 16, "site_ranks": tuple(RANKS)},
        federation={"strategy": "svd"},
    )
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    run_simulation(folder, say=lambda _: None)

    records = round_records(folder)
    assert [r["round"] for r in records] == [1, 2]
    sites = folder.sites()  # site i trains at RANKS[i]
    for record in records:
        assert record["rejected"] == []
        for site, rank in zip(sites, RANKS, strict=True):
            # the hospital trained at its rank (its claim) and its factors have that rank (the coordinator's check)
            assert record["train"][site]["lora-rank"] == rank
        assert set(record["eval"]) == {*sites, "pooled"}  # each evaluated the global at its own rank
    final = load_checkpoint(folder.root, 2).state
    assert rank_of(final) == 16
    assert any(float(v.abs().sum()) > 0 for k, v in final.items() if ".lora_B." in k)
    exported, _ = read_exported(folder.adapter_dir)
    assert all(torch.equal(exported[k], final[k]) for k in final)
    base = AutoModelForCausalLM.from_pretrained(Path(os.environ["FEDTUNE_CACHE"]) / "models" / "tiny-llama")
    PeftModel.from_pretrained(base, str(folder.adapter_dir))  # a plain PEFT adapter at the global rank


def test_ffa_keeps_the_shared_a_and_fedadam_state_survives_a_resume(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(tiny_cfg, federation={"strategy": "ffa", "server_optimizer": "fedadam", "rounds": 2})
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    run_simulation(folder, say=lambda _: None)

    start, first, second = (load_checkpoint(folder.root, r) for r in (0, 1, 2))
    for key in start.state:
        if ".lora_A." in key:  # A never moves: it is the round-0 A of `lora.init_seed`
            assert torch.equal(second.state[key], start.state[key])
    assert any(not torch.equal(second.state[k], first.state[k]) for k in start.state if ".lora_B." in k)
    for record in round_records(folder):  # ffa sends B only: half the tensors of a fedavg reply
        assert all(m["upload-bytes"] < 0.75 * record["download-bytes"] for m in record["train"].values())
    assert int(second.aux["t"]) == 2 and any(k.startswith("m/") for k in second.aux)  # the optimizer's moments

    # a coordinator that died after round 1 resumes with round 1's moments: round 2 comes out the same
    checkpoint_path(folder.root, 2).unlink()
    atomic_write_json(folder.root / CHECKPOINTS / LATEST, {"server_round": 1, "file": "round-0001.safetensors"})
    run_simulation(folder, say=lambda _: None)
    assert [r["round"] for r in round_records(folder)] == [1, 2]
    resumed = load_checkpoint(folder.root, 2)
    assert all(torch.allclose(resumed.state[k], second.state[k], atol=1e-6) for k in second.state)
    assert int(resumed.aux["t"]) == 2
