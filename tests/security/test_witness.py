"""The coordinator's witness of the hospitals' audit trails: what it records of each sealed
reply, that it hashes a reply exactly as the hospital's audit did after Flower's
serialization, and how ``fedtune server witness`` hands it to a hospital."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType
from flwr.common.serde import message_from_proto, message_to_proto, recorddict_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedtune import wire
from fedtune.cli import main
from fedtune.client.audit import GENESIS, AuditLog, Outgoing
from fedtune.security.keys import AllowList, KeyPair
from fedtune.security.witness import ChainHead, WitnessEntry, WitnessLog, gather, load_witness
from fedtune.server.sampling import Sampling
from fedtune.server.strategy import LoraStrategy

GLOBAL = {"l.lora_A.weight": torch.ones(2, 3), "l.lora_B.weight": torch.zeros(3, 2)}
COORD = KeyPair.generate("coordinator", "coordinator")
SITES = {name: KeyPair.generate(name, "hospital") for name in ("a", "b")}

pytestmark = pytest.mark.usefixtures("flower_run_id")


class Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2]


def _strategy(tmp_path: Path) -> LoraStrategy:
    return LoraStrategy(
        spec_sha256="spec",
        base_sha256="",
        sampling=Sampling(2),
        opener=wire.Opener(COORD, AllowList([p.public for p in SITES.values()])),
        run_id="run-1",
        witness=WitnessLog(tmp_path / "witness.jsonl"),
    )


def _request(s: LoraStrategy, rnd: int, kind: str = "train") -> wire.RoundInstruction:
    configure = s.configure_train if kind == "train" else s.configure_evaluate
    (msg, *_) = list(configure(rnd, wire.to_arrays(GLOBAL), wire.instruction_config(num_rounds=3), Nodes()))  # type: ignore[arg-type]
    return wire.unpack_instruction(msg.content)


def _reply(site: str, ins: wire.RoundInstruction, head: ChainHead, *, key: KeyPair | None = None) -> Message:
    content = wire.pack_reply(
        wire.Identity(site, "base", "spec"),
        {"train-loss": 0.5},
        num_examples=4,
        delta={k: torch.full_like(v, 0.1) for k, v in GLOBAL.items()},
        sealer=wire.Sealer(key or SITES[site], COORD.public),
        instruction=ins,
        audit=head,
    )
    return Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN)


def _through_flower(msg: Message) -> Message:
    """The reply as the coordinator gets it: Flower's message protobuf, bytes, and back."""
    return message_from_proto(ProtoMessage.FromString(message_to_proto(msg).SerializeToString()))


def test_the_coordinator_hashes_a_reply_exactly_as_the_hospital_audited_it(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    ins = _request(s, 1)
    trail = AuditLog(tmp_path / "hospital" / "audit.jsonl")
    trail.append(Outgoing(run="run-1", round=0, kind="evaluate", payload=b"an earlier message"))
    head = trail.head()
    sent = _reply("a", ins, head)
    # what the hospital's `audited` mod hashes: the content, serialized deterministically
    record = trail.append(
        Outgoing(
            run="run-1",
            round=1,
            kind="train",
            payload=recorddict_to_proto(sent.content).SerializeToString(deterministic=True),
        )
    )
    received = _through_flower(sent)
    assert received.content is not sent.content
    s.aggregate_train(1, [received])
    assert s.report.accepted.keys() == {"a"}
    (entry,) = WitnessLog(tmp_path / "witness.jsonl").entries()[0]
    assert (entry.hospital, entry.run, entry.round, entry.kind) == ("a", "run-1", 1, "train")
    assert entry.head == head == ChainHead(1, record["prev"])  # the head it sent is its record's prev
    assert (entry.sha256, entry.bytes) == (record["sha256"], record["bytes"])
    assert entry.sha256 == hashlib.sha256(wire.wire_bytes(received.content)).hexdigest()
    assert entry.time.endswith("+00:00")
    witness, _, _ = gather("a", {"run-1": WitnessLog(tmp_path / "witness.jsonl")}, all_runs=False)
    assert trail.verify().ok and trail.check_witness(witness).ok and trail.check_witness(witness).last == 2


def test_only_authentic_envelopes_are_witnessed_as_their_headers_say(tmp_path: Path) -> None:
    s = _strategy(tmp_path)
    one = _request(s, 1)
    first = _reply("a", one, ChainHead(0, GENESIS))
    s.aggregate_train(1, [first])
    two = _request(s, 2)
    tampered = _reply("b", two, ChainHead(3, "c" * 64))
    prefix, body, signature = tampered.content.config_records[wire.ENVELOPE]["data"]  # type: ignore[misc]
    flipped = bytearray(body)  # type: ignore[arg-type]
    flipped[len(flipped) // 2] ^= 1  # one bit of the ciphertext
    tampered.content.config_records[wire.ENVELOPE] = ConfigRecord({"data": [prefix, bytes(flipped), signature]})
    mallory = KeyPair.generate("a", "hospital")
    replies = [
        _reply("b", two, ChainHead(3, "c" * 64)),
        first,  # a replay of round 1: refused, but still a message "a" sent once
        tampered,
        _reply("a", two, ChainHead(7, "d" * 64), key=mallory),  # not a's signature
    ]
    s.aggregate_train(2, replies)
    assert len(s.report.rejected) == 3
    entries, skipped = WitnessLog(tmp_path / "witness.jsonl").entries()
    assert skipped == 0
    assert [(e.hospital, e.round, e.audit_seq) for e in entries] == [("a", 1, 0), ("b", 2, 3), ("a", 1, 0)]
    assert "d" * 64 not in (tmp_path / "witness.jsonl").read_text()  # nothing unauthenticated is recorded
    witness, _, seen = gather("a", {"run-1": WitnessLog(tmp_path / "witness.jsonl")}, all_runs=False)
    assert len(witness.entries) == 1 and seen == {"a", "b"}  # the replay is the same message


def test_a_torn_witness_line_is_skipped_and_later_appends_stay_readable(tmp_path: Path) -> None:
    log = WitnessLog(tmp_path / "witness.jsonl")
    entry = WitnessEntry("a", "run-1", 1, "train", 0, GENESIS, "e" * 64, 10)
    log.append(entry)
    with open(log.path, "ab") as f:
        f.write(b'{"hospital": "a", "run": "ru')  # the coordinator died mid-write
    log.append(WitnessEntry("a", "run-1", 1, "evaluate", 1, "f" * 64, "0" * 64, 12))
    entries, skipped = log.entries()
    assert [e.kind for e in entries] == ["train", "evaluate"] and skipped == 1


def _home_with_runs(tmp_path: Path) -> Path:
    home = tmp_path / "coordinator"
    for run, n in (("run-a", 2), ("run-b", 1)):
        log = WitnessLog(home / "runs" / run / "witness.jsonl")
        for i in range(n):
            for site in ("st-elsewhere", "northgate"):
                sha = hashlib.sha256(f"{site} {run} {i}".encode()).hexdigest()
                log.append(WitnessEntry(site, run, i + 1, "train", i, "1" * 64, sha, 5))
    return home


def test_server_witness_writes_the_file_a_hospital_verifies_against(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    home = _home_with_runs(tmp_path)
    out = tmp_path / "witness.json"
    assert main(["server", "witness", "--home", str(home), "--hospital", "st-elsewhere", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "3 sealed replies from `st-elsewhere` over 2 run(s)" in said and "--witness witness.json" in said
    witness = load_witness(out)
    assert witness.all_runs and witness.runs == ("run-a", "run-b") and len(witness.entries) == 3
    assert {e.hospital for e in witness.entries} == {"st-elsewhere"}
    assert main(["server", "witness", "--home", str(home), "--hospital", "st-elsewhere", "--run", "run-b"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["runs"] == ["run-b"] and printed["all_runs"] is False and len(printed["entries"]) == 1
    for argv, says in (
        (["--home", str(home), "--hospital", "nobody"], "no sealed reply from hospital `nobody`"),
        (["--home", str(home), "--hospital", "st-elsewhere", "--run", "run-z"], "`--run` 'run-z' is not a run"),
        (["--home", str(tmp_path / "empty"), "--hospital", "st-elsewhere"], "no runs yet"),
        (["--run-dir", str(home / "runs" / "run-a"), "--hospital", "st-elsewhere"], "no config.toml"),
        (["--run-dir", str(home), "--run", "run-a", "--hospital", "x"], "without `--home` or `--run`"),
    ):
        assert main(["server", "witness", *argv]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    assert "hospitals recorded there: northgate, st-elsewhere" in _err(capsys, home)


def _err(capsys, home: Path) -> str:  # type: ignore[no-untyped-def]
    main(["server", "witness", "--home", str(home), "--hospital", "nobody"])
    return str(capsys.readouterr().err)
