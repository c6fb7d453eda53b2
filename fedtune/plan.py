"""Memory you can plan: a hospital's peak training memory and the coordinator's merge peak,
from a model's shape alone (no torch: ``fedtune plan`` starts light).

The hospital's peak is the sum of what is resident at the start of the backward pass, the
training step's high-water mark (``benchmarks/plan.py`` measures it on CPU and prints this
prediction against it):

- **base weights** in their load format: float32 (fedtune always loads float32 weights;
  ``bf16`` is autocast over them), or the decoder's linear layers in NF4 (half a byte per
  weight, plus per-64 block absmax constants quantized to 8 bits with one float32 constant
  per 256 blocks: double quantization) or LLM.int8 (a byte per weight plus a float32 scale
  per row), their embeddings, norms and LM head in float32 (peft's k-bit preparation);
- **autocast copies**: in bf16, each frozen float32 weight a gradient flows through is cast
  to bf16 and that copy is kept for the backward pass (all decoder linears and the LM head,
  one layer's linears under gradient checkpointing; over a quantized base only the float32
  LM head);
- **LoRA**: float32 weights, their gradients and AdamW's two moments (16 bytes a
  parameter), plus autocast's cached bf16 copy;
- **activations**: what autograd keeps per token and layer (bytes per hidden, key/value and
  MLP unit: :data:`ACTIVATION`, plus each LoRA target's input), for every layer, or with
  gradient checkpointing only each layer's float32 input plus one layer recomputed;
- **logits**: the vocabulary projection for every position of the batch, its float32 copy,
  the log-softmax kept for the loss and their gradients (:data:`LOGIT_COPIES` float32
  copies at the peak);
- **DP per-sample gradients** (Opacus): a float32 gradient per example for every LoRA
  parameter, the clipped sum, and the float32 inputs of the LoRA layers its hooks hold;
- **runtime**: on a GPU the CUDA context and kernels' workspace (:data:`CUDA_RUNTIME_MB`, an
  assumption until ``benchmarks/gpu_round.py`` measures it) and the caching allocator's
  slack (:data:`CUDA_SLACK` of the activations); on CPU nothing (the measurement subtracts
  the process after its imports).

The coordinator's merge holds the hospitals' adapters as received (float32), the global
adapter and the next one, and, for ``svd``, one module's stacked float64 factors and their
QR at a time (``fedtune/lora/factored.py``), or dense float64 matrices for the paths that
need them (robust combines, client-level DP, momentum/Adam server optimizers), which
``federation.svd_dense_limit_mb`` refuses above its size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.errors import ConfigError, ModelError
from fedtune.shapes import SHAPES

MB = 2**20
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # packed weight, 8-bit absmax per 64, float32 absmax per 256 blocks
# Bytes a token keeps per layer for backward without LoRA, per hidden unit, key/value unit and MLP
# unit: the layer's float32 input and the residual after attention, SDPA's query, key, value and
# output, and the MLP's gate, SiLU and up (bf16 under autocast; float32 where bitsandbytes casts
# its outputs back to the input's dtype). Each LoRA target adds the input its A factor keeps.
ACTIVATION = {
    "fp32": (16.0, 8.0, 12.0),
    "bf16": (12.0, 4.0, 6.0),
    "4bit": (12.0, 4.0, 12.0),
    "8bit": (12.0, 4.0, 12.0),
}
LOGIT_COPIES = 2.9  # float32 vocabulary-sized tensors per position at the peak (the loss's forward and backward)
LORA_BYTES = {"adamw": 16, "sgd": 8}  # weight + gradient (+ AdamW's two moments), float32
CUDA_RUNTIME_MB = 1024.0  # CUDA context, cuBLAS workspace, kernels: assumed, not measured here
CUDA_SLACK = 0.10  # the caching allocator's fragmentation, as a share of the activations and logits
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-style decoder's shape: all the plan needs to know about a model."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool

    def linears(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each linear layer of one decoder layer."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {
            "q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i),
        }  # fmt: skip

    def linear_params(self) -> int:
        return self.layers * sum(o * i for o, i in self.linears().values())

    def other_params(self) -> int:
        """Embeddings, the LM head unless tied, and the norms: what stays unquantized."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + (2 * self.layers + 1) * self.hidden

    def lora_params(self, rank: int, targets: tuple[str, ...]) -> int:
        shapes = self.linears()
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise ConfigError(
                f"`lora.target_modules` {unknown} are not linear layers of {self.name}; choose from {', '.join(shapes)}"
            )
        return self.layers * sum(rank * (shapes[t][0] + shapes[t][1]) for t in targets)


def _from_config(name: str, cfg: dict[str, Any]) -> ModelShape:
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [k for k in needed if not isinstance(cfg.get(k), int)]
    if missing:
        raise ModelError(f"model {name}: config.json has no {', '.join(missing)}; fedtune plans LLaMA-style decoders")
    heads = cfg["num_attention_heads"]
    return ModelShape(
        name=name,
        hidden=cfg["hidden_size"],
        intermediate=cfg["intermediate_size"],
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
        vocab=cfg["vocab_size"],
        tied=bool(cfg.get("tie_word_embeddings", False)),
    )


def model_shape(source: str) -> ModelShape:
    """The shape of a scale architecture (``llama-1b``...), a local model folder, or a source
    fedtune builds or converts (``smollm2``, ``tiny``, a .gguf file: resolved once, with torch)."""
    if source in SHAPES:
        s = SHAPES[source]
        return ModelShape(
            source, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.hidden // s.heads, s.vocab, s.tied
        )
    path = Path(source).expanduser()
    if not path.is_dir():
        if source not in ("smollm2", "tiny") and path.suffix != ".gguf":  # fedtune.models' sources (it imports torch)
            raise ModelError(
                f"model {source!r} is not a scale architecture ({', '.join(SHAPES)}), 'smollm2', 'tiny', "
                "a local model folder with a config.json or a .gguf file"
            )
        from fedtune.models import resolve_model_dir

        path = resolve_model_dir(source)
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"model folder {path} has no config.json; point it at a Hugging Face model folder")
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError) as err:
        raise ModelError(f"{config}: not readable JSON ({err})") from err
    return _from_config(source, data.get("text_config", data))


@dataclass(frozen=True)
class PlanInput:
    """One hospital's training set-up."""

    shape: ModelShape
    quantization: str = "none"
    precision: str = "bf16"
    rank: int = 8
    target_modules: tuple[str, ...] = ATTENTION
    batch: int = 4
    seq: int = 256
    dp: bool = False
    checkpointing: bool = False
    optimizer: str = "adamw"
    device: str = "cuda"

    def __post_init__(self) -> None:
        _check(
            self.quantization in ("none", "8bit", "4bit"),
            f"--quantization must be none, 8bit or 4bit, got {self.quantization!r}",
        )
        _check(self.precision in ("fp32", "bf16"), f"--precision must be fp32 or bf16, got {self.precision!r}")
        _check(self.rank >= 1, f"--rank must be a positive integer, got {self.rank}")
        _check(self.batch >= 1, f"--batch must be >= 1, got {self.batch}")
        _check(self.seq >= 1, f"--seq must be >= 1, got {self.seq}")
        _check(self.device in ("cuda", "cpu"), f"--device must be cuda or cpu, got {self.device!r}")
        _check(self.optimizer in LORA_BYTES, f"--optimizer must be adamw or sgd, got {self.optimizer!r}")
        _check(
            not (self.quantization == "8bit" and self.device != "cuda"),
            "--quantization 8bit needs --device cuda (bitsandbytes runs LLM.int8 only there); use 4bit or none",
        )

    @property
    def mode(self) -> str:
        """Which activation profile applies: fp32, bf16 autocast, or a quantized base (bf16 compute)."""
        if self.quantization != "none":
            return self.quantization
        return self.precision


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def layer_activations(p: PlanInput) -> float:
    """Bytes one token keeps for backward in one decoder layer: :data:`ACTIVATION`, plus the
    input each LoRA A keeps: a bf16 cast per target under autocast (the attention and MLP
    inputs are float32), the float32 input once per shared input in fp32."""
    s, t = p.shape, set(p.target_modules)
    per_h, per_kv, per_i = ACTIVATION[p.mode]
    base = per_h * s.hidden + per_kv * s.kv_heads * s.head_dim + per_i * s.intermediate
    shared = 4.0 * s.hidden * (bool(t & {"q_proj", "k_proj", "v_proj"}) + bool(t & {"gate_proj", "up_proj"}))
    if p.mode == "fp32":
        return base + shared + 4.0 * s.hidden * ("o_proj" in t) + 4.0 * s.intermediate * ("down_proj" in t)
    casts = len(t & {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"})
    return base + 2.0 * s.hidden * casts + 2.0 * s.intermediate * ("down_proj" in t)


def _dp_inputs(p: PlanInput) -> float:
    """Bytes per token and layer of the float32 inputs Opacus's hooks hold under autocast,
    where autograd keeps only bf16 casts of them."""
    s, t = p.shape, set(p.target_modules)
    shared = 4.0 * s.hidden * (bool(t & {"q_proj", "k_proj", "v_proj"}) + bool(t & {"gate_proj", "up_proj"}))
    return shared + 4.0 * s.intermediate * ("down_proj" in t and p.quantization != "none")


def hospital_peak(p: PlanInput) -> dict[str, float]:
    """A hospital's peak training memory by component (MiB), and ``total_mb``."""
    s = p.shape
    linear, other = s.linear_params(), s.other_params()
    head = s.vocab * s.hidden
    lora = s.lora_params(p.rank, p.target_modules)
    tokens = p.batch * p.seq
    if p.quantization == "4bit":
        weights = linear * NF4_BYTES + other * 4
    elif p.quantization == "8bit":
        weights = linear + 4 * s.layers * sum(o for o, _ in s.linears().values()) + other * 4
    else:
        weights = (linear + other) * 4.0
    autocast = p.precision == "bf16" or p.quantization != "none"
    copies = 0.0
    if autocast:
        # checkpointed layers run their first forward without autograd: one layer's copies at a time
        held = 0 if p.quantization != "none" else (linear // s.layers if p.checkpointing else linear)
        copies = 2.0 * (held + head) + 2.0 * lora
    per_layer = layer_activations(p)
    if p.checkpointing:
        activations = tokens * (4.0 * s.hidden * s.layers + per_layer)
    else:
        activations = tokens * per_layer * s.layers
    logits = tokens * s.vocab * 4.0 * LOGIT_COPIES
    dp = 0.0
    if p.dp:
        inputs = _dp_inputs(p) * (1 if p.checkpointing else s.layers) if autocast else 0.0
        dp = lora * 4.0 * (p.batch + 1) + tokens * inputs
    runtime = CUDA_RUNTIME_MB * MB + CUDA_SLACK * (activations + logits) if p.device == "cuda" else 0.0
    parts = {
        "base_weights_mb": weights,
        "autocast_copies_mb": copies,
        "lora_state_mb": lora * float(LORA_BYTES[p.optimizer]),
        "activations_mb": activations,
        "logits_mb": logits,
        "dp_per_sample_mb": dp,
        "runtime_mb": runtime,
    }
    out = {k: v / MB for k, v in parts.items()}
    out["total_mb"] = sum(out.values())
    out["lora_params"] = float(lora)
    return out


# dense float64 copies of the update each dense path holds at once, besides the mean (see docs/aggregation.md)
DENSE_COPIES = {"median": -1, "trimmed_mean": -1, "client_dp": 2, "fedavgm": 2, "fedadam": 3, "fedyogi": 3}


def merge_peak(
    p: PlanInput, *, hospitals: int, strategy: str = "svd", dense: str = "", dense_limit_mb: float = 2048.0
) -> dict[str, Any]:
    """The coordinator's merge peak (MiB) for ``hospitals`` adapters: ``dense`` names what makes
    an ``svd`` merge dense (an aggregation, ``client_dp`` or a server optimizer), "" when it
    stays factored; ``refused`` when one dense copy is over ``federation.svd_dense_limit_mb``."""
    _check(hospitals >= 1, f"--hospitals must be >= 1, got {hospitals}")
    _check(strategy in ("fedavg", "ffa", "svd"), f"--strategy must be fedavg, ffa or svd, got {strategy!r}")
    _check(dense in ("", *DENSE_COPIES), f"--dense must be one of {', '.join(DENSE_COPIES)}, got {dense!r}")
    s, r = p.shape, p.rank
    adapter = 4.0 * s.lora_params(r, p.target_modules)
    shapes = [s.linears()[t] for t in p.target_modules]
    received = hospitals * adapter
    working = 2 * adapter  # the global adapter and the next one
    dense_copy = 8.0 * s.layers * sum(o * i for o, i in shapes)
    path = "plain"
    if strategy == "svd" and dense:
        copies = DENSE_COPIES[dense]
        working += dense_copy * (hospitals + 1 if copies < 0 else copies)
        path = "dense"
    elif strategy == "svd":
        k = (hospitals + 1) * r  # the stacked ranks: every hospital's and the global's once
        working += max(3 * 8.0 * (o + i) * k + 2 * 8.0 * (o + i) * r for o, i in shapes)
        path = "factored"
    else:
        working += adapter  # the weighted mean of the deltas
    return {
        "path": path,
        "received_mb": received / MB,
        "working_mb": working / MB,
        "total_mb": (received + working) / MB,
        "dense_copy_mb": dense_copy / MB,
        "refused": path == "dense" and dense_copy / MB > dense_limit_mb,
    }
