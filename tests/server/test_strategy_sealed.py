"""The coordinator opens sealed replies before anything touches the global adapter."""

from __future__ import annotations

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType

from fedtune import wire
from fedtune.lora.aggregate import weighted_mean
from fedtune.lora.delta import apply_delta
from fedtune.security.keys import AllowList, KeyPair
from fedtune.security.witness import ChainHead
from fedtune.server.merging import Merge, NormBounds
from fedtune.server.sampling import Sampling
from fedtune.server.strategy import LoraStrategy

GLOBAL = {"l.lora_A.weight": torch.ones(2, 3), "l.lora_B.weight": torch.zeros(3, 2)}
COORD = KeyPair.generate("coordinator", "coordinator")
SITES = {name: KeyPair.generate(name, "hospital") for name in ("a", "b", "c")}
MALLORY = KeyPair.generate("a", "hospital")  # claims to be "a" with her own key
HEAD = ChainHead(0, "0" * 64)  # the hospitals' audit heads (what the coordinator does with them: test_witness.py)

pytestmark = pytest.mark.usefixtures("flower_run_id")


class Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _strategy(bounds: NormBounds | None = None) -> LoraStrategy:
    opener = wire.Opener(COORD, AllowList([p.public for p in SITES.values()]))
    return LoraStrategy(
        spec_sha256="spec",
        base_sha256="",
        sampling=Sampling(3),
        merge=Merge(bounds=bounds or NormBounds()),
        run_id="run-1",
        opener=opener,
    )


def _request(s: LoraStrategy, rnd: int, kind: str = "train") -> wire.RoundInstruction:
    """Open a request on the strategy and return what a client receives."""
    config = wire.instruction_config(num_rounds=5)
    configure = s.configure_train if kind == "train" else s.configure_evaluate
    (msg, *_) = list(configure(rnd, wire.to_arrays(GLOBAL), config, Nodes()))  # type: ignore[arg-type]
    return wire.unpack_instruction(msg.content)


def _delta(value: float) -> dict[str, torch.Tensor]:
    return {k: torch.full_like(v, value) for k, v in GLOBAL.items()}


def _sealed(
    site: str,
    instruction: wire.RoundInstruction,
    delta: dict[str, torch.Tensor] | None,
    *,
    n: int = 10,
    key: KeyPair | None = None,
) -> Message:
    sealer = wire.Sealer(key or SITES[site], COORD.public)
    content = wire.pack_reply(
        wire.Identity(site, "base", "spec"),
        {"train-loss": 0.5},
        num_examples=n,
        delta=delta,
        sealer=sealer,
        instruction=instruction,
        audit=HEAD,
    )
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def test_sealed_updates_merge_like_plain_ones() -> None:
    s = _strategy()
    ins = _request(s, 1)
    assert len(ins.challenge) == 32 and ins.run_id == "run-1"
    arrays, metrics = s.aggregate_train(1, [_sealed("a", ins, _delta(1.0), n=10), _sealed("b", ins, _delta(4.0), n=30)])
    expected = apply_delta(GLOBAL, weighted_mean([_delta(1.0), _delta(4.0)], [10.0, 30.0]))
    for k, v in wire.from_arrays(arrays).items():
        torch.testing.assert_close(v, expected[k])
    assert metrics["accepted"] == 2 and s.report.accepted["a"]["train-loss"] == 0.5
    # nothing but the envelope travels
    msg = _sealed("a", ins, _delta(1.0))
    assert list(msg.content.keys()) == [wire.ENVELOPE] and not msg.content.array_records


def test_every_kind_of_bad_envelope_is_rejected_and_has_no_effect() -> None:
    s = _strategy()
    old = _request(s, 1)
    stale = _sealed("c", old, _delta(100.0))  # recorded in round 1 ...
    s.aggregate_train(1, [_sealed("a", old, _delta(1.0))])
    ins = _request(s, 2)
    tampered = _sealed("b", ins, _delta(100.0))
    prefix, body, signature = tampered.content.config_records[wire.ENVELOPE]["data"]  # type: ignore[misc]
    flipped = bytearray(body)  # type: ignore[arg-type]
    flipped[len(flipped) // 2] ^= 1  # one bit of the ciphertext
    tampered.content.config_records[wire.ENVELOPE] = ConfigRecord({"data": [prefix, bytes(flipped), signature]})
    other_run = wire.RoundInstruction(ins.state, 2, 5, run_id="run-0", challenge=ins.challenge)
    outsider = KeyPair.generate("zed", "hospital")
    replies = [
        _sealed("a", ins, _delta(2.0)),  # the one valid update
        stale,  # ... replayed in round 2
        tampered,
        _sealed("a", ins, _delta(100.0), key=MALLORY),  # forged signature
        _sealed("zed", ins, _delta(100.0), key=outsider),  # not on the allow-list
        _sealed("c", other_run, _delta(100.0)),  # another run
        _sealed("a", ins, _delta(100.0)),  # a second update from a
    ]
    arrays, metrics = s.aggregate_train(2, replies)
    for k, v in wire.from_arrays(arrays).items():
        torch.testing.assert_close(v, GLOBAL[k] + 2.0)  # only the valid update counted
    reasons = [r["reason"] for r in s.report.rejected]
    assert metrics["rejected"] == 6 == len(reasons)
    assert sum("invalid envelope" in r for r in reasons) == 3  # tampered, forged, outsider: one opaque error
    assert any("round 1, expected 2" in r for r in reasons)
    assert any("run 'run-0'" in r for r in reasons)
    assert any("second update from the same hospital" in r for r in reasons)
    assert any("claims zed" in r["site"] for r in s.report.rejected)


def test_a_replay_within_the_same_round_number_after_a_restart_is_refused() -> None:
    s = _strategy()
    first_attempt = _request(s, 3)
    replayed = _sealed("a", first_attempt, _delta(100.0))
    s2 = _strategy()  # the coordinator restarted and re-runs round 3 with a new challenge
    ins = _request(s2, 3)
    s2.aggregate_train(3, [replayed, _sealed("b", ins, _delta(1.0))])
    assert [r["reason"] for r in s2.report.rejected] == [
        "1 hospital(s) sent nothing within `round_timeout`",  # c was asked too
        "envelope answers another request (challenge differs): a replay",
    ]


def test_norm_outliers_are_rejected_against_the_median_of_the_others() -> None:
    s = _strategy(NormBounds(relative=10.0))
    ins = _request(s, 1)
    arrays, _ = s.aggregate_train(
        1, [_sealed("a", ins, _delta(1.0)), _sealed("b", ins, _delta(1.5)), _sealed("c", ins, _delta(1e4))]
    )
    assert [r["site"] for r in s.report.rejected] == ["c"] and "median" in s.report.rejected[0]["reason"]
    assert set(s.report.accepted) == {"a", "b"}
    capped = _strategy(NormBounds(absolute=1.0))
    ins = _request(capped, 1)
    capped.aggregate_train(1, [_sealed("a", ins, _delta(0.01)), _sealed("b", ins, _delta(1.0))])
    assert [r["site"] for r in capped.report.rejected] == ["(no reply)", "b"]  # c was asked and did not answer
    assert "max_update_norm" in capped.report.rejected[1]["reason"]


def test_sealed_refusals_and_evaluations() -> None:
    s = _strategy()
    ins = _request(s, 1)
    refusal = wire.pack_refusal(
        wire.Identity("b", "base", "spec"),
        kind="privacy-budget",
        reason="spent",
        sealer=wire.Sealer(SITES["b"], COORD.public),
        instruction=ins,
        audit=HEAD,
    )
    s.aggregate_train(
        1, [_sealed("a", ins, _delta(1.0)), Message(refusal, dst_node_id=0, message_type=MessageType.TRAIN)]
    )
    assert s.report.refused == [{"site": "b", "kind": "privacy-budget", "reason": "spent"}]
    ev = _request(s, 1, kind="evaluate")
    metrics = {"loss-sum": 2.0, "tokens": 4.0, "metric-sum": 1.0, "exact-sum": 0.0}
    good = wire.pack_reply(
        wire.Identity("a", "base", "spec"),
        metrics,
        num_examples=2,
        sealer=wire.Sealer(SITES["a"], COORD.public),
        instruction=ev,
        audit=HEAD,
    )
    stale = wire.pack_reply(
        wire.Identity("b", "base", "spec"),
        metrics,
        num_examples=2,
        sealer=wire.Sealer(SITES["b"], COORD.public),
        instruction=ins,
        audit=HEAD,
    )
    results = s.evaluate_replies(
        1, [Message(c, dst_node_id=0, message_type=MessageType.EVALUATE) for c in (good, stale)]
    )
    assert set(results) == {"a"} and results["a"].n == 2  # a train-request envelope is no evaluation
