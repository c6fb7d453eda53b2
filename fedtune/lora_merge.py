"""Merge rules for LoRA adapters that are exact about what LoRA trains: the product B·A.

A site's adapter changes each adapted weight by ``scaling * B @ A`` (B: out x r,
A: r x in). The federation's target is the weighted mean of those products over the
sites. Three rules, over whole adapter states (the sites' adapters after local training):

- ``fedavg``: the weighted means of A and of B separately (what Flower, NVFlare and most
  LoRA federations do). mean(B)·mean(A) is not mean(B·A): the gap grows with the spread
  of the sites' factors (non-IID data, DP noise).
- ``ffa``: FFA-LoRA (Sun et al., ICLR 2024). A is frozen at a seed every site shares and
  only B is trained; the weighted mean of B times the common A *is* the mean of B_i·A,
  and the merge is linear (it works under secure aggregation and with DP noise on B).
- ``svd``: the weighted mean of the products, re-factorised by truncated SVD to the
  global rank (exact when that mean has rank <= the global rank, the best rank-r
  approximation otherwise, by Eckart-Young). Sites may train at different ranks, and
  each can be sent the merged product re-factorised at its own rank (FlexLoRA, HLoRA).

Not yet wired into the round loop; see the issue's note.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from fedtune.errors import UpdateRejected

State = dict[str, torch.Tensor]
A_TAG, B_TAG = ".lora_A.", ".lora_B."


def modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Each adapted module's (A key, B key), keyed by the module's name."""
    out: dict[str, tuple[str, str]] = {}
    for key in state:
        if A_TAG in key:
            module = key.split(A_TAG)[0]
            b_key = key.replace(A_TAG, B_TAG)
            if b_key not in state:
                raise UpdateRejected(f"{key} has no matching {b_key}")
            out[module] = (key, b_key)
    if len(out) * 2 != len(state):
        raise UpdateRejected("the adapter has tensors that are not LoRA A/B pairs")
    return out


def _normalised(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n or n == 0:
        raise ValueError(f"{n} adapters but {len(weights)} weights")
    total = float(sum(weights))
    if total <= 0 or any(w < 0 for w in weights):
        raise ValueError("weights must be non-negative with a positive sum")
    return [float(w) / total for w in weights]


def product_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """The target: per module, the weighted mean of the sites' B·A (in float64)."""
    w = _normalised(weights, len(states))
    out: State = {}
    for module, (a, b) in modules(states[0]).items():
        out[module] = sum(wi * (s[b].double() @ s[a].double()) for wi, s in zip(w, states, strict=True))  # type: ignore[assignment]
    return out


def products(state: Mapping[str, torch.Tensor]) -> State:
    """Per module, this adapter's B·A (in float64)."""
    return {m: state[b].double() @ state[a].double() for m, (a, b) in modules(state).items()}


def merge_fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """Separate weighted means of A and B (the baseline)."""
    w = _normalised(weights, len(states))
    shapes = {k: v.shape for k, v in states[0].items()}
    if any({k: v.shape for k, v in s.items()} != shapes for s in states):
        raise UpdateRejected("the sites' adapters differ in keys or ranks (mixed ranks need `svd`)")
    return {k: sum(wi * s[k] for wi, s in zip(w, states, strict=True)) for k in states[0]}  # type: ignore[misc]


def merge_ffa(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> State:
    """A stays the shared frozen A; B is the weighted mean of the sites' B: exact and linear."""
    first = states[0]
    for module, (a, _) in modules(first).items():
        if any(not torch.equal(s[a], first[a]) for s in states[1:]):
            raise UpdateRejected(f"`ffa` needs A frozen and shared, but the sites' {module} A differ")
    merged = merge_fedavg(states, weights)
    return {k: (first[k].clone() if A_TAG in k else v) for k, v in merged.items()}


def factorise(product: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-``rank`` approximation of ``product``, balanced:
    B = U·sqrt(S), A = sqrt(S)·Vh."""
    u, s, vh = torch.linalg.svd(product.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    b = u[:, :r] * root
    a = root[:, None] * vh[:r]
    if r < rank:  # a product of lower rank than asked: pad with zero directions
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
    return b, a


def merge_svd(
    states: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    rank: int,
    *,
    like: Mapping[str, torch.Tensor] | None = None,
) -> State:
    """The weighted mean of the sites' B·A, re-factorised at ``rank``.

    The sites may have trained at different ranks (only their products are combined).
    ``like``: an adapter whose key names and dtypes the result takes (default: the first).
    """
    template = like if like is not None else states[0]
    target = product_mean(states, weights)
    out: State = {}
    for module, (a, b) in modules(template).items():
        b_new, a_new = factorise(target[module], rank)
        out[a] = a_new.to(template[a].dtype)
        out[b] = b_new.to(template[b].dtype)
    return out
