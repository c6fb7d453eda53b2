"""The hospital's audit trail: a hash chain in which any edit, deletion or reordering
of a record is found, and the first bad record named; a last record anchored by the head
file (crashes recovered only as the head file declared); and what only the coordinator's
witness can catch."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from fedtune.client.audit import GENESIS, AuditLog, Outgoing, record_hash
from fedtune.errors import FedTuneError
from fedtune.security.witness import Witness, WitnessEntry


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


def _forge(log: AuditLog, *, rewrite_head: bool) -> dict:  # type: ignore[type-arg]
    """The attack: append a record with a correctly recomputed chain link (an insider hiding
    or inventing a disclosure), optionally rewriting the head file to match."""
    last = log.records()[-1]
    forged = {**last, "seq": last["seq"] + 1, "round": 9, "sha256": "f" * 64, "bytes": 3, "prev": last["hash"]}
    forged["hash"] = record_hash(forged)
    with open(log.path, "a") as f:
        f.write(json.dumps(forged, sort_keys=True) + "\n")
    if rewrite_head:
        log.head_path.write_text(json.dumps({"seq": forged["seq"], "hash": forged["hash"]}))
    return forged


def test_a_forged_record_with_a_correct_link_is_not_anchored_and_blocks_appending(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    _forge(log, rewrite_head=False)  # the head file is left alone
    verdict = log.verify()
    assert not verdict.ok and not verdict.interrupted
    assert verdict.bad == 7 and verdict.reason.startswith("is not anchored: the head file names record 6")
    # nothing adopts it: not a recovery, not the next append (which would chain onto it)
    for act in (log.recover, log.head, lambda: log.append(Outgoing(run="r", round=1, kind="train", payload=b"x"))):
        with pytest.raises(FedTuneError, match="ends at record 7 but the head file names record 6"):
            act()
    assert len(log.records()) == 7 and log.verify().bad == 7


def _witness_of(records: list[dict], runs: tuple[str, ...] = ("run-1",)) -> Witness:  # type: ignore[type-arg]
    """What the coordinator records of a genuine trail's messages: for each, the head before it
    (the record's prev) and the hash of the content it received (the record's sha256)."""
    entries = [
        WitnessEntry("st-elsewhere", r["run"], r["round"], r["kind"], r["seq"] - 1, r["prev"], r["sha256"], r["bytes"])
        for r in records
    ]
    return Witness("st-elsewhere", runs, False, tuple(entries))


def test_a_forged_record_with_the_head_rewritten_passes_the_local_check_but_not_the_witness(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    witness = _witness_of(log.records())
    assert log.verify().ok and log.check_witness(witness).ok
    assert log.check_witness(witness).witnessed == 6
    _forge(log, rewrite_head=True)
    # the limit of a check on the hospital's machine alone: a consistent forgery of both files verifies
    assert log.verify().ok and log.verify().records == 7
    check = log.check_witness(witness)
    assert (check.bad, check.last) == (7, 6) and "record 7 (run run-1) is not witnessed" in check.reason


def test_a_rewritten_trail_does_not_match_the_witness(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    witness = _witness_of(log.records())
    records = log.records()
    records[1]["epsilon"] = 0.01  # understate the privacy spent in record 2, then recompute every hash
    prev = records[0]["hash"]
    for r in records[1:]:
        r["prev"] = prev
        r["hash"] = prev = record_hash(r)
    log.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    log.head_path.write_text(json.dumps({"seq": 6, "hash": prev}))
    assert log.verify().ok  # locally consistent
    check = log.check_witness(witness)
    assert check.bad == 2 and "named as the trail's head when it was sent (rewritten)" in check.reason
    # the same for a trail cut short with its head rewritten
    log = _fill(tmp_path / "cut.jsonl")
    witness = _witness_of(log.records())
    records = log.records()[:4]
    log.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    log.head_path.write_text(json.dumps({"seq": 4, "hash": records[-1]["hash"]}))
    assert log.verify().ok
    check = log.check_witness(witness)
    assert check.bad == 5 and "is missing" in check.reason and "truncated" in check.reason
    # and a record whose content is not what the coordinator received
    log = _fill(tmp_path / "other.jsonl")
    entries = list(_witness_of(log.records()).entries)
    entries[2] = WitnessEntry(**{**entries[2].__dict__, "sha256": "0" * 64})
    check = log.check_witness(Witness("st-elsewhere", ("run-1",), False, tuple(entries)))
    assert check.bad == 3 and "(sha256 differ)" in check.reason


def test_records_of_runs_the_witness_does_not_cover_are_reported_not_judged(tmp_path: Path) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    log.append(Outgoing(run="run-2", round=1, kind="train", payload=b"later"))
    witness = _witness_of(log.records()[:6])
    check = log.check_witness(witness)
    assert check.ok and (check.last, check.uncovered) == (6, 1)
    everything = Witness("st-elsewhere", ("run-1",), True, witness.entries)  # all of the coordinator's runs
    assert log.check_witness(everything).bad == 7


class _Crash(Exception):
    pass


def _crash_at(monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """Make the next append die just after the head file declares the record ("declared") or
    just after the line is appended ("appended")."""
    honest = AuditLog._write_head

    def write_head(self: AuditLog, seq: int, hash_: str, pending: dict | None = None) -> None:  # type: ignore[type-arg]
        if where == "appended" and pending is None:
            raise _Crash()
        honest(self, seq, hash_, pending)
        if where == "declared" and pending is not None:
            raise _Crash()

    monkeypatch.setattr(AuditLog, "_write_head", write_head)


def test_a_crash_after_the_append_is_recovered_explicitly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    log = _fill(tmp_path / "audit.jsonl")
    with monkeypatch.context() as m:
        _crash_at(m, "appended")
        with pytest.raises(_Crash):
            log.append(Outgoing(run="run-1", round=4, kind="train", payload=b"sent"))
    assert len(log.records()) == 7  # the line is there; the head file still names 6 and declares 7
    verdict = log.verify()
    assert verdict.interrupted and verdict.bad == 7 and "fedtune client audit recover" in verdict.reason
    with caplog.at_level("WARNING"):
        said = log.recover()
    assert "record 7 was appended" in said and "anchored now" in said
    assert any("record 7 was appended" in r.getMessage() and r.levelname == "WARNING" for r in caplog.records)
    assert log.verify().ok and log.verify().records == 7 and log.recover() == ""
    # the next append after such a crash settles it by itself (logged), then goes on
    with monkeypatch.context() as m:
        _crash_at(m, "appended")
        with pytest.raises(_Crash):
            log.append(Outgoing(run="run-1", round=5, kind="train", payload=b"sent"))
    caplog.clear()
    with caplog.at_level("WARNING"):
        log.append(Outgoing(run="run-1", round=5, kind="evaluate", payload=b"next"))
    assert any("record 8 was appended" in r.getMessage() for r in caplog.records)
    assert log.verify().ok and [r["seq"] for r in log.records()][-2:] == [8, 9]


def test_a_crash_before_the_append_drops_only_the_declared_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedtune.cli import main

    log = _fill(tmp_path / "audit.jsonl")
    with monkeypatch.context() as m:
        _crash_at(m, "declared")
        with pytest.raises(_Crash):
            log.append(Outgoing(run="run-1", round=4, kind="train", payload=b"never sent"))
    assert len(log.records()) == 6
    verdict = log.verify()
    assert verdict.interrupted and verdict.bad == 7 and "not sent" in verdict.reason
    pending = json.loads(log.head_path.read_text())["pending"]
    with open(log.path, "ab") as f:  # the append itself was torn by the crash
        f.write((json.dumps(pending, sort_keys=True) + "\n").encode()[:40])
    assert "torn by a crash" in log.verify().reason
    assert main(["client", "audit", "verify", str(log.path)]) == 1
    assert main(["client", "audit", "recover", str(log.path)]) == 0
    assert log.verify().ok and len(log.records()) == 6 and log.head().seq == 6
    assert main(["client", "audit", "recover", str(log.path)]) == 0  # nothing left to do
    # a declaration that does not fit the log is not a crash: nothing is adopted
    forged = _forge(log, rewrite_head=False)
    log.head_path.write_text(json.dumps({"seq": 6, "hash": forged["prev"], "pending": {**forged, "bytes": 9}}))
    assert not log.verify().ok
    with pytest.raises(FedTuneError):
        log.recover()


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


def test_cli_verify_with_a_witness_file(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.cli import main

    log = _fill(tmp_path / "audit" / "st-elsewhere.jsonl")
    witness = tmp_path / "witness.json"
    witness.write_text(json.dumps(_witness_of(log.records()).to_json()))
    assert main(["client", "audit", "verify", str(log.path), "--witness", str(witness)]) == 0
    out = capsys.readouterr().out
    assert "WITNESSED by the coordinator for `st-elsewhere`: 6 sealed replies, every record up to 6" in out
    _forge(log, rewrite_head=True)
    assert main(["client", "audit", "verify", str(log.path)]) == 0
    assert main(["client", "audit", "verify", str(log.path), "--witness", str(witness)]) == 1
    assert "NOT WITNESSED at record 7" in capsys.readouterr().out
    for bad, says in (
        (tmp_path / "missing.json", "no such file; get it from the coordinator"),
        (tmp_path / "audit", "is unreadable or not JSON"),  # a folder, not a file
    ):
        assert main(["client", "audit", "verify", str(log.path), "--witness", str(bad)]) == 2
        err = capsys.readouterr().err
        assert says in err and len(err.strip().splitlines()) == 1, err
    (tmp_path / "junk.json").write_text('{"format": "something-else"}')
    assert main(["client", "audit", "verify", str(log.path), "--witness", str(tmp_path / "junk.json")]) == 2
    assert "`format` must be 'fedtune-witness-v1', got 'something-else'" in capsys.readouterr().err
    assert main(["client", "audit", "verify", str(tmp_path / "audit"), "--witness", str(witness)]) == 2
    assert "pass that hospital's log file, not a folder" in capsys.readouterr().err
