"""The coordinator's home folder and its SuperLink: ``fedtune server start``,
``add-hospital``, ``remove-hospital``, ``witness`` and ``fedtune status``.

Layout of ``--home`` (default ``./coordinator``)::

    pki/        ca.pem, server.pem, server.key (TLS), coordinator.key/.pub (envelopes)
    hospitals/  <name>.pub (the envelope allow-list), <name>.node.pub, registry.json
    flwr/       FLWR_HOME: the `flwr` CLI's connection to this SuperLink
    state.db    the SuperLink's persistent state (registered nodes, runs)
    logs/       superlink.log
    runs/       one folder per federation run (each with its witness.jsonl)
    server.json the running SuperLink's pid and address (removed when it stops)

The SuperLink runs with TLS, SuperNode authentication and runtime dependency installation
off; ``--insecure`` drops TLS and node authentication and says so loudly every start.
A hospital is admitted in both places at once: Flower's node registry (its SuperNode
key) and fedtune's allow-list (its envelope key).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from fedtune import pki
from fedtune.checkpoint import atomic_write_json
from fedtune.errors import ConfigError, FedTuneError
from fedtune.hospital import parse_address
from fedtune.keys import load_private, load_public
from fedtune.launcher import _bin, flower_env
from fedtune.witness import Witness, WitnessLog, gather

CONNECTION = "fedtune"
INSECURE_WARNING = (
    "WARNING: INSECURE MODE. No TLS and no SuperNode authentication: anyone on the network can read "
    "the traffic and join as a hospital. Use only on a closed test network."
)


@dataclass(frozen=True)
class CoordinatorHome:
    root: Path

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
        if _alive(int(info.get("pid", 0))):
            return info
        scheme = "http" if info.get("insecure") else "https"
        if _healthy(scheme, str(info.get("address", "")), int(info.get("port", 0)), self):
            return info
        return None


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return False
    return True


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


def write_connection(home: CoordinatorHome, address: str, port: int, *, insecure: bool) -> None:
    """The `flwr` CLI's connection to this SuperLink (Control API, same port as the Fleet API)."""
    conn: dict[str, Any] = {"address": f"{address}:{port}"}
    if insecure:
        conn["insecure"] = True
    else:
        conn["root-certificates"] = str(home.ca_cert.resolve())
    home.flwr_home.mkdir(parents=True, exist_ok=True)
    (home.flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION, CONNECTION: conn}}))


def superlink_command(home: CoordinatorHome, host: str, port: int, *, insecure: bool) -> list[str]:
    cmd = [_bin("flower-superlink")]
    if insecure:
        cmd.append("--insecure")
    else:
        cmd += [
            "--ssl-certfile",
            str(home.tls.cert),
            "--ssl-keyfile",
            str(home.tls.key),
            "--ssl-ca-certfile",
            str(home.ca_cert),
            "--enable-supernode-auth",
        ]
    return cmd + [
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--database",
        str(home.root / "state.db"),
        "--host",
        host,
        "--port",
        str(port),
    ]


def serve(
    home: CoordinatorHome,
    *,
    address: str,
    host: str,
    port: int,
    insecure: bool,
    say: Any = print,
    ready_timeout: float = 60.0,
) -> int:
    """Run the SuperLink in the foreground until SIGINT/SIGTERM; return its exit code."""
    parse_address(f"{address}:{port}", "--address/--port")
    running = home.server()
    if running is not None:
        raise ConfigError(f"a SuperLink of {home.root} is already running (pid {running['pid']})")
    _preflight(home, address, insecure)
    if insecure:
        say(INSECURE_WARNING)
    home.root.mkdir(parents=True, exist_ok=True)
    home.logs_dir.mkdir(exist_ok=True)
    write_connection(home, address, port, insecure=insecure)
    env = flower_env(home)
    with open(home.logs_dir / "superlink.log", "ab") as log:
        proc = subprocess.Popen(
            superlink_command(home, host, port, insecure=insecure),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=home.root,
        )
    stop = {"asked": False}

    def forward(signum: int, _frame: Any) -> None:
        stop["asked"] = True
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        scheme = "http" if insecure else "https"
        deadline = time.monotonic() + ready_timeout
        while not _healthy(scheme, address if not insecure else host, port, home, timeout=1.0):
            if proc.poll() is not None:
                raise FedTuneError(
                    f"the SuperLink exited with code {proc.returncode}; see {home.logs_dir / 'superlink.log'}"
                )
            if time.monotonic() > deadline:
                raise FedTuneError(f"the SuperLink did not answer within {ready_timeout:.0f} s; see logs/superlink.log")
            time.sleep(0.3)
        atomic_write_json(
            home.server_json,
            {
                "pid": proc.pid,
                "address": address,
                "host": host,
                "port": port,
                "insecure": insecure,
                "started": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        say(
            f"SuperLink serving {'WITHOUT TLS' if insecure else 'with TLS and SuperNode authentication'} on "
            f"{host}:{port} (hospitals dial {address}:{port}); state in {home.root / 'state.db'}; Ctrl-C stops it"
        )
        code = proc.wait()
        return 0 if stop["asked"] else code
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        with contextlib.suppress(FileNotFoundError):
            home.server_json.unlink()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _healthy(scheme: str, address: str, port: int, home: CoordinatorHome, *, timeout: float = 2.0) -> bool:
    import ssl

    if not address or not 0 < port < 65536:
        return False
    try:
        context = ssl.create_default_context(cafile=str(home.ca_cert)) if scheme == "https" else None
        with urllib.request.urlopen(f"{scheme}://{address}:{port}/health", timeout=timeout, context=context):
            return True
    except (OSError, ValueError, ssl.SSLError):
        return False


def flwr_cli(home: CoordinatorHome, *args: str, timeout: float = 60.0) -> dict[str, Any]:
    """Run a `flwr` command against this SuperLink with JSON output; one-line error when it fails."""
    if home.server() is None:
        raise ConfigError(
            f"no SuperLink of {home.root} is running; start it with `fedtune server start --home {home.root}`"
        )
    out = subprocess.run(
        [_bin("flwr"), *args, CONNECTION, "--format", "json"],
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


def add_hospital(home: CoordinatorHome, name: str, node_pub: Path, envelope_pub: Path) -> dict[str, Any]:
    """Admit a hospital: register its SuperNode key with Flower and its envelope key in the allow-list."""
    identity = load_public(envelope_pub)
    if identity.role != "hospital" or identity.name != name:
        raise ConfigError(
            f"{envelope_pub} is the envelope key of {identity.role} {identity.name!r}, not of hospital {name!r}"
        )
    node_key = pki.load_node_public(node_pub)
    registry = home.registry()
    if name in registry:
        raise ConfigError(f"hospital {name!r} is already registered; remove it first to replace its keys")
    result = flwr_cli(home, "supernode", "register", str(Path(node_pub).resolve()), "--name", name)
    home.hospitals_dir.mkdir(parents=True, exist_ok=True)
    (home.hospitals_dir / f"{name}.pub").write_bytes(Path(envelope_pub).read_bytes())
    (home.hospitals_dir / f"{name}.node.pub").write_bytes(Path(node_pub).read_bytes())
    entry = {
        "node-id": int(result["node-id"]),
        "node-key": pki.node_fingerprint(node_key),
        "envelope-key": identity.fingerprint,
        "added": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    registry[name] = entry
    atomic_write_json(home.registry_path, registry)
    return entry


def remove_hospital(home: CoordinatorHome, name: str) -> None:
    """Unregister a hospital's SuperNode and drop its envelope key from the allow-list."""
    registry = home.registry()
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise ConfigError(f"hospital {name!r} is not registered (registered: {known})")
    flwr_cli(home, "supernode", "unregister", str(registry[name]["node-id"]))
    for suffix in (".pub", ".node.pub"):
        with contextlib.suppress(FileNotFoundError):
            (home.hospitals_dir / f"{name}{suffix}").unlink()
    del registry[name]
    atomic_write_json(home.registry_path, registry)


def status_rows(home: CoordinatorHome) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(server line, hospitals, runs) for `fedtune status`."""
    info = home.server()
    if info is None:
        line = f"SuperLink of {home.root}: not running"
        nodes: dict[int, dict[str, Any]] = {}
    else:
        mode = "INSECURE" if info["insecure"] else "TLS + SuperNode authentication"
        line = f"SuperLink of {home.root}: running (pid {info['pid']}), {info['address']}:{info['port']}, {mode}"
        nodes = {int(n["node-id"]): n for n in flwr_cli(home, "supernode", "list").get("nodes", [])}
    hospitals = []
    for name, entry in sorted(home.registry().items()):
        node = nodes.get(int(entry["node-id"]), {})
        hospitals.append(
            {
                "hospital": name,
                "node id": entry["node-id"],
                "status": node.get("status", "unknown (SuperLink not running)" if info is None else "missing"),
                "online since": node.get("online-at", "-"),
                "node key": entry["node-key"][:20],
                "envelope key": entry["envelope-key"][:16],
            }
        )
    runs = []
    from fedtune.report import run_status

    for folder in sorted(home.runs_dir.glob("*")) if home.runs_dir.exists() else []:
        if folder.is_dir():
            runs.append(run_status(folder))
    return line, hospitals, runs


def main_status(home: CoordinatorHome) -> str:
    from fedtune.report import markdown_table

    line, hospitals, runs = status_rows(home)
    parts = [line, "", "hospitals:", markdown_table(hospitals) if hospitals else "(none registered)"]
    parts += ["", "runs:", markdown_table(runs) if runs else "(none)"]
    return "\n".join(parts) + "\n"


def install_run_keys(home: CoordinatorHome, folder: Any) -> None:
    """The run's coordinator key and its allow-list: the hospitals registered now.

    Refreshed on every launch and resume, so a hospital removed in between is refused.
    """
    import shutil

    from fedtune.checkpoint import atomic_write_bytes

    key = load_private(home.coordinator_key)  # checks mode and role before copying
    if key.role != "coordinator":
        raise ConfigError(f"{home.coordinator_key} is a {key.role} key, not the coordinator's")
    atomic_write_bytes(folder.coordinator_key, home.coordinator_key.read_bytes(), mode=0o600)
    shutil.rmtree(folder.allowlist_dir, ignore_errors=True)
    folder.allowlist_dir.mkdir(parents=True)
    for name in home.registry():
        atomic_write_bytes(folder.allowlist_dir / f"{name}.pub", (home.hospitals_dir / f"{name}.pub").read_bytes())


def prepare_deployment_run(home: CoordinatorHome, cfg: Any) -> Any:
    """A new run folder under ``home/runs`` for the registered hospitals."""
    from fedtune.checkpoint import atomic_write_bytes
    from fedtune.config import replace
    from fedtune.models import resolve_model_dir
    from fedtune.runfolder import RunFolder

    registry = home.registry()
    if not registry:
        raise ConfigError(f"no hospitals are registered in {home.root}; add them with `fedtune server add-hospital`")
    try:
        cfg = replace(cfg, data={"hospitals": len(registry)})
    except ConfigError as err:
        raise ConfigError(f"with the {len(registry)} registered hospital(s): {err}") from err
    resolve_model_dir(cfg.model.source)  # the coordinator builds the initial adapter from the base model's shape
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = RunFolder((home.runs_dir / f"{cfg.run.name}-{stamp}").resolve())
    if folder.root.exists():
        raise ConfigError(f"run folder {folder.root} already exists; wait a second and launch again")
    folder.root.mkdir(parents=True)
    atomic_write_json(folder.data_dir / "sites.json", {"sites": sorted(registry)})
    if cfg.security.seal:
        install_run_keys(home, folder)
    atomic_write_bytes(folder.config_path, cfg.to_toml().encode())
    return folder


def launch(home: CoordinatorHome, folder: Any, *, say: Any = print, poll: float = 1.0) -> str:
    """``flwr run`` the run folder's federation on this SuperLink; stream round lines; summarise."""
    from fedtune.launcher import last_error, start_run, stop_process, write_app
    from fedtune.report import round_printer, write_summary
    from fedtune.simulate import federation_done

    if home.server() is None:
        raise ConfigError(
            f"no SuperLink of {home.root} is running; start it with `fedtune server start --home {home.root}`"
        )
    cfg = folder.load_config()
    if cfg.security.seal:
        install_run_keys(home, folder)
    write_app(folder)
    env = flower_env(home)
    total = cfg.federation.rounds
    show_new_rounds = round_printer(folder, total, say)
    say(f"run folder: {folder.root}; {len(folder.sites())} registered hospitals, {total} rounds (log: logs/flower.log)")
    proc = start_run(folder, env, connection=CONNECTION)
    try:
        while proc.poll() is None:
            show_new_rounds()
            time.sleep(poll)
    finally:
        stop_process(proc, grace=10)
    show_new_rounds()
    if not federation_done(folder, cfg):
        raise FedTuneError(
            f"the federation stopped before round {total}: {last_error(folder)}; fix the cause and run "
            f"`fedtune run --resume {folder.root} --home {home.root}`"
        )
    table = write_summary(folder)
    say(f"exported the global adapter (PEFT) to {folder.adapter_dir}; plots in {folder.plots_dir}")
    return str(table)


def gather_witness(
    hospital: str, *, home: CoordinatorHome | None = None, run: str | None = None, run_dir: Path | None = None
) -> tuple[Witness, int]:
    """``fedtune server witness``: what the coordinator received from ``hospital`` (and lines skipped).

    Over every run of ``home`` (``all_runs``), one run of it (``run``), or one run folder
    (``run_dir``: a simulation's, or a copy of a deployment run's)."""
    from fedtune.runfolder import RunFolder

    if run_dir is not None:
        folder = RunFolder(Path(run_dir).resolve())
        folder.load_config()  # a clear error when it is not a run folder
        runs = {folder.root.name: WitnessLog(folder.witness_path)}
        where = f"run folder {folder.root}"
    else:
        home = home or CoordinatorHome(Path("coordinator"))
        names = sorted(p.name for p in home.runs_dir.iterdir() if p.is_dir()) if home.runs_dir.is_dir() else []
        if run is not None:
            if run not in names:
                raise ConfigError(f"`--run` {run!r} is not a run of {home.root} (runs: {', '.join(names) or 'none'})")
            names = [run]
        if not names:
            raise ConfigError(f"{home.runs_dir}: no runs yet; launch one with `fedtune run --home {home.root}`")
        runs = {name: WitnessLog(RunFolder(home.runs_dir / name).witness_path) for name in names}
        where = f"run {run} of {home.root}" if run is not None else f"the {len(names)} run(s) of {home.root}"
    witness, skipped, seen = gather(hospital, runs, all_runs=run_dir is None and run is None)
    if not witness.entries:
        raise ConfigError(
            f"no sealed reply from hospital `{hospital}` is recorded in {where} "
            f"(hospitals recorded there: {', '.join(sorted(seen)) or 'none'}); check `--hospital`"
        )
    return witness, skipped
