"""Run the fedtune apps on Flower's deployment engine locally: a SuperLink in simulation
mode plus ``flwr run``, with all Flower and Ray state inside the run folder.

The SuperLink listens on loopback only, never installs dependencies at run time,
has telemetry off, and is stopped (SIGINT, by process id) whatever happens. The
processes started here get SIGTERM when the fedtune process that started them dies
(:func:`fedtune.process.dies_with_us`); a simulation's whole process tree, Ray's
detached helpers included, is also watched (:func:`fedtune.process.guarded`), so a
SIGKILLed ``fedtune simulate`` leaves nothing running. A deep run folder's short link in
the system temp folder (Ray's socket paths) is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import tomli_w

from fedtune import process
from fedtune.config import SimulationSettings, TrackingSettings
from fedtune.errors import ConfigError
from fedtune.flowerhome import cleanup, flower_env, ray_tmpdir, remove_ray_link, run_markers
from fedtune.runfolder import RunFolder
from fedtune.security.keys import KeyPair

CONNECTION = "fedtune-local"


def console_script(name: str) -> str:
    """A console script of this environment (not whatever is first on PATH)."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


_LOWEST = 20000
_HANDED_OUT: set[int] = set()


def _ephemeral_start() -> int:
    """Where the kernel's ephemeral ports (port 0 binds, outgoing connections) begin."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port() -> int:
    """A loopback TCP port nothing listens on now, for a server fedtune starts next.

    Picked at random below the kernel's ephemeral range and never twice by this process: a
    port the kernel hands out for port 0 is also what it hands the next outgoing connection
    or port-0 bind of any process, so two federations started side by side (pytest-xdist's
    workers) took each other's ports in the moment before their servers bound them."""
    start = _ephemeral_start()
    rng = random.SystemRandom()
    for _ in range(100 if start - _LOWEST >= 1000 else 0):
        port = rng.randrange(_LOWEST, start)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # no room below the range: the kernel's pick
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_app(folder: RunFolder, *, signer: KeyPair | None = None) -> None:
    """The Flower App bundle: only a pyproject naming the installed fedtune apps.

    ``signer``: the coordinator's key; a deployment run carries its signature over the
    run's settings (``run-authorization``), without which no hospital serves it.
    """
    from fedtune.security import authorization

    folder.app_dir.mkdir(parents=True, exist_ok=True)
    # where the coordinator tracks its runs (an MLflow URI) is not the hospitals' business
    experiment = dataclasses.replace(folder.load_config(), tracking=TrackingSettings()).to_toml()
    config = {"run-dir": str(folder.root.resolve()), "experiment": experiment}
    if signer is not None:
        config[authorization.CONFIG_KEY] = authorization.sign_run(
            signer, run=folder.root.name, experiment=experiment, issued_ms=int(time.time() * 1000)
        )
    project = {
        "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
        "project": {
            "name": authorization.APP_NAME,
            "version": "1.0.0",
            "description": "A fedtune federation (apps installed with the fedtune package).",
            "license": "Apache-2.0",
            "dependencies": [],
        },
        "tool": {
            "flwr": {
                "app": {
                    "publisher": authorization.PUBLISHER,
                    "components": dict(authorization.COMPONENTS),
                    # the coordinator's run folder, and the run's settings for the hospitals
                    "config": config,
                }
            }
        },
    }
    (folder.app_dir / "pyproject.toml").write_text(tomli_w.dumps(project))


@contextlib.contextmanager
def local_superlink(folder: RunFolder, env: dict[str, str], *, simulation: bool = True) -> Iterator[int]:
    """Start a loopback SuperLink; yield its port; always stop it.

    ``simulation``: the simulation engine runs the hospitals; otherwise SuperNodes connect
    to the same port (Flower 1.41 serves its Fleet, Control and runtime APIs on one port)
    and the link keeps its state in ``state.db`` in the run folder.
    """
    port = free_port()
    folder.flwr_home.mkdir(parents=True, exist_ok=True)
    folder.logs_dir.mkdir(parents=True, exist_ok=True)
    connection = {"superlink": {"default": CONNECTION, CONNECTION: {"address": f"127.0.0.1:{port}", "insecure": True}}}
    (folder.flwr_home / "config.toml").write_text(tomli_w.dumps(connection))
    cmd = [
        console_script("flower-superlink"),
        *(["--simulation"] if simulation else ["--database", str(folder.root / "state.db")]),
        "--insecure",
        "--isolation",
        "subprocess",
        "--disable-runtime-dependency-installation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    with open(folder.logs_dir / "superlink.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder.root, preexec_fn=process.dies_with_us()
        )
    try:
        process.await_ready(
            proc,
            lambda: process.answers_http(f"http://127.0.0.1:{port}/health"),
            what="SuperLink",
            log=folder.logs_dir / "superlink.log",
        )
        yield port
    finally:
        process.stop(proc, nudge=2.0)


@contextlib.contextmanager
def local_supernode(
    folder: RunFolder, env: dict[str, str], superlink_port: int, *, partition_id: int, num_partitions: int
) -> Iterator[subprocess.Popen[bytes]]:
    """Start a loopback SuperNode for one simulated hospital; yield its process; always stop it.

    It runs in its own session, so that the whole hospital (the SuperNode and the ClientApp
    processes it starts) can be signalled as one process group.
    """
    port = free_port()
    log_path = folder.logs_dir / f"supernode-{partition_id}.log"
    cmd = [
        sys.executable,
        "-m",
        "fedtune.supernode",  # Flower's SuperNode, its polling paced for rounds
        "--insecure",
        "--superlink",
        f"127.0.0.1:{superlink_port}",
        "--node-config",
        f"partition-id={partition_id} num-partitions={num_partitions}",
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    folder.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=folder.root,
            start_new_session=True,
            preexec_fn=process.dies_with_us(),
        )
    try:
        process.await_ready(
            proc, lambda: process.answers_http(f"http://127.0.0.1:{port}/health"), what="SuperNode", log=log_path
        )
        yield proc
    finally:
        process.stop(proc, nudge=2.0)


def start_run(
    folder: RunFolder, env: dict[str, str], *, federation_config: str = "", connection: str = CONNECTION
) -> subprocess.Popen[bytes]:
    """``flwr run`` of the run folder's app bundle against a SuperLink (the local one by
    default), streaming its log to ``logs/flower.log``; the caller waits for it and stops it."""
    cmd = [console_script("flwr"), "run", str(folder.app_dir), connection, "--stream"]
    if federation_config:
        cmd += ["--federation-config", federation_config]
    folder.logs_dir.mkdir(parents=True, exist_ok=True)
    with open(folder.logs_dir / "flower.log", "ab") as log:
        return subprocess.Popen(
            cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder.root, preexec_fn=process.dies_with_us()
        )


def last_error(folder: RunFolder) -> str:
    """What went wrong, from the run's Flower log: the coordinator's own error (a fedtune
    error raised in the ServerApp) when there is one, else the text of the last error box
    `flwr` drew, else the last line that mentions an error."""
    log = folder.logs_dir / "flower.log"
    if not log.is_file():
        return "no Flower log was written"
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    for line in reversed(lines):
        if line.startswith("fedtune.errors.") and ": " in line:
            return line.split(": ", 1)[1][:400]
    box = _last_box(lines)
    if box:
        return box[:400]
    for line in reversed(lines):
        if "error" in line.lower():
            return line[-400:]
    return lines[-1][-400:] if lines else "the Flower log is empty"


def _last_box(lines: list[str]) -> str:
    """The text inside the last box `flwr` drew (rich's panel: a top border, lines in │ │, a bottom)."""
    end = next((i for i in range(len(lines) - 1, -1, -1) if lines[i].startswith("╰")), None)
    if end is None:
        return ""
    body: list[str] = []
    for line in reversed(lines[:end]):
        if not line.startswith("│"):
            break
        body.append(line.strip("│ "))
    return " ".join(reversed(body)).strip()


def client_resources(settings: SimulationSettings, *, cuda: bool, cpu_count: int) -> tuple[int, float]:
    """(CPUs, GPU share) of each simulated hospital; one-line errors for what cannot be scheduled
    here (on a Ray cluster its nodes decide, so only the local checks are skipped)."""
    cluster = bool(settings.ray_address)
    cpus = settings.client_cpus or (1 if cluster else cpu_count)
    if not cluster and cpus > cpu_count:
        raise ConfigError(
            f"`simulation.client_cpus` = {cpus} is more than this machine's {cpu_count} CPUs, so no hospital "
            "could be scheduled; lower it (0: all CPUs)"
        )
    if settings.client_gpus == 0:
        return cpus, 1.0 if cuda and not cluster else 0.0
    if not cuda and not cluster:
        raise ConfigError(
            f"`simulation.client_gpus` = {settings.client_gpus} shares a GPU, but torch sees no CUDA device here; "
            "set it to 0 (CPU) or run where CUDA is present"
        )
    return cpus, settings.client_gpus


def federation_config(*, num_supernodes: int, cpus_per_client: int, gpus_per_client: float) -> str:
    """``flwr run --federation-config``: Flower's simulation backend gets each ClientApp's
    resources from it (Ray runs as many hospitals at once as the CPUs and GPU shares allow)."""
    return (
        f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client} "
        f"client-resources-num-gpus={gpus_per_client}"
    )


def flwr_run(
    folder: RunFolder,
    *,
    num_supernodes: int,
    cpus_per_client: int,
    gpus_per_client: float,
    ray_address: str = "",
    on_poll: Callable[[], None] | None = None,
) -> None:
    """Launch the run with ``flwr run`` against a fresh local SuperLink and wait for it.

    Every process of the run (the SuperLink, ``flwr run``, the ServerApp and Ray, which
    Flower starts detached) is stopped when this returns or raises, and killed within
    seconds by a watcher (:func:`fedtune.process.guarded`) if this process dies.
    ``ray_address``: the hospitals run on that Ray cluster (Ray's ``RAY_ADDRESS``, which
    Flower's ``ray.init`` reads); the cluster itself is never stopped here. Without it a
    ``RAY_ADDRESS`` in the caller's environment is dropped: the run starts its own Ray.
    """
    cleanup(folder)  # orphans of a crashed attempt would race this one
    env = flower_env(folder)  # after the cleanup, which removes the temp link this makes
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    write_app(folder)
    federation = federation_config(
        num_supernodes=num_supernodes, cpus_per_client=cpus_per_client, gpus_per_client=gpus_per_client
    )
    with process.guarded(run_markers(folder), unlink=[ray_tmpdir(folder)]) as watcher:
        try:
            with local_superlink(folder, env):
                proc = start_run(folder, env, federation_config=federation)
                try:
                    while proc.poll() is None:
                        if on_poll is not None:
                            on_poll()
                        time.sleep(0.5)
                finally:
                    process.stop(proc, grace=10, nudge=2.0)
        finally:
            # Flower starts some helpers detached; stop them too, the watcher excepted
            process.kill(process.find(run_markers(folder), exclude=[watcher]), graceful=True)
            remove_ray_link(folder)
    if on_poll is not None:
        on_poll()
