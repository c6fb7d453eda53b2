"""The coordinator's home folder, and how to reach the SuperLink running from it.

Layout of ``--home`` (default ``./coordinator``)::

    pki/        ca.pem, server.pem, server.key (TLS), coordinator.key/.pub (envelopes)
    hospitals/  <name>.pub (the envelope allow-list), <name>.node.pub, registry.json
    internal/   the loopback SuperLink's TLS (a CA made at every start, its key deleted)
    flwr/       FLWR_HOME: the `flwr` CLI's connection to this SuperLink, on loopback
    state.db    the SuperLink's persistent state (registered nodes, runs)
    logs/       superlink.log, front.log (every request the front refused); both rotated by
                size (``.1`` to ``.3`` kept, :mod:`fedtune.logfile`)
    runs/       one folder per federation run (each with its witness.jsonl and live status.json)
    server.json the running SuperLink's pids, address and loopback control port (removed when it stops)

The coordinator's commands, one module each: :mod:`~fedtune.server.serving` (``fedtune
server start``), :mod:`~fedtune.server.admission` (``add-hospital``, ``remove-hospital``,
``invite``), :mod:`~fedtune.server.runs` (``fedtune run``, ``fedtune server witness``) and
:mod:`~fedtune.server.status` (``fedtune status``).
"""

from __future__ import annotations

import json
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedtune import process
from fedtune.errors import ConfigError, FedTuneError
from fedtune.security import pki

CONNECTION = "fedtune"  # the `flwr` CLI's name for this home's SuperLink (flwr/config.toml)
SUPERLINK_ENV = "FEDTUNE_SUPERLINK"  # HOME#PID of `server start`: carried by its SuperLink and all it starts


@dataclass(frozen=True)
class CoordinatorHome:
    root: Path

    def __post_init__(self) -> None:
        # resolved at the edge: Flower's processes start in other folders
        object.__setattr__(self, "root", Path(self.root).expanduser().resolve())

    @property
    def pki_dir(self) -> Path:
        return self.root / "pki"

    @property
    def hospitals_dir(self) -> Path:
        return self.root / "hospitals"

    @property
    def registry_path(self) -> Path:
        return self.hospitals_dir / "registry.json"

    @property
    def flwr_home(self) -> Path:
        return self.root / "flwr"

    @property
    def ray_dir(self) -> Path:
        return self.root / "ray"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def server_json(self) -> Path:
        return self.root / "server.json"

    @property
    def ca_cert(self) -> Path:
        return self.pki_dir / "ca.pem"

    @property
    def internal_dir(self) -> Path:
        """The loopback SuperLink's TLS material, made at every start."""
        return self.root / "internal"

    @property
    def internal_ca(self) -> Path:
        return self.internal_dir / "ca.pem"

    @property
    def tls(self) -> pki.ServerFiles:
        return pki.ServerFiles.at(self.pki_dir)

    @property
    def coordinator_key(self) -> Path:
        return self.pki_dir / "coordinator.key"

    def registry(self) -> dict[str, dict[str, Any]]:
        if not self.registry_path.exists():
            return {}
        try:
            data = json.loads(self.registry_path.read_text())
        except (OSError, ValueError) as err:
            raise FedTuneError(f"{self.registry_path}: unreadable ({err}); restore it from backup") from err
        return dict(data)

    def server(self) -> dict[str, Any] | None:
        """The running SuperLink's record, or None when none is running.

        Alive: its process runs on this machine, or (from another container or machine
        sharing the home folder) it answers on its health route.
        """
        try:
            info = dict(json.loads(self.server_json.read_text()))
        except (OSError, ValueError):
            return None
        if process.alive(int(info.get("pid", 0))) and process.alive(int(info.get("front-pid", 0))):
            return info
        scheme = "http" if info.get("insecure") else "https"
        address, port = str(info.get("address", "")), int(info.get("port", 0))
        if address and 0 < port < 65536 and healthy(f"{scheme}://{address}:{port}", self.ca_cert):
            return info
        return None


def superlink_markers(home: CoordinatorHome, pid: int) -> process.Markers:
    """The SuperLink that ``fedtune server start`` of ``home`` in process ``pid`` started, and
    what that SuperLink started (SuperExec, the runs' ServerApps). Per start: a watcher
    still sweeping after a crash never touches the SuperLink of the next start."""
    return process.Markers(environ=(f"{SUPERLINK_ENV}={home.root}#{pid}",))


def superlink_answers(home: CoordinatorHome, info: dict[str, Any], *, tries: int = 1) -> bool:
    """Whether the SuperLink of ``info`` (its record in server.json) answers on loopback."""
    scheme = "http" if info.get("insecure") else "https"
    url = f"{scheme}://127.0.0.1:{int(info.get('control-port', 0))}"
    for i in range(tries):
        if healthy(url, None if info.get("insecure") else home.internal_ca, timeout=1.0):
            return True
        if i + 1 < tries:
            time.sleep(0.5)
    return False


def healthy(url: str, ca: Path | None, *, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers ``GET /health`` (verifying TLS against ``ca`` for https)."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(ca)) if url.startswith("https") and ca else None
    except (OSError, ssl.SSLError):  # the CA file is missing or unreadable: nothing can be verified
        return False
    return process.answers_http(f"{url}/health", timeout=timeout, context=context)


def flwr_cli(home: CoordinatorHome, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run a `flwr` command against this SuperLink with JSON output; one-line error when it fails."""
    from fedtune.launcher import console_script, flower_env  # the run folder's imports: only when flwr runs

    if home.server() is None:
        raise ConfigError(
            f"no SuperLink of {home.root} is running; start it with `fedtune server start --home {home.root}`"
        )
    out = subprocess.run(
        [console_script("flwr"), *args, CONNECTION, "--format", "json"],
        env=flower_env(home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=home.root,
    )
    try:
        result = dict(json.loads(out.stdout[out.stdout.index("{") :]))
    except ValueError:
        result = {"success": False, "error-message": (out.stderr or out.stdout).strip().splitlines()[-1:]}
    if out.returncode != 0 or not result.get("success", False):
        message = result.get("error-message") or (out.stderr or out.stdout).strip()
        raise FedTuneError(f"`flwr {' '.join(args)}` failed: {str(message).strip()[:300]}")
    return result
