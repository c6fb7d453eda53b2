"""The hospital's audit trail: one record for every message that leaves it, hash-chained.

Each record is one JSON line: its sequence number, UTC time, the fedtune run and round,
the message kind, the SHA-256 and size of the message content exactly as serialized for
the wire, the privacy budget spent so far, and the adapter spec and base model hashes;
under DP also ``ledger_releases``, the privacy ledger's release count when it left
(optional: older records lack it), by which a ledger restored from an older copy is found.
``prev`` is the previous record's ``hash`` (a fixed genesis value for the first) and
``hash`` is the SHA-256 of the record's canonical JSON without it, so that an edit, a
deletion or a reordering anywhere breaks the chain from that record on. Deleting the
last records leaves a valid but shorter chain; a head file next to the log
(``<log>.head``, rewritten atomically after every append) names the last record, and
``verify`` checks the chain against it. Whoever can rewrite both files and recompute
every hash can forge the trail; send the head hash out of band (``audit show`` prints it)
to anchor it.

Appends take an exclusive lock (several ClientApp processes may reply at once) and are
fsynced before the message is handed to Flower: a record is never missing for a message
that left. A crash between the two leaves one record for a message that did not leave,
which errs on the side of disclosure.
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
from pathlib import Path
from typing import Any

from fedtune.checkpoint import atomic_write_json
from fedtune.errors import FedTuneError

FORMAT = "fedtune-audit-v1"
GENESIS = hashlib.sha256(FORMAT.encode()).hexdigest()
FIELDS = ("seq", "time", "run", "round", "kind", "sha256", "bytes", "epsilon", "delta", "adapter_sha256", "base_sha256")


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the format name and the record's canonical JSON, ``hash`` left out."""
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{FORMAT}\n{canonical}".encode()).hexdigest()


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
    """``verify``'s answer: ``bad`` is the 1-based number of the first bad record (0: none)."""

    records: int
    bad: int = 0
    reason: str = ""
    head: str = GENESIS

    @property
    def ok(self) -> bool:
        return self.bad == 0


class AuditLog:
    """An append-only, hash-chained JSONL audit log at ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head_path = self.path.with_name(self.path.name + ".head")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _last(self) -> dict[str, Any] | None:
        """The last record, read from the end of the file (the log grows without bound)."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return None
        with open(self.path, "rb") as f:
            pos = f.seek(0, os.SEEK_END)
            chunk = b""
            while pos > 0 and chunk.count(b"\n") < 2:
                step = min(8192, pos)
                pos -= step
                f.seek(pos)
                chunk = f.read(step) + chunk
        if not chunk.endswith(b"\n"):
            raise FedTuneError(f"{self.path}: the last record is incomplete; run `fedtune client audit verify`")
        line = chunk[:-1].rsplit(b"\n", 1)[-1]
        try:
            record: dict[str, Any] = json.loads(line)
        except ValueError as err:
            raise FedTuneError(f"{self.path}: the last record is not JSON; run `fedtune client audit verify`") from err
        return record

    def append(self, out: Outgoing) -> dict[str, Any]:
        """Record one outgoing message; durable before this returns."""
        with self._locked():
            last = self._last()
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
            line = (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode()
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)  # one write of one line: no other appender interleaves
                os.fsync(fd)
            finally:
                os.close(fd)
            atomic_write_json(self.head_path, {"seq": record["seq"], "hash": record["hash"]})
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

    def verify(self) -> Verdict:
        """Check the whole chain and the head; name the first bad record."""
        if not self.path.exists():
            if self.head_path.exists():
                return Verdict(0, 1, "the log is missing but its head file names records")
            return Verdict(0)
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        if lines and lines[-1] == b"":
            lines.pop()
        elif lines:
            return Verdict(len(lines) - 1, len(lines), "incomplete (torn write or truncated file)")
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
        if not self.head_path.exists():
            if count:
                return Verdict(count, count + 1, f"the head file {self.head_path.name} is missing", prev)
            return Verdict(0)
        try:
            head = json.loads(self.head_path.read_text())
            seq, head_hash = int(head["seq"]), str(head["hash"])
        except (OSError, ValueError, KeyError, TypeError):
            return Verdict(count, count + 1, f"the head file {self.head_path.name} is unreadable", prev)
        if seq > count:
            return Verdict(count, count + 1, f"records {count + 1} to {seq} are missing (the head names {seq})", prev)
        # a crash between appending and rewriting the head leaves the head one record behind
        if seq < count - 1 or (seq >= 1 and self._hash_at(lines, seq) != head_hash):
            return Verdict(count, seq + 1 if seq < count - 1 else seq, "does not match the head file", prev)
        return Verdict(count, 0, "", prev)

    @staticmethod
    def _hash_at(lines: list[bytes], seq: int) -> str:
        return str(json.loads(lines[seq - 1])["hash"])
