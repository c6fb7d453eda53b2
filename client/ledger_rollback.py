"""The rollback check: a privacy ledger older than what the hospital already sent is refused.

The audit trail is the witness. A release is written to the ledger (fsync) before its
update is built, and the audit record of the message that carries it is appended after,
with the ledger's release count at that moment (``ledger_releases``); the ledger only
grows (``record`` appends, ``load_state_dict`` refuses to forget). So a current ledger
holds at least the largest count in the trail; fewer means it was replaced by an older
copy (a backup, a snapshot of its volume) or deleted, and would under-count the spend.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from fedtune.client.ledger import PrivacyLedger
from fedtune.errors import PrivacyError


class LedgerRolledBack(PrivacyError):
    """The ledger holds fewer releases than the hospital had recorded when it sent its last
    messages: it is an older copy, and training on it would spend again what was spent."""

    def public_reason(self) -> str:
        """What a refusal may tell the coordinator: no paths, no counts."""
        return (
            "this hospital's privacy ledger is older than what it already sent (a restored copy); "
            "it trains no more until its operators restore the newest ledger"
        )


def check_ledger_current(ledger_path: Path, audit_path: Path) -> int:
    """Refuse a ledger older than what the hospital already released; return its release count.

    The trail is already there, append-only, hash-chained and read from where the last
    call stopped (:func:`releases_sent`), so this costs no second file to keep in step.
    Records without the field (older trails, rounds without DP) prove nothing and are
    accepted. Not seen here: the ledger and the trail rolled back together (one snapshot
    of the whole state folder); only a witness outside the hospital (the coordinator's
    record of the trail's head) sees that.
    """
    held = PrivacyLedger.open(ledger_path).releases() if Path(ledger_path).exists() else 0
    sent, seq = releases_sent(audit_path)
    if held < sent:
        raise LedgerRolledBack(
            f"privacy ledger {ledger_path} holds {held} releases, but record {seq} of the audit trail {audit_path} "
            f"was sent when it held {sent}: it is an older copy (a restored backup or snapshot) and under-counts the "
            "privacy spent; restore the newest ledger and never train on an older copy"
        )
    return held


@dataclass(frozen=True)
class _Scanned:
    """How far ``releases_sent`` read a trail, and the largest count it found there."""

    file: tuple[int, int]  # (st_dev, st_ino): a replaced log is read again from the start
    offset: int  # the end of the last complete line read
    tail: bytes  # that line: a log rewritten in place is read again from the start
    most: int
    seq: int


_SCANNED: dict[Path, _Scanned] = {}  # per audit trail: where this process stopped reading it


def releases_sent(audit_path: Path) -> tuple[int, int]:
    """The largest ``ledger_releases`` a record of the trail carries, and that record's ``seq`` ((0, 0): none).

    Asked before every DP round, of a log that grows without bound: only the lines
    appended since this process last asked are parsed. Lines that do not parse are
    skipped (``verify`` judges them); a torn last line is read again next time.
    """
    path = Path(audit_path)
    key = path.absolute()
    try:
        f = open(path, "rb")  # noqa: SIM115 (closed below)
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
