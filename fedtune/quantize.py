"""A quantized frozen base (QLoRA) and gradient checkpointing: how a site holds its base in memory.

``model.quantization`` = ``4bit`` loads every linear layer of the base through bitsandbytes
as NF4 with double quantization (the QLoRA recipe), computing in the dtype
``model.precision`` gives (bf16 where the hardware does it, else float32); ``8bit`` loads
LLM.int8 layers. The LoRA layers stay float32 and are the only trainable parameters, so
what a site sends, the coordinator merges and the export holds are the same adapter
as over an unquantized base: it applies with plain peft to the float weights. The base
model hash stays the hash of the source weights (:func:`fedtune.models.source_sha256`).

bitsandbytes 0.50 runs NF4 layers (forward and backward) on CPU too, so this path is
tested without a GPU; LLM.int8 needs CUDA.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from fedtune.errors import ModelError
from fedtune.train import autocast_dtype

# Reentrant checkpointing runs the first forward without autograd, so Opacus's hooks capture
# each layer's activations once (in the recomputation); the non-reentrant kind captures
# them twice under DP-SGD. It needs an input that requires grad: enable_input_require_grads.
CHECKPOINT_KWARGS = {"use_reentrant": True}


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """The dtype quantized layers compute in: ``model.precision``'s autocast dtype, else float32."""
    return autocast_dtype(precision, device) or torch.float32


def bnb_config(quantization: str, dtype: torch.dtype) -> Any:
    """transformers' ``BitsAndBytesConfig`` for ``model.quantization`` (None for ``none``)."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as err:  # pragma: no cover - a core dependency; a broken install
        raise ModelError(
            f"`model.quantization` = {quantization!r} needs bitsandbytes; install it with "
            "`pip install bitsandbytes==0.50.2`"
        ) from err
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    )


def check_supported(quantization: str, device: torch.device) -> None:
    """LLM.int8 layers need CUDA; NF4 runs on CPU and CUDA."""
    if quantization == "8bit" and device.type != "cuda":
        raise ModelError(
            "`model.quantization` = '8bit' needs a CUDA GPU (bitsandbytes runs LLM.int8 only there); "
            "use '4bit' (NF4 runs on CPU too) or 'none'"
        )


def load_quantized(path: Any, quantization: str, *, device: torch.device, dtype: torch.dtype) -> PreTrainedModel:
    """Load the model folder ``path`` with its linear layers quantized, onto ``device``."""
    from transformers import AutoModelForCausalLM

    check_supported(quantization, device)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=bnb_config(quantization, dtype),
        dtype=dtype,
        device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"},
    )
    return model  # type: ignore[no-any-return]


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def prepare_for_training(model: PreTrainedModel, *, kbit_prepare: bool, gradient_checkpointing: bool) -> None:
    """Before the LoRA layers are attached: peft's k-bit preparation (a quantized base with
    ``kbit_prepare``) and gradient checkpointing (active only in training mode)."""
    if is_quantized(model) and kbit_prepare:
        from peft import prepare_model_for_kbit_training

        # with checkpointing on, it also makes the embeddings' output require grad (reentrant)
        prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=CHECKPOINT_KWARGS
        )
        return
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINT_KWARGS)
        model.enable_input_require_grads()
