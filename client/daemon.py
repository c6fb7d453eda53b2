"""The hospital's client daemon: ``fedtune client start --config hospital.toml``.

It validates the whole config first (one-line error, non-zero exit), refuses a privacy
ledger older than what the audit trail shows was already released, then runs a Flower
SuperNode that dials the coordinator with TLS (the federation's CA) and authenticates
with the hospital's node key; the SuperNode reconnects with exponential backoff whenever
the coordinator is away (for ever, unless ``--max-retries`` says otherwise). Its output
becomes structured logs: one JSON object per line in ``daemon.log_file``, and plain lines
on stderr. ``daemon.health`` is the SuperNode's local HTTP API (loopback), whose
``GET /health`` answers while the daemon is up. ``--insecure`` (no TLS, no node
authentication) prints a warning on every start.

The SuperNode runs with ``--isolation process``: it executes nothing itself. The daemon
is its ClientApp runtime (:mod:`fedtune.client.appio`): it serves only fedtune's own
installed ClientApp, only for runs the coordinator signed, from this long-lived process
where the base model stays resident.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fedtune.hospital import HospitalConfig, load_hospital_config, parse_address

INSECURE_WARNING = (
    "WARNING: INSECURE MODE. This hospital talks to the coordinator without TLS and without node "
    "authentication: its updates travel readable and unauthenticated. Use only on a closed test network."
)
_LEVEL = re.compile(r"^(?:\x1b\[[0-9;]*m)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*(?:\x1b\[[0-9;]*m)?\s*:\s*(.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def supernode_command(cfg: HospitalConfig, *, insecure: bool, max_retries: int = 0, secret_file: Path) -> list[str]:
    """The hospital's SuperNode: dials the coordinator, runs no app itself (the daemon does)."""
    host, port = parse_address(cfg.daemon.health, "daemon.health")
    # Flower's flower-supernode, with its message polling paced for rounds (fedtune.client.supernode)
    cmd = [sys.executable, "-m", "fedtune.client.supernode", "--superlink", cfg.coordinator.address]
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
        str(secret_file),
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
    from fedtune.checkpoint import atomic_write_bytes

    secret = os.urandom(32)
    atomic_write_bytes(path, secret, mode=0o600)
    return secret


def log_record(line: str, hospital: str, source: str = "supernode") -> dict[str, Any]:
    """One structured log record from one line of Flower's output."""
    text = _ANSI.sub("", line.rstrip("\n"))
    match = _LEVEL.match(line.rstrip("\n"))
    level, message = (match.group(1), _ANSI.sub("", match.group(2))) if match else ("INFO", text)
    return _entry(level, hospital, source, message.strip())


def _entry(level: str, hospital: str, source: str, message: str) -> dict[str, Any]:
    return {
        "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "level": level,
        "hospital": hospital,
        "source": source,
        "message": message,
    }


class StructuredLog:
    """Appends JSON lines to the daemon's log file (0600) and echoes plain lines to stderr."""

    def __init__(self, path: Path, hospital: str, echo: IO[str] | None = sys.stderr) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())
        path.chmod(0o600)
        self.hospital = hospital
        self.echo = echo
        self.lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self.file.flush()
            if self.echo is not None:
                print(f"{record['time']} {record['level']:<7} {record['message']}", file=self.echo, flush=True)

    def event(self, level: str, message: str) -> None:
        self.write(_entry(level, self.hospital, "fedtune", message))

    def close(self) -> None:
        self.file.close()


def run_daemon(config: Path, *, insecure: bool = False, max_retries: int = 0, echo: IO[str] | None = sys.stderr) -> int:
    """Validate, then run the SuperNode in the foreground until it exits or SIGINT/SIGTERM."""
    from fedtune.client.ledger import check_ledger_current

    cfg = load_hospital_config(config, insecure=insecure)
    check_ledger_current(cfg.ledger_path, cfg.audit_path)  # an older copy of the ledger: refused, one line
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    log = StructuredLog(cfg.log_path, cfg.name, echo)
    with contextlib.ExitStack() as stack:
        stack.callback(log.close)
        if insecure:
            log.event("WARNING", INSECURE_WARNING)
        log.event(
            "INFO",
            f"hospital `{cfg.name}` dialling {cfg.coordinator.address} "
            f"{'WITHOUT TLS' if insecure else 'with TLS and node authentication'}; health on http://{cfg.daemon.health}/health",
        )
        from fedtune.client.appio import AppRuntime
        from fedtune.client.audit import AuditLog
        from fedtune.client.supernode import PARENT_ENV

        from fedtune.authorization import SeenRuns
        from fedtune.keys import load_public
        from fedtune.launcher import flower_env

        env = {**flower_env(_DaemonHome(cfg.state_dir)), PARENT_ENV: str(os.getpid())}
        secret_file = cfg.state_dir / "superexec.secret"
        runtime = AppRuntime(
            address=cfg.daemon.health,
            secret=new_secret(secret_file),
            hospital=cfg.name,
            hospital_config=cfg.source,
            coordinator=load_public(cfg.path(cfg.coordinator.envelope_key)),
            seen=SeenRuns(cfg.state_dir / "runs.json"),
            audit=AuditLog(cfg.audit_path),
            say=log.event,
        )
        proc = subprocess.Popen(
            supernode_command(cfg, insecure=insecure, max_retries=max_retries, secret_file=secret_file),
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cfg.state_dir,
            start_new_session=True,
        )
        runtime.start()
        stack.callback(runtime.stop)
        stop = {"asked": False}

        def forward(signum: int, _frame: Any) -> None:
            stop["asked"] = True
            # the whole group: the SuperNode's SuperExec children hold the log pipe open too
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGINT)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.strip():
                    log.write(log_record(line, cfg.name))
                    if "Received successfully" in line:
                        runtime.wake()  # the SuperNode holds a message for the app: no polling delay

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        try:
            code = proc.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            _stop_group(proc.pid)  # what the SuperNode started (SuperExec) must not outlive it
            proc.wait()
            reader.join(timeout=10)
        if stop["asked"]:
            log.event("INFO", "stopped")
            return 0
        log.event("ERROR", f"the SuperNode exited with code {code}")
        return code or 1


def _stop_group(pgid: int, grace: float = 10.0) -> None:
    """SIGINT the daemon's process group, SIGKILL whatever is left after ``grace`` seconds."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


class _DaemonHome:
    """Flower's and Ray's state for the daemon: inside the hospital's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.flwr_home = state_dir / "flwr"
        self.ray_dir = state_dir / "ray"
