"""The hospital's client daemon: ``fedtune client start --config hospital.toml``.

It validates the whole config first (one-line error, non-zero exit), refuses a privacy
ledger older than what the audit trail shows was already released, then runs a Flower
SuperNode that dials the coordinator with TLS (the federation's CA) and authenticates
with the hospital's node key; the SuperNode reconnects with exponential backoff whenever
the coordinator is away (for ever, unless ``--max-retries`` says otherwise). Paths are
resolved against the config's folder here, at the edge: the daemon runs from any folder
and hands its children absolute paths only.

The daemon serves its own health routes on ``daemon.health`` (loopback only):
``/health/live`` (200 while it runs), ``/health/ready`` (200 only while connected to the
coordinator, else 503) and ``/health`` (the state as JSON: connected since when and as
which node, retrying since when with the last error, refused and why, stopped); see
:mod:`fedtune.client.health`, which reads that state from what the SuperNode prints. A
refusal (this node key not registered, removed by the coordinator, a clock the
coordinator cannot accept) is one ERROR line and exit status 3; a TLS mismatch is one
ERROR line, and the daemon keeps dialling (a new SuperNode with backoff) since the
coordinator may fix its side; ``--max-retries`` gives up on either.

Its output becomes structured logs: one JSON object per line in ``daemon.log_file``
(rotated by size, ``daemon.log_max_mb`` and ``daemon.log_backups``), and plain lines on
stderr without Flower's chatter and tracebacks (they stay in the file at DEBUG).
``--insecure`` (no TLS, no node authentication) prints a warning on every start.

The SuperNode runs with ``--isolation process``: it executes nothing itself. The daemon
is its ClientApp runtime (:mod:`fedtune.client.appio`) over the SuperNode's runtime API,
on a free loopback port of its own at every start: it serves only fedtune's own
installed ClientApp, only for runs the coordinator signed, from this long-lived process
where the base model stays resident. The SuperNode dies with the daemon however the
daemon dies; a start also stops one an earlier daemon left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from fedtune.client.causes import Identity
from fedtune.client.health import Memory, Watch, split_level
from fedtune.client.health_routes import HealthServer, Link
from fedtune.client.hospital import HospitalConfig, load_hospital_config, parse_address
from fedtune.errors import ConfigError

INSECURE_WARNING = (
    "WARNING: INSECURE MODE. This hospital talks to the coordinator without TLS and without node "
    "authentication: its updates travel readable and unauthenticated. Use only on a closed test network."
)


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

    def close(self) -> None:
        self.file.close()


EXIT_REFUSED = 3  # the coordinator refuses this hospital: restarting will not help (systemd: RestartPreventExitStatus)


def run_daemon(config: Path, *, insecure: bool = False, max_retries: int = 0, echo: bool = True) -> int:
    """Validate, serve the health routes, run the SuperNode until SIGINT/SIGTERM or a refusal.

    Exit status: 0 when stopped, 3 when the coordinator refuses this hospital (not
    registered, removed, clock), 1 when it gave up (``--max-retries``) or the SuperNode failed.
    ``echo``: plain lines on the ``sys.stderr`` of the call (not of the import: tests swap it).
    """
    from fedtune.client.ledger_rollback import check_ledger_current

    cfg = load_hospital_config(config, insecure=insecure)
    check_ledger_current(cfg.ledger_path, cfg.audit_path)  # an older copy of the ledger: refused, one line
    cfg.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    who = hospital_identity(cfg, insecure=insecure)
    link = Link(who)
    health = _health_server(cfg, link)  # first: a second daemon of this hospital stops here, one line
    log = StructuredLog(
        cfg.log_path,
        cfg.name,
        sys.stderr if echo else None,
        max_bytes=int(cfg.daemon.log_max_mb * 2**20),
        backups=cfg.daemon.log_backups,
    )
    with contextlib.ExitStack() as stack:
        stack.callback(log.close)
        health.start()
        stack.callback(health.stop)
        if insecure:
            log.event("WARNING", INSECURE_WARNING)
        log.event(
            "INFO",
            f"hospital `{cfg.name}` dialling {cfg.coordinator.address} "
            f"{'WITHOUT TLS' if insecure else 'with TLS and node authentication'}; "
            f"health on http://{cfg.daemon.health}/health (/health/live, /health/ready)",
        )
        _clear_stale(cfg, log)
        from fedtune.client.appio import AppRuntime
        from fedtune.client.audit import AuditLog
        from fedtune.launcher import flower_env, free_port
        from fedtune.security.authorization import SeenRuns
        from fedtune.security.keys import load_public
        from fedtune.supernode import PARENT_ENV

        env = {**flower_env(_DaemonHome(cfg.state_dir)), PARENT_ENV: str(os.getpid())}
        secret_file = cfg.state_dir / "superexec.secret"
        runtime_address = f"127.0.0.1:{free_port()}"  # the SuperNode's runtime API: the daemon's only
        runtime = AppRuntime(
            address=runtime_address,
            secret=new_secret(secret_file),
            hospital=cfg.name,
            hospital_config=cfg.source,
            coordinator=load_public(cfg.path(cfg.coordinator.envelope_key)),
            seen=SeenRuns(cfg.state_dir / "runs.json"),
            audit=AuditLog(cfg.audit_path),
            say=log.event,
        )
        runtime.start()
        stack.callback(runtime.stop)
        command = supernode_command(
            cfg, insecure=insecure, max_retries=max_retries, secret_file=secret_file, runtime=runtime_address
        )
        watch = Watch(who, link, Memory(cfg.state_dir / "connection.json"), max_retries=max_retries)
        stopping = threading.Event()
        current: dict[str, subprocess.Popen[str]] = {}

        def forward(signum: int, _frame: Any) -> None:
            stopping.set()
            link.set("stopped", reason="asked to stop")
            proc = current.get("proc")
            if proc is not None:  # the whole group: what the SuperNode started goes too
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGINT)

        previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
        stack.callback(lambda: [signal.signal(s, h) for s, h in previous.items()])
        while True:
            watch.begin()
            code = _supervise(command, env, cfg, log, watch, runtime, current, stopping)
            if stopping.is_set():
                link.set("stopped", reason="asked to stop")
                log.event("INFO", "stopped")
                return 0
            verdict = watch.ended(code)
            for said in verdict.said:
                log.event(said.level, said.message)
            if verdict.action == "refuse":
                return EXIT_REFUSED
            if verdict.action != "retry":
                return code or 1
            if stopping.wait(verdict.wait):
                link.set("stopped", reason="asked to stop")
                log.event("INFO", "stopped")
                return 0


def _supervise(
    command: list[str],
    env: dict[str, str],
    cfg: HospitalConfig,
    log: StructuredLog,
    watch: Watch,
    runtime: Any,
    current: dict[str, subprocess.Popen[str]],
    stopping: threading.Event,
) -> int:
    """Run one SuperNode to its end, its lines through ``watch`` into the log; its exit code."""
    if stopping.is_set():
        return 0
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=cfg.state_dir,
        start_new_session=True,
    )
    current["proc"] = proc
    if stopping.is_set():  # a signal between the check and Popen
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if not line.strip():
                continue
            level, says = watch.line(line)
            if level is not None:
                record = log_record(line, cfg.name)
                record["level"] = level
                log.write(record)
            for said in says:
                log.event(said.level, said.message)
            if "Received successfully" in line:
                runtime.wake()  # the SuperNode holds a message for the app: no polling delay

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        code = proc.wait()
    finally:
        _stop_group(proc.pid)  # what the SuperNode started (SuperExec) must not outlive it
        proc.wait()
        reader.join(timeout=10)
        current.pop("proc", None)
    return code


def hospital_identity(cfg: HospitalConfig, *, insecure: bool) -> Identity:
    """What the daemon's and ``client check --dial``'s lines name: the config's words, the key's fingerprint."""
    from fedtune.security import pki

    fingerprint = (
        "" if insecure else pki.node_fingerprint(pki.load_node_private(cfg.path(cfg.keys.node_key)).public_key())
    )
    return Identity(
        hospital=cfg.name,
        address=cfg.coordinator.address,
        ca=cfg.coordinator.ca,
        node_key=cfg.keys.node_key,
        fingerprint=fingerprint or "no node key: --insecure",
    )


def _health_server(cfg: HospitalConfig, link: Link) -> HealthServer:
    host, port = parse_address(cfg.daemon.health, "daemon.health")
    try:
        return HealthServer(host, port, link)
    except OSError as err:
        raise ConfigError(
            f"{cfg.source}: `daemon.health` {cfg.daemon.health} cannot be served ({err.strerror}): is this "
            "hospital's daemon already running? Stop it, or give this one another port"
        ) from err


def _clear_stale(cfg: HospitalConfig, log: StructuredLog) -> None:
    """A SuperNode left by an earlier daemon of this hospital (its Flower home is ours): stop it.

    On Linux a SuperNode dies with its daemon however the daemon dies; this covers the
    rest (another platform, a SuperNode started by hand with this state folder). The
    health port, held by this daemon, says no other daemon of this hospital runs.
    """
    from fedtune.launcher import kill_run_processes, run_processes

    home = _DaemonHome(cfg.state_dir)
    stale = run_processes(home)  # type: ignore[arg-type]
    if stale:
        left = kill_run_processes(home, timeout=10)  # type: ignore[arg-type]
        log.event(
            "WARNING",
            f"stopped {len(stale) - left} process(es) left by an earlier daemon of this hospital "
            f"(pid {', '.join(map(str, stale))})" + (f"; {left} would not die" if left else ""),
        )


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
