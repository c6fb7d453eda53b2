"""The coordinator's witness of the hospitals' audit trails.

Every sealed reply names, in its signed envelope header, the head of the sending
hospital's audit trail when the reply was built: the ``seq`` and ``hash`` of the last
record before this message (:class:`ChainHead`). The hospital's audit mod then appends
the record of this very message, whose ``prev`` is that head and whose ``sha256`` is the
SHA-256 of the message content as serialized for the wire (:func:`fedtune.wire.wire_bytes`).

The coordinator, on opening an authentic envelope, appends one :class:`WitnessEntry` to
the run folder's ``witness.jsonl`` (flushed and fsynced): hospital, run, round, kind, the
audit head the envelope carries and the SHA-256 and size of the content as it arrived.
Entries are facts about messages received; they are never rewritten, so a coordinator
that resumes a run keeps them (a round that runs again adds the new replies' entries).

``fedtune server witness`` gathers one hospital's entries into a witness file
(:class:`Witness`, JSON, ``format = fedtune-witness-v1``)::

    {"format": "fedtune-witness-v1", "hospital": "st-elsewhere",
     "runs": ["demo-20250101-120000"],   # the runs this file covers
     "all_runs": true,                   # every run of that coordinator home
     "entries": [{"run": ..., "round": 1, "kind": "train", "audit_seq": 0,
                  "audit_head": "<64 hex>", "sha256": "<64 hex>", "bytes": 1234,
                  "time": "2025-01-01T12:00:03.120+00:00"}, ...]}

which ``fedtune client audit verify LOG --witness FILE`` checks the trail against
(:mod:`fedtune.client.audit`). The file is the coordinator's statement; it is not signed,
so an auditor fetches it from the coordinator directly.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_json
from fedtune.errors import ConfigError

FORMAT = "fedtune-witness-v1"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class ChainHead:
    """The last record of a hospital's audit trail: its ``seq`` (0: no record yet) and ``hash``."""

    seq: int
    hash: str


@dataclass(frozen=True)
class WitnessEntry:
    """One sealed reply as the coordinator received it."""

    hospital: str
    run: str
    round: int
    kind: str
    audit_seq: int
    audit_head: str
    sha256: str
    bytes: int
    time: str = ""

    @property
    def head(self) -> ChainHead:
        return ChainHead(self.audit_seq, self.audit_head)

    def key(self) -> tuple[int, str, str]:
        """What makes two entries the same message (a replayed envelope is witnessed twice)."""
        return (self.audit_seq, self.audit_head, self.sha256)

    @staticmethod
    def from_json(doc: Any, where: str) -> WitnessEntry:
        """Strict: every field with its type, else ConfigError naming ``where``."""
        names = {f.name: f.type for f in fields(WitnessEntry)}
        if not isinstance(doc, dict) or set(doc) != set(names):
            got = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise ConfigError(f"{where}: an entry must have exactly the fields {sorted(names)}, got {got}")
        for name, kind in names.items():
            want = int if kind == "int" else str
            if not isinstance(doc[name], want) or isinstance(doc[name], bool):
                raise ConfigError(f"{where}: entry field `{name}` must be {want.__name__}, got {doc[name]!r}")
        if doc["audit_seq"] < 0 or not _HEX64.fullmatch(doc["audit_head"]) or not _HEX64.fullmatch(doc["sha256"]):
            raise ConfigError(f"{where}: entry `audit_seq`, `audit_head` or `sha256` malformed: {doc!r}")
        return WitnessEntry(**doc)


class WitnessLog:
    """A run's ``witness.jsonl``: append-only, one entry per line, fsynced."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, entry: WitnessEntry) -> None:
        """Record one received reply; durable before this returns."""
        if not entry.time:
            entry = WitnessEntry(**{**asdict(entry), "time": datetime.now(UTC).isoformat(timespec="milliseconds")})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(asdict(entry), sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                line = b"\n" + line  # a torn last line from a crash stays a line of its own
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)

    def entries(self) -> tuple[list[WitnessEntry], int]:
        """(every entry, how many lines were torn or unreadable and skipped)."""
        if not self.path.is_file():
            return [], 0
        out, skipped = [], 0
        for n, line in enumerate(self.path.read_bytes().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                out.append(WitnessEntry.from_json(json.loads(line), f"{self.path}:{n}"))
            except (ValueError, ConfigError):
                skipped += 1
        return out, skipped


@dataclass(frozen=True)
class Witness:
    """What the coordinator saw of one hospital's audit trail, over ``runs``."""

    hospital: str
    runs: tuple[str, ...]
    all_runs: bool
    entries: tuple[WitnessEntry, ...]

    def to_json(self) -> dict[str, Any]:
        entries = [{k: v for k, v in asdict(e).items() if k != "hospital"} for e in self.entries]
        return {
            "format": FORMAT,
            "hospital": self.hospital,
            "runs": list(self.runs),
            "all_runs": self.all_runs,
            "entries": entries,
        }

    def write(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())


def gather(hospital: str, runs: dict[str, WitnessLog], *, all_runs: bool) -> tuple[Witness, int, set[str]]:
    """(hospital's witness over ``runs``, lines skipped, every hospital seen in them)."""
    entries: list[WitnessEntry] = []
    seen: set[str] = set()
    skipped = 0
    for log in runs.values():
        found, torn = log.entries()
        skipped += torn
        seen.update(e.hospital for e in found)
        entries += [e for e in found if e.hospital == hospital]
    unique: dict[tuple[int, str, str], WitnessEntry] = {}
    for entry in sorted(entries, key=lambda e: (e.audit_seq, e.time)):
        unique.setdefault(entry.key(), entry)  # the first time it arrived
    ordered = list(unique.values())
    return Witness(hospital, tuple(sorted(runs)), all_runs, tuple(ordered)), skipped, seen


def load_witness(path: Path) -> Witness:
    """A witness file, strictly; a one-line ConfigError naming the file when it is not one."""
    get = f"get it from the coordinator (`fedtune server witness --hospital NAME --out {path.name}`)"
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"`--witness` file {path}: no such file; {get}") from err
    except (OSError, ValueError) as err:
        raise ConfigError(f"`--witness` file {path} is unreadable or not JSON ({err}); {get}") from err
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ConfigError(f"`--witness` file {path}: `format` must be {FORMAT!r}, got {got!r}; {get}")
    hospital, runs, all_runs, entries = doc.get("hospital"), doc.get("runs"), doc.get("all_runs"), doc.get("entries")
    if not (
        isinstance(hospital, str)
        and isinstance(all_runs, bool)
        and isinstance(entries, list)
        and isinstance(runs, list)
        and all(isinstance(r, str) for r in runs)
    ):
        raise ConfigError(
            f"`--witness` file {path}: needs `hospital` (text), `runs` (list of text), `all_runs` (true/false) "
            f"and `entries` (list); {get}"
        )
    parsed = tuple(
        WitnessEntry.from_json({**e, "hospital": hospital} if isinstance(e, dict) else e, f"`--witness` file {path}")
        for e in entries
    )
    return Witness(hospital, tuple(runs), all_runs, parsed)
