"""A SmolLM2 federation over a 4-bit base (QLoRA) on CPU: two hospitals hold the real
default model in NF4, train one round, and the exported adapter loads with plain peft onto
the unquantized (float32) SmolLM2 and changes its output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedtune.checkpoint import load_checkpoint
from fedtune.config import load_config
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.lora import adapter
from fedtune.models import SMOLLM2, resolve_model_dir, source_sha256

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]


def test_a_smollm2_4bit_federation_exports_an_adapter_for_the_float_base(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        {
            "model.source": SMOLLM2,
            "model.quantization": "4bit",
            "model.precision": "fp32",
            "model.threads": 1,
            "data.hospitals": 2,
            "data.train_per_hospital": 4,
            "data.eval_per_hospital": 1,
            "train.local_steps": 1,
            "train.batch_size": 2,
            "train.max_length": 96,
            "train.lr": 0.01,
            "federation.rounds": 1,
            "eval.batch_size": 1,
            "eval.max_new_tokens": 1,
            "run.baselines": False,
        },
    )
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    run_simulation(folder, say=lambda _: None)

    (record,) = round_records(folder)
    assert len(record["train"]) == 2 and record["rejected"] == []
    # one NF4 load in the one worker process serves both hospitals
    assert [site["base-model-loads"] for site in record["train"].values()] == [1.0, 1.0]
    first, last = load_checkpoint(folder.root, 0).state, load_checkpoint(folder.root, 1).state
    assert any(not torch.equal(first[k], last[k]) for k in first)
    path = resolve_model_dir(SMOLLM2)
    exported, meta = adapter.read_exported(folder.adapter_dir)
    assert meta["fedtune.base_sha256"] == source_sha256(path)  # the float source weights' hash, not the NF4 load's

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)("BP 142/88 mmHg. Assessment: pneumonia.", return_tensors="pt")
    with torch.no_grad():
        before = base(**ids).logits
        plain = PeftModel.from_pretrained(base, str(folder.adapter_dir)).eval()
        after = plain(**ids).logits
    loaded = adapter.get_state(plain)
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in exported.items()}
    assert all(torch.equal(loaded[k], exported[k]) for k in exported)
    assert bool(torch.isfinite(after).all()) and not torch.allclose(before, after)
