"""The strategy wrapper: replies are unpacked, validated and merged as a weighted mean of deltas."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import wire
from fedtune.errors import FedTuneError
from fedtune.lora.aggregate import weighted_mean
from fedtune.lora.delta import apply_delta
from fedtune.server.merging import Combine, Merge
from fedtune.server.sampling import Sampling
from fedtune.server.strategy import LoraStrategy

pytestmark = pytest.mark.usefixtures("flower_run_id")


GLOBAL = {"l.lora_A.weight": torch.ones(2, 3), "l.lora_B.weight": torch.zeros(3, 2)}


def _reply(
    site: str, delta: dict[str, torch.Tensor] | None, *, n: int = 10, spec: str = "spec", base: str = "base"
) -> Message:
    content = wire.pack_reply(wire.Identity(site, base, spec), {"train-loss": 1.0}, num_examples=n, delta=delta)
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def _delta(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in GLOBAL.items()}


def _strategy(min_updates: int = 1, *, nodes: int = 3, merge: Merge | None = None) -> LoraStrategy:
    s = LoraStrategy(spec_sha256="spec", base_sha256="", sampling=Sampling(nodes, min_updates=min_updates), merge=merge)
    s.current = {k: v.clone() for k, v in GLOBAL.items()}
    return s


def test_merge_is_global_plus_weighted_mean_delta() -> None:
    s = _strategy()
    arrays, metrics = s.aggregate_train(1, [_reply("a", _delta(1.0), n=10), _reply("b", _delta(4.0), n=30)])
    merged = wire.from_arrays(arrays)
    expected = apply_delta(GLOBAL, weighted_mean([_delta(1.0), _delta(4.0)], [10.0, 30.0]))
    for k in GLOBAL:
        torch.testing.assert_close(merged[k], expected[k])
        torch.testing.assert_close(merged[k], GLOBAL[k] + 3.25)  # (1*10 + 4*30) / 40
    assert metrics["accepted"] == 2 and metrics["rejected"] == 0
    assert set(s.report.accepted) == {"a", "b"} and s.base_sha256 == "base"


def test_bad_replies_are_rejected_counted_and_kept_out_of_the_mean() -> None:
    s = _strategy()
    nan = _delta(0.0)
    nan["l.lora_A.weight"][0, 0] = float("nan")
    wrong_shape = _delta(0.0)
    wrong_shape["l.lora_B.weight"] = torch.zeros(2, 2)
    no_identity = _reply("x", _delta(100.0))
    del no_identity.content.config_records[wire.IDENTITY]
    replies = [
        _reply("good", _delta(2.0)),
        _reply("nan", nan),
        _reply("shape", wrong_shape),
        _reply("spec", _delta(100.0), spec="other"),
        _reply("nodelta", None),
        _reply("zero-examples", _delta(100.0), n=0),
        no_identity,
        _reply("otherbase", _delta(100.0), base="other"),
    ]
    arrays, metrics = s.aggregate_train(1, replies)
    merged = wire.from_arrays(arrays)
    for k in GLOBAL:
        torch.testing.assert_close(merged[k], GLOBAL[k] + 2.0)  # only "good" counted
    reasons = {r["site"]: r["reason"] for r in s.report.rejected}
    assert metrics["rejected"] == 7 == len(reasons)
    assert "NaN or Inf" in reasons["nan"]
    assert "shape" in reasons["shape"]
    assert "adapter spec differs" in reasons["spec"]
    assert "no delta" in reasons["nodelta"]
    assert "positive integer" in reasons["zero-examples"]
    assert "trained on base model" in reasons["otherbase"]


def test_too_few_valid_updates_fail_the_round_clearly() -> None:
    s = _strategy(min_updates=2)
    bad = _delta(0.0)
    bad["l.lora_A.weight"][0, 0] = float("inf")
    with pytest.raises(FedTuneError, match=r"round 3: only 1 valid update\(s\), the round needs 2"):
        s.aggregate_train(3, [_reply("a", _delta(1.0)), _reply("b", bad)])


def test_instruction_round_trip() -> None:
    content = RecordDict({wire.GLOBAL: wire.to_arrays(GLOBAL), wire.CONFIG: wire.instruction_config(num_rounds=5)})
    content.config_records[wire.CONFIG]["server-round"] = 2
    got = wire.unpack_instruction(content)
    assert (got.server_round, got.num_rounds) == (2, 5)
    assert all(torch.equal(got.state[k], GLOBAL[k]) for k in GLOBAL)
    assert isinstance(content.config_records[wire.CONFIG], ConfigRecord)


def _refusal(site: str) -> Message:
    content = wire.pack_refusal(
        wire.Identity(site, "base", "spec"), kind=wire.REFUSED_PRIVACY_BUDGET, reason=f"{site}: budget spent"
    )
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_refusals_are_counted_apart_and_the_round_goes_on_without_them() -> None:
    s = _strategy(min_updates=1)
    arrays, metrics = s.aggregate_train(2, [_reply("a", _delta(1.0)), _refusal("b")])
    for k, v in wire.from_arrays(arrays).items():
        torch.testing.assert_close(v, GLOBAL[k] + 1.0)  # the refusing site is not in the mean
    assert metrics["refused"] == 1 and metrics["rejected"] == 0
    assert s.report.refused == [{"site": "b", "kind": "privacy-budget", "reason": "b: budget spent"}]
    assert set(s.report.accepted) == {"a"}


def test_refusals_that_leave_too_few_updates_stop_the_federation() -> None:
    from fedtune.errors import FederationStopped

    s = _strategy(min_updates=2)
    with pytest.raises(FederationStopped, match=r"round 4: 2 site\(s\) refused to train \(a: privacy-budget, b:"):
        s.aggregate_train(4, [_refusal("a"), _refusal("b"), _reply("c", _delta(1.0))])


def test_a_refusal_without_identity_is_rejected() -> None:
    s = _strategy()
    bad = _refusal("x")
    del bad.content.config_records[wire.IDENTITY]
    s.aggregate_train(1, [bad, _reply("a", _delta(1.0))])
    assert s.report.refused == [] and len(s.report.rejected) == 1


def test_client_level_dp_replaces_the_weighted_mean() -> None:
    from fedtune.config import ClientDPSettings
    from fedtune.server.client_dp import ClientLevelDP, clip

    dp = ClientLevelDP(ClientDPSettings(enabled=True, noise_multiplier=1e-9, clipping_norm=0.5), num_sampled=2)
    s = _strategy(merge=Merge(client_dp=dp))
    arrays, _ = s.aggregate_train(1, [_reply("a", _delta(1.0), n=10), _reply("b", _delta(0.01), n=1000)])
    merged = wire.from_arrays(arrays)
    big, small = clip(_delta(1.0), 0.5)[0], _delta(0.01)
    for k in GLOBAL:  # uniform over the sampled hospitals, not weighted by examples; clipped
        torch.testing.assert_close(merged[k], GLOBAL[k] + (big[k] + small[k]) / 2, rtol=1e-5, atol=1e-6)
    assert s.report.client_dp["clipped"] == 1 and s.report.client_dp["epsilon"] > 0


def test_fraction_train_samples_that_share_of_the_hospitals() -> None:
    from fedtune.config import load_config
    from fedtune.lora.adapter import META_BASE, META_SPEC

    class FourNodes:
        def get_node_ids(self) -> list[int]:
            return [11, 12, 13, 14]

    meta = {META_SPEC: "spec", META_BASE: ""}
    half = LoraStrategy.from_config(load_config(None, {"data.hospitals": 4, "federation.fraction_train": 0.5}), meta)
    config = wire.instruction_config(num_rounds=2)
    messages = list(half.configure_train(1, wire.to_arrays(GLOBAL), config, FourNodes()))  # type: ignore[arg-type]
    assert len(messages) == 2 and {m.metadata.dst_node_id for m in messages} <= {11, 12, 13, 14}
    assert half.min_updates == 2  # min_clients = 0: every sampled hospital
    every = LoraStrategy.from_config(load_config(None, {"data.hospitals": 4, "federation.min_clients": 3}), meta)
    assert len(list(every.configure_train(1, wire.to_arrays(GLOBAL), config, FourNodes()))) == 4  # type: ignore[arg-type]
    assert every.min_updates == 3


class _Nodes:
    """A grid whose connected hospitals are whatever the test says."""

    def __init__(self, *ids: int) -> None:
        self.ids = list(ids)

    def get_node_ids(self) -> list[int]:
        return self.ids


def test_sampling_never_waits_for_a_dead_hospital() -> None:
    from fedtune.config import load_config
    from fedtune.lora.adapter import META_BASE, META_SPEC

    meta = {META_SPEC: "spec", META_BASE: ""}
    s = LoraStrategy.from_config(load_config(None, {"data.hospitals": 3, "federation.min_clients": 2}), meta)
    config = wire.instruction_config(num_rounds=2)
    grid = _Nodes(11, 12)  # the third has died: Flower's own sampling would wait for it forever
    train = list(s.configure_train(1, wire.to_arrays(GLOBAL), config, grid))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in train) == [11, 12]
    evaluate = list(s.configure_evaluate(1, wire.to_arrays(GLOBAL), ConfigRecord(dict(config)), grid))  # type: ignore[arg-type]
    assert sorted(m.metadata.dst_node_id for m in evaluate) == [11, 12]


def test_await_hospitals_goes_on_with_enough_and_fails_clearly_without() -> None:
    from fedtune.server.sampling import await_hospitals

    said: list[str] = []
    assert await_hospitals(_Nodes(1, 2, 3), want=3, need=2, timeout=5, say=said.append) == 3  # type: ignore[arg-type]
    assert said == []
    assert await_hospitals(_Nodes(1, 2), want=3, need=2, timeout=0.2, say=said.append) == 2  # type: ignore[arg-type]
    assert said[-1] == "2 of 3 hospitals connected after 0 s; going on with them"
    with pytest.raises(FedTuneError, match=r"only 1 hospital\(s\) connected within `federation.join_timeout`.*needs 2"):
        await_hospitals(_Nodes(1), want=3, need=2, timeout=0.2, say=said.append)  # type: ignore[arg-type]
    grid = _Nodes(1)
    joined = []

    def say(line: str) -> None:  # a hospital connects while the coordinator waits
        joined.append(line)
        grid.ids.append(len(grid.ids) + 1)

    assert await_hospitals(grid, want=3, need=3, timeout=30, say=say) == 3  # type: ignore[arg-type]
    assert joined[0] == "waiting for hospitals: 1/3 connected"


@pytest.mark.parametrize("combine", ["median", "trimmed_mean", "mean"])
def test_robust_combines_ignore_one_huge_update(combine: str) -> None:
    s = _strategy(nodes=5, merge=Merge(combine=Combine(combine, trim_fraction=0.2)))
    values = [1.0, 2.0, 3.0, 2.0, 4992.0]  # the last hospital pushes; the norm bound is off here
    arrays, _ = s.aggregate_train(1, [_reply(f"h{i}", _delta(v), n=10) for i, v in enumerate(values)])
    merged = wire.from_arrays(arrays)
    # median 2; trimmed mean drops 1 and 4992 per coordinate: mean(2, 2, 3) = 2.33; the plain mean follows the push
    want = {"median": 2.0, "trimmed_mean": 7.0 / 3.0, "mean": 1000.0}[combine]
    for k in GLOBAL:
        torch.testing.assert_close(merged[k], GLOBAL[k] + want)


def test_a_server_optimizer_steps_along_the_merged_update() -> None:
    from fedtune.lora.optimizers import make_server_optimizer

    s = _strategy(nodes=2, merge=Merge(optimizer=make_server_optimizer("fedavgm", lr=0.5)))
    for rnd in (1, 2):
        s.current = {k: v.clone() for k, v in GLOBAL.items()}
        arrays, _ = s.aggregate_train(rnd, [_reply("a", _delta(1.0)), _reply("b", _delta(3.0))])
    merged = wire.from_arrays(arrays)
    for k in GLOBAL:  # round 2: v = 0.9 * 2 + 2 = 3.8, step = 0.5 * 3.8
        torch.testing.assert_close(merged[k], GLOBAL[k] + 1.9)


def test_the_adapter_travels_packed_and_malformed_packing_is_refused() -> None:
    from flwr.app import Array, ArrayRecord

    state = {"b.weight": torch.randn(3, 4), "a.weight": torch.randn(2, 5), "c.bias": torch.randn(7)}
    record = wire.to_arrays(state)
    assert set(record) == {wire.PACKED, wire.INDEX}
    assert record[wire.PACKED].numpy().shape == (12 + 10 + 7,)  # one object instead of one per tensor
    back = wire.from_arrays(record)
    assert list(back) == sorted(state)
    for k, v in state.items():
        torch.testing.assert_close(back[k], v, rtol=0, atol=0)
    flat = record[wire.PACKED].numpy()
    index = record[wire.INDEX]
    short = ArrayRecord({wire.INDEX: index, wire.PACKED: Array.from_numpy_ndarray(flat[:-1].copy())})
    with pytest.raises(ValueError, match="does not fit"):
        wire.from_arrays(short)
    extra = ArrayRecord({wire.INDEX: index, wire.PACKED: Array.from_numpy_ndarray(np.append(flat, np.float32(1)))})
    with pytest.raises(ValueError, match="not named by the index"):
        wire.from_arrays(extra)
    bad = np.frombuffer(b'[["a", [-1]]]', dtype=np.uint8).copy()
    with pytest.raises(ValueError, match="non-negative dims"):
        wire.from_arrays(ArrayRecord({wire.INDEX: Array.from_numpy_ndarray(bad), wire.PACKED: record[wire.PACKED]}))
    with pytest.raises(ValueError, match="holds `index` and `adapter`"):
        wire.from_arrays(ArrayRecord({"a.weight": Array.from_numpy_ndarray(np.zeros(3, np.float32))}))


def test_each_sampled_node_gets_its_outcome_and_a_stop_says_why_sites_refused() -> None:
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.errors import FederationStopped

    def from_node(node: int, msg: Message) -> Message:
        TaskIdentity._node_id = node  # type: ignore[attr-defined] # a reply's sender (the fixture restores it)
        return Message(content=msg.content, dst_node_id=0, message_type=MessageType.TRAIN)

    s = _strategy(min_updates=1)
    s.report.node(14, "no reply")  # sampled, as configure_train records it; never answers
    nan = _delta(0.0)
    nan["l.lora_A.weight"][0, 0] = float("nan")
    replies = [from_node(11, _reply("a", _delta(1.0))), from_node(12, _refusal("b")), from_node(13, _reply("c", nan))]
    s.aggregate_train(1, replies)
    assert {n: o["state"] for n, o in s.report.nodes.items()} == {
        11: "accepted",
        12: "refused",
        13: "rejected",
        14: "no reply",
    }
    assert s.report.nodes[12] == {"state": "refused", "hospital": "b", "why": "privacy-budget: b: budget spent"}
    assert "NaN or Inf" in s.report.nodes[13]["why"] and s.report.nodes[13]["hospital"] == ""  # unsealed: a claim

    stopper = _strategy(min_updates=2)
    with pytest.raises(FederationStopped, match=r"refused to train .*; why: a: budget spent; b: budget spent$"):
        stopper.aggregate_train(1, [from_node(1, _refusal("a")), from_node(2, _refusal("b"))])


def test_an_error_reply_names_the_hospital_admitted_with_its_node() -> None:
    """Flower answers for a node that left ("Node Unavailable"); the coordinator names the hospital."""
    from flwr.app import Error

    from fedtune.server.replies import site_hint

    request = Message(RecordDict({"x": ConfigRecord({"a": 1})}), dst_node_id=7, message_type=MessageType.TRAIN)
    request.metadata.__dict__["_message_id"] = "m" * 64
    failed = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=request)
    failed.metadata.__dict__["_src_node_id"] = 7
    assert site_hint(failed, {7: "riverside-community"}) == "riverside-community"
    assert site_hint(failed, {}) == "node-7"  # simulation: no admitted names
