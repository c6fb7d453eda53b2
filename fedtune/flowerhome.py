"""Where a Flower process keeps its state (a run folder, the coordinator's or a daemon's
home) and how its processes are known again: the environment every Flower process gets,
the Ray temp folder (a short link for a deep folder), the markers its processes carry, and
stopping whatever of them is left.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Protocol

from fedtune import process
from fedtune.process import Markers


class FlowerHome(Protocol):
    """Where a Flower process keeps its state: a run folder, or the coordinator's home."""

    @property
    def flwr_home(self) -> Path: ...

    @property
    def ray_dir(self) -> Path: ...


def flower_env(folder: FlowerHome, *, ray: bool = True) -> dict[str, str]:
    """Environment for Flower processes: state in the run folder, nothing fetched.

    ``ray``: Ray's temp dir in the folder (simulations); a deployment SuperLink runs no Ray.
    """
    env = dict(os.environ)
    if ray:
        env["RAY_TMPDIR"] = str(_ray_tmpdir(folder))
    env.update(
        {
            "FLWR_HOME": str(folder.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
            # how often a SuperLink's SuperExec looks for a ServerApp to start (Flower's default: 1 s)
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
            # Flower starts its helpers (flower-superexec, flwr-simulation) by name.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        }
    )
    return env


def ray_tmpdir(folder: FlowerHome) -> Path:
    """Where Ray keeps its sockets for ``folder``: its ray folder, or a short link to it.

    Ray puts Unix sockets under RAY_TMPDIR and those paths must stay under ~107 bytes;
    a deep folder gets a short symlink in the system temp dir pointing into it
    (made by :func:`flower_env`, removed by :func:`remove_ray_link`).
    """
    if len(str(folder.ray_dir)) <= 40:
        return folder.ray_dir
    digest = hashlib.sha256(str(folder.ray_dir.resolve()).encode()).hexdigest()[:10]
    return Path(tempfile.gettempdir()) / f"ftray-{digest}"


def _ray_tmpdir(folder: FlowerHome) -> Path:
    folder.ray_dir.mkdir(parents=True, exist_ok=True)
    link = ray_tmpdir(folder)
    if link == folder.ray_dir:
        return link
    if link.is_symlink() and Path(os.readlink(link)) != folder.ray_dir.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(folder.ray_dir.resolve(), target_is_directory=True)
    return link


def remove_ray_link(folder: FlowerHome) -> None:
    """Remove the short temp-dir link of a deep folder (nothing for a short one)."""
    link = ray_tmpdir(folder)
    if link != folder.ray_dir and link.is_symlink():
        with contextlib.suppress(OSError):
            link.unlink()


def run_markers(folder: FlowerHome) -> Markers:
    """What every process of this folder carries: its FLWR_HOME or RAY_TMPDIR, or (Ray's
    agents, started with neither) the Ray temp dir in its command line."""
    tmp = ray_tmpdir(folder)
    paths = {f"{tmp}/", f"{folder.ray_dir}/"}
    with contextlib.suppress(OSError):
        paths.add(f"{folder.ray_dir.resolve()}/")
    return Markers(environ=(f"FLWR_HOME={folder.flwr_home}", f"RAY_TMPDIR={tmp}"), cmdline=tuple(sorted(paths)))


def run_processes(folder: FlowerHome) -> list[int]:
    """Process ids started for this folder (a run folder, the coordinator's or a daemon's home), on Linux."""
    return process.find(run_markers(folder))


def kill_run_processes(folder: FlowerHome, *, graceful: bool = True, timeout: float = 10.0) -> int:
    """Stop every process of this folder still alive; return how many would not die.

    ``graceful``: SIGINT first and SIGKILL after ``timeout`` (Flower helpers started
    detached, at the end of a run). Otherwise SIGKILL at once: orphans of a crashed run
    must not finish another round into the folder while they are asked nicely.
    """
    pids = run_processes(folder)
    if not graceful:
        process.sweep(run_markers(folder))
        return len(run_processes(folder))
    return process.kill(pids, graceful=True, timeout=timeout)


def cleanup(folder: FlowerHome) -> None:
    """Kill whatever of the folder's processes is left (a crashed run's) and remove its temp link."""
    kill_run_processes(folder, graceful=False)
    remove_ray_link(folder)
