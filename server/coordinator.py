"""The coordinator's home folder and its SuperLink: ``fedtune server start``,
``add-hospital``, ``remove-hospital``, ``witness`` and ``fedtune status``.

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

The SuperLink runs on 127.0.0.1 only, with TLS, SuperNode authentication and runtime
dependency installation off; hospitals reach its Fleet API through the front
(:mod:`fedtune.server.front`) on ``--host``/``--port``, which serves nothing else.
``--insecure`` drops TLS and node authentication and says so loudly every start.
A hospital is admitted in both places at once: Flower's node registry (its SuperNode
key) and fedtune's allow-list (its envelope key); ``fedtune server invite`` writes the
startup kit a new hospital begins from.

The SuperLink, and the ServerApp of every run it starts (which Flower leaves running,
orphaned, when its SuperLink goes), carry ``FEDTUNE_SUPERLINK`` in their environment:
a stop (Ctrl-C, SIGTERM) ends them all within seconds, and if the coordinator's
process dies outright a watcher (:func:`fedtune.process.guarded`) kills
them. ``fedtune run`` then names the cause: the coordinator's SuperLink stopped, and how
to resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import tomli_w

from fedtune import process
from fedtune.atomic import atomic_write_json
from fedtune.client.hospital import parse_address
from fedtune.errors import ConfigError, FedTuneError
from fedtune.launcher import console_script, flower_env, stop_process
from fedtune.logfile import RotatingFile, pump
from fedtune.security import pki
from fedtune.security.keys import KeyPair, load_private, load_public
from fedtune.security.witness import Witness, WitnessLog, gather

CONNECTION = "fedtune"
SUPERLINK_ENV = "FEDTUNE_SUPERLINK"  # HOME#PID of `server start`: carried by its SuperLink and all it starts
INSECURE_WARNING = (
    "WARNING: INSECURE MODE. No TLS and no SuperNode authentication: anyone on the network can read "
    "the traffic and join as a hospital. Use only on a closed test network."
)


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
        if _alive(int(info.get("pid", 0))) and _alive(int(info.get("front-pid", 0))):
            return info
        scheme = "http" if info.get("insecure") else "https"
        address, port = str(info.get("address", "")), int(info.get("port", 0))
        if address and 0 < port < 65536 and _healthy(f"{scheme}://{address}:{port}", self.ca_cert):
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
        if _healthy(url, None if info.get("insecure") else home.internal_ca, timeout=1.0):
            return True
        if i + 1 < tries:
            time.sleep(0.5)
    return False


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
    say: Any = print,
    ready_timeout: float = 60.0,
) -> int:
    """Run the SuperLink (loopback) and its public front until SIGINT/SIGTERM; return the exit code."""
    from fedtune.launcher import free_port

    parse_address(f"{address}:{port}", "--address/--port")
    running = home.server()
    if running is not None:
        raise ConfigError(f"a SuperLink of {home.root} is already running (pid {running['pid']})")
    _preflight(home, address, insecure)
    if insecure:
        say(INSECURE_WARNING)
    home.root.mkdir(parents=True, exist_ok=True)
    home.logs_dir.mkdir(exist_ok=True)
    control_port = control_port or free_port()
    if not insecure:
        internal_tls(home)
    write_connection(home, control_port, insecure=insecure)
    # if this process dies, so do its SuperLink and the runs' ServerApps
    with process.guarded(superlink_markers(home, os.getpid())):
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
    say: Any,
    ready_timeout: float,
) -> int:
    from fedtune.server.front import Front, Upstream, describe

    env = {**flower_env(home, ray=False), SUPERLINK_ENV: f"{home.root}#{os.getpid()}"}
    ours = superlink_markers(home, os.getpid())
    log = RotatingFile(home.logs_dir / "superlink.log")
    proc = subprocess.Popen(
        superlink_command(home, control_port, insecure=insecure),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=home.root,
        preexec_fn=process.dies_with_us(),
    )
    assert proc.stdout is not None  # Popen(stdout=PIPE) sets it; for the type checker
    reader = pump(proc.stdout, log)
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    front: Front | None = None
    try:
        upstream = Upstream(control_port, None if insecure else home.internal_ca)
        deadline = time.monotonic() + ready_timeout
        while not _healthy(upstream.url, upstream.ca, timeout=1.0):
            if proc.poll() is not None:
                raise FedTuneError(
                    f"the SuperLink exited with code {proc.returncode}; see {home.logs_dir / 'superlink.log'}"
                )
            if time.monotonic() > deadline:
                raise FedTuneError(f"the SuperLink did not answer within {ready_timeout:.0f} s; see logs/superlink.log")
            if stop.wait(0.3):
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
        while not stop.wait(0.2):
            if proc.poll() is not None:
                raise FedTuneError(
                    f"the SuperLink exited with code {proc.returncode}; see {home.logs_dir / 'superlink.log'}"
                )
            if not front.alive:
                raise FedTuneError(f"the coordinator's front stopped: {front.error}; see {home.logs_dir}")
        return 0
    finally:
        if front is not None:
            front.stop()  # first: hospitals see the coordinator go away, and its links to the SuperLink close
        # the runs' ServerApps before the SuperLink: Flower leaves them running, orphaned,
        # retrying a SuperLink that is gone, and their open links would hold its shutdown.
        # SIGKILL: neither SIGINT nor SIGTERM ends them within seconds (measured), and a
        # round cut short loses nothing (checkpoints and metrics lines are crash-safe).
        process.kill(process.find(ours, exclude=[proc.pid]), graceful=False, timeout=2.0)
        stop_process(proc)
        process.kill(process.find(ours), graceful=False, timeout=2.0)
        reader.join(timeout=5)
        log.close()
        with contextlib.suppress(FileNotFoundError):
            home.server_json.unlink()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _healthy(url: str, ca: Path | None, *, timeout: float = 2.0) -> bool:
    """Whether ``url`` answers ``GET /health`` (verifying TLS against ``ca`` for https)."""
    import ssl

    try:
        context = ssl.create_default_context(cafile=str(ca)) if url.startswith("https") and ca else None
        with urllib.request.urlopen(f"{url}/health", timeout=timeout, context=context):
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
    try:
        result = flwr_cli(home, "supernode", "register", str(Path(node_pub).resolve()), "--name", name)
    except FedTuneError as err:
        if "already in use" not in str(err):
            raise
        owner = next((n for n, e in registry.items() if e.get("node-key") == pki.node_fingerprint(node_key)), "")
        if owner:
            raise ConfigError(f"{node_pub} is already the node key of hospital {owner!r}") from None
        raise ConfigError(
            f"{node_pub}: the SuperLink has seen this node key before (revoked by remove-hospital, or registered "
            f"outside fedtune) and never admits it again; the hospital makes a new one with `fedtune pki hospital "
            f"--name {name} --out keys --rotate-node-key` and sends its {name}.node.pub"
        ) from None
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
    from fedtune.experiments.report import run_status

    for folder in sorted(home.runs_dir.glob("*")) if home.runs_dir.exists() else []:
        if folder.is_dir():
            runs.append(run_status(folder))
    return line, hospitals, runs


def status_data(home: CoordinatorHome) -> dict[str, Any]:
    """Everything ``fedtune status`` shows: the SuperLink, hospitals, runs, and for each
    run in progress its round, phase and each hospital's state in the round."""
    from fedtune.experiments.report import live_rows
    from fedtune.live import ENDED, read_status

    line, hospitals, runs = status_rows(home)
    names = {int(entry["node-id"]): name for name, entry in home.registry().items()}
    live: dict[str, Any] = {}
    for row in runs:
        status = read_status(home.runs_dir / row["run"])
        if status is None or status.get("phase") in ENDED or not process.running(int(status.get("pid", 0)), "flwr"):
            continue
        live[row["run"]] = {
            **{k: status.get(k) for k in ("flower-run-id", "round", "rounds", "phase", "since", "updated")},
            "hospitals": live_rows(status, names),
        }
    return {"superlink": line, "hospitals": hospitals, "runs": runs, "live": live}


def main_status(home: CoordinatorHome, *, as_json: bool = False) -> str:
    from fedtune.experiments.report import markdown_table

    data = status_data(home)
    if as_json:
        return json.dumps(data, indent=1, default=str) + "\n"
    hospitals, runs = data["hospitals"], data["runs"]
    parts = [data["superlink"], "", "hospitals:", markdown_table(hospitals) if hospitals else "(none registered)"]
    parts += ["", "runs:", markdown_table(runs) if runs else "(none)"]
    for run, live in data["live"].items():
        since = time.time() - float(live.get("since") or time.time())
        parts += [
            "",
            f"run {run} (Flower run {live['flower-run-id']}): round {live['round']}/{live['rounds']}, "
            f"{live['phase']} for {since:.0f} s",
            markdown_table(live["hospitals"]) if live["hospitals"] else "(no hospital sampled yet)",
        ]
    return "\n".join(parts) + "\n"


def watch_status(
    home: CoordinatorHome,
    *,
    every: float,
    as_json: bool = False,
    out: Any = print,
    sleep: Any = time.sleep,
    clear: bool = False,
) -> int:
    """``fedtune status --watch``: show the status every ``every`` seconds until Ctrl-C; exit 0."""
    try:
        while True:
            text = main_status(home, as_json=as_json)
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            out(("\033[2J\033[H" if clear else "") + (text if as_json else f"--- {stamp}\n{text}"))
            sleep(every)
    except KeyboardInterrupt:
        return 0


KIT_INSTRUCTIONS = """\
fedtune startup kit for hospital `{name}`, coordinator {address}

This folder holds what the coordinator gives you, and nothing secret:
  keys/ca.pem           the federation's CA certificate: it verifies the coordinator
  keys/coordinator.pub  the coordinator's public envelope key: only runs it signed are served
  hospital.toml         this hospital's daemon configuration, filled in for you

Compare these fingerprints with the coordinator by phone or in person before step 2:
  keys/ca.pem           SHA-256 {ca_fingerprint}
  keys/coordinator.pub  {coordinator_fingerprint}

1. Make this hospital's keys, in this folder (the private keys never leave this machine):
     fedtune pki hospital --name {name} --out keys
2. Send keys/{name}.node.pub and keys/{name}.pub to the coordinator. It admits them with
   `fedtune server add-hospital` and reads both fingerprints back to you: compare them with
   the ones step 1 printed.
3. Edit hospital.toml: [data] (your training and held-out record files), [model] (the
   model folder, device, precision) and [privacy] (require_dp, min_noise_multiplier,
   budget_epsilon). The rest is filled in.
4. Check the file and everything it names:
     fedtune client check --config hospital.toml
5. Start the daemon (as a service: deploy/systemd/fedtune-client.service):
     fedtune client start --config hospital.toml
"""


def kit_toml(name: str, address: str) -> str:
    """``fedtune.client.hospital.EXAMPLE`` for hospital ``name`` dialling ``address``, its key paths
    those ``fedtune pki hospital --name NAME --out keys`` writes."""
    import tomllib

    from fedtune.client.hospital import EXAMPLE

    text = EXAMPLE.replace("st-elsewhere", name).replace("coordinator.example.org:9092", address)
    data = tomllib.loads(text)
    want = {
        ("hospital", "name"): name,
        ("coordinator", "address"): address,
        ("coordinator", "ca"): "keys/ca.pem",
        ("coordinator", "envelope_key"): "keys/coordinator.pub",
        ("keys", "node_key"): str(pki.NodeKeyFiles.at(Path("keys"), name).key),
        ("keys", "envelope_key"): f"keys/{name}.key",
    }
    for (section, key), value in want.items():
        if data.get(section, {}).get(key) != value:  # EXAMPLE changed shape: a bug here, not the user's
            raise FedTuneError(f"the example hospital.toml no longer fills `{section}.{key}`; fix kit_toml")
    return text


def invite(home: CoordinatorHome, name: str, out: Path, *, address: str | None = None) -> list[Path]:
    """``fedtune server invite``: a hospital's startup kit in ``out`` (never a private key)."""
    from fedtune.client.hospital import HospitalSection
    from fedtune.security.keys import load_identity

    try:
        HospitalSection(name=name)
    except ConfigError as err:
        raise ConfigError(f"`--name`: {str(err).replace('`hospital.name`', 'the name')}") from None
    if address is None:
        info = home.server()
        if info is None:
            raise ConfigError(
                f"`--address` is needed: no SuperLink of {home.root} is running to take it from; give the "
                "HOST:PORT hospitals dial, e.g. `--address coord.example.org:9092`"
            )
        address = f"{info['address']}:{info['port']}"
    host, _ = parse_address(address, "--address")
    coordinator_pub = home.pki_dir / "coordinator.pub"
    for needed in (home.ca_cert, coordinator_pub):
        if not needed.is_file():
            raise ConfigError(
                f"{needed} is missing; create the PKI first: `fedtune pki ca --out {home.pki_dir}` and "
                f"`fedtune pki server --ca {home.pki_dir} --out {home.pki_dir} --address {host}`"
            )
    if home.tls.cert.is_file():  # a kit for an address the certificate does not name would fail TLS
        try:
            pki.check_server_cert(home.tls, home.ca_cert, address=host)
        except FedTuneError as err:
            raise ConfigError(f"`--address` {address!r}: {err}") from None
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"`--out` {out} already exists and is not empty; give a new folder for the kit")
    identity = load_identity(coordinator_pub)
    if identity.role != "coordinator":
        raise ConfigError(f"{coordinator_pub} is the key of {identity.role} {identity.name!r}, not the coordinator's")
    ca_cert = pki.load_cert(home.ca_cert, "CA certificate")
    (out / "keys").mkdir(parents=True, exist_ok=True)
    written = [out / "keys" / "ca.pem", out / "keys" / "coordinator.pub", out / "hospital.toml"]
    written[0].write_bytes(home.ca_cert.read_bytes())
    written[1].write_bytes(coordinator_pub.read_bytes())
    written[2].write_text(kit_toml(name, address))
    instructions = KIT_INSTRUCTIONS.format(
        name=name,
        address=address,
        ca_fingerprint=pki.fingerprint(ca_cert),
        coordinator_fingerprint=identity.fingerprint,
    )
    written.append(out / "INSTRUCTIONS.txt")
    written[-1].write_text(instructions)
    return written


def _coordinator_keys(home: CoordinatorHome) -> KeyPair:
    if not home.coordinator_key.exists():
        raise ConfigError(
            f"{home.coordinator_key} is missing: hospitals serve only runs signed with it; create it with "
            f"`fedtune pki server --ca {home.pki_dir} --out {home.pki_dir} --address ADDRESS`"
        )
    key = load_private(home.coordinator_key)  # checks mode and role
    if key.role != "coordinator":
        raise ConfigError(f"{home.coordinator_key} is a {key.role} key, not the coordinator's")
    return key


def install_run_keys(home: CoordinatorHome, folder: Any) -> None:
    """The run's coordinator key and its allow-list: the hospitals registered now.

    Refreshed on every launch and resume, so a hospital removed in between is refused.
    """
    import shutil

    from fedtune.atomic import atomic_write_bytes

    _coordinator_keys(home)  # checks mode and role before copying
    atomic_write_bytes(folder.coordinator_key, home.coordinator_key.read_bytes(), mode=0o600)
    shutil.rmtree(folder.allowlist_dir, ignore_errors=True)
    folder.allowlist_dir.mkdir(parents=True)
    for name in home.registry():
        atomic_write_bytes(folder.allowlist_dir / f"{name}.pub", (home.hospitals_dir / f"{name}.pub").read_bytes())


def prepare_deployment_run(home: CoordinatorHome, cfg: Any) -> Any:
    """A new run folder under ``home/runs`` for the registered hospitals."""
    from fedtune.atomic import atomic_write_bytes
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
    """``flwr run`` the run folder's federation on this SuperLink; stream round lines; summarise.

    Returns the summary table when every round ran. Otherwise raises, in one line, what
    ended it: the federation stopped early (:class:`~fedtune.errors.StoppedEarly`, exit 3,
    when the last trained round's adapter is exported; nothing trained, exit 2), failed
    (its error), or the coordinator's SuperLink stopped under it. Ctrl-C stops the run at
    the coordinator too, so that ``--resume`` never races a ServerApp still training.
    """
    from fedtune.experiments.report import round_printer
    from fedtune.launcher import start_run, stop_process, write_app

    info = home.server()
    if info is None:
        raise ConfigError(
            f"no SuperLink of {home.root} is running; start it with `fedtune server start --home {home.root}`"
        )
    cfg = folder.load_config()
    _refuse_if_running(home, folder)
    if cfg.security.seal:
        install_run_keys(home, folder)
    # replies then name the hospital, not a Flower node id (refreshed like the allow-list)
    atomic_write_json(folder.nodes_path, {str(e["node-id"]): name for name, e in home.registry().items()})
    write_app(folder, signer=_coordinator_keys(home))  # hospitals serve only runs the coordinator signed
    env = flower_env(home, ray=False)
    total = cfg.federation.rounds
    show_new_rounds = round_printer(folder, total, say)
    say(f"run folder: {folder.root}; {len(folder.sites())} registered hospitals, {total} rounds (log: logs/flower.log)")
    started = time.time()
    proc = start_run(folder, env, connection=CONNECTION)
    unanswered = 0
    try:
        while proc.poll() is None:
            show_new_rounds()
            # `flwr run` notices a SuperLink gone within a second or two; this is the backstop
            unanswered = 0 if superlink_answers(home, info) else unanswered + 1
            if unanswered >= 5:
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        stop_flower_run(home, folder)
        raise
    finally:
        stop_process(proc, grace=10)
    show_new_rounds()
    return _run_outcome(home, folder, cfg, info, started=started, say=say)


def _run_outcome(
    home: CoordinatorHome, folder: Any, cfg: Any, info: dict[str, Any], *, started: float, say: Any
) -> str:
    """What ``fedtune run`` says (or raises) once ``flwr run`` has ended."""
    from fedtune.experiments.report import write_summary
    from fedtune.experiments.simulate import ended_early, federation_done
    from fedtune.launcher import last_error
    from fedtune.live import read_status

    total = cfg.federation.rounds
    resume = f"`fedtune run --resume {folder.root} --home {home.root}`"
    if federation_done(folder, cfg):
        early = ended_early(folder, cfg)
        if early is not None and not folder.adapter_dir.is_dir():
            raise early  # nothing trained, nothing exported: nothing to summarise
        table = str(write_summary(folder))
        if early is not None:
            say(table)
            raise early
        say(f"exported the global adapter (PEFT) to {folder.adapter_dir}; plots in {folder.plots_dir}")
        return table
    live = read_status(folder.root) or {}
    fresh = float(live.get("updated", 0)) >= started  # written by this launch's ServerApp
    at = f"round {live.get('round')}/{total}" if fresh and live.get("round") else f"its first round of {total}"
    if fresh and live.get("phase") == "failed":
        raise FedTuneError(f"the federation failed in {at}: {live.get('reason', '')}; fix the cause and run {resume}")
    if not superlink_answers(home, info, tries=3):
        raise FedTuneError(
            f"the coordinator's SuperLink stopped during {at} (`fedtune server start --home {home.root}` ended); "
            f"completed rounds are kept: start the coordinator again and continue with {resume}"
        )
    raise FedTuneError(
        f"the federation stopped before round {total}: {last_error(folder)}; fix the cause and run {resume}"
    )


def flower_run_id(folder: Any) -> str:
    """The Flower run id of the run folder's latest launch: from its status.json, else its Flower log."""
    import re

    from fedtune.live import read_status

    live = read_status(folder.root) or {}
    if live.get("flower-run-id"):
        return str(live["flower-run-id"])
    log = folder.logs_dir / "flower.log"
    found = re.findall(r"Successfully started run (\d+)", log.read_text(errors="replace")) if log.is_file() else []
    return found[-1] if found else ""


def stop_flower_run(home: CoordinatorHome, folder: Any, *, wait: float = 10.0) -> bool:
    """``flwr stop`` the run folder's Flower run and wait for its ServerApp to end; whether it did.

    Best effort (the caller is already on its way out): a SuperLink that is gone has
    stopped the run anyway.
    """
    from fedtune.live import read_status

    run_id = flower_run_id(folder)
    if not run_id or home.server() is None:
        return False
    with contextlib.suppress(FedTuneError, subprocess.TimeoutExpired):
        flwr_cli(home, "stop", run_id, timeout=wait)
    pid = int((read_status(folder.root) or {}).get("pid", 0))
    deadline = time.monotonic() + wait
    while process.running(pid, "flwr") and time.monotonic() < deadline:
        time.sleep(0.1)
    return not process.running(pid, "flwr")


def _refuse_if_running(home: CoordinatorHome, folder: Any) -> None:
    """A second ServerApp on one run folder would train every round twice: refuse to start one."""
    from fedtune.live import ENDED, read_status

    live = read_status(folder.root) or {}
    pid = int(live.get("pid", 0))
    if live and live.get("phase") not in ENDED and process.running(pid, "flwr"):
        run_id = live.get("flower-run-id")
        raise ConfigError(
            f"run {folder.root.name} is still running at the coordinator (Flower run {run_id}, "
            f"round {live.get('round')}, ServerApp pid {pid}); watch it with `fedtune status --home {home.root} "
            f"--watch 5`, or stop it with `FLWR_HOME={home.flwr_home} flwr stop {run_id} {CONNECTION}`"
        )


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
