"""Merge rules for LoRA adapters that say what they do to the update LoRA trains: B·A.

A site's adapter changes each adapted weight by ``(alpha / r) * B @ A`` (B: out x r,
A: r x in): its *effective update*. The federation's target is the weighted mean of the
sites' effective updates. Each rule fixes what a site trains, what it sends, what the
coordinator merges (the round's *update space*, where norm bounds, robust aggregation,
client-level DP and the server optimizer act) and how the merged update becomes the next
global adapter:

========  ======================  ===========================  ==========================
rule      a site trains / sends   merged update                next global adapter
========  ======================  ===========================  ==========================
fedavg    A and B / their deltas  mean of the deltas of A, B   global + step (A and B
                                                               averaged apart: not the
                                                               mean of B·A)
ffa       B (A frozen at the      mean of the deltas of B      global B + step, A as
          shared seed) / delta B                               ever: exact, linear
svd       A and B at its own      mean of the changes of the   best rank-r factors of the
          rank / its factors      effective update (dense)     global's effective update
                                                               + step (exact up to rank)
========  ======================  ===========================  ==========================

``fedavg`` and ``ffa`` are sums of what the sites send, so they work under secure
aggregation; ``ffa`` is exact because the common A factors out of the mean
(FFA-LoRA, Sun et al., ICLR 2024). ``svd`` lets sites train at different ranks (FlexLoRA,
Bai et al. 2024; NVFlare's HLoRA): each re-factorises the global effective update at its
own rank before training. Its factors are B = U·S and A = V^T (A with orthonormal rows,
like a LoRA A at its initial scale, B carrying the magnitude, like a LoRA B); directions
the update does not use get B = 0 and a fresh random A row, so they can still learn.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedtune.errors import ModelMismatchError, UpdateRejected
from fedtune.lora.aggregate import validate_update, weighted_mean
from fedtune.lora.delta import State, apply_delta, compute_delta

A_TAG, B_TAG = ".lora_A.", ".lora_B."


def modules(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """Each adapted module's (A key, B key), keyed by the module's name."""
    out: dict[str, tuple[str, str]] = {}
    for key in state:
        if A_TAG in key:
            b_key = key.replace(A_TAG, B_TAG)
            if b_key not in state:
                raise UpdateRejected(f"{key} has no matching {b_key}")
            out[key.split(A_TAG)[0]] = (key, b_key)
    if len(out) * 2 != len(state):
        raise UpdateRejected("the adapter has tensors that are not LoRA A/B pairs")
    return out


def rank_of(state: Mapping[str, torch.Tensor]) -> int:
    """The adapter's rank (rows of every A); UpdateRejected when the modules disagree."""
    ranks = {int(state[a].shape[0]) for a, _ in modules(state).values()}
    if len(ranks) != 1:
        raise UpdateRejected(f"the adapter's modules have different ranks {sorted(ranks)}")
    return ranks.pop()


def effective(state: Mapping[str, torch.Tensor], *, alpha: float) -> State:
    """Per module, the weight update the adapter makes: ``(alpha / r) * B @ A`` in float64."""
    scale = alpha / rank_of(state)
    return {m: scale * (state[b].double() @ state[a].double()) for m, (a, b) in modules(state).items()}


def effective_mean(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], *, alpha: float) -> State:
    """The federation's target: the weighted mean of the sites' effective updates."""
    return weighted_mean([effective(s, alpha=alpha) for s in states], weights)


def _fill_rows(module: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """Fresh A rows for unused directions, drawn like LoRA's A (bound 1/sqrt(in)), reproducibly."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode())) % 2**63)
    return (torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1) / cols**0.5


def _range(product: torch.Tensor, width: int, generator: torch.Generator, power_iterations: int) -> torch.Tensor:
    """An orthonormal basis (out x width) of ``product``'s dominant column space: a randomized
    range finder (Halko, Martinsson and Tropp, 2011) with power iterations. When the
    product's rank is at most ``width`` it spans the whole column space, so what follows is exact."""
    sketch = torch.randn(product.shape[1], width, generator=generator, dtype=torch.float64)
    q = torch.linalg.qr(product @ sketch).Q
    for _ in range(power_iterations):
        q = torch.linalg.qr(product @ torch.linalg.qr(product.T @ q).Q).Q
    return q


def factorise(
    product: torch.Tensor, rank: int, *, module: str = "", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) with B @ A the best rank-``rank`` approximation of ``product`` (Eckart-Young):
    B = U·S, A = V^T. Directions beyond the product's rank get B = 0 and a random A row.

    A full SVD costs out·in·min(out, in); the SVD is instead taken within a randomized basis
    of ``rank + max(3 * rank, 16)`` columns (exact whenever the product's rank fits in it,
    e.g. the mean of up to 4 sites' updates at the global rank; otherwise within the
    randomized SVD's error after two power iterations). Small matrices get the full SVD.
    """
    product = product.double()
    width = rank + max(3 * rank, 16)
    generator = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(module.encode()) + 1) % 2**63)
    if width < min(product.shape):
        basis = _range(product, width, generator, power_iterations=2)
        u_small, s, vh = torch.linalg.svd(basis.T @ product, full_matrices=False)
        u = basis @ u_small
    else:
        u, s, vh = torch.linalg.svd(product, full_matrices=False)
    tol = float(s.max()) * max(product.shape) * torch.finfo(torch.float64).eps if s.numel() else 0.0
    used = min(rank, int((s > tol).sum()))
    b = torch.zeros(product.shape[0], rank, dtype=torch.float64)
    a = _fill_rows(module, rank, product.shape[1], seed)
    b[:, :used] = u[:, :used] * s[:used]
    a[:used] = vh[:used]
    return b, a


def to_rank(
    effective_update: Mapping[str, torch.Tensor],
    like: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    seed: int,
) -> State:
    """Factors at ``rank`` (key names and dtype of ``like``) whose effective update is the best
    rank-``rank`` approximation of ``effective_update``."""
    out: State = {}
    for module, (a_key, b_key) in modules(like).items():
        b, a = factorise(effective_update[module] / (alpha / rank), rank, module=module, seed=seed)
        out[a_key], out[b_key] = a.to(like[a_key].dtype), b.to(like[b_key].dtype)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class MergeRule:
    """The ``fedavg`` rule; :class:`FFARule` and :class:`SVDRule` change what differs.

    ``alpha`` and ``rank`` are the run's (the global adapter's); ``seed`` is ``lora.init_seed``.
    """

    alpha: float
    rank: int
    seed: int = 0
    name = "fedavg"
    freeze_a = False
    linear = True  # the merged update is a weighted sum of what the sites send: secure aggregation can compute it

    # -- at the site -----------------------------------------------------------------
    def local_start(self, global_state: Mapping[str, torch.Tensor], *, rank: int) -> State:
        """The adapter a site of ``rank`` trains from this round."""
        if rank != self.rank:
            raise ModelMismatchError(
                f"this site trains at rank {rank} but the run's adapter has rank {self.rank}; "
                "only `federation.strategy` = 'svd' merges mixed ranks"
            )
        return dict(global_state)

    def reply(self, trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> State:
        """What a site sends after training from ``start``."""
        return compute_delta(trained, start)

    # -- at the coordinator ------------------------------------------------------------
    def reference(self, global_state: Mapping[str, torch.Tensor]) -> State:
        """Keys, shapes and dtypes a reply must have (for a site at the run's rank)."""
        return dict(global_state)

    def check(self, sent: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> None:
        """UpdateRejected unless ``sent`` is a well-formed reply to ``global_state``."""
        validate_update(sent, self.reference(global_state))

    def reply_rank(self, sent: Mapping[str, torch.Tensor]) -> int:
        """The rank the site trained at, as its (checked) reply shows."""
        return self.rank

    def updates(
        self, global_state: Mapping[str, torch.Tensor], replies: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[State]:
        """Each site's update in the rule's update space, for the round's checked replies."""
        return [dict(sent) for sent in replies]

    def apply(self, global_state: Mapping[str, torch.Tensor], step: Mapping[str, torch.Tensor]) -> State:
        """The next global adapter after the server takes ``step`` in update space."""
        return apply_delta(global_state, step)


@dataclass(frozen=True)
class FFARule(MergeRule):
    """FFA-LoRA: A stays the shared round-0 A (seed ``lora.init_seed``); sites train and send B."""

    name = "ffa"
    freeze_a = True
    linear = True

    def reply(self, trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> State:
        return {k: v for k, v in compute_delta(trained, start).items() if B_TAG in k}

    def reference(self, global_state: Mapping[str, torch.Tensor]) -> State:
        return {k: v for k, v in global_state.items() if B_TAG in k}

    def apply(self, global_state: Mapping[str, torch.Tensor], step: Mapping[str, torch.Tensor]) -> State:
        out = dict(global_state)
        out.update(apply_delta(self.reference(global_state), step))
        return out


@dataclass(frozen=True)
class SVDRule(MergeRule):
    """Effective updates merged densely, re-factorised at the run's rank; sites at any rank."""

    name = "svd"
    linear = False  # each site's update is its dense B·A, a product of what it sends

    def local_start(self, global_state: Mapping[str, torch.Tensor], *, rank: int) -> State:
        if rank == self.rank:
            return dict(global_state)
        like = {
            k: v.new_empty((rank, v.shape[1]) if A_TAG in k else (v.shape[0], rank)) for k, v in global_state.items()
        }
        return to_rank(effective(global_state, alpha=self.alpha), like, rank=rank, alpha=self.alpha, seed=self.seed)

    def reply(self, trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> State:
        return {k: v.detach().float().cpu().clone() for k, v in sorted(trained.items())}

    def check(self, sent: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]) -> None:
        if set(sent) != set(global_state):
            raise UpdateRejected("keys differ from the global adapter's")
        rank = rank_of(sent)
        for m, (a, b) in modules(global_state).items():
            out, inp = global_state[b].shape[0], global_state[a].shape[1]
            if tuple(sent[a].shape) != (rank, inp) or tuple(sent[b].shape) != (out, rank):
                raise UpdateRejected(f"{m}: factors of shape {tuple(sent[b].shape)} x {tuple(sent[a].shape)}")
            if rank > min(out, inp):
                raise UpdateRejected(f"rank {rank} is above what {m} ({out} x {inp}) can hold")
        for key, value in sent.items():
            if value.dtype != global_state[key].dtype or not bool(torch.isfinite(value).all()):
                raise UpdateRejected(f"tensor {key} is not finite {global_state[key].dtype}")

    def reply_rank(self, sent: Mapping[str, torch.Tensor]) -> int:
        return rank_of(sent)

    def updates(
        self, global_state: Mapping[str, torch.Tensor], replies: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[State]:
        now = effective(global_state, alpha=self.alpha)  # once a round: dense, out x in per module
        return [{m: v - now[m] for m, v in effective(sent, alpha=self.alpha).items()} for sent in replies]

    def apply(self, global_state: Mapping[str, torch.Tensor], step: Mapping[str, torch.Tensor]) -> State:
        now = effective(global_state, alpha=self.alpha)
        target = {m: now[m] + step[m].double() for m in now}
        return to_rank(target, global_state, rank=self.rank, alpha=self.alpha, seed=self.seed)


# The registry of merge rules (``federation.strategy``): config.STRATEGIES and
# config.LINEAR_STRATEGIES are tested equal to its names and to its linear rules' names.
RULES: dict[str, type[MergeRule]] = {rule.name: rule for rule in (MergeRule, FFARule, SVDRule)}


def make_rule(name: str, *, alpha: float, rank: int, seed: int = 0) -> MergeRule:
    """The merge rule called ``name`` (``federation.strategy``) for the run's adapter."""
    return RULES[name](alpha=alpha, rank=rank, seed=seed)


def merge(
    rule: MergeRule,
    global_state: Mapping[str, torch.Tensor],
    trained: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
) -> State:
    """One plain round end to end: each site trained ``trained[i]`` from its start; the
    coordinator merges their replies by the weighted mean and applies it."""
    starts = [rule.local_start(global_state, rank=rank_of(t)) for t in trained]
    replies = [rule.reply(t, s) for t, s in zip(trained, starts, strict=True)]
    return rule.apply(global_state, weighted_mean(rule.updates(global_state, replies), weights))
