"""The scale architectures' shapes (``fedtune/scale.py`` builds them), without torch: what
``fedtune plan`` reads to plan memory for a model it never builds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    """The numbers that fix a LLaMA-style decoder's parameter count."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool

    def parameters(self) -> int:
        """The parameter count: embeddings, per layer attention (q, k, v, o), MLP (gate, up,
        down) and two RMSNorms, the final norm, and the LM head unless tied to the embeddings."""
        h, kv = self.hidden, self.kv_heads * (self.hidden // self.heads)
        layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate + 2 * h
        return self.vocab * h * (1 if self.tied else 2) + self.layers * layer + h


SHAPES: dict[str, Shape] = {
    "llama-0.5b": Shape(hidden=896, intermediate=4864, layers=24, heads=14, kv_heads=2, vocab=151936, tied=True),
    "llama-1b": Shape(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied=True),
    "llama-3b": Shape(hidden=3072, intermediate=8192, layers=28, heads=24, kv_heads=8, vocab=128256, tied=True),
    "llama-7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000, tied=False),
    "llama-8b": Shape(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied=False),
}
