"""The daemon's structured logs: one JSON object per line in ``daemon.log_file``, plain lines on stderr.

The file is rotated by size (``daemon.log_max_mb``, ``daemon.log_backups``); the console
gets no DEBUG records: Flower's chatter and tracebacks stay in the file.
"""

from __future__ import annotations

import json
import os
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fedtune.client.health import split_level
from fedtune.progress import describe


def log_record(line: str, hospital: str, source: str = "supernode") -> dict[str, Any]:
    """One structured log record from one line of Flower's output."""
    level, message = split_level(line)
    return _entry(level or "INFO", hospital, source, message)


def _entry(level: str, hospital: str, source: str, message: str) -> dict[str, Any]:
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "hospital": hospital,
        "source": source,
        "message": message,
    }


class StructuredLog:
    """Appends JSON lines to the daemon's log file (0600) and echoes plain lines to stderr.

    DEBUG records (Flower's chatter, tracebacks) go to the file only. With ``max_bytes``
    the file is rotated before a line would take it past that size: ``FILE`` becomes
    ``FILE.1``, ``FILE.1`` becomes ``FILE.2`` and so on, ``backups`` of them kept (0: the
    old lines are dropped). Only this log rotates; the privacy ledger and the audit trail
    never do (their size is a few hundred bytes per round).
    """

    def __init__(
        self, path: Path, hospital: str, echo: IO[str] | None, *, max_bytes: int = 0, backups: int = 0
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self.file = self._open()
        self.hospital = hospital
        self.echo = echo
        self.lock = threading.Lock()

    def _open(self) -> IO[str]:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.chmod(self.path, 0o600)
        return os.fdopen(fd, "a", encoding="utf-8")

    def _rotate(self) -> None:
        self.file.close()
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        if self.backups:
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        else:
            self.path.unlink(missing_ok=True)
        self.file = self._open()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.lock:
            if self.max_bytes and self.file.tell() and self.file.tell() + len(line.encode()) > self.max_bytes:
                self._rotate()
            self.file.write(line)
            self.file.flush()
            if self.echo is not None and record["level"] != "DEBUG":
                print(f"{record['time']} {record['level']:<7} {record['message']}", file=self.echo, flush=True)

    def event(self, level: str, message: str) -> None:
        self.write(_entry(level, self.hospital, "fedtune", message))

    def progress(self, record: dict[str, Any]) -> None:
        """A training step (:mod:`fedtune.progress`): its fields in the JSON line, ``event`` ``train-progress``."""
        self.write({**_entry("INFO", self.hospital, "fedtune", describe(record)), "event": "train-progress", **record})

    def close(self) -> None:
        self.file.close()
