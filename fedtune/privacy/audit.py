"""An empirical privacy audit of an adapter: a membership inference test with the frozen base
model as reference. No Flower, no role, nothing sent: a hospital runs it on its own records.

The score of a record is how much the adapter lowered its loss: the base model's mean
answer-token loss (the same model with the adapter disabled) minus the adapted model's.
A record the adapter memorised scores high. Training records (members) are scored against
held-out records of the same hospital (nonmembers); how well the score tells them apart is
the ROC-AUC (0.5: not at all) and the true-positive rate at 1% false positives, each with a
95% interval (see :mod:`fedtune.privacy.audit_stats` for how they are computed).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from peft import PeftModel

from fedtune.data.tokens import TokenizedExample, collate
from fedtune.privacy import audit_stats
from fedtune.privacy.dpsgd import per_example_loss
from fedtune.train import answer_token_nll, autocast_dtype


@dataclass(frozen=True)
class MembershipAudit:
    """The outcome of a membership inference test on one adapter.

    ``auc`` (95% interval ``auc_low``..``auc_high``, DeLong's): the chance a random training
    record scores above a random held-out one; 0.5 means the adapter does not tell them apart.
    ``tpr_at_1fpr`` (``tpr_low``..``tpr_high``, bootstrap and Clopper-Pearson hull): the share
    of training records an attacker flags while flagging at most 1% of held-out records.
    """

    auc: float
    auc_low: float
    auc_high: float
    tpr_at_1fpr: float
    tpr_low: float
    tpr_high: float
    members: int
    nonmembers: int

    @property
    def fpr_resolution(self) -> float:
        """The smallest false-positive rate ``nonmembers`` held-out records can resolve (1/n):
        with fewer than 100 of them, "1% FPR" is really "no false positive"."""
        return 1.0 / self.nonmembers

    def as_dict(self) -> dict[str, float | int]:
        """The fields, and ``fpr_resolution``, as JSON-ready numbers."""
        return {**asdict(self), "fpr_resolution": self.fpr_resolution}


def member_subset(count: int, available: int, *, seed: int) -> list[int]:
    """A seeded random subset of ``count`` (at most ``available``) training record indices, sorted."""
    return sorted(random.Random(f"privacy-audit/{seed}").sample(range(available), min(count, available)))


def from_scores(members: Sequence[float], nonmembers: Sequence[float], *, seed: int = 0) -> MembershipAudit:
    """The audit of already computed scores (higher = more member-like)."""
    auc_low, auc_high = audit_stats.auc_interval(members, nonmembers)
    tpr_low, tpr_high = audit_stats.tpr_interval(members, nonmembers, seed=seed)
    return MembershipAudit(
        auc=audit_stats.auc(members, nonmembers),
        auc_low=auc_low,
        auc_high=auc_high,
        tpr_at_1fpr=audit_stats.tpr_at_fpr(members, nonmembers),
        tpr_low=tpr_low,
        tpr_high=tpr_high,
        members=len(members),
        nonmembers=len(nonmembers),
    )


def record_losses(
    model: torch.nn.Module,
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    batch_size: int = 8,
    precision: str = "auto",
    total: bool = False,
) -> list[float]:
    """Each record's mean answer-token loss under ``model`` as it is (no gradients); with
    ``total``, the sum over its answer tokens instead (minus the log-probability of the answer).

    Records are batched in order of length (less padding) and the losses returned in the
    order given."""
    if not examples:
        return []
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    losses = [0.0] * len(examples)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), max(1, batch_size)):
                chunk = order[start : start + max(1, batch_size)]
                batch = {k: v.to(device) for k, v in collate([examples[i] for i in chunk], pad_id=pad_id).items()}
                with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                    values = _batch_losses(model, batch, total=total)
                for i, value in zip(chunk, values, strict=True):
                    losses[i] = float(value)
    finally:
        model.train(was_training)
    return losses


def _batch_losses(model: torch.nn.Module, batch: dict[str, torch.Tensor], *, total: bool) -> list[float]:
    """Each row's answer loss: the mean over its answer tokens (the training loss), or the sum."""
    per_record = answer_token_nll(model, batch)[0].sum(dim=1) if total else per_example_loss(model, batch)
    return [float(v) for v in per_record.float().cpu().tolist()]


def record_scores(
    model: PeftModel,
    examples: Sequence[TokenizedExample],
    *,
    pad_id: int,
    batch_size: int = 8,
    precision: str = "auto",
) -> list[float]:
    """Per record: base-model loss minus adapted loss (mean answer-token NLL; the base is the
    same model with the adapter disabled). Higher = more member-like."""
    adapted = record_losses(model, examples, pad_id=pad_id, batch_size=batch_size, precision=precision)
    with model.disable_adapter():
        base = record_losses(model, examples, pad_id=pad_id, batch_size=batch_size, precision=precision)
    return [b - a for b, a in zip(base, adapted, strict=True)]


def membership_audit(
    model: PeftModel,
    members: Sequence[TokenizedExample],
    nonmembers: Sequence[TokenizedExample],
    *,
    pad_id: int,
    batch_size: int = 8,
    precision: str = "auto",
    seed: int = 0,
) -> MembershipAudit:
    """Score ``members`` (training records) against ``nonmembers`` (held-out records of the
    same hospital) with the adapter of ``model``; ``seed`` seeds the TPR's bootstrap."""
    if not members or not nonmembers:
        raise ValueError("a membership audit needs at least one training and one held-out record")
    member_scores = record_scores(model, members, pad_id=pad_id, batch_size=batch_size, precision=precision)
    nonmember_scores = record_scores(model, nonmembers, pad_id=pad_id, batch_size=batch_size, precision=precision)
    return from_scores(member_scores, nonmember_scores, seed=seed)
