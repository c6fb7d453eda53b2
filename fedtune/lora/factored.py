"""The ``svd`` rule's update space held as factors: never an out x in matrix.

Per adapted module an update is a sum of scaled products ``X = sum_j c_j · B_j @ A_j``
(:class:`LowRank`); its terms refer to the adapters as received (no copies). A site's
update is ``(alpha/r_i)·B_i·A_i - (alpha/r)·B_g·A_g`` (its effective update minus the
global's), the weighted mean of the sites' updates and the server's plain step stay sums of
such terms, and the next global adapter is the best rank-r factorisation of
``(alpha/r)·B_g·A_g + step``, computed from the stacked factors: with every coefficient
folded into its B, stack the B's (out x k) and the A's (k x in, k the sum of the ranks),
take the thin QR of each (``B = Q_B·R_B``, ``A^T = Q_A·R_A``), the SVD of the small core
``R_B·R_A^T = U·S·V^T`` (k x k), and then ``B = Q_B·U·S``, ``A = V^T·Q_A^T`` truncated to
the rank. That is the exact truncated SVD of X (Eckart-Young), in float64, for
O((out + in)·k) memory per module, one module at a time.

What does not stay factored (coordinate-wise robust combines, client-level DP's noise, the
momentum and Adam-style moments of the server optimizers) asks for :meth:`Factored.dense`,
the update as one float64 matrix per module: ``dense_bytes`` says what that costs.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from fedtune.lora.aggregate import weighted_mean
from fedtune.lora.delta import State, l2_norm

FLOAT64_BYTES = 8


@dataclass(frozen=True)
class Term:
    """``coef · b @ a``; ``b`` (out x r) and ``a`` (r x in) are kept as given, not copied."""

    coef: float
    b: torch.Tensor
    a: torch.Tensor


@dataclass(frozen=True)
class LowRank:
    """One module's update ``X = sum_j c_j · B_j @ A_j``, held as its terms."""

    terms: tuple[Term, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.terms[0].b.shape[0]), int(self.terms[0].a.shape[1])

    def scaled(self, factor: float) -> LowRank:
        return LowRank(tuple(Term(t.coef * factor, t.b, t.a) for t in self.terms))

    def stacked(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, A) in float64 with B @ A = X: each coefficient folded into its B, the B's side
        by side (out x k), the A's one above the other (k x in)."""
        b = torch.cat([t.b.detach().double() * t.coef for t in self.terms], dim=1)
        a = torch.cat([t.a.detach().double() for t in self.terms], dim=0)
        return b, a

    def core(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Q_B, R_B·R_A^T, Q_A) with X = Q_B · core · Q_A^T, Q_B and Q_A orthonormal columns."""
        b, a = self.stacked()
        q_b, r_b = torch.linalg.qr(b)
        q_a, r_a = torch.linalg.qr(a.T)
        return q_b, r_b @ r_a.T, q_a

    def svd(self, keep: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The thin SVD of X (U, S, V^T), never forming X: all singular values, and the
        first ``keep`` singular vectors (all when None)."""
        q_b, core, q_a = self.core()
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        return q_b @ u[:, :keep], s, vh[:keep] @ q_a.T

    def norm_squared(self) -> float:
        """||X||_F^2, from the core (orthonormal Q's keep the Frobenius norm)."""
        return float((self.core()[1] ** 2).sum())

    def dense(self) -> torch.Tensor:
        b, a = self.stacked()
        return b @ a


def combine(parts: Sequence[tuple[float, LowRank]]) -> LowRank:
    """``sum_i w_i · X_i`` as one LowRank; terms over the same tensors (e.g. the global
    adapter's, in every site's update) become one term, so the global counts once."""
    merged: dict[tuple[int, int], Term] = {}
    for weight, x in parts:
        for t in x.terms:
            key = (id(t.b), id(t.a))
            coef = weight * t.coef + (merged[key].coef if key in merged else 0.0)
            merged[key] = Term(coef, t.b, t.a)
    return LowRank(tuple(merged.values()))


@dataclass(frozen=True)
class Factored:
    """An update of the ``svd`` rule's update space, per module (sorted by name)."""

    parts: dict[str, LowRank]

    def scaled(self, factor: float) -> Factored:
        return Factored({m: x.scaled(factor) for m, x in self.parts.items()})

    def norm(self) -> float:
        """The L2 (Frobenius) norm over all modules: the dense update's, without forming it."""
        return sum(x.norm_squared() for x in self.parts.values()) ** 0.5

    def dense_bytes(self) -> int:
        """What :meth:`dense` holds: one float64 out x in matrix per module."""
        return dense_bytes(x.shape for x in self.parts.values())

    def dense(self) -> State:
        """The update as one float64 matrix per module (what the dense paths need)."""
        return {m: x.dense() for m, x in self.parts.items()}


Update = State | Factored  # a round's update in a rule's update space


def dense_bytes(shapes: Iterable[tuple[int, int]]) -> int:
    """Bytes of float64 matrices of the given (out, in) shapes."""
    return sum(FLOAT64_BYTES * int(o) * int(i) for o, i in shapes)


def update_norm(update: Update) -> float:
    """An update's L2 norm (what the norm bounds and the metrics use), factored or not."""
    return update.norm() if isinstance(update, Factored) else l2_norm(update)


def mean(updates: Sequence[Update], weights: Sequence[float]) -> Update:
    """The weighted mean of a round's updates: factored when they are, else :func:`weighted_mean`."""
    factored = [u for u in updates if isinstance(u, Factored)]
    if not factored:
        return weighted_mean([u for u in updates if not isinstance(u, Factored)], weights)
    if len(factored) != len(updates):
        raise TypeError("mean: factored and dense updates mixed")
    if len(weights) != len(updates) or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    modules = factored[0].parts.keys()
    if any(u.parts.keys() != modules for u in factored):
        raise ValueError("mean: the updates' modules differ")
    return Factored(
        {m: combine([(w / total, u.parts[m]) for u, w in zip(factored, weights, strict=True)]) for m in modules}
    )


def fill_rows(module: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Fresh A rows for unused directions, drawn like LoRA's A (bound 1/sqrt(in)), reproducibly."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % 2**63)
    return (torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1) / cols**0.5


def truncate(
    u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, shape: tuple[int, int], rank: int, *, module: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) at ``rank`` from a thin SVD of an out x in matrix: B = U·S, A = V^T for the
    singular values above round-off; the directions beyond get B = 0 and a random A row
    (:func:`fill_rows`), so they can still learn."""
    out, inp = shape
    tol = float(s.max()) * max(shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    used = min(rank, int((s > tol).sum()))
    b = torch.zeros(out, rank, dtype=torch.float64)
    a = fill_rows(module, rank, inp, seed)
    b[:, :used] = u[:, :used] * s[:used]
    a[:used] = vh[:used]
    return b, a
