"""A whole federation on one machine, through fedtune's own commands, on loopback.

The coordinator (``fedtune server start``, TLS and SuperNode authentication on) and N
hospitals, each with its own folder, keys, data and ``hospital.toml``, admitted with
``fedtune server add-hospital`` and run by ``fedtune client start``: what the deployment
tests and ``benchmarks/deploy_round.py`` use, so both exercise exactly what a
consortium runs. Every process it starts runs in its own session and is stopped by
process id (SIGINT, then SIGKILL of its process group).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fedtune import process
from fedtune.errors import FedTuneError

HOSPITALS = ("st-elsewhere", "northgate-general", "riverside-community", "lakeside-university", "harbor-county")


def fedtune_process(*args: str, log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """``python -m fedtune ARGS`` in its own session, output appended to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedtune", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )


def stop(proc: subprocess.Popen[bytes], *, grace: float = 30.0) -> int:
    """SIGINT, then SIGKILL of the whole process group after ``grace`` seconds; the exit code."""
    return process.stop(proc, grace=grace, group=True)


def until(check: Callable[[], bool], what: str, limit: float = 60.0, step: float = 0.2) -> None:
    """Wait for ``check`` or fail saying what did not happen."""
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise FedTuneError(f"timed out after {limit:.0f} s waiting for {what}")
        time.sleep(step)


def hospital_toml(name: str, *, address: str, health: str, model: str = "tiny", require_dp: bool = False) -> str:
    """The startup kit's ``hospital.toml`` (``fedtune server invite``) filled in for a loopback hospital."""
    from fedtune.client.hospital_example import kit_toml

    text = (
        kit_toml(name, address)
        .replace('path = "models/SmolLM2-135M-Instruct"', f'path = "{model}"')
        .replace("127.0.0.1:9094", health)
        .replace("require_dp = true", f"require_dp = {'true' if require_dp else 'false'}")
    )
    # several hospitals share this machine's cores: one thread each, as if each had its own
    text, count = re.subn(r"(?m)^threads = \d+.*$", "threads = 1", text)
    if count != 1 or address not in text or f'"{model}"' not in text:
        raise FedTuneError("fedtune.client.hospital_example.EXAMPLE changed: update fedtune.cli.loopback.hospital_toml")
    return text


@dataclass
class Loopback:
    """A coordinator home and hospital folders under ``root``; processes started on demand."""

    root: Path
    port: int = 0
    page_port: int = 0  # the coordinator's live page, on loopback
    server: subprocess.Popen[bytes] | None = None
    daemons: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from fedtune.launcher import free_port
        from fedtune.server.home import CoordinatorHome

        self.root = Path(self.root).resolve()
        self.port = self.port or free_port()
        self.page_port = self.page_port or free_port()
        self.home = CoordinatorHome(self.root / "coordinator")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pki(self) -> None:
        from fedtune.cli import main

        pki = str(self.home.pki_dir)
        server = ["pki", "server", "--ca", pki, "--out", pki, "--address", "127.0.0.1"]
        for args in (["pki", "ca", "--out", pki], server):
            if main(args) != 0:
                raise FedTuneError(f"`fedtune {' '.join(args)}` failed")

    def start_server(self, *extra: str) -> subprocess.Popen[bytes]:
        args = ["--home", str(self.home.root), "--address", "127.0.0.1", "--host", "127.0.0.1"]
        if "--page" not in extra:
            args += ["--page", f"127.0.0.1:{self.page_port}"]
        self.server = fedtune_process(
            "server", "start", *args, "--port", str(self.port), *extra, log=self.root / "server.out"
        )
        server = self.server
        until(lambda: self.home.server() is not None or server.poll() is not None, "the coordinator to start")
        if server.poll() is not None:
            raise FedTuneError(f"the coordinator exited: {(self.root / 'server.out').read_text()[-2000:]}")
        return server

    def folder(self, name: str) -> Path:
        return self.root / name

    def config(self, name: str) -> Path:
        return self.folder(name) / "hospital.toml"

    def add_hospital(
        self, name: str, index: int, *, records: int = 12, model: str = "tiny", require_dp: bool = False
    ) -> Path:
        """A hospital's folder: keys (``fedtune pki hospital``), the coordinator's public files, data, config."""
        from fedtune.cli import main
        from fedtune.data.clinical import generate_site
        from fedtune.data.records import write_records
        from fedtune.launcher import free_port

        folder = self.folder(name)
        if main(["pki", "hospital", "--name", name, "--out", str(folder / "keys")]) != 0:
            raise FedTuneError(f"`fedtune pki hospital --name {name}` failed")
        (folder / "keys" / "ca.pem").write_bytes(self.home.ca_cert.read_bytes())
        (folder / "keys" / "coordinator.pub").write_bytes((self.home.pki_dir / "coordinator.pub").read_bytes())
        data = generate_site(index, records, seed=0)
        held = max(1, records // 6)
        write_records(folder / "data" / "train.jsonl", data[:-held])
        write_records(folder / "data" / "eval.jsonl", data[-held:])
        text = hospital_toml(
            name, address=self.address, health=f"127.0.0.1:{free_port()}", model=model, require_dp=require_dp
        )
        self.config(name).write_text(text)
        return self.config(name)

    def admit(self, name: str) -> None:
        from fedtune.cli import main

        keys = self.folder(name) / "keys"
        args = ["--home", str(self.home.root), "--name", name, "--node-key", str(keys / f"{name}.node.pub")]
        if main(["server", "add-hospital", *args, "--envelope-key", str(keys / f"{name}.pub")]) != 0:
            raise FedTuneError(f"`fedtune server add-hospital --name {name}` failed")

    def start_daemon(self, name: str, *extra: str) -> subprocess.Popen[bytes]:
        proc = fedtune_process(
            "client", "start", "--config", str(self.config(name)), *extra, log=self.root / f"{name}.out"
        )
        self.daemons[name] = proc
        return proc

    def node_status(self, name: str) -> str:
        from fedtune.server.status import status_rows

        _, hospitals, _ = status_rows(self.home)
        return next((str(h["status"]) for h in hospitals if h["hospital"] == name), "absent")

    def wait_online(self, names: list[str] | None = None, limit: float = 90.0) -> None:
        for name in names or list(self.daemons):

            def online(name: str = name) -> bool:
                return self.node_status(name) == "online"

            until(online, f"hospital {name} to come online", limit)

    def health(self, name: str, route: str = "/health") -> tuple[int, dict[str, object]]:
        """A hospital daemon's health route: the HTTP status and the JSON state."""
        import urllib.error
        import urllib.request

        from fedtune.client.hospital import load_hospital_config

        address = load_hospital_config(self.config(name), check_files=False).daemon.health
        try:
            with urllib.request.urlopen(f"http://{address}{route}", timeout=5) as answer:
                return int(answer.status), json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return int(err.code), json.loads(err.read() or b"{}")

    def log(self, name: str) -> list[dict[str, object]]:
        """The hospital daemon's structured log records."""
        path = self.folder(name) / "state" / "client.log.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def close(self) -> dict[str, int]:
        """Stop every daemon, then the coordinator; their exit codes by name."""
        codes = {name: stop(proc) for name, proc in self.daemons.items()}
        if self.server is not None:
            codes["coordinator"] = stop(self.server)
        return codes


def federation(root: Path, count: int = 3, *, records: int = 12, model: str = "tiny") -> Loopback:
    """A running coordinator and ``count`` admitted hospitals with their daemons online."""
    fed = Loopback(root)
    fed.pki()
    fed.start_server()
    try:
        for i, name in enumerate(HOSPITALS[:count]):
            fed.add_hospital(name, i, records=records, model=model)
            fed.admit(name)
            fed.start_daemon(name)
        fed.wait_online()
    except BaseException:
        fed.close()
        raise
    return fed
