"""A quantized base (QLoRA) and gradient checkpointing: the base hash stays the source's, the
adapter trained over NF4 layers is a plain peft adapter for the float base, and checkpointing
changes memory, not the loss or the gradients."""

from __future__ import annotations

import shutil
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.config import LoraSettings, ModelSettings, TrainSettings
from fedtune.data import clinical
from fedtune.data.tokens import collate
from fedtune.errors import ConfigError, ModelError
from fedtune.lora import adapter
from fedtune.models import load_base_model, source_sha256, state_sha256
from fedtune.quantize import is_quantized
from fedtune.runtime import SiteRuntime, site_data
from fedtune.train import answer_nll

LORA = LoraSettings(rank=4)


def _settings(**kw: object) -> ModelSettings:
    return ModelSettings(**{"source": "tiny", "precision": "fp32", "threads": 1, **kw})  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def user_tiny(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model as a hospital's own folder: outside fedtune's cache, so hashed on every load."""
    folder = tmp_path_factory.mktemp("user") / "tiny"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns("fedtune-model.json"))
    return folder


def test_model_quantization_is_validated() -> None:
    assert _settings(quantization="4bit").quantization == "4bit"
    with pytest.raises(ConfigError, match=r"`model.quantization` must be one of none, 8bit, 4bit, got 'nf4'"):
        _settings(quantization="nf4")


def test_base_hash_is_the_source_weights_whatever_the_load_precision(user_tiny: Path) -> None:
    full = load_base_model(str(user_tiny))
    four = load_base_model(str(user_tiny), quantization="4bit", precision="fp32")
    assert is_quantized(four.model) and not is_quantized(full.model)
    assert state_sha256(four.model) != state_sha256(full.model)  # what is in memory differs...
    assert four.sha256 == full.sha256 == source_sha256(user_tiny) == load_base_model("tiny").sha256  # ...the hash not


def test_source_hash_is_the_weights_content(user_tiny: Path, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(user_tiny, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] += 1.0
    model.save_pretrained(tmp_path / "changed")
    assert source_sha256(tmp_path / "changed") != source_sha256(user_tiny)
    # weights only as a torch pickle: no safetensors to stream, so hashed from a float32 load, same value
    torch.save(AutoModelForCausalLM.from_pretrained(user_tiny).state_dict(), tmp_path / "pytorch_model.bin")
    shutil.copy(user_tiny / "config.json", tmp_path / "config.json")
    assert source_sha256(tmp_path) == source_sha256(user_tiny)


def test_training_over_a_4bit_base_exports_a_plain_peft_adapter(user_tiny: Path, tmp_path: Path) -> None:
    rt = SiteRuntime(_settings(source=str(user_tiny), quantization="4bit"), LORA)
    fp32 = SiteRuntime(_settings(source=str(user_tiny)), LORA)
    q_proj = rt.model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(q_proj.base_layer, bnb.nn.Linear4bit) and q_proj.base_layer.weight.quant_type == "nf4"
    trainable = {n for n, p in rt.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for p in adapter.lora_parameters(rt.model).values())
    # the coordinator sees the same base and adapter spec as from a float32 site: they merge
    assert rt.identity("a") == fp32.identity("a")

    train, held = clinical.generate(1, n_train=16, n_eval=2, seed=0)["st-elsewhere"]
    data = site_data(rt, "a", train, held, 256)
    start = fp32.state()
    result = rt.train_steps(start, data, TrainSettings(lr=1e-2, batch_size=4), steps=3, seed=0)
    state = rt.state()
    assert torch.isfinite(torch.tensor(result.mean_loss))
    assert any(not torch.equal(state[k], start[k]) for k in state)

    out = tmp_path / "adapter"
    adapter.export_peft(out, state, LORA, base_model_path=str(user_tiny), base_sha256=rt.base.sha256)
    base = AutoModelForCausalLM.from_pretrained(user_tiny, dtype=torch.float32)  # the unquantized base
    plain = PeftModel.from_pretrained(base, str(out)).eval()
    loaded = adapter.get_state(plain)
    assert {k: v.shape for k, v in loaded.items()} == {k: v.shape for k, v in fp32.state().items()}
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 3]])
    with torch.no_grad():
        logits = plain(input_ids=ids).logits
        with plain.disable_adapter():
            bare = plain(input_ids=ids).logits
    assert bool(torch.isfinite(logits).all()) and not torch.allclose(logits, bare)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, 8-bit loads")
def test_8bit_needs_cuda_and_says_so() -> None:
    with pytest.raises(ModelError, match=r"`model.quantization` = '8bit' needs a CUDA GPU.*use '4bit'"):
        SiteRuntime(_settings(quantization="8bit"), LORA)


def _loss_and_grads(rt: SiteRuntime, start: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor], int]:
    """One forward and backward in training mode; how many times the first decoder layer's MLP ran."""
    train, _ = clinical.generate(1, n_train=4, n_eval=1, seed=1)["st-elsewhere"]
    batch = collate(rt.tokenize(train, 256), pad_id=int(rt.base.tokenizer.pad_token_id))
    rt.load(start, freeze_a=False)
    calls = []
    # a module inside the layer: transformers checkpoints the layer's forward, so the layer's own hooks run once
    hook = rt.model.base_model.model.model.layers[0].mlp.register_forward_hook(lambda *_: calls.append(1))
    rt.model.train()
    try:
        nll, n = answer_nll(rt.model, batch)
        (nll / n).backward()
    finally:
        hook.remove()
        rt.model.eval()
    grads = {k: p.grad.detach().clone() for k, p in adapter.lora_parameters(rt.model).items() if p.grad is not None}
    rt.model.zero_grad(set_to_none=True)
    return float(nll.detach() / n), grads, len(calls)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(quantization: str) -> None:
    plain = SiteRuntime(_settings(quantization=quantization), LORA)
    checkpointed = SiteRuntime(_settings(quantization=quantization, gradient_checkpointing=True), LORA)
    start = {k: v + 0.01 * torch.randn_like(v) for k, v in plain.state().items()}  # B != 0: A gets gradients
    loss, grads, runs = _loss_and_grads(plain, start)
    loss_ck, grads_ck, runs_ck = _loss_and_grads(checkpointed, start)
    assert (runs, runs_ck) == (1, 2)  # checkpointing really recomputed the layer in the backward pass
    assert loss_ck == pytest.approx(loss, rel=1e-6)
    assert set(grads) == set(grads_ck) == set(start)
    for k in grads:
        torch.testing.assert_close(grads_ck[k], grads[k], rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_a_quantized_base_trains_on_cuda(user_tiny: Path, quantization: str) -> None:
    rt = SiteRuntime(_settings(source=str(user_tiny), quantization=quantization, device="cuda", precision="bf16"), LORA)
    assert rt.base.sha256 == source_sha256(user_tiny) and next(rt.model.parameters()).is_cuda
    train, held = clinical.generate(1, n_train=8, n_eval=1, seed=0)["st-elsewhere"]
    start = rt.state()
    result = rt.train_steps(start, site_data(rt, "a", train, held, 256), TrainSettings(batch_size=4), steps=2, seed=0)
    assert torch.isfinite(torch.tensor(result.mean_loss))
    assert any(not torch.equal(rt.state()[k], start[k]) for k in start)
