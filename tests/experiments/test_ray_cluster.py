"""A simulation on a running Ray cluster (``fedtune simulate --ray-address``): a two-node
cluster started on loopback for this test only, stopped by its own process ids (never a
global ``ray stop``, which would hit any other Ray on the machine)."""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune import process
from fedtune.launcher import free_port


def _ports() -> list[str]:
    """Every port a node opens, free ones: two nodes share this machine (and maybe others' Ray)."""
    out = []
    for flag in (
        "--node-manager-port",
        "--object-manager-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--metrics-export-port",
        "--runtime-env-agent-port",
    ):
        out += [flag, str(free_port())]
    return out


@pytest.fixture()
def ray_cluster(tmp_path: Path) -> Iterator[tuple[str, Path, process.Markers]]:
    """(HOST:PORT, session logs, what its processes carry) of a head and a worker node, 1 CPU
    each, state under tmp_path."""
    state = tmp_path / "ray"
    state.mkdir()
    # Ray's socket paths must stay under ~107 bytes: a short link in the temp folder to tmp_path
    link = Path(tempfile.gettempdir()) / f"ftrc-{hashlib.sha256(str(state).encode()).hexdigest()[:8]}"
    link.symlink_to(state, target_is_directory=True)
    env = {**os.environ, "FEDTUNE_TEST_RAY": str(state), "RAY_USAGE_STATS_ENABLED": "0"}
    markers = process.Markers(environ=(f"FEDTUNE_TEST_RAY={state}",), cmdline=(f"{link}/", f"{state}/"))
    ray = str(Path(sys.executable).parent / "ray")
    node = ["--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"]
    port = free_port()
    head = [ray, "start", "--head", "--port", str(port), "--temp-dir", str(link), "--include-dashboard=false"]
    head += ["--ray-client-server-port", str(free_port())]
    try:
        for cmd in (head, [ray, "start", "--address", f"127.0.0.1:{port}"]):
            done = subprocess.run([*cmd, *node, *_ports()], env=env, capture_output=True, text=True, timeout=180)
            assert done.returncode == 0, f"{cmd[1:3]} failed: {done.stdout[-800:]} {done.stderr[-800:]}"
        yield f"127.0.0.1:{port}", link / "session_latest" / "logs", markers
    finally:
        # SIGTERM, as `ray stop` sends; the GCS and raylets drain for seconds, so SIGKILL after 3
        left = process.kill(process.find(markers), graceful=True, timeout=3, first=signal.SIGTERM)
        link.unlink()
        assert left == 0 and process.find(markers) == []


def _nodes_of_client_workers(logs: Path) -> set[str]:
    """The Ray node ids of the worker processes that ran Flower's ClientApp actors."""
    pids = {
        m.group(1)
        for f in logs.glob("worker-*.out")
        if "ClientAppActor" in f.read_text(errors="replace")
        for m in [re.search(r"-(\d+)\.out$", f.name)]
        if m
    }
    nodes = set()
    for pid in pids:
        for log in logs.glob(f"python-core-worker-*_{pid}.log"):
            nodes.update(re.findall(r"node_id=([0-9a-f]+)", log.read_text(errors="replace")))
    return nodes


@pytest.mark.flower
def test_a_simulation_runs_on_a_two_node_ray_cluster(
    ray_cluster: tuple[str, Path, process.Markers], tmp_path: Path
) -> None:
    address, logs, markers = ray_cluster
    run = tmp_path / "run"
    settings = {
        "model.threads": 1,
        "model.precision": '"fp32"',
        "data.train_per_hospital": 8,
        "data.eval_per_hospital": 2,
        "train.max_length": 128,
        "eval.max_new_tokens": 2,
        "simulation.client_cpus": 1,
        "federation.round_timeout": 240.0,
    }
    cmd = [sys.executable, "-m", "fedtune", "simulate", "--model", "tiny", "--hospitals", "2", "--rounds", "1"]
    cmd += ["--local-steps", "1", "--batch-size", "4", "--no-baselines", "--ray-address", address, "--out", str(run)]
    cmd += [x for k, v in settings.items() for x in ("--set", f"{k}={v}")]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=420)
    assert done.returncode == 0, done.stdout[-1500:] + done.stderr[-1500:]
    assert f"on the Ray cluster at {address}" in done.stdout
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "ray").exists() or not any((run / "ray").iterdir())  # no private Ray was started
    # both hospitals' actors ran on the cluster, one on each node (1 CPU per node, 1 per hospital)
    assert len(_nodes_of_client_workers(logs)) == 2
    # and the run left the cluster running: both nodes' raylets are alive
    raylets = [p for p in process.find(markers) if b"raylet/raylet" in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert len(raylets) == 2
