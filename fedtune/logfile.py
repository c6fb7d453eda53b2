"""Size-rotated log files for the coordinator's long-lived processes.

``superlink.log`` (everything the SuperLink and its ServerApps print) and ``front.log``
(every request the front refused) grow for as long as the coordinator runs. Each is
written through a :class:`RotatingFile`: when a write would take the file past
``max_bytes``, ``name.log`` becomes ``name.log.1`` (``.1`` becomes ``.2``, and so on) and
a new ``name.log`` starts; ``backups`` old files are kept, the oldest dropped. Lines are
never split across files. Ledgers and audit trails are records, not logs: they are
never rotated (nothing here touches them).
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import IO

MAX_BYTES = 10 * 1024 * 1024
BACKUPS = 3
LINE_LIMIT = 64 * 1024  # a longer "line" is written in pieces


class RotatingFile:
    """Append-only writes to ``path``, rotated by size; thread-safe."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, backups: int = BACKUPS) -> None:
        if max_bytes <= 0 or backups < 1:
            raise ValueError("a rotating log needs max_bytes > 0 and at least one backup")
        self.path = path
        self.max_bytes = max_bytes
        self.backups = backups
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = None

    def _open(self) -> IO[bytes]:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "ab")  # noqa: SIM115 - kept open between writes, closed by close()
        return self._file

    def _rotate(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def write(self, data: bytes) -> None:
        with self._lock:
            f = self._open()
            size = f.tell()
            if size and size + len(data) > self.max_bytes:
                self._rotate()
                f = self._open()
            f.write(data)
            f.flush()

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def pump(stream: IO[bytes], log: RotatingFile) -> threading.Thread:
    """Copy a child's output ``stream`` into ``log`` line by line, in a thread, until EOF."""

    def run() -> None:
        with contextlib.suppress(OSError, ValueError):
            for line in iter(lambda: stream.readline(LINE_LIMIT), b""):
                log.write(line)
        with contextlib.suppress(OSError):
            stream.close()

    thread = threading.Thread(target=run, name=f"log-{log.path.name}", daemon=True)
    thread.start()
    return thread
