"""Adapter state round trips, the server's meta-device init, PEFT export and the base hash check."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.config import LoraSettings
from fedtune.errors import ModelMismatchError
from fedtune.lora import adapter
from fedtune.models import load_base_model, load_model_config

LORA = LoraSettings(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"))


@pytest.fixture()
def tiny_peft(tiny_dir: Path):  # type: ignore[no-untyped-def]
    base = load_base_model("tiny")
    return base, adapter.attach_lora(base.model, LORA)


def _randomize(model: PeftModel, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=gen) for k, v in adapter.get_state(model).items()}
    adapter.set_state(model, state)
    return state


def test_state_round_trip(tiny_peft) -> None:  # type: ignore[no-untyped-def]
    _, model = tiny_peft
    state = _randomize(model, 0)
    back = adapter.get_state(model)
    assert list(back) == sorted(back)
    for k in state:
        assert torch.equal(back[k], state[k])
    back[next(iter(back))].add_(1.0)  # get_state returns copies
    assert not torch.equal(adapter.get_state(model)[next(iter(back))], back[next(iter(back))])


def test_set_state_refuses_wrong_layout(tiny_peft) -> None:  # type: ignore[no-untyped-def]
    _, model = tiny_peft
    state = adapter.get_state(model)
    key = next(iter(state))
    with pytest.raises(ModelMismatchError, match="adapter keys differ"):
        adapter.set_state(model, {k: v for k, v in state.items() if k != key})
    bad = dict(state)
    bad[key] = torch.zeros(3, 3)
    with pytest.raises(ModelMismatchError, match=r"has shape \(3, 3\)"):
        adapter.set_state(model, bad)


def test_initial_state_matches_the_real_model_layout(tiny_peft, tiny_dir: Path) -> None:  # type: ignore[no-untyped-def]
    _, model = tiny_peft
    init = adapter.initial_state(load_model_config("tiny"), LORA)
    live = adapter.get_state(model)
    assert {k: v.shape for k, v in init.items()} == {k: v.shape for k, v in live.items()}
    assert all(float(v.abs().sum()) == 0.0 for k, v in init.items() if ".lora_B." in k)  # identity update
    for k, v in init.items():
        if ".lora_A." in k:
            assert float(v.abs().max()) <= 1.0 / v.shape[1] ** 0.5
    again = adapter.initial_state(load_model_config("tiny"), LORA)
    assert all(torch.equal(init[k], again[k]) for k in init)  # seeded: every coordinator agrees
    assert adapter.spec_sha256(LORA, init) == adapter.spec_sha256(LORA, live)


def test_spec_hash_changes_with_rank() -> None:
    state = {"x.lora_A.weight": torch.zeros(4, 8)}
    assert adapter.spec_sha256(LORA, state) != adapter.spec_sha256(LoraSettings(rank=8), state)


def test_exported_adapter_loads_in_plain_peft_with_same_logits(tiny_peft, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, model = tiny_peft
    state = _randomize(model, 1)
    out = tmp_path / "adapter"
    adapter.export_peft(out, state, LORA, base_model_path=str(base.path), base_sha256=base.sha256)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 3]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        fresh = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float32)
        plain = PeftModel.from_pretrained(fresh, str(out)).eval()
        theirs = plain(input_ids=ids).logits
        with model.disable_adapter():
            bare = model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bare, ours, atol=1e-3)  # the adapter really changes the logits


def test_exported_adapter_refuses_another_base(tiny_peft, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    base, model = tiny_peft
    state = _randomize(model, 2)
    out = tmp_path / "adapter"
    adapter.export_peft(out, state, LORA, base_model_path=str(base.path), base_sha256=base.sha256)
    adapter.load_exported(model, out, base_sha256=base.sha256)  # same base: fine
    with pytest.raises(ModelMismatchError, match="trained on base model .* load the same base model"):
        adapter.load_exported(model, out, base_sha256="0" * 64)


def test_smollm2_export_gives_the_same_logits_in_plain_peft(tmp_path: Path) -> None:
    """The acceptance check on the real default model (converted from the wheel's GGUF)."""
    base = load_base_model("smollm2")
    model = adapter.attach_lora(base.model, LoraSettings())
    state = _randomize(model, 3)
    for k in state:  # scale down: realistic adapter magnitudes keep logits in range
        state[k] *= 0.05
    adapter.set_state(model, state)
    out = tmp_path / "adapter"
    adapter.export_peft(out, state, LoraSettings(), base_model_path=str(base.path), base_sha256=base.sha256)
    ids = base.tokenizer("BP 142/88 mmHg, HR 96 bpm. Assessment: pneumonia.", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base.path), str(out)).eval()
        theirs = plain(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
