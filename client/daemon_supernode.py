"""The daemon's SuperNode: its command line, its secret, one process at a time, stopped with its group.

The SuperNode runs with ``--isolation process``: it executes nothing itself, the daemon is
its ClientApp runtime. Each process starts in a session of its own; its lines go through
the daemon's :class:`~fedtune.client.health.Watch` into the log, and when it ends whatever
it started (SuperExec) goes with it. SIGINT or SIGTERM to the daemon stop it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fedtune import process
from fedtune.client.daemon_log import StructuredLog, log_record
from fedtune.client.health import Watch
from fedtune.client.hospital import HospitalConfig
from fedtune.config import parse_address


def supernode_command(
    cfg: HospitalConfig, *, insecure: bool, max_retries: int = 0, secret_file: Path, runtime: str
) -> list[str]:
    """The hospital's SuperNode: dials the coordinator, runs no app itself (the daemon does).

    Every path is absolute (the SuperNode starts in the state folder); ``runtime`` is the
    loopback ``HOST:PORT`` of its runtime API, which only the daemon uses.
    """
    host, port = parse_address(runtime, "runtime")
    # Flower's flower-supernode, with its message polling paced for rounds (fedtune.supernode)
    cmd = [sys.executable, "-m", "fedtune.supernode", "--superlink", cfg.coordinator.address]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += [
            "--root-certificates",
            str(cfg.path(cfg.coordinator.ca)),
            "--auth-supernode-private-key",
            str(cfg.path(cfg.keys.node_key)),
        ]
    cmd += [
        "--isolation",
        "process",  # the daemon is the ClientApp runtime; no app bundle is ever executed
        "--superexec-auth-secret-file",
        str(secret_file.resolve()),
        "--host",
        host,
        "--port",
        str(port),
    ]
    if max_retries:
        cmd += ["--max-retries", str(max_retries)]
    return cmd


def new_secret(path: Path) -> bytes:
    """Fresh random bytes only the daemon and its SuperNode know (0600), written at every start."""
    from fedtune.atomic import atomic_write_bytes

    secret = os.urandom(32)
    atomic_write_bytes(path, secret, mode=0o600)
    return secret


class SuperNode:
    """Runs the hospital's SuperNode to its end, one process at a time; ``stopping`` once asked to stop."""

    def __init__(
        self,
        command: list[str],
        *,
        env: dict[str, str],
        cwd: Path,
        hospital: str,
        log: StructuredLog,
        watch: Watch,
        wake: Callable[[], None],
    ) -> None:
        self.command = command
        self.env = env
        self.cwd = cwd
        self.hospital = hospital
        self.log = log
        self.watch = watch
        self.wake = wake  # the SuperNode holds a message for the app: take it now
        self.stopping = threading.Event()
        self._proc: subprocess.Popen[str] | None = None

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """Inside: SIGINT and SIGTERM stop the SuperNode (its whole group) and any start after."""

        def forward(signum: int, _frame: Any) -> None:
            self.stopping.set()
            self.watch.link.set("stopped", reason="asked to stop")
            proc = self._proc
            if proc is not None:  # the whole group: what the SuperNode started goes too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run(self) -> int:
        """Run one SuperNode to its end, its lines through the watch into the log; its exit code."""
        if self.stopping.is_set():
            return 0
        proc = subprocess.Popen(
            self.command,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.cwd,
            start_new_session=True,
        )
        self._proc = proc
        if self.stopping.is_set():  # a signal between the check and Popen
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)
        reader = threading.Thread(target=self._pump, args=(proc,), daemon=True)
        reader.start()
        try:
            code = proc.wait()
        finally:
            process.stop_group(proc.pid)  # what the SuperNode started must not outlive it
            proc.wait()
            reader.join(timeout=10)
            self._proc = None
        return code

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.strip():
                continue
            level, says = self.watch.line(line)
            if level is not None:
                record = log_record(line, self.hospital)
                record["level"] = level
                self.log.write(record)
            for said in says:
                self.log.event(said.level, said.message)
            if "Received successfully" in line:
                self.wake()  # the SuperNode holds a message for the app: no polling delay
