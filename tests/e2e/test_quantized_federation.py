"""A federation over a 4-bit base (QLoRA): the tiny model's sites hold NF4 layers, train, and
the exported adapter loads with plain peft onto the unquantized base."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.checkpoint import load_checkpoint
from fedtune.config import replace
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.lora import adapter
from fedtune.models import load_base_model

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]


def test_a_4bit_federation_trains_and_exports_for_the_float_base(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(tiny_cfg, model={"quantization": "4bit", "gradient_checkpointing": True}, federation={"rounds": 1})
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    run_simulation(folder, say=lambda _: None)

    (record,) = round_records(folder)
    assert len(record["train"]) == 2 and record["rejected"] == []
    first, last = load_checkpoint(folder.root, 0).state, load_checkpoint(folder.root, 1).state
    assert any(not torch.equal(first[k], last[k]) for k in first)
    exported, meta = adapter.read_exported(folder.adapter_dir)
    assert meta["fedtune.base_sha256"] == load_base_model("tiny").sha256  # the source weights' hash

    base = AutoModelForCausalLM.from_pretrained(Path(os.environ["FEDTUNE_CACHE"]) / "models" / "tiny-llama")
    plain = PeftModel.from_pretrained(base, str(folder.adapter_dir)).eval()
    loaded = adapter.get_state(plain)
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in exported.items()}
    assert all(torch.equal(loaded[k], exported[k]) for k in exported)
    with torch.no_grad():
        assert bool(torch.isfinite(plain(input_ids=torch.tensor([[1, 5, 9, 13]])).logits).all())
