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
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.client.causes import Identity
from fedtune.client.daemon_log import StructuredLog
from fedtune.client.daemon_supernode import SuperNode, new_secret, supernode_command
from fedtune.client.health import Memory, Watch
from fedtune.client.health_routes import HealthServer, Link
from fedtune.client.hospital import HospitalConfig, load_hospital_config
from fedtune.config import parse_address
from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.client.appio import AppRuntime

INSECURE_WARNING = (
    "WARNING: INSECURE MODE. This hospital talks to the coordinator without TLS and without node "
    "authentication: its updates travel readable and unauthenticated. Use only on a closed test network."
)
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
            f"health on http://{cfg.daemon.health}/health (/health/live, /health/ready); "
            f"this hospital's page: http://{cfg.daemon.health}/",
        )
        _clear_stale(cfg, log)
        watch = Watch(who, link, Memory(cfg.state_dir / "connection.json"), max_retries=max_retries)
        supernode = _wire(cfg, log, watch, insecure=insecure, stack=stack)
        stack.enter_context(supernode.signals())
        return _serve(supernode, log)


def _wire(
    cfg: HospitalConfig, log: StructuredLog, watch: Watch, *, insecure: bool, stack: contextlib.ExitStack
) -> SuperNode:
    """The daemon's ClientApp runtime, started (and stopped with ``stack``), and the SuperNode that feeds it.

    The runtime API listens on a free loopback port of its own at every start, and only
    the daemon and its SuperNode know the secret that takes its tasks.
    """
    from fedtune.launcher import flower_env, free_port
    from fedtune.supernode import PARENT_ENV

    env = {**flower_env(_DaemonHome(cfg.state_dir)), PARENT_ENV: str(os.getpid())}
    secret_file = cfg.state_dir / "superexec.secret"
    address = f"127.0.0.1:{free_port()}"  # the SuperNode's runtime API: the daemon's only
    runtime = _app_runtime(cfg, log, address=address, secret=new_secret(secret_file))
    runtime.start()
    stack.callback(runtime.stop)
    command = supernode_command(
        cfg, insecure=insecure, max_retries=watch.max_retries, secret_file=secret_file, runtime=address
    )
    return SuperNode(command, env=env, cwd=cfg.state_dir, hospital=cfg.name, log=log, watch=watch, wake=runtime.wake)


def _app_runtime(cfg: HospitalConfig, log: StructuredLog, *, address: str, secret: bytes) -> AppRuntime:
    """fedtune's ClientApp, served from this process for runs the coordinator signed (:mod:`fedtune.client.appio`)."""
    from fedtune.client.appio import AppRuntime
    from fedtune.client.audit import AuditLog
    from fedtune.security.authorization import SeenRuns
    from fedtune.security.keys import load_public

    return AppRuntime(
        address=address,
        secret=secret,
        hospital=cfg.name,
        hospital_config=cfg.source,
        coordinator=load_public(cfg.path(cfg.coordinator.envelope_key)),
        seen=SeenRuns(cfg.state_dir / "runs.json"),
        audit=AuditLog(cfg.audit_path),
        say=log.event,
        progress=log.progress,
    )


def _serve(supernode: SuperNode, log: StructuredLog) -> int:
    """Run SuperNodes until asked to stop, refused or given up: what ``watch`` decides on each exit."""
    watch = supernode.watch
    while True:
        watch.begin()
        code = supernode.run()
        if supernode.stopping.is_set():
            return _stopped(watch.link, log)
        verdict = watch.ended(code)
        for said in verdict.said:
            log.event(said.level, said.message)
        if verdict.action == "refuse":
            return EXIT_REFUSED
        if verdict.action != "retry":
            return code or 1
        if supernode.stopping.wait(verdict.wait):
            return _stopped(watch.link, log)


def _stopped(link: Link, log: StructuredLog) -> int:
    link.set("stopped", reason="asked to stop")
    log.event("INFO", "stopped")
    return 0


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
    """The health routes and the hospital's own page (``/``), on ``daemon.health`` (loopback only)."""
    from fedtune.client.page import hospital_state
    from fedtune.pages.serve import PageRoutes

    host, port = parse_address(cfg.daemon.health, "daemon.health")
    page = PageRoutes(lambda _query: hospital_state(cfg, link), page="hospital.html")
    try:
        return HealthServer(host, port, link, page)
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
    from fedtune.flowerhome import kill_run_processes, run_processes

    home = _DaemonHome(cfg.state_dir)
    stale = run_processes(home)  # type: ignore[arg-type]
    if stale:
        left = kill_run_processes(home, timeout=10)  # type: ignore[arg-type]
        log.event(
            "WARNING",
            f"stopped {len(stale) - left} process(es) left by an earlier daemon of this hospital "
            f"(pid {', '.join(map(str, stale))})" + (f"; {left} would not die" if left else ""),
        )


class _DaemonHome:
    """Flower's and Ray's state for the daemon: inside the hospital's state folder."""

    def __init__(self, state_dir: Path) -> None:
        self.flwr_home = state_dir / "flwr"
        self.ray_dir = state_dir / "ray"
