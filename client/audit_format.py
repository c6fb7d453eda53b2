"""The audit trail's format, written once: a record's fields, its hash, its line, the head file.

A record is one JSON line (:func:`record_line`); ``hash`` is the SHA-256 of the format
name and the record's canonical JSON without it (:func:`record_hash`), and ``prev`` the
previous record's ``hash`` (:data:`GENESIS` for the first). The head file (``<log>.head``)
holds the last record's ``seq`` and ``hash``, and during an append ``pending``: the whole
record it declares (:func:`read_head`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

FORMAT = "fedtune-audit-v1"
GENESIS = hashlib.sha256(FORMAT.encode()).hexdigest()
FIELDS = ("seq", "time", "run", "round", "kind", "sha256", "bytes", "epsilon", "delta", "adapter_sha256", "base_sha256")


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the format name and the record's canonical JSON, ``hash`` left out."""
    body = {k: v for k, v in record.items() if k != "hash"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(f"{FORMAT}\n{canonical}".encode()).hexdigest()


def record_line(record: dict[str, Any]) -> bytes:
    """A record's line in the log, exactly as ``append`` writes it."""
    return (json.dumps(record, sort_keys=True, ensure_ascii=True) + "\n").encode()


def head_path(log: Path) -> Path:
    """The head file that anchors the trail's last record."""
    return Path(log).with_name(Path(log).name + ".head")


class HeadUnreadable(Exception):
    """The head file exists but is not a head."""


def read_head(path: Path) -> dict[str, Any] | None:
    """The head file: ``seq``, ``hash`` and maybe ``pending``; None when there is none."""
    if not path.exists():
        return None
    try:
        head = json.loads(path.read_text())
        if not isinstance(head, dict) or not isinstance(head["seq"], int) or not isinstance(head["hash"], str):
            raise TypeError("not a head")
        pending = head.get("pending")
        if pending is not None and not valid_pending(head, pending):
            raise ValueError("bad pending record")
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise HeadUnreadable() from err
    return head


def valid_pending(head: dict[str, Any], pending: Any) -> bool:
    """A declared record: complete, hashed, and the one that follows the head."""
    return (
        isinstance(pending, dict)
        and all(f in pending for f in (*FIELDS, "prev", "hash"))
        and record_hash(pending) == pending["hash"]
        and pending["seq"] == head["seq"] + 1
        and pending["prev"] == head["hash"]
    )
