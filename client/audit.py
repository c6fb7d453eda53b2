"""The hospital's audit trail: one record for every message that leaves it, hash-chained.

Each record is one JSON line: its sequence number, UTC time, the fedtune run and round,
the message kind, the SHA-256 and size of the message content exactly as serialized for
the wire (:func:`fedtune.wire.wire_bytes`), the privacy budget spent so far, and the
adapter spec and base model hashes; under DP also ``ledger_releases``, the privacy
ledger's release count when it left (optional: older records lack it), by which a ledger
restored from an older copy is found. ``prev`` is the previous record's ``hash`` (a fixed
genesis value for the first) and ``hash`` is the SHA-256 of the record's canonical JSON
without it, so that an edit, a deletion or a reordering anywhere breaks the chain from
that record on.

**The last record is anchored.** A head file next to the log (``<log>.head``, rewritten
atomically) names the last record, and ``verify`` requires the log to end exactly there:
a record after the head is reported as not anchored, whatever its chain link says, and
fewer records than the head names as missing. An append is write-ahead: the head file
first declares the new record as ``pending`` (the whole record), then the line is
appended and fsynced, then the head names it. A crash in between leaves a state that
says what happened, and recovery (:meth:`AuditLog.recover`: ``fedtune client audit
recover``, or the next append or head read, logged at WARNING) only ever completes or
drops the append the head file declared: the record appended exactly as declared is
anchored (its message may not have left: the trail errs on the side of disclosure); a
declared record that never reached the log is dropped (its message was not sent: the
append comes first). A record appended behind fedtune's back, with a correct
chain link or not, is never adopted: ``verify`` fails naming it and appends refuse.

**What a local check cannot catch, and the witness that can.** Whoever can rewrite both
files and recompute every hash (or append a record and rewrite the head to match) can
forge the trail, and no check on the hospital's machine alone can tell. So every sealed
reply carries, signed, the head of the trail when it was built (``seq`` and ``hash`` of
the last record before it, which is the ``prev`` of the record appended for that very
reply), and the coordinator records it with the SHA-256 of the content it received
(:mod:`fedtune.security.witness`). :meth:`AuditLog.check_witness` (``fedtune client audit verify
LOG --witness FILE``) then requires each witnessed message's record to follow the head
the coordinator saw and carry the content hash it saw, and fails on records after the
last witnessed one: a rewritten trail, or one extended with a forged record even with
the head file rewritten to match, no longer verifies. Limits: SecAgg+ stage messages and
error replies are Flower's own and unsealed, so they carry no head; they are anchored
by the next sealed reply only, and until then (at the end of a trail) they are reported
as not witnessed. The last witnessed record's own time and epsilon are anchored by the
next sealed reply. The check assumes one message at a time per trail (what a fedtune
hospital does): the head read when a reply is built is then exactly the ``prev`` of its
record.

Appends take an exclusive lock (several ClientApp processes may reply at once) and are
fsynced before the message is handed to Flower: a record is never missing for a message
that left.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from logging import WARNING
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_json
from fedtune.errors import FedTuneError
from fedtune.security.witness import ChainHead, Witness

FORMAT = "fedtune-audit-v1"
GENESIS = hashlib.sha256(FORMAT.encode()).hexdigest()
FIELDS = ("seq", "time", "run", "round", "kind", "sha256", "bytes", "epsilon", "delta", "adapter_sha256", "base_sha256")


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the format name and the record's canonical JSON, ``hash`` left out."""
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{FORMAT}\n{canonical}".encode()).hexdigest()


def _line(record: dict[str, Any]) -> bytes:
    """A record's line in the log, exactly as ``append`` writes it."""
    return (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode()


@dataclass(frozen=True)
class Outgoing:
    """What the audit says of one outgoing message."""

    run: str
    round: int
    kind: str
    payload: bytes
    epsilon: float | None = None
    delta: float | None = None
    adapter_sha256: str = ""
    base_sha256: str = ""
    ledger_releases: int | None = None  # releases in the privacy ledger when this left (None: no DP)


@dataclass(frozen=True)
class _Scanned:
    """How far ``ledger_releases_sent`` read a log, and the largest count it found there."""

    file: tuple[int, int]  # (st_dev, st_ino): a replaced log is read again from the start
    offset: int  # the end of the last complete line read
    tail: bytes  # that line: a log rewritten in place is read again from the start
    most: int
    seq: int


_SCANNED: dict[Path, _Scanned] = {}


@dataclass(frozen=True)
class Verdict:
    """``verify``'s answer: ``bad`` is the 1-based number of the first bad record (0: none).

    ``interrupted``: the trail is intact but an append was interrupted by a crash;
    ``recover`` settles it.
    """

    records: int
    bad: int = 0
    reason: str = ""
    head: str = GENESIS
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return self.bad == 0


@dataclass(frozen=True)
class WitnessVerdict:
    """``check_witness``'s answer: how many records the coordinator vouches for, up to which."""

    witnessed: int
    last: int  # seq of the last witnessed record (0: none)
    bad: int = 0
    reason: str = ""
    uncovered: int = 0  # records after ``last`` of runs the witness does not cover (not judged)

    @property
    def ok(self) -> bool:
        return self.bad == 0


def lock_path(log: Path) -> Path:
    """The trail's lock file: held by every append, and by ``fedtune client backup`` while it copies."""
    return Path(log).with_name(Path(log).name + ".lock")


class _HeadUnreadable(Exception):
    pass


class AuditLog:
    """An append-only, hash-chained JSONL audit log at ``path``, anchored by ``<path>.head``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path(self.path), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- the head file -----------------------------------------------------------------
    def _head(self) -> dict[str, Any] | None:
        """The head file: ``seq``, ``hash`` and maybe ``pending``; None when there is none."""
        if not self.head_path.exists():
            return None
        try:
            head = json.loads(self.head_path.read_text())
            if not isinstance(head, dict) or not isinstance(head["seq"], int) or not isinstance(head["hash"], str):
                raise TypeError("not a head")
            pending = head.get("pending")
            if pending is not None and not self._valid_pending(head, pending):
                raise ValueError("bad pending record")
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _HeadUnreadable() from err
        return head

    @staticmethod
    def _valid_pending(head: dict[str, Any], pending: Any) -> bool:
        """A declared record: complete, hashed, and the one that follows the head."""
        return (
            isinstance(pending, dict)
            and all(f in pending for f in (*FIELDS, "prev", "hash"))
            and record_hash(pending) == pending["hash"]
            and pending["seq"] == head["seq"] + 1
            and pending["prev"] == head["hash"]
        )

    def _write_head(self, seq: int, hash_: str, pending: dict[str, Any] | None = None) -> None:
        doc: dict[str, Any] = {"seq": seq, "hash": hash_}
        if pending is not None:
            doc["pending"] = pending
        atomic_write_json(self.head_path, doc)

    # -- the log's tail ----------------------------------------------------------------
    def _tail(self) -> tuple[bytes | None, bytes]:
        """(the last complete line without its newline, or None; the bytes after it: a torn write).

        Read from the end of the file: the log grows without bound."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None, b""
        with open(self.path, "rb") as f:
            pos = f.seek(0, os.SEEK_END)
            chunk = b""
            while pos > 0 and chunk.count(b"\n") < 2:
                step = min(8192, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step) + chunk
        complete, _, fragment = chunk.rpartition(b"\n")
        if not complete and not chunk.startswith(b"\n") and b"\n" not in chunk:
            return None, fragment
        return complete.rsplit(b"\n", 1)[-1], fragment

    def _parse(self, line: bytes | None) -> dict[str, Any] | None:
        if line is None:
            return None
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("seq"), int) or "hash" not in record:
                raise ValueError("not a record")
        except ValueError as err:
            raise FedTuneError(f"{self.path}: the last record is not a JSON record; run {self._verify_hint}") from err
        return record

    @property
    def _verify_hint(self) -> str:
        return f"`fedtune client audit verify {self.path}`"

    # -- recovery and the anchored head ------------------------------------------------
    def _settle(self) -> tuple[dict[str, Any] | None, str]:
        """Under the lock: settle an append a crash interrupted (only the one the head file
        declared), then return (the last record, what was recovered or ""). Raises when
        the log does not end where the head file says: nothing is ever adopted."""
        try:
            head = self._head()
        except _HeadUnreadable as err:
            raise FedTuneError(f"{self.head_path}: unreadable or malformed; run {self._verify_hint}") from err
        line, fragment = self._tail()
        recovered = ""
        if head is not None and head.get("pending") is not None:
            pending: dict[str, Any] = head["pending"]
            declared = _line(pending)
            seq = int(pending["seq"])
            if fragment and declared.startswith(fragment):  # the append itself was torn
                with open(self.path, "r+b") as f:
                    f.truncate(f.seek(0, os.SEEK_END) - len(fragment))
                    os.fsync(f.fileno())
                fragment = b""
            last = self._parse(line)
            if line is not None and line + b"\n" == declared:
                head = {"seq": seq, "hash": str(pending["hash"])}
                recovered = (
                    f"record {seq} was appended but the head file was not rewritten (a crash); it is the "
                    "record the head file declared before the append, so it is anchored now"
                )
            elif (last is None and head["seq"] == 0) or (
                last is not None and last["seq"] == head["seq"] and last["hash"] == head["hash"]
            ):
                head = {"seq": head["seq"], "hash": head["hash"]}
                recovered = (
                    f"the append of record {seq} was interrupted before it reached the log (a crash); its "
                    "message was not sent (the record is written first), so the declaration is dropped"
                )
            else:
                raise FedTuneError(
                    f"{self.path}: an interrupted append of record {seq} does not match the log's end; the trail "
                    f"was changed outside fedtune; run {self._verify_hint}"
                )
            self._write_head(int(head["seq"]), str(head["hash"]))
            from flwr.supercore import log  # here: Flower costs `fedtune client check` 0.3 s at start

            log(WARNING, "audit trail %s: %s", self.path, recovered)
        if fragment:
            raise FedTuneError(f"{self.path}: the last record is incomplete; run {self._verify_hint}")
        last = self._parse(line)
        head_seq = int(head["seq"]) if head is not None else 0
        head_hash = str(head["hash"]) if head is not None else GENESIS
        last_seq = int(last["seq"]) if last is not None else 0
        last_hash = str(last["hash"]) if last is not None else GENESIS
        if head is None and last is not None:
            raise FedTuneError(f"{self.path}: the head file {self.head_path.name} is missing; run {self._verify_hint}")
        if (last_seq, last_hash) != (head_seq, head_hash):
            raise FedTuneError(
                f"{self.path}: the log ends at record {last_seq} but the head file names record {head_seq}: "
                f"the trail was changed outside fedtune (a record added or removed); run {self._verify_hint}"
            )
        return last, recovered

    def head(self) -> ChainHead:
        """The anchored head: the last record's seq and hash ((0, genesis) for an empty trail).

        What a sealed reply names as the trail's head; the record appended for that reply
        follows it. Raises when the trail does not end where its head file says."""
        with self._locked():
            last, _ = self._settle()
        return ChainHead(int(last["seq"]), str(last["hash"])) if last else ChainHead(0, GENESIS)

    def recover(self) -> str:
        """Settle an append a crash interrupted; say what was done ("" when nothing was needed)."""
        with self._locked():
            _, recovered = self._settle()
        return recovered

    def append(self, out: Outgoing) -> dict[str, Any]:
        """Record one outgoing message; durable before this returns.

        Write-ahead: the head file declares the record, the line is appended and fsynced,
        then the head file names it."""
        with self._locked():
            last, _ = self._settle()
            record: dict[str, Any] = {
                "seq": (int(last["seq"]) + 1) if last else 1,
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "run": out.run,
                "round": out.round,
                "kind": out.kind,
                "sha256": hashlib.sha256(out.payload).hexdigest(),
                "bytes": len(out.payload),
                "epsilon": out.epsilon,
                "delta": out.delta,
                "adapter_sha256": out.adapter_sha256,
                "base_sha256": out.base_sha256,
                "prev": str(last["hash"]) if last else GENESIS,
            }
            if out.ledger_releases is not None:  # optional, so trails without it read and verify as before
                record["ledger_releases"] = out.ledger_releases
            record["hash"] = record_hash(record)
            self._write_head(record["seq"] - 1, record["prev"], pending=record)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, _line(record))  # one write of one line
                os.fsync(fd)
            finally:
                os.close(fd)
            self._write_head(record["seq"], record["hash"])
            return record

    def records(self) -> list[dict[str, Any]]:
        """Every record that parses, in file order (for ``show``; ``verify`` judges them)."""
        out = []
        if self.path.exists():
            for line in self.path.read_bytes().splitlines():
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    if isinstance(record, dict):
                        out.append(record)
        return out

    def ledger_releases_sent(self) -> tuple[int, int]:
        """The largest ``ledger_releases`` a record carries, and that record's ``seq`` ((0, 0): none).

        Asked before every DP round, of a log that grows without bound: only the lines
        appended since this process last asked are parsed. Lines that do not parse are
        skipped (``verify`` judges them); a torn last line is read again next time.
        """
        key = self.path.absolute()
        try:
            f = open(self.path, "rb")  # noqa: SIM115 (closed below)
        except FileNotFoundError:
            _SCANNED.pop(key, None)
            return 0, 0
        with f:
            st = os.fstat(f.fileno())
            seen = _SCANNED.get(key)
            if seen is not None and seen.offset:
                f.seek(seen.offset - len(seen.tail))
                same = seen.file == (st.st_dev, st.st_ino) and f.read(len(seen.tail)) == seen.tail
                if not same:
                    seen = None
            offset, tail, most, seq = (seen.offset, seen.tail, seen.most, seen.seq) if seen else (0, b"", 0, 0)
            f.seek(offset)
            for line in f:
                if not line.endswith(b"\n"):
                    break
                offset, tail = offset + len(line), line
                try:
                    record = json.loads(line)
                    value = record.get("ledger_releases")
                except (ValueError, AttributeError):
                    continue
                if isinstance(value, int) and not isinstance(value, bool) and value > most:
                    number = record.get("seq")
                    most, seq = value, number if isinstance(number, int) else 0
        _SCANNED[key] = _Scanned((st.st_dev, st.st_ino), offset, tail, most, seq)
        return most, seq

    # -- verification ------------------------------------------------------------------
    def verify(self) -> Verdict:
        """Check the whole chain and that the log ends exactly at the head; name the first bad record."""
        unreadable = False
        try:
            head = self._head()
        except _HeadUnreadable:
            head, unreadable = None, True
        pending = head.get("pending") if head is not None else None
        if not self.path.exists():
            if pending is not None and pending["seq"] == 1:
                reason = f"its append was interrupted before it reached the log (not sent); {self._recover_hint}"
                return Verdict(0, 1, reason, interrupted=True)
            if head is None and not unreadable:
                return Verdict(0)
            return Verdict(0, 1, "the log is missing but its head file names records")
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        fragment = lines.pop()  # b"" when the file ends with a newline
        if fragment:
            if pending is not None and _line(pending).startswith(fragment):
                n = len(lines) + 1
                reason = f"the append of record {n} was torn by a crash; {self._recover_hint}"
                return Verdict(len(lines), n, reason, interrupted=True)
            return Verdict(len(lines), len(lines) + 1, "incomplete (torn write or truncated file)")
        prev = GENESIS
        for n, line in enumerate(lines, start=1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                return Verdict(n - 1, n, "not a JSON record", prev)
            missing = [f for f in (*FIELDS, "prev", "hash") if f not in record]
            if missing:
                return Verdict(n - 1, n, f"lacks {', '.join(missing)}", prev)
            if record_hash(record) != record["hash"]:
                return Verdict(n - 1, n, "its contents do not match its hash (altered)", prev)
            if record["seq"] != n:
                where = f"is record {record['seq']} where record {n} belongs (deleted or reordered)"
                return Verdict(n - 1, n, where, prev)
            if record["prev"] != prev:
                return Verdict(n - 1, n, "does not follow the one before it (deleted, inserted or reordered)", prev)
            prev = record["hash"]
        count = len(lines)
        if unreadable:
            return Verdict(count, count + 1, f"the head file {self.head_path.name} is unreadable", prev)
        if head is None:
            if count:
                return Verdict(count, count + 1, f"the head file {self.head_path.name} is missing", prev)
            return Verdict(0)
        seq, head_hash = int(head["seq"]), str(head["hash"])
        if pending is not None:
            n = int(pending["seq"])
            if count == n and lines[-1] + b"\n" == _line(pending):  # the chain check above: it follows the head
                reason = f"appended, but a crash stopped the head file naming it; {self._recover_hint}"
                return Verdict(count, n, reason, prev, True)
            if count == seq and (seq == 0 or self._hash_at(lines, seq) == head_hash):
                reason = f"its append was interrupted before it reached the log (not sent); {self._recover_hint}"
                return Verdict(count, n, reason, prev, True)
        if seq > count:
            return Verdict(count, count + 1, f"records {count + 1} to {seq} are missing (the head names {seq})", prev)
        if seq < count:
            added = "this record was" if count == seq + 1 else f"records {seq + 1} to {count} were"
            reason = f"is not anchored: the head file names record {seq}, so {added} added outside fedtune's append"
            return Verdict(seq, seq + 1, reason, prev)
        if seq >= 1 and self._hash_at(lines, seq) != head_hash:
            return Verdict(count, seq, "does not match the head file", prev)
        return Verdict(count, 0, "", prev)

    @property
    def _recover_hint(self) -> str:
        return f"run `fedtune client audit recover {self.path}`"

    @staticmethod
    def _hash_at(lines: list[bytes], seq: int) -> str:
        return str(json.loads(lines[seq - 1])["hash"])

    def check_witness(self, witness: Witness) -> WitnessVerdict:
        """Check the trail against what the coordinator received (call after ``verify`` passed).

        Each witnessed message's record must follow the head the coordinator saw in its
        envelope (record ``audit_seq`` has hash ``audit_head``, so the next one's ``prev``
        is that head) and carry the run, round, kind, SHA-256 and size the coordinator saw;
        records after the last witnessed one, in the runs the witness covers (every run
        when ``all_runs``), are not witnessed and fail.
        """
        records = self.records()
        count = len(records)
        witnessed: set[int] = set()
        for entry in sorted(witness.entries, key=lambda e: e.audit_seq):
            what = f"the {entry.kind} reply of run {entry.run} round {entry.round}"
            s = entry.audit_seq
            if s >= count:
                reason = (
                    f"is missing: the coordinator received {what}, built after record {s}, but the trail has "
                    f"{count} records (truncated?)"
                )
                return WitnessVerdict(len(witnessed), max(witnessed, default=0), s + 1, reason)
            if (records[s - 1]["hash"] if s else GENESIS) != entry.audit_head:
                reason = f"differs from the record {what} named as the trail's head when it was sent (rewritten)"
                return WitnessVerdict(len(witnessed), max(witnessed, default=0), s, reason)
            record = records[s]
            wants = {"sha256": entry.sha256, "bytes": entry.bytes, "run": entry.run}
            wants |= {"round": entry.round, "kind": entry.kind}
            differ = [f for f, want in wants.items() if record.get(f) != want]
            if differ:
                reason = f"is not {what} as the coordinator received it ({', '.join(differ)} differ)"
                return WitnessVerdict(len(witnessed), max(witnessed, default=0), s + 1, reason)
            witnessed.add(s + 1)
        last = max(witnessed, default=0)
        covered = set(witness.runs)
        after = records[last:]
        judged = [r for r in after if witness.all_runs or r.get("run") in covered]
        if judged:
            first, end = int(judged[0]["seq"]), int(judged[-1]["seq"])
            runs = ", ".join(sorted({str(r.get("run")) for r in judged}))
            which = f"record {first} (run {runs}) is" if first == end else f"records {first} to {end} (run {runs}) are"
            reason = (
                f"{which} not witnessed: the coordinator's last "
                f"witnessed record is {last}; they were added after the last message it received (forged?), "
                "or are unsealed messages (SecAgg+ stages, errors) not yet followed by a sealed reply, or the "
                "witness file is older than them"
            )
            return WitnessVerdict(len(witnessed), last, first, reason, len(after) - len(judged))
        return WitnessVerdict(len(witnessed), last, 0, "", len(after))
