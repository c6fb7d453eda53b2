"""The local check of an audit trail: the whole chain, and that the log ends exactly at its head.

``fedtune client audit verify LOG`` (:meth:`fedtune.client.audit.AuditLog.verify`): every
record parses, has every field and its own hash, sits at its number and follows the one
before it; the head file names the last record. A record after the head is reported as
not anchored, whatever its chain link says, and fewer records than the head names as
missing. An append a crash interrupted (the head file declares it as ``pending``) is
reported as such: ``recover`` settles it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune.client.audit_format import FIELDS, GENESIS, HeadUnreadable, head_path, read_head, record_hash, record_line


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


def recover_hint(log: Path) -> str:
    return f"run `fedtune client audit recover {log}`"


def verify_trail(log: Path) -> Verdict:
    """Check the whole chain of the trail at ``log`` and that it ends exactly at the head; name the first bad record."""
    unreadable = False
    try:
        head = read_head(head_path(log))
    except HeadUnreadable:
        head, unreadable = None, True
    pending = head.get("pending") if head is not None else None
    if not log.exists():
        if pending is not None and pending["seq"] == 1:
            reason = f"its append was interrupted before it reached the log (not sent); {recover_hint(log)}"
            return Verdict(0, 1, reason, interrupted=True)
        if head is None and not unreadable:
            return Verdict(0)
        return Verdict(0, 1, "the log is missing but its head file names records")
    lines = log.read_bytes().split(b"\n")
    fragment = lines.pop()  # b"" when the file ends with a newline
    if fragment:
        if pending is not None and record_line(pending).startswith(fragment):
            n = len(lines) + 1
            reason = f"the append of record {n} was torn by a crash; {recover_hint(log)}"
            return Verdict(len(lines), n, reason, interrupted=True)
        return Verdict(len(lines), len(lines) + 1, "incomplete (torn write or truncated file)")
    chain = _chain(lines)
    if not chain.ok:
        return chain
    count, prev, name = len(lines), chain.head, head_path(log).name
    if unreadable:
        return Verdict(count, count + 1, f"the head file {name} is unreadable", prev)
    if head is None:
        if count:
            return Verdict(count, count + 1, f"the head file {name} is missing", prev)
        return Verdict(0)
    return _against_head(log, lines, head, prev)


def _chain(lines: list[bytes]) -> Verdict:
    """The first record that is malformed, altered, out of place or not linked; else all of them, good."""
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
    return Verdict(len(lines), 0, "", prev)


def _against_head(log: Path, lines: list[bytes], head: dict[str, Any], prev: str) -> Verdict:
    """An intact chain of ``lines`` against the head file: it must end exactly where the head says."""
    count = len(lines)
    seq, head_hash = int(head["seq"]), str(head["hash"])
    pending = head.get("pending")
    if pending is not None:
        n = int(pending["seq"])
        if count == n and lines[-1] + b"\n" == record_line(pending):  # the chain check: it follows the head
            reason = f"appended, but a crash stopped the head file naming it; {recover_hint(log)}"
            return Verdict(count, n, reason, prev, True)
        if count == seq and (seq == 0 or _hash_at(lines, seq) == head_hash):
            reason = f"its append was interrupted before it reached the log (not sent); {recover_hint(log)}"
            return Verdict(count, n, reason, prev, True)
    if seq > count:
        return Verdict(count, count + 1, f"records {count + 1} to {seq} are missing (the head names {seq})", prev)
    if seq < count:
        added = "this record was" if count == seq + 1 else f"records {seq + 1} to {count} were"
        reason = f"is not anchored: the head file names record {seq}, so {added} added outside fedtune's append"
        return Verdict(seq, seq + 1, reason, prev)
    if seq >= 1 and _hash_at(lines, seq) != head_hash:
        return Verdict(count, seq, "does not match the head file", prev)
    return Verdict(count, 0, "", prev)


def _hash_at(lines: list[bytes], seq: int) -> str:
    return str(json.loads(lines[seq - 1])["hash"])
