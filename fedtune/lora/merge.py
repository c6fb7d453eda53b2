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
          rank / its factors      effective update (held as    global's effective update
                                  factors, never out x in)     + step (exact up to rank)
========  ======================  ===========================  ==========================

``fedavg`` and ``ffa`` are sums of what the sites send, so they work under secure
aggregation; ``ffa`` is exact because the common A factors out of the mean
(FFA-LoRA, Sun et al., ICLR 2024). ``svd`` lets sites train at different ranks (FlexLoRA,
Bai et al. 2024; NVFlare's HLoRA): each re-factorises the global effective update at its
own rank before training. Its factors are B = U·S and A = V^T (A with orthonormal rows,
like a LoRA A at its initial scale, B carrying the magnitude, like a LoRA B); directions
the update does not use get B = 0 and a fresh random A row, so they can still learn.
``svd``'s updates stay factored (:mod:`fedtune.lora.factored`): the truncated SVD comes
from the stacked factors, never the out x in matrix, unless a dense path asks for it.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedtune.errors import ModelMismatchError, UpdateRejected
from fedtune.lora.aggregate import validate_update, weighted_mean
from fedtune.lora.delta import State, apply_delta, compute_delta
from fedtune.lora.factored import Factored, LowRank, Term, Update, combine, mean, truncate

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


def factored_effective(state: Mapping[str, torch.Tensor], *, alpha: float) -> dict[str, LowRank]:
    """:func:`effective` held as factors: per module the one term ``(alpha / r) · B @ A``."""
    scale = alpha / rank_of(state)
    return {m: LowRank((Term(scale, state[b], state[a]),)) for m, (a, b) in modules(state).items()}


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
    return truncate(u, s, vh, (product.shape[0], product.shape[1]), rank, module=module, seed=seed)


def to_rank(
    effective_update: Mapping[str, torch.Tensor | LowRank],
    like: Mapping[str, torch.Tensor],
    *,
    rank: int,
    alpha: float,
    seed: int,
) -> State:
    """Factors at ``rank`` (key names and dtype of ``like``) whose effective update is the best
    rank-``rank`` approximation of ``effective_update``, one module at a time: a dense
    matrix by :func:`factorise`, a :class:`LowRank` by the exact SVD of its stacked factors."""
    out: State = {}
    for module, (a_key, b_key) in modules(like).items():
        x = effective_update[module]
        if isinstance(x, LowRank):
            x = x.scaled(rank / alpha)
            u, s, vh = x.svd(keep=rank)
            b, a = truncate(u, s, vh, x.shape, rank, module=module, seed=seed)
        else:
            b, a = factorise(x / (alpha / rank), rank, module=module, seed=seed)
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
    factored = False  # its updates are :class:`~fedtune.lora.factored.Factored` (dense paths must ask to densify)

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
    ) -> list[Update]:
        """Each site's update in the rule's update space, for the round's checked replies."""
        return [dict(sent) for sent in replies]

    def apply(self, global_state: Mapping[str, torch.Tensor], step: Update) -> State:
        """The next global adapter after the server takes ``step`` in update space."""
        return apply_delta(global_state, _dense_step(self, step))


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

    def apply(self, global_state: Mapping[str, torch.Tensor], step: Update) -> State:
        out = dict(global_state)
        out.update(apply_delta(self.reference(global_state), _dense_step(self, step)))
        return out


@dataclass(frozen=True)
class SVDRule(MergeRule):
    """Effective updates merged as factors, re-factorised at the run's rank; sites at any rank."""

    name = "svd"
    linear = False  # each site's update is its B·A, a product of what it sends
    factored = True

    def local_start(self, global_state: Mapping[str, torch.Tensor], *, rank: int) -> State:
        if rank == self.rank:
            return dict(global_state)
        like = {
            k: v.new_empty((rank, v.shape[1]) if A_TAG in k else (v.shape[0], rank)) for k, v in global_state.items()
        }
        now = factored_effective(global_state, alpha=self.alpha)
        return to_rank(dict(now), like, rank=rank, alpha=self.alpha, seed=self.seed)

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
    ) -> list[Update]:
        """Per site and module ``(alpha/r_i)·B_i·A_i - (alpha/r)·B_g·A_g``, as its two terms."""
        now = factored_effective(global_state, alpha=self.alpha)
        return [
            Factored(
                {m: combine([(1.0, x), (-1.0, now[m])]) for m, x in factored_effective(sent, alpha=self.alpha).items()}
            )
            for sent in replies
        ]

    def apply(self, global_state: Mapping[str, torch.Tensor], step: Update) -> State:
        """The best rank-r factors of the global's effective update plus ``step``: from the
        stacked factors when ``step`` is factored, densely when a dense path made it dense."""
        target: dict[str, torch.Tensor | LowRank]
        if isinstance(step, Factored):
            now = factored_effective(global_state, alpha=self.alpha)
            target = {m: combine([(1.0, now[m]), (1.0, step.parts[m])]) for m in now}
        else:
            dense_now = effective(global_state, alpha=self.alpha)
            target = {m: dense_now[m] + step[m].double() for m in dense_now}
        return to_rank(target, global_state, rank=self.rank, alpha=self.alpha, seed=self.seed)


# The registry of merge rules (``federation.strategy``): config.STRATEGIES and
# config.LINEAR_STRATEGIES are tested equal to its names and to its linear rules' names.
RULES: dict[str, type[MergeRule]] = {rule.name: rule for rule in (MergeRule, FFARule, SVDRule)}


def _dense_step(rule: MergeRule, step: Update) -> Mapping[str, torch.Tensor]:
    if isinstance(step, Factored):
        raise TypeError(f"the {rule.name!r} rule takes plain deltas, not factored updates")
    return step


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
    return rule.apply(global_state, mean(rule.updates(global_state, replies), weights))
