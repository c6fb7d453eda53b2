"""Validation of updates and the combines of a round's updates (the ``COMBINES`` registry). No Flower in here.

``fedavg`` here is FedAvg over deltas: the weighted mean of the sites' deltas, added
to the current global adapter. For LoRA this averages A and B separately, which is
not the mean of the products B·A; exact merges come with the LoRA-aware strategies.

``trimmed_mean`` and ``coordinate_median`` are the coordinate-wise robust rules of Yin et al.
(ICML 2018); they ignore example counts, which a site could misreport.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Protocol

import torch

from fedtune.errors import UpdateRejected
from fedtune.lora.delta import State


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


def _stacked(updates: Sequence[Mapping[str, torch.Tensor]], what: str) -> dict[str, torch.Tensor]:
    """Each key's tensors stacked along a new first axis, in float64, keys sorted."""
    if not updates:
        raise ValueError(f"{what} needs at least one update")
    keys = set(updates[0])
    for i, update in enumerate(updates[1:], start=1):
        if set(update) != keys:
            raise ValueError(f"{what}: update {i} has keys {sorted(set(update) ^ keys)[:2]} not in update 0")
    out: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        shape = updates[0][key].shape
        if any(update[key].shape != shape for update in updates):
            raise ValueError(f"{what}: tensor {key} has different shapes across updates")
        out[key] = torch.stack([update[key].detach().to(torch.float64) for update in updates])
    return out


def trimmed_mean(updates: Sequence[Mapping[str, torch.Tensor]], *, trim_fraction: float) -> State:
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018), unweighted.

    Per coordinate, drops the ``k = floor(trim_fraction·n)`` largest and ``k`` smallest
    of the ``n`` values and averages the rest. Unweighted on purpose: a site can misreport
    its example count, and a weight it chose would let it back into the mean the trim keeps
    it out of. Accumulated in float64, returned in the input dtype.

    Parameters
    ----------
    updates : sequence of mappings
        The sites' deltas, all with the same keys and shapes.
    trim_fraction : float
        Fraction trimmed at each end, in [0, 0.5); 0 is the plain mean.
    """
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    stacked = _stacked(updates, "trimmed_mean")
    n = len(updates)
    k = math.floor(trim_fraction * n + 1e-9)  # the epsilon keeps e.g. 0.29 * 100 from flooring to 28
    if n - 2 * k < 1:
        raise ValueError(f"trim_fraction {trim_fraction} trims all {n} updates")
    out: State = {}
    for key, values in stacked.items():
        kept = values.sort(dim=0).values[k : n - k]
        out[key] = kept.mean(dim=0).to(updates[0][key].dtype)
    return out


def coordinate_median(updates: Sequence[Mapping[str, torch.Tensor]]) -> State:
    """Coordinate-wise median (Yin et al., ICML 2018), unweighted, like :func:`trimmed_mean`.

    The true median: for an even count, the mean of the two middle values (``torch.median``
    would return the lower one, biasing the merge). Accumulated in float64, returned in the
    input dtype.
    """
    stacked = _stacked(updates, "coordinate_median")
    n = len(updates)
    out: State = {}
    for key, values in stacked.items():
        ordered = values.sort(dim=0).values
        middle = ordered[(n - 1) // 2 : n // 2 + 1]  # one value for odd n, two for even n
        out[key] = middle.mean(dim=0).to(updates[0][key].dtype)
    return out


class CombineFn(Protocol):
    """How a round's updates become one: all take the records weights and the trim share;
    the robust rules ignore the weights on purpose (a site could misreport its count)."""

    def __call__(
        self, updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *, trim_fraction: float
    ) -> State: ...


def _mean(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *, trim_fraction: float) -> State:
    return weighted_mean(updates, weights)


def _trimmed_mean(
    updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *, trim_fraction: float
) -> State:
    return trimmed_mean(updates, trim_fraction=trim_fraction)


def _median(updates: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *, trim_fraction: float) -> State:
    return coordinate_median(updates)


# The registry of combines (``federation.aggregation``): config.AGGREGATIONS is tested equal to its names.
COMBINES: dict[str, CombineFn] = {"mean": _mean, "trimmed_mean": _trimmed_mean, "median": _median}
