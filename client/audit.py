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

**What a local check cannot catch** (a rewritten trail whose hashes were recomputed) the
coordinator's witness can: every sealed reply names the trail's head, signed, and
:mod:`fedtune.client.audit_witness` checks the trail against what the coordinator received.
Verification: :mod:`fedtune.client.audit_verify`; the format: :mod:`fedtune.client.audit_format`.

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
from fedtune.client.audit_format import GENESIS, HeadUnreadable, head_path, read_head, record_hash, record_line
from fedtune.client.audit_verify import Verdict, verify_trail
from fedtune.client.audit_witness import WitnessVerdict, check_witness
from fedtune.errors import FedTuneError
from fedtune.security.witness import ChainHead, Witness


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


def lock_path(log: Path) -> Path:
    """The trail's lock file: held by every append, and by ``fedtune client backup`` while it copies."""
    return Path(log).with_name(Path(log).name + ".lock")


class AuditLog:
    """An append-only, hash-chained JSONL audit log at ``path``, anchored by ``<path>.head``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.head_path = head_path(self.path)

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
            head = read_head(self.head_path)
        except HeadUnreadable as err:
            raise FedTuneError(f"{self.head_path}: unreadable or malformed; run {self._verify_hint}") from err
        line, fragment = self._tail()
        recovered = ""
        if head is not None and head.get("pending") is not None:
            head, fragment, recovered = self._settle_pending(head, line, fragment)
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

    def _settle_pending(
        self, head: dict[str, Any], line: bytes | None, fragment: bytes
    ) -> tuple[dict[str, Any], bytes, str]:
        """The append ``head`` declares, completed or dropped: (the head now, the torn bytes left, what was done)."""
        pending: dict[str, Any] = head["pending"]
        declared = record_line(pending)
        seq = int(pending["seq"])
        if fragment and declared.startswith(fragment):  # the append itself was torn
            with open(self.path, "r+b") as f:
                f.truncate(f.seek(0, os.SEEK_END) - len(fragment))
                os.fsync(f.fileno())
            fragment = b""
        last = self._parse(line)
        if line is not None and line + b"\n" == declared:
            recovered = (
                f"record {seq} was appended but the head file was not rewritten (a crash); it is the "
                "record the head file declared before the append, so it is anchored now"
            )
            return {"seq": seq, "hash": str(pending["hash"])}, fragment, recovered
        if (last is None and head["seq"] == 0) or (
            last is not None and last["seq"] == head["seq"] and last["hash"] == head["hash"]
        ):
            recovered = (
                f"the append of record {seq} was interrupted before it reached the log (a crash); its "
                "message was not sent (the record is written first), so the declaration is dropped"
            )
            return {"seq": head["seq"], "hash": head["hash"]}, fragment, recovered
        raise FedTuneError(
            f"{self.path}: an interrupted append of record {seq} does not match the log's end; the trail "
            f"was changed outside fedtune; run {self._verify_hint}"
        )

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
                os.write(fd, record_line(record))  # one write of one line
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

    # -- verification ------------------------------------------------------------------
    def verify(self) -> Verdict:
        """Check the whole chain and that the log ends exactly at the head; name the first bad record."""
        return verify_trail(self.path)

    def check_witness(self, witness: Witness) -> WitnessVerdict:
        """Check the trail against what the coordinator received (call after ``verify`` passed)."""
        return check_witness(self.records(), witness)
