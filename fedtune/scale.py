"""LLaMA-style models at real sizes with random weights, built in code: for systems measurements only.

Memory, time, bytes on the wire and merge cost depend on a model's shapes, not on its
weights, so a model of the right architecture with random weights measures them honestly
without downloading anything. Its outputs mean nothing: **never report a quality figure
from one**. Every build says so in the log.

Shapes (``SHAPES``) follow published configs: ``llama-0.5b`` is Qwen2.5-0.5B's shape without
its q/k/v biases, ``llama-1b`` and ``llama-3b`` are Llama-3.2-1B and -3B, ``llama-7b`` is
LLaMA-2-7B, ``llama-8b`` is Llama-3.1-8B. An 8B model takes 32 GB in float32: build it in
bf16 (16 GB), with its linear layers in NF4 (``quantization="4bit"``: about 5.5 GB, built
layer by layer, never holding the float model), or on the meta device (shapes only, no
memory: adapter layouts, parameter counts, planning).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fedtune.errors import ModelError
from fedtune.shapes import SHAPES, Shape

__all__ = ["SHAPES", "WARNING", "Shape", "build_scale_model", "scale_config"]
log = logging.getLogger("fedtune.scale")
WARNING = "random weights: for systems measurements (memory, time, bytes) only, never for quality"


def scale_config(name: str) -> LlamaConfig:
    """The transformers config of architecture ``name`` (one of :data:`SHAPES`)."""
    if name not in SHAPES:
        raise ModelError(f"unknown scale architecture {name!r}; known: {', '.join(SHAPES)}")
    s = SHAPES[name]
    return LlamaConfig(
        vocab_size=s.vocab,
        hidden_size=s.hidden,
        intermediate_size=s.intermediate,
        num_hidden_layers=s.layers,
        num_attention_heads=s.heads,
        num_key_value_heads=s.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=s.tied,
        rms_norm_eps=1e-5,
    )


def build_scale_model(
    arch: str | LlamaConfig,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    quantization: str = "none",
    seed: int = 0,
) -> LlamaForCausalLM:
    """A LLaMA-style model with random weights (see the module's note: never for quality).

    ``device="meta"``: shapes only. ``quantization="4bit"``: every decoder linear layer in
    NF4 with double quantization, computing in ``dtype``, quantized one at a time.
    """
    config = scale_config(arch) if isinstance(arch, str) else arch
    log.warning("building %s: %s", arch if isinstance(arch, str) else "a scale model", WARNING)
    if device == "meta":
        with torch.device("meta"):
            return LlamaForCausalLM._from_config(config, dtype=dtype)  # type: ignore[no-any-return]
    if quantization not in ("none", "4bit"):
        raise ModelError(f"scale models are built with quantization 'none' or '4bit', got {quantization!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if quantization == "none":
            with torch.device(device):
                return LlamaForCausalLM._from_config(config, dtype=dtype)  # type: ignore[no-any-return]
        return _build_4bit(config, torch.device(device), dtype)


def _build_4bit(config: LlamaConfig, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    """The skeleton on the meta device; each decoder linear drawn in ``dtype`` and quantized to
    NF4 at once; then the rest (embeddings, norms, head, rotary table) made real."""
    import bitsandbytes as bnb

    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    std = config.initializer_range
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, linear in list(parent.named_children()):
                if not isinstance(linear, torch.nn.Linear):
                    continue
                q = bnb.nn.Linear4bit(
                    linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                    compress_statistics=True, quant_type="nf4", device="meta",
                )  # fmt: skip
                weight = torch.empty(linear.weight.shape, dtype=dtype, device=device).normal_(0.0, std)
                param: Any = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
                q.weight = param.to(device)  # quantized here: the float weight is dropped
                setattr(parent, name, q)
    _materialize(model, device, std)
    with torch.device(device):  # the rotary table is a buffer computed at construction
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.is_loaded_in_4bit = True  # what peft reads to attach its bitsandbytes LoRA layers
    return model


def _materialize(model: torch.nn.Module, device: torch.device, std: float) -> None:
    """Every parameter still on the meta device made real: matrices drawn N(0, std), norm
    weights ones; a tied weight stays one tensor."""
    done: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if not param.is_meta:
                continue
            if id(param) not in done:
                real = torch.empty(param.shape, dtype=param.dtype, device=device)
                real.normal_(0.0, std) if param.dim() > 1 else real.fill_(1.0)
                done[id(param)] = torch.nn.Parameter(real, requires_grad=False)
            setattr(module, name, done[id(param)])
