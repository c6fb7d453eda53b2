"""Progress inside a round: each hospital's training steps, rate-limited.

The training loops (:func:`fedtune.train.train_local`, DP-SGD's) call :func:`step` after
every optimizer step; it does nothing unless the caller set a hook with
:func:`reporting` (a context variable: one thread's training, one hook). The ClientApp's
hook is a :class:`StepReporter`, which passes on the first step, the last, and in between
at most one step every ``interval`` seconds, so a long round is seen moving and a fast
one costs two records. A simulated hospital appends its records to
``<run>/progress.jsonl`` (the researcher's terminal shows them: :func:`progress_printer`);
a hospital's daemon writes them into its JSON log.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path
from typing import Any

PROGRESS_FILE = "progress.jsonl"
INTERVAL_S = 10.0

Hook = Callable[[int, int, float | None], None]
Emit = Callable[[dict[str, Any]], None]
_HOOK: ContextVar[Hook | None] = ContextVar("fedtune_progress", default=None)


@contextlib.contextmanager
def reporting(hook: Hook) -> Iterator[None]:
    """Training steps run inside this block call ``hook(step, steps, loss)``."""
    token = _HOOK.set(hook)
    try:
        yield
    finally:
        _HOOK.reset(token)


def step(done: int, total: int, loss: float | None = None) -> None:
    """Step ``done`` of ``total`` finished (``loss``: its training loss; None under DP)."""
    hook = _HOOK.get()
    if hook is not None:
        with contextlib.suppress(Exception):  # progress is a view: it never stops training
            hook(done, total, loss)


class StepReporter:
    """A hook that emits a record for the first and last step, and in between at most one
    every ``interval`` seconds."""

    def __init__(
        self,
        emit: Emit,
        *,
        site: str,
        server_round: int,
        rounds: int,
        run: str = "",
        interval: float = INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.emit, self.interval, self.clock = emit, interval, clock
        self.base = {"run": run, "site": site, "round": server_round, "rounds": rounds}
        self.start = self.last = clock()

    def __call__(self, done: int, total: int, loss: float | None) -> None:
        now = self.clock()
        if done not in (1, total) and now - self.last < self.interval:
            return
        self.last = now
        record: dict[str, Any] = {**self.base, "step": done, "steps": total, "seconds": round(now - self.start, 2)}
        if loss is not None and math.isfinite(loss):
            record["loss"] = round(loss, 4)
        self.emit(record)


def describe(record: dict[str, Any]) -> str:
    """``round 2/5: st-elsewhere step 3/5 (loss 1.234, 12.0 s)``."""
    loss = f"loss {record['loss']:.3f}, " if "loss" in record else ""
    return (
        f"round {record['round']}/{record['rounds']}: {record['site']} step {record['step']}/{record['steps']} "
        f"({loss}{record['seconds']:.1f} s)"
    )


def append_record(path: Path, record: dict[str, Any]) -> None:
    """One line appended in one write (O_APPEND): hospitals in several processes share the file."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record, sort_keys=True) + "\n").encode())
    finally:
        os.close(fd)


def progress_printer(path: Path, say: Callable[[str], None]) -> Callable[[], None]:
    """A poll function that says, for each round with new records since the last call, one
    line with each hospital's latest step: ``round 2/5 training: a step 3/5 (...); b step 5/5 (...)``.
    Records written before this call (an earlier attempt of a resumed run) are skipped."""
    offset = path.stat().st_size if path.is_file() else 0

    def poll() -> None:
        nonlocal offset
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except OSError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a line being written waits for the next poll
        offset += len(complete)
        latest: dict[int, dict[str, dict[str, Any]]] = {}
        for line in complete.decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):
                record = json.loads(line)
                latest.setdefault(int(record["round"]), {})[str(record["site"])] = record
        for rnd in sorted(latest):
            sites = latest[rnd].values()
            first = next(iter(sites))
            parts = "; ".join(describe(r).split(": ", 1)[1] for r in sites)
            say(f"round {rnd}/{first['rounds']} training: {parts}")

    return poll


class RoundOrder:
    """Holds the lines of one poll (hospitals' steps, finished rounds) and says them in round
    order, a round's steps before its own line: a fast round's steps and end can arrive
    in one poll together with the next round's steps."""

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say
        self.held: list[str] = []

    def __call__(self, line: str) -> None:
        self.held.append(line)

    def flush(self) -> None:
        def order(line: str) -> tuple[int, int]:
            head = line.split("/", 1)[0].removeprefix("round ")
            return (int(head) if head.isdigit() else 1 << 30, 0 if " training: " in line else 1)

        held, self.held = sorted(self.held, key=order), []
        for line in held:
            self.say(line)
