"""A secure-aggregation round goes through the strategy: recorded and stepped as a plain round."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Message, MessageType

from fedtune import wire
from fedtune.errors import FedTuneError
from fedtune.lora.optimizers import make_server_optimizer
from fedtune.server.merging import Merge, NormBounds
from fedtune.server.sampling import Sampling
from fedtune.server.secagg import SecAggResult
from fedtune.server.strategy import LoraStrategy

pytestmark = pytest.mark.usefixtures("flower_run_id")

GLOBAL = {"l.lora_A.weight": torch.ones(2, 3), "l.lora_B.weight": torch.zeros(3, 2)}


def _delta(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in GLOBAL.items()}


def _strategy(min_updates: int = 1, merge: Merge | None = None) -> LoraStrategy:
    return LoraStrategy(spec_sha256="spec", base_sha256="", sampling=Sampling(3, min_updates=min_updates), merge=merge)


def test_a_secure_round_is_recorded_and_stepped_like_a_plain_one() -> None:
    numbers = {"a": {"train-loss": 1.0, "num-examples": 10.0}, "b": {"train-loss": 2.0, "num-examples": 30.0}}
    merge = Merge(optimizer=make_server_optimizer("fedavgm", lr=0.5))
    secure = _strategy(merge=merge)
    arrays, counts = secure.aggregate_secure(1, GLOBAL, SecAggResult(_delta(2.0), numbers, dropped=1))
    for k, v in wire.from_arrays(arrays).items():
        torch.testing.assert_close(v, GLOBAL[k] + 1.0)  # the server optimizer's step: 0.5 x 2
    assert secure.current is GLOBAL and secure.report.accepted == numbers
    assert secure.report.rejected == [{"site": "(secure aggregation)", "reason": "1 hospital(s) dropped out"}]
    assert dict(counts) == {"accepted": 2, "rejected": 1, "refused": 0}

    plain = _strategy()
    plain.configure_train(1, wire.to_arrays(GLOBAL), wire.instruction_config(num_rounds=1), _NoNodes())  # type: ignore[arg-type]
    reply = wire.pack_reply(wire.Identity("a", "base", "spec"), {}, num_examples=10, delta=_delta(2.0))
    _, plain_counts = plain.aggregate_train(1, [Message(content=reply, dst_node_id=0, message_type=MessageType.TRAIN)])
    assert set(dict(plain_counts)) == set(dict(counts))  # one record for both kinds of round


def test_a_secure_round_fails_clearly_with_too_few_hospitals_or_too_large_a_sum() -> None:
    one = SecAggResult(_delta(1.0), {"a": {"num-examples": 10.0}})
    with pytest.raises(FedTuneError, match=r"round 2: only 1 hospital\(s\) completed secure aggregation, .* needs 2"):
        _strategy(min_updates=2).aggregate_secure(2, GLOBAL, one)
    capped = _strategy(merge=Merge(bounds=NormBounds(absolute=1.0)))
    with pytest.raises(FedTuneError, match=r"round 3: the aggregate update's norm .* over `security.max_update_norm`"):
        capped.aggregate_secure(3, GLOBAL, one)


class _NoNodes:
    def get_node_ids(self) -> list[int]:
        return []
