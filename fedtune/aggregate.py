"""Validation of updates and merge rules. No Flower in here.

``fedavg`` here is FedAvg over deltas: the weighted mean of the sites' deltas, added
to the current global adapter. For LoRA this averages A and B separately, which is
not the mean of the products B·A; exact merges come with the LoRA-aware strategies.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedtune.errors import UpdateRejected

State = dict[str, torch.Tensor]


def validate_update(delta: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Reject an update whose keys, shapes or dtypes differ from ``reference`` or that is not finite."""
    missing, extra = set(reference) - set(delta), set(delta) - set(reference)
    if missing or extra:
        raise UpdateRejected(
            f"keys differ from the global adapter (missing {sorted(missing)[:2]}, unexpected {sorted(extra)[:2]})"
        )
    for key, ref in reference.items():
        value = delta[key]
        if tuple(value.shape) != tuple(ref.shape):
            raise UpdateRejected(f"tensor {key} has shape {tuple(value.shape)}, expected {tuple(ref.shape)}")
        if value.dtype != ref.dtype:
            raise UpdateRejected(f"tensor {key} has dtype {value.dtype}, expected {ref.dtype}")
        if not bool(torch.isfinite(value).all()):
            raise UpdateRejected(f"tensor {key} holds NaN or Inf")


def weighted_mean(deltas: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Σ w_i·Δ_i / Σ w_i per tensor, accumulated in float64, returned in the input dtype."""
    if not deltas or len(deltas) != len(weights):
        raise ValueError("weighted_mean needs one weight per delta and at least one delta")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    out: State = {}
    for key in sorted(deltas[0]):
        acc = torch.zeros(deltas[0][key].shape, dtype=torch.float64)
        for delta, w in zip(deltas, weights, strict=True):
            acc += delta[key].double() * (w / total)
        out[key] = acc.to(deltas[0][key].dtype)
    return out
