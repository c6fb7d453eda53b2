"""The LoRA adapter: PEFT build, canonical state keys, spec hash, PEFT export and import.

Canonical keys are the keys PEFT writes to ``adapter_model.safetensors`` (no adapter
name), e.g. ``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``; the
wire, the checkpoints and the export all use them, so an exported adapter is a plain
PEFT adapter.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

from fedtune.config import LoraSettings
from fedtune.errors import CheckpointError, ModelMismatchError
from fedtune.lora.delta import State

ADAPTER = "default"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
META_BASE = "fedtune.base_sha256"
META_SPEC = "fedtune.spec_sha256"


def peft_config(lora: LoraSettings, *, base_model_path: str = "") -> LoraConfig:
    """The PEFT ``LoraConfig`` for our settings."""
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base_model_path or None,
    )


def attach_lora(model: PreTrainedModel, lora: LoraSettings) -> PeftModel:
    """Wrap ``model`` with a trainable LoRA adapter; base weights stay frozen."""
    try:
        peft_model = get_peft_model(model, peft_config(lora))
    except ValueError as err:
        raise ModelMismatchError(
            f"`lora.target_modules` {list(lora.target_modules)} do not match this model ({err})"
        ) from err
    return peft_model  # type: ignore[return-value]


def _canonical(name: str) -> str:
    return name.replace(f".{ADAPTER}.", ".")


def lora_parameters(peft_model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """Canonical key -> the live LoRA parameter, in a fixed (sorted) order."""
    params = {_canonical(n): p for n, p in peft_model.named_parameters() if "lora_" in n}
    return dict(sorted(params.items()))


def get_state(peft_model: PeftModel) -> State:
    """A detached float32 CPU copy of the adapter, canonical keys."""
    return {k: p.detach().to("cpu", torch.float32).clone() for k, p in lora_parameters(peft_model).items()}


def set_state(peft_model: PeftModel, state: Mapping[str, torch.Tensor]) -> None:
    """Load ``state`` into the adapter in place; keys and shapes must match exactly."""
    params = lora_parameters(peft_model)
    if set(params) != set(state):
        missing, extra = sorted(set(params) - set(state)), sorted(set(state) - set(params))
        raise ModelMismatchError(
            f"adapter keys differ from this model's LoRA layout (missing {missing[:2]}, "
            f"unexpected {extra[:2]}); check `lora.rank` and `lora.target_modules`"
        )
    with torch.no_grad():
        for key, param in params.items():
            value = state[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ModelMismatchError(
                    f"adapter tensor {key} has shape {tuple(value.shape)}, model expects {tuple(param.shape)}"
                )
            param.copy_(value.to(param.device, param.dtype))


def initial_state(model_config: PretrainedConfig, lora: LoraSettings) -> State:
    """The round-0 adapter, from the architecture config alone (no weights loaded).

    The model is built on the meta device to learn the LoRA key names and shapes;
    A is drawn like PEFT's default (Kaiming-uniform with a = sqrt(5), i.e. bound =
    1/sqrt(fan_in)) from a generator seeded with ``lora.init_seed``; B is zero, so
    the initial adapter is the identity update.
    """
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config)
        shapes = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(attach_lora(skeleton, lora)).items()}
    generator = torch.Generator().manual_seed(lora.init_seed)
    state: State = {}
    for key, shape in sorted(shapes.items()):
        if ".lora_A." in key:
            bound = 1.0 / math.sqrt(shape[1])
            state[key] = (torch.rand(shape, generator=generator) * 2 - 1) * bound
        else:
            state[key] = torch.zeros(shape)
    return state


def spec_sha256(lora: LoraSettings, state: Mapping[str, torch.Tensor]) -> str:
    """Hash of what makes two adapters mergeable: rank, alpha, targets, keys and shapes."""
    spec = {
        "rank": lora.rank,
        "alpha": lora.alpha,
        "target_modules": sorted(lora.target_modules),
        "tensors": [[k, list(v.shape), str(v.dtype)] for k, v in sorted(state.items())],
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def spec_at_rank(lora: LoraSettings, state: Mapping[str, torch.Tensor]) -> str:
    """:func:`spec_sha256` of ``lora`` for an adapter laid out like ``state`` but at ``lora.rank``
    (a site training at its own rank names the run's spec)."""
    resized = {
        k: torch.empty(
            (lora.rank, v.shape[1]) if ".lora_A." in k else (v.shape[0], lora.rank), dtype=v.dtype, device="meta"
        )
        for k, v in state.items()
    }
    return spec_sha256(lora, resized)


def export_peft(
    out_dir: Path, state: Mapping[str, torch.Tensor], lora: LoraSettings, *, base_model_path: str, base_sha256: str
) -> None:
    """Write a PEFT adapter folder that ``PeftModel.from_pretrained`` loads.

    The base model hash and the spec hash go into the safetensors metadata, where PEFT
    ignores them and :func:`load_exported` checks them.
    """
    from fedtune.atomic import atomic_directory

    with atomic_directory(out_dir) as tmp:
        peft_config(lora, base_model_path=base_model_path).save_pretrained(str(tmp))
        tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
        metadata = {"format": "pt", META_BASE: base_sha256, META_SPEC: spec_sha256(lora, tensors)}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata=metadata)


def read_exported(adapter_dir: Path) -> tuple[State, dict[str, str]]:
    """Tensors and metadata of an exported adapter."""
    path = adapter_dir / WEIGHTS_FILE
    if not path.is_file() or not (adapter_dir / CONFIG_FILE).is_file():
        raise CheckpointError(f"{adapter_dir}: not a PEFT adapter folder ({WEIGHTS_FILE} or {CONFIG_FILE} missing)")
    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
        state = {k: f.get_tensor(k) for k in f.keys()}
    return state, metadata


def check_base(expected_sha256: str, actual_sha256: str, *, what: str) -> None:
    """Refuse to combine an adapter with a base model it was not trained on."""
    if expected_sha256 != actual_sha256:
        raise ModelMismatchError(
            f"{what} was trained on base model {expected_sha256[:12]}, but this base model is "
            f"{actual_sha256[:12]}; load the same base model the adapter was trained on"
        )


def load_exported(peft_model: PeftModel, adapter_dir: Path, *, base_sha256: str) -> None:
    """Load an exported adapter into ``peft_model`` after checking the base model hash."""
    state, metadata = read_exported(adapter_dir)
    if META_BASE not in metadata:
        raise ModelMismatchError(f"{adapter_dir}: adapter records no base model hash; it was not made by fedtune")
    check_base(metadata[META_BASE], base_sha256, what=f"adapter {adapter_dir}")
    set_state(peft_model, state)
