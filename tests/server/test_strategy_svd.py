"""The strategy under `svd`: factored updates are bounded by their (dense) norm, reported,
merged and stepped into the next global adapter at the run's rank, with no dense matrix."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message, MessageType

from fedtune import wire
from fedtune.lora.aggregate import weighted_mean
from fedtune.lora.delta import l2_norm
from fedtune.lora.merge import effective, make_rule, rank_of
from fedtune.server.merging import Merge, NormBounds
from fedtune.server.sampling import Sampling
from fedtune.server.strategy import LoraStrategy

pytestmark = pytest.mark.usefixtures("flower_run_id")

ALPHA = 8.0


def _adapter(rank: int, seed: int, scale: float = 0.1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "l.lora_A.weight": torch.randn(rank, 12, generator=g) / 12**0.5,
        "l.lora_B.weight": scale * torch.randn(10, rank, generator=g),
    }


def _reply(site: str, delta: dict[str, torch.Tensor], n: int) -> Message:
    content = wire.pack_reply(wire.Identity(site, "base", "spec"), {"train-loss": 1.0}, num_examples=n, delta=delta)
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_svd_round_rejects_by_norm_and_merges_the_rest_exactly() -> None:
    glob = _adapter(8, 0)
    sites = {"a": _adapter(4, 1), "b": _adapter(8, 2), "c": _adapter(2, 3), "big": _adapter(4, 4, scale=100.0)}
    merge = Merge(rule=make_rule("svd", alpha=ALPHA, rank=8), bounds=NormBounds(relative=5.0))
    s = LoraStrategy(spec_sha256="spec", base_sha256="", sampling=Sampling(4, min_updates=3), merge=merge)
    s.current = {k: v.clone() for k, v in glob.items()}
    counts = {"a": 10, "b": 30, "c": 20, "big": 10}
    arrays, metrics = s.aggregate_train(1, [_reply(k, v, counts[k]) for k, v in sites.items()])
    assert metrics["accepted"] == 3 and metrics["rejected"] == 1
    assert "median of the others" in s.report.rejected[0]["reason"]
    now = effective(glob, alpha=ALPHA)
    kept = ["a", "b", "c"]
    changes = [{m: v - now[m] for m, v in effective(sites[k], alpha=ALPHA).items()} for k in kept]
    assert s.report.accepted["b"]["delta-norm"] == pytest.approx(l2_norm(changes[1]), rel=1e-6)
    assert s.report.accepted["c"]["lora-rank"] == 2.0
    merged = wire.from_arrays(arrays)
    assert rank_of(merged) == 8
    target = weighted_mean(changes, [float(counts[k]) for k in kept])["l"] + now["l"]  # rank 4 + 8 + 2 = 14 > 8
    u, sv, vh = torch.linalg.svd(target)
    best = (u[:, :8] * sv[:8]) @ vh[:8]
    got = effective(merged, alpha=ALPHA)["l"]
    assert float((got - best).norm() / best.norm()) < 1e-5
    assert float((got - target).norm()) == pytest.approx(float(sv[8:].norm()), rel=1e-4)  # Eckart-Young
