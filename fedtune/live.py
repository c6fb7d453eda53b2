"""A run's live state, ``<run>/status.json``: what the round loop is doing right now.

The round loop (:func:`fedtune.server.federation.run_federation`) rewrites it atomically
at every step: which round, which phase (``waiting`` for hospitals, ``train``,
``evaluate``; at the end ``finished``, ``stopped`` or ``failed`` with the reason), and per
hospital in the round (by Flower node id) what became of its message (and ``seen``, when
its last reply arrived): ``sampled``, ``answered``, then ``accepted``, ``refused`` or
``rejected`` with why, or ``no reply``.
It also names the Flower run (the id ``flwr ls`` and ``flwr log`` take) and the process
running the loop, so a reader can tell a live run from one whose coordinator died
mid-round. ``fedtune status`` reads it; nothing reads it to decide what to train.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_json

STATUS = "status.json"
PHASES = ("waiting", "train", "evaluate", "finished", "stopped", "failed")
ENDED = ("finished", "stopped", "failed")
TRAIN_STATES = ("sampled", "answered", "accepted", "refused", "rejected", "no reply")
EVAL_STATES = ("sampled", "answered", "evaluated", "failed", "no reply")


class LiveStatus:
    """Writes ``status.json`` for one run of the round loop (one process, one Flower run)."""

    def __init__(
        self,
        path: Path,
        *,
        rounds: int,
        flower_run_id: str = "",
        pid: int | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._clock = clock
        self.data: dict[str, Any] = {
            "flower-run-id": flower_run_id,
            "pid": os.getpid() if pid is None else pid,
            "rounds": rounds,
            "round": 0,
            "phase": "waiting",
            "since": clock(),
            "hospitals": {},
            "reason": "",
        }

    def phase(self, server_round: int, phase: str) -> None:
        """Enter ``phase`` of ``server_round``; a new round starts with no hospitals."""
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        if server_round != self.data["round"]:
            self.data["hospitals"] = {}
        self.data.update(round=server_round, phase=phase, since=self._clock())
        self._write()

    def sampled(self, kind: str, nodes: Iterable[int]) -> None:
        """The round's ``kind`` ("train" or "evaluate") message went to ``nodes``."""
        for node in nodes:
            self._node(node)[kind] = "sampled"
        self._write()

    def answered(self, kind: str, node: int) -> None:
        entry = self._node(node)
        entry["seen"] = self._clock()  # when its last reply arrived: the live page's "last seen"
        if entry.get(kind) == "sampled":
            entry[kind] = "answered"
            self._write()

    def outcome(self, kind: str, node: int, state: str, *, hospital: str = "", why: str = "") -> None:
        """What became of ``node``'s reply; ``hospital`` only when its reply proved who it is."""
        states = TRAIN_STATES if kind == "train" else EVAL_STATES
        if state not in states:
            raise ValueError(f"unknown {kind} state {state!r}")
        entry = self._node(node)
        entry[kind] = state
        if hospital:
            entry["hospital"] = hospital
        if why:
            entry[f"{kind}-why"] = why[:300]

    def settle(self, kind: str) -> None:
        """Close the exchange: a node still ``sampled`` or ``answered`` sent nothing usable in time."""
        for entry in self.data["hospitals"].values():
            if entry.get(kind) in ("sampled", "answered"):
                entry[kind] = "no reply"
        self._write()

    def end(self, phase: str, reason: str = "") -> None:
        """The loop is over: ``finished``, ``stopped`` (and why) or ``failed`` (and why)."""
        if phase not in ENDED:
            raise ValueError(f"unknown end {phase!r}")
        self.data.update(phase=phase, reason=reason[:500], since=self._clock())
        self._write()

    def _node(self, node: int) -> dict[str, Any]:
        entry: dict[str, Any] = self.data["hospitals"].setdefault(str(node), {})
        return entry

    def _write(self) -> None:
        self.data["updated"] = self._clock()
        atomic_write_json(self.path, self.data)


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``status.json``, or None when there is none (or it is unreadable)."""
    try:
        data = json.loads((run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
