"""The release gate's state at the hospital: the adapter it adopted and every decision.

Under ``<daemon.state_dir>/release/`` (torch-free: ``fedtune client release`` and the
hospital's page read it without loading a model):

- ``adapters/<sha256[:16]>/``: the adopted adapter, a PEFT folder (``adapter_config.json``,
  ``adapter_model.safetensors``) that plain ``peft`` loads onto the base model;
- ``adopted.json``: which one is adopted (run, round, adapter SHA-256, its held-out
  metrics, the audit's result, the folder), rewritten atomically: **the commit point**.
  A new adapter's folder is written first under its own name, then ``adopted.json`` is
  renamed over the old one, then older folders are removed; a crash at any point leaves
  the previous ``adopted.json`` naming a folder that is still whole;
- ``baseline.json``: the base model's held-out scores (what the first candidate is judged
  against), kept so that they are measured once per base model and held-out set;
- ``decisions.jsonl``: one line per decision, appended and fsynced, never rewritten.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_json, fsync_dir
from fedtune.errors import FedTuneError

ADOPTED = "adopted.json"
BASELINE = "baseline.json"
DECISIONS = "decisions.jsonl"
ADAPTERS = "adapters"
LOCK = ".lock"  # held while the state changes, and by `fedtune client backup` while it copies it


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the release state's lock (an exclusive ``flock``) for the block."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class ReleaseStore:
    """The release gate's files in ``folder`` (``HospitalConfig.release_dir``)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def _read(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise FedTuneError(f"{path}: unreadable release state ({err}); restore it from a backup") from err
        if not isinstance(doc, dict):
            raise FedTuneError(f"{path}: not a JSON object; restore it from a backup")
        return doc

    def adopted(self) -> dict[str, Any] | None:
        """The adopted adapter's record (None before the first acceptance)."""
        return self._read(ADOPTED)

    def adapter_dir(self, record: dict[str, Any]) -> Path:
        """Where the adopted adapter's PEFT folder is."""
        return self.folder / str(record["adapter"])

    def adopt(self, record: dict[str, Any], write_adapter: Callable[[Path], None]) -> Path:
        """Make ``record`` the adopted adapter: its folder (``write_adapter`` writes it), then
        ``adopted.json`` atomically, then drop the folders no record names."""
        relative = f"{ADAPTERS}/{str(record['sha256'])[:16]}"
        target = self.folder / relative
        with locked(self.folder):
            write_adapter(target)
            atomic_write_json(self.folder / ADOPTED, {**record, "adapter": relative})
            for old in (self.folder / ADAPTERS).iterdir():
                if old != target and old.is_dir():
                    shutil.rmtree(old, ignore_errors=True)
        return target

    def update_adopted(self, record: dict[str, Any]) -> None:
        """Rewrite the adopted adapter's record (its scores on a changed held-out set)."""
        atomic_write_json(self.folder / ADOPTED, record)

    def baseline(self, key: str) -> dict[str, Any] | None:
        """The base model's held-out scores for ``key`` (its held-out set and base model)."""
        doc = self._read(BASELINE)
        return doc if doc is not None and doc.get("key") == key else None

    def set_baseline(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.folder / BASELINE, record)

    def record(self, decision: dict[str, Any]) -> None:
        """Append one decision and fsync it (a line a crash cut short is ended first)."""
        path = self.folder / DECISIONS
        with locked(self.folder), open(path, "ab") as f:
            if f.tell() and not _ends_with_newline(path):
                f.write(b"\n")
            f.write((json.dumps(decision, sort_keys=True) + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(self.folder)

    def decisions(self) -> list[dict[str, Any]]:
        """Every decision, oldest first (a line a crash cut short is skipped)."""
        try:
            lines = (self.folder / DECISIONS).read_bytes().splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                found.append(doc)
        return found

    def files(self) -> list[Path]:
        """What a backup holds (under :func:`locked`): the records, the history, the adopted adapter's folder."""
        found = [self.folder / name for name in (ADOPTED, BASELINE, DECISIONS)]
        adopted = self.adopted() if (self.folder / ADOPTED).is_file() else None
        if adopted is not None:
            found += sorted(p for p in self.adapter_dir(adopted).rglob("*") if p.is_file())
        return [p for p in found if p.is_file()]


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _adopted_line(store: ReleaseStore, adopted: dict[str, Any] | None) -> str:
    if adopted is None:
        return "adopted adapter: none yet (the hospital uses the base model)"
    metrics, audit = adopted.get("metrics") or {}, adopted.get("audit")
    said = f"audit AUC {audit['auc']:.3f} ({audit['auc_low']:.3f}-{audit['auc_high']:.3f})" if audit else "no audit"
    return (
        f"adopted adapter: run {adopted['run']} round {adopted['round']}, adopted {adopted['time']}; held-out field "
        f"accuracy {metrics.get('field_accuracy', float('nan')):.3f}, loss {metrics.get('loss', float('nan')):.3f}; "
        f"{said}; sha256 {adopted['sha256']}; PEFT folder {store.adapter_dir(adopted)}"
    )


def decision_rows(decisions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The decisions as table rows (newest last)."""
    return [
        {
            "time (UTC)": str(d.get("time", ""))[:19],
            "run": d.get("run"),
            "round": d.get("round"),
            "sha256": str(d.get("sha256", ""))[:12],
            "candidate": (d.get("candidate") or {}).get(str(d.get("metric"))),
            "current": (d.get("current") or {}).get(str(d.get("metric"))),
            "metric": d.get("metric"),
            "audit AUC": (d.get("audit") or {}).get("auc"),
            "decision": d.get("decision"),
            "reason": d.get("reason"),
        }
        for d in decisions
    ]


def release_report(folder: Path, *, history: bool = False, as_json: bool = False) -> str:
    """``fedtune client release``: the adopted adapter and the last decision (``history``: all of them)."""
    store = ReleaseStore(folder)
    adopted, decisions = store.adopted(), store.decisions()
    if as_json:
        where = str(store.adapter_dir(adopted)) if adopted else None
        shown = decisions if history else decisions[-1:]
        return json.dumps({"adopted": adopted, "path": where, "decisions": shown}, indent=2) + "\n"
    from fedtune.experiments.report import markdown_table

    lines = [f"release gate state {folder}", _adopted_line(store, adopted)]
    if not decisions:
        lines.append("no decisions yet (the gate decides after each evaluation round)")
    else:
        lines += [
            f"decisions: {len(decisions)} ({sum(d.get('decision') == 'accepted' for d in decisions)} accepted)"
            + ("" if history else "; the last one (--history: all):"),
            markdown_table(decision_rows(decisions if history else decisions[-1:])).rstrip("\n"),
        ]
    return "\n".join(lines) + "\n"


def release_view(folder: Path) -> dict[str, Any]:
    """The hospital page's view: the adopted adapter and the last decision."""
    try:
        store = ReleaseStore(folder)
        adopted, decisions = store.adopted(), store.decisions()
    except FedTuneError as err:
        return {"adopted": f"unreadable: {err}", "last": []}
    return {"adopted": _adopted_line(store, adopted), "last": decision_rows(decisions[-1:])}
