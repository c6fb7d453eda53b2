"""``fedtune server start``: the coordinator's SuperLink, on loopback, behind its front.

The SuperLink runs on 127.0.0.1 only, with TLS, SuperNode authentication and runtime
dependency installation off; hospitals reach its Fleet API through the front
(:mod:`fedtune.server.front`) on ``--host``/``--port``, which serves nothing else.
``--insecure`` drops TLS and node authentication and says so loudly every start.

The SuperLink, and the ServerApp of every run it starts (which Flower leaves running,
orphaned, when its SuperLink goes), carry ``FEDTUNE_SUPERLINK`` in their environment:
a stop (Ctrl-C, SIGTERM) ends them all within seconds, and if the coordinator's
process dies outright a watcher (:func:`fedtune.process.guarded`) kills
them. ``fedtune run`` then names the cause: the coordinator's SuperLink stopped, and how
to resume.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import tomli_w

from fedtune import process
from fedtune.atomic import atomic_write_json
from fedtune.config import parse_address
from fedtune.errors import ConfigError, FedTuneError
from fedtune.launcher import console_script, flower_env
from fedtune.logfile import RotatingFile, pump
from fedtune.security import pki
from fedtune.security.keys import load_private
from fedtune.server.home import CONNECTION, SUPERLINK_ENV, CoordinatorHome, healthy, superlink_markers

if TYPE_CHECKING:
    from fedtune.server.front import Front, Upstream

INSECURE_WARNING = (
    "WARNING: INSECURE MODE. No TLS and no SuperNode authentication: anyone on the network can read "
    "the traffic and join as a hospital. Use only on a closed test network."
)


def _preflight(home: CoordinatorHome, address: str, insecure: bool) -> None:
    """Everything the SuperLink and the coordinator's runs will need, checked before it starts."""
    if insecure:
        return
    missing = [p for p in (home.ca_cert, home.tls.cert, home.tls.key, home.coordinator_key) if not p.exists()]
    if missing:
        raise ConfigError(
            f"{missing[0]} is missing; create the PKI first: `fedtune pki ca --out {home.pki_dir}` and "
            f"`fedtune pki server --ca {home.pki_dir} --out {home.pki_dir} --address {address}`"
        )
    pki.check_server_cert(home.tls, home.ca_cert, address=address)
    keys = load_private(home.coordinator_key)
    if keys.role != "coordinator":
        raise ConfigError(f"{home.coordinator_key} is a {keys.role} key, not the coordinator's")


def internal_tls(home: CoordinatorHome) -> pki.ServerFiles:
    """TLS for the loopback SuperLink: a CA and a certificate for 127.0.0.1, made at every start.

    The public certificate names the addresses hospitals dial, not 127.0.0.1, and is
    served only by the front. The CA key is deleted as soon as it has signed, so
    nothing can issue another certificate this CA vouches for.
    """
    import shutil

    folder = home.internal_dir
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, mode=0o700)
    pki.create_ca(folder, name="fedtune coordinator loopback CA")
    files = pki.issue_server_cert(folder, folder, ["127.0.0.1", "localhost"])
    pki.CAFiles.at(folder).key.unlink()
    return files


def write_connection(home: CoordinatorHome, control_port: int, *, insecure: bool) -> None:
    """The `flwr` CLI's connection to this coordinator's SuperLink: on loopback, never the public port."""
    conn: dict[str, Any] = {"address": f"127.0.0.1:{control_port}"}
    if insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(home.internal_ca)
    home.flwr_home.mkdir(parents=True, exist_ok=True)
    (home.flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def superlink_command(home: CoordinatorHome, control_port: int, *, insecure: bool) -> list[str]:
    """The SuperLink, on loopback only: hospitals reach its Fleet API through the front."""
    cmd = [console_script("flower-superlink")]
    if insecure:
        cmd.append("--insecure")
    else:
        tls = pki.ServerFiles.at(home.internal_dir)
        cmd += [
            "--ssl-certfile",
            str(tls.cert),
            "--ssl-keyfile",
            str(tls.key),
            "--ssl-ca-certfile",
            str(home.internal_ca),
            "--enable-supernode-auth",
        ]
    return cmd + [
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--database",
        str(home.root / "state.db"),
        "--host",
        "127.0.0.1",
        "--port",
        str(control_port),
    ]


def serve(
    home: CoordinatorHome,
    *,
    address: str,
    host: str,
    port: int,
    insecure: bool,
    control_port: int = 0,
    say: Callable[[str], None] = print,
    ready_timeout: float = 60.0,
    page: str = "127.0.0.1:9095",
    page_token_file: str | None = None,
) -> int:
    """Run the SuperLink (loopback), its public front and its live page until SIGINT/SIGTERM; the exit code."""
    from fedtune.launcher import free_port
    from fedtune.server.page import coordinator_page

    parse_address(f"{address}:{port}", "--address/--port")
    running = home.server()
    if running is not None:
        raise ConfigError(f"a SuperLink of {home.root} is already running (pid {running['pid']})")
    _preflight(home, address, insecure)
    live_page = coordinator_page(home, page, token_file=page_token_file, insecure=insecure)  # refused: nothing started
    if insecure:
        say(INSECURE_WARNING)
    home.root.mkdir(parents=True, exist_ok=True)
    home.logs_dir.mkdir(exist_ok=True)
    control_port = control_port or free_port()
    if not insecure:
        internal_tls(home)
    write_connection(home, control_port, insecure=insecure)
    if live_page is not None:
        live_page.start()
        say(f"live page: {live_page.url}{' (token needed)' if page_token_file else ''}")
    # if this process dies, so do its SuperLink and the runs' ServerApps
    with process.guarded(superlink_markers(home, os.getpid())), contextlib.ExitStack() as stack:
        if live_page is not None:
            stack.callback(live_page.stop)
        return _serve(
            home,
            address=address,
            host=host,
            port=port,
            insecure=insecure,
            control_port=control_port,
            say=say,
            ready_timeout=ready_timeout,
        )


def _serve(
    home: CoordinatorHome,
    *,
    address: str,
    host: str,
    port: int,
    insecure: bool,
    control_port: int,
    say: Callable[[str], None],
    ready_timeout: float,
) -> int:
    from fedtune.server.front import Front, Upstream, describe

    log = RotatingFile(home.logs_dir / "superlink.log")
    proc = _start_superlink(home, control_port, insecure=insecure)
    assert proc.stdout is not None  # Popen(stdout=PIPE) sets it; for the type checker
    reader = pump(proc.stdout, log)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    front: Front | None = None
    try:
        upstream = Upstream(control_port, None if insecure else home.internal_ca)
        if not _await_superlink(home, proc, upstream, stop, timeout=ready_timeout):
            return 0
        front = Front(
            upstream,
            host=host,
            port=port,
            certfile=None if insecure else home.tls.cert,
            keyfile=None if insecure else home.tls.key,
            refusal_log=home.logs_dir / "front.log",
        )
        front.start()
        info = {
            "pid": proc.pid,
            "front-pid": os.getpid(),
            "address": address,
            "host": host,
            "port": port,
            "control-port": control_port,
            "insecure": insecure,
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_json(home.server_json, info)
        say(
            f"SuperLink serving {'WITHOUT TLS' if insecure else 'with TLS and SuperNode authentication'}: "
            f"{describe(info)}; hospitals dial {address}:{port}; state in {home.root / 'state.db'}; Ctrl-C stops it"
        )
        _watch(home, proc, front, stop)
        return 0
    finally:
        _shutdown(home, proc, front)
        reader.join(timeout=5)
        log.close()
        with contextlib.suppress(FileNotFoundError):
            home.server_json.unlink()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _start_superlink(home: CoordinatorHome, control_port: int, *, insecure: bool) -> subprocess.Popen[bytes]:
    """The SuperLink process, marked as this start's (:func:`superlink_markers`), its output piped."""
    env = {**flower_env(home, ray=False), SUPERLINK_ENV: f"{home.root}#{os.getpid()}"}
    return subprocess.Popen(
        superlink_command(home, control_port, insecure=insecure),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=home.root,
        preexec_fn=process.dies_with_us(),
    )


def _superlink_exited(home: CoordinatorHome, proc: subprocess.Popen[bytes]) -> FedTuneError:
    return FedTuneError(f"the SuperLink exited with code {proc.returncode}; see {home.logs_dir / 'superlink.log'}")


def _await_superlink(
    home: CoordinatorHome, proc: subprocess.Popen[bytes], upstream: Upstream, stop: threading.Event, *, timeout: float
) -> bool:
    """Wait until the SuperLink answers on loopback: True; False when stopped first; raise when it dies or hangs."""
    return process.await_ready(
        proc,
        lambda: healthy(upstream.url, upstream.ca, timeout=1.0),
        what="the SuperLink",
        log=home.logs_dir / "superlink.log",
        limit=timeout,
        stop=stop.wait,
    )


def _watch(home: CoordinatorHome, proc: subprocess.Popen[bytes], front: Front, stop: threading.Event) -> None:
    """Serve until ``stop`` is set; raise when the SuperLink or the front dies under it."""
    while not stop.wait(0.2):
        if proc.poll() is not None:
            raise _superlink_exited(home, proc)
        if not front.alive:
            raise FedTuneError(f"the coordinator's front stopped: {front.error}; see {home.logs_dir}")


def _shutdown(home: CoordinatorHome, proc: subprocess.Popen[bytes], front: Front | None) -> None:
    """Stop the front, the runs' ServerApps, the SuperLink, then anything else this start left."""
    ours = superlink_markers(home, os.getpid())
    if front is not None:
        front.stop()  # first: hospitals see the coordinator go away, and its links to the SuperLink close
    # the runs' ServerApps before the SuperLink: Flower leaves them running, orphaned,
    # retrying a SuperLink that is gone, and their open links would hold its shutdown.
    # SIGKILL: neither SIGINT nor SIGTERM ends them within seconds (measured), and a
    # round cut short loses nothing (checkpoints and metrics lines are crash-safe).
    process.kill(process.find(ours, exclude=[proc.pid]), graceful=False, timeout=2.0)
    process.stop(proc, nudge=2.0)
    process.kill(process.find(ours), graceful=False, timeout=2.0)
