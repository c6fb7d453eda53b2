"""The hospital's audit trail: a hash chain in which any edit, deletion or reordering
of a record is found, and the first bad record named."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest
from fedtune.client.audit import GENESIS, AuditLog, Outgoing

from fedtune.errors import FedTuneError


def _fill(path: Path, n: int = 6) -> AuditLog:
    log = AuditLog(path)
    for i in range(1, n + 1):
        log.append(
            Outgoing(
                run="run-1",
                round=(i + 1) // 2,
                kind="train" if i % 2 else "evaluate",
                payload=f"envelope {i}".encode() * i,
                epsilon=0.5 * i,
                delta=1e-5,
                adapter_sha256="a" * 64,
                base_sha256="b" * 64,
            )
        )
    return log


def _lines(log: AuditLog) -> list[str]:
    return log.path.read_text().splitlines(keepends=True)


def test_an_intact_log_verifies_and_records_what_was_sent(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    verdict = log.verify()
    assert verdict.ok and verdict.records == 6
    records = log.records()
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert records[0]["prev"] == GENESIS and records[1]["prev"] == records[0]["hash"]
    assert records[2]["bytes"] == len(b"envelope 3" * 3) and records[2]["epsilon"] == 1.5
    assert verdict.head == records[-1]["hash"]
    assert oct(log.path.stat().st_mode & 0o777) == "0o600"


@pytest.mark.parametrize("victim", [1, 3, 6])
def test_altering_any_record_names_it(tmp_path: Path, victim: int) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    lines = _lines(log)
    record = json.loads(lines[victim - 1])
    record["epsilon"] = 0.01  # understate the privacy spent
    lines[victim - 1] = json.dumps(record, sort_keys=True) + "\n"
    log.path.write_text("".join(lines))
    verdict = log.verify()
    assert (verdict.bad, verdict.reason) == (victim, "its contents do not match its hash (altered)")


@pytest.mark.parametrize("victim", [1, 3])
def test_altering_a_record_and_fixing_its_hash_breaks_the_next_link(tmp_path: Path, victim: int) -> None:
    from fedtune.client.audit import record_hash

    log = _fill(tmp_path / "audit.jsonl")
    lines = _lines(log)
    record = json.loads(lines[victim - 1])
    record["bytes"] = 1  # understate what left
    record["hash"] = record_hash(record)
    lines[victim - 1] = json.dumps(record, sort_keys=True) + "\n"
    log.path.write_text("".join(lines))
    verdict = log.verify()
    assert verdict.bad == victim + 1 and "does not follow" in verdict.reason


@pytest.mark.parametrize("victim", [1, 4, 6])
def test_deleting_any_record_names_where_it_was(tmp_path: Path, victim: int) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    lines = _lines(log)
    del lines[victim - 1]
    log.path.write_text("".join(lines))
    verdict = log.verify()
    assert verdict.bad == victim, verdict
    if victim == 6:  # the chain that is left is valid: only the head file knows
        assert "missing" in verdict.reason
    else:
        assert "deleted or reordered" in verdict.reason


def test_deleting_the_last_record_and_the_head_is_still_found(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    log.path.write_text("".join(_lines(log)[:-1]))
    log.head_path.unlink()
    verdict = log.verify()
    assert verdict.bad == 6 and "head file" in verdict.reason


@pytest.mark.parametrize(("a", "b"), [(1, 2), (3, 5), (5, 6)])
def test_reordering_records_names_the_first_out_of_place(tmp_path: Path, a: int, b: int) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    lines = _lines(log)
    lines[a - 1], lines[b - 1] = lines[b - 1], lines[a - 1]
    log.path.write_text("".join(lines))
    verdict = log.verify()
    assert verdict.bad == a and "reordered" in verdict.reason


def test_a_torn_last_line_is_reported_and_blocks_appending(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl", 3)
    data = log.path.read_bytes()
    log.path.write_bytes(data[:-20])
    assert log.verify().bad == 3
    with pytest.raises(FedTuneError, match="last record is incomplete"):
        log.append(Outgoing(run="r", round=1, kind="train", payload=b"x"))


def test_a_head_one_behind_after_a_crash_still_verifies(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl", 3)
    head = json.loads(log.head_path.read_text())
    records = log.records()
    log.head_path.write_text(json.dumps({"seq": 2, "hash": records[1]["hash"]}))  # crash before the head rewrite
    assert log.verify().ok and head["seq"] == 3
    log.head_path.write_text(json.dumps({"seq": 2, "hash": "0" * 64}))
    assert log.verify().bad == 2


def _append_many(path: str, worker: int) -> None:
    log = AuditLog(Path(path))
    for i in range(25):
        log.append(Outgoing(run="r", round=i, kind=f"w{worker}", payload=bytes([worker, i])))


def test_concurrent_appenders_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(str(path), w)) for w in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    log = AuditLog(path)
    assert log.verify().ok and log.verify().records == 75


def test_cli_verify_fails_and_names_the_record_show_prints_the_table(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.cli import main

    log = _fill(tmp_path / "audit" / "st-elsewhere.jsonl")
    assert main(["client", "audit", "verify", str(tmp_path / "audit")]) == 0
    assert "OK, 6 records" in capsys.readouterr().out
    assert main(["client", "audit", "show", str(log.path), "--last", "2"]) == 0
    out = capsys.readouterr().out
    assert "6 messages" in out and "chain OK" in out and "| 5 " in out and "| 4 " not in out
    lines = _lines(log)
    lines[2], lines[3] = lines[3], lines[2]
    log.path.write_text("".join(lines))
    assert main(["client", "audit", "verify", str(log.path)]) == 1
    assert "BROKEN at record 3" in capsys.readouterr().out
    assert main(["client", "audit", "verify", str(tmp_path / "nothing")]) == 2
    assert "no audit log here" in capsys.readouterr().err
