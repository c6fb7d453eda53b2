"""Scale models: LLaMA-style architectures at published sizes, random weights, built without a
download; for systems measurements only."""

from __future__ import annotations

import logging

import bitsandbytes as bnb
import pytest
import torch
from peft import get_peft_model
from transformers import LlamaConfig

from fedtune.config import LoraSettings
from fedtune.errors import ModelError
from fedtune.lora.adapter import peft_config
from fedtune.scale import SHAPES, build_scale_model, scale_config

# the published parameter counts of the models whose shapes these are (docs/simulation.md)
PUBLISHED = {
    "llama-0.5b": 494_005_120,  # Qwen2.5-0.5B without its 27,648 q/k/v bias values
    "llama-1b": 1_235_814_400,  # Llama-3.2-1B
    "llama-3b": 3_212_749_824,  # Llama-3.2-3B
    "llama-7b": 6_738_415_616,  # LLaMA-2-7B
    "llama-8b": 8_030_261_248,  # Llama-3.1-8B
}


def test_each_shape_has_its_published_parameter_count() -> None:
    assert tuple(SHAPES) == tuple(PUBLISHED)
    assert {name: shape.parameters() for name, shape in SHAPES.items()} == PUBLISHED


def test_the_smallest_builds_on_the_meta_device_with_that_count(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="fedtune.scale"):
        model = build_scale_model("llama-0.5b", device="meta")
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED["llama-0.5b"]
    assert all(p.is_meta for p in model.parameters())
    assert "never for quality" in caplog.text  # every build says what it is for


def test_an_unknown_architecture_is_refused() -> None:
    with pytest.raises(ModelError, match="unknown scale architecture 'llama-70b'; known: llama-0.5b, llama-1b"):
        scale_config("llama-70b")
    with pytest.raises(ModelError, match="quantization 'none' or '4bit', got '8bit'"):
        build_scale_model("llama-0.5b", quantization="8bit")


def _micro(tied: bool = False) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=tied,
    )  # fmt: skip


def test_a_4bit_build_quantizes_every_decoder_linear_and_trains_lora() -> None:
    model = build_scale_model(_micro(), quantization="4bit", dtype=torch.float32)
    linears = [m for layer in model.model.layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 2 * 7 and all(isinstance(m, bnb.nn.Linear4bit) for m in linears)
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    again = build_scale_model(_micro(), quantization="4bit", dtype=torch.float32)  # seeded: the same weights
    assert torch.equal(model.lm_head.weight, again.lm_head.weight)
    dense = build_scale_model(_micro(), dtype=torch.float32)
    assert torch.equal(model.model.rotary_emb.inv_freq, dense.model.rotary_emb.inv_freq)  # a real rotary table
    tied = build_scale_model(_micro(tied=True), quantization="4bit", dtype=torch.float32)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight  # a tied head stays one tensor
    peft = get_peft_model(model, peft_config(LoraSettings(rank=4, target_modules=("q_proj", "down_proj"))))
    ids = torch.randint(0, 128, (2, 12))
    out = peft(input_ids=ids, labels=ids)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    grads = [p.grad for n, p in peft.named_parameters() if "lora_B" in n]  # B = 0 at init: A gets none yet
    assert len(grads) == 4 and all(g is not None and bool(g.abs().sum() > 0) for g in grads)


def test_a_dense_build_is_in_the_dtype_asked() -> None:
    model = build_scale_model(_micro(), dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert (
        sum(p.numel() for p in model.parameters())
        == 2 * 64 * 128 + 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64) + 64
    )
