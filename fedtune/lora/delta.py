"""Adapter deltas: what a site sends (trained minus received) and how the server applies them."""

from __future__ import annotations

from collections.abc import Mapping

import torch

State = dict[str, torch.Tensor]  # an adapter's tensors by key: the one definition


def compute_delta(trained: Mapping[str, torch.Tensor], received: Mapping[str, torch.Tensor]) -> State:
    """``trained - received`` per tensor, float32 on CPU; key sets must be equal."""
    if set(trained) != set(received):
        raise KeyError(f"delta keys differ: {sorted(set(trained) ^ set(received))[:3]}")
    return {k: (trained[k].float().cpu() - received[k].float().cpu()) for k in sorted(trained)}


def apply_delta(state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], *, scale: float = 1.0) -> State:
    """``state + scale * delta``: the new global adapter (server learning rate ``scale``)."""
    if set(state) != set(delta):
        raise KeyError(f"delta keys differ from the state: {sorted(set(state) ^ set(delta))[:3]}")
    return {k: state[k] + scale * delta[k].to(state[k].dtype) for k in sorted(state)}


def l2_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """Global L2 norm over all tensors (float64 accumulation)."""
    total = torch.zeros((), dtype=torch.float64)
    for v in delta.values():
        total += (v.double() ** 2).sum()
    return float(torch.sqrt(total))
