"""deploy/compose: Docker Compose's own `config` accepts the demo (and refuses a broken copy), the
services are hardened, and the set-up and admission scripts run for real."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.client.hospital import load_hospital_config
from fedtune.config import load_config
from tests.deploy.common import (
    DEPLOY,
    HOME,
    HOSPITALS,
    IMAGES,
    _compose_bin,
    _under,
)

# --------------------------------------------------------------------------- compose


def _compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COMPOSE_PROFILES="run")
    return subprocess.run(
        [_compose_bin(), "-f", str(path), "config", "--format", "json"], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    out = _compose_config(DEPLOY / "compose" / "compose.yaml")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_docker_compose_accepts_the_demo_and_refuses_a_broken_copy(compose: dict[str, Any], tmp_path: Path) -> None:
    assert set(compose["services"]) == set(HOSPITALS) | {"setup", "coordinator", "admit", "run"}
    spec = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    spec["services"]["admit"]["network_mode"] = "service:nowhere"
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(spec))
    out = _compose_config(broken)
    assert out.returncode != 0 and "nowhere" in out.stderr, out.stderr


def _mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in service.get("volumes", []) if v["type"] == "volume"]


def _writable(service: dict[str, Any], path: str) -> bool:
    tmpfs = [t.split(":")[0] for t in service.get("tmpfs", [])]
    return any(_under(path, m["target"]) and not m.get("read_only") for m in _mounts(service)) or any(
        _under(path, t) for t in tmpfs
    )


def _hardened(service: dict[str, Any]) -> None:
    assert service.get("user", "") in ("", None) or service["user"].split(":")[0] not in ("0", "root")
    assert IMAGES[service["image"]]["user"].split(":")[0] not in ("", "0", "root")
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]


def test_compose_hospitals_are_isolated_non_root_and_have_a_writable_cache(compose: dict[str, Any]) -> None:
    services = compose["services"]
    owners: Counter[str] = Counter()
    for name, s in services.items():
        for m in _mounts(s):
            owners[m["source"]] += name != "setup"
    for h in HOSPITALS:
        s = services[h]
        assert s["image"] == "fedtune-client"
        _hardened(s)
        (mount,) = _mounts(s)  # its own volume and nothing else: no other hospital's keys or data
        assert mount["source"] == h and mount["target"] == HOME and not mount.get("read_only")
        assert owners[mount["source"]] == 1, f"{h}'s volume is mounted by another service"
        env = dict(IMAGES["fedtune-client"]["env"], **(s.get("environment") or {}))
        assert _writable(s, env["FEDTUNE_CACHE"]), "the model cache must be writable (GGUF conversion)"
        assert s["command"] == ["--config", f"{HOME}/hospital.toml"]
        assert s["depends_on"]["admit"]["condition"] == "service_completed_successfully"
    assert len({_mounts(services[h])[0]["source"] for h in HOSPITALS}) == len(HOSPITALS)


def test_compose_admission_and_run_share_the_coordinator_namespaces(compose: dict[str, Any]) -> None:
    services = compose["services"]
    coordinator = services["coordinator"]
    _hardened(coordinator)
    (home,) = _mounts(coordinator)
    assert home["target"] == HOME and _writable(coordinator, IMAGES["fedtune-coordinator"]["env"]["FEDTUNE_CACHE"])
    args = coordinator["command"]
    address, port = args[args.index("--address") + 1], args[args.index("--port") + 1]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert f"https://{address}:{port}/health" in " ".join(coordinator["healthcheck"]["test"])
    for name in ("admit", "run"):
        s = services[name]
        _hardened(s)
        # the Control API answers on the coordinator's loopback only
        assert s["network_mode"] == "service:coordinator" and s["pid"] == "service:coordinator"
        assert {"source": home["source"], "target": HOME} in [
            {k: m[k] for k in ("source", "target")} for m in _mounts(s)
        ]
    assert services["admit"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert services["run"]["entrypoint"][:2] == ["fedtune", "run"]
    assert services["run"]["entrypoint"][-2:] == ["--home", HOME]
    assert services["run"]["profiles"] == ["run"]


def _shim(folder: Path, name: str, log: Path) -> None:
    """A stand-in command that records its arguments, one line per call."""
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    (folder / name).chmod(0o755)


def test_compose_setup_and_admission_scripts_run(compose: dict[str, Any], tmp_path: Path) -> None:
    setup = compose["services"]["setup"]
    mounts = {m["target"]: m["source"] for m in _mounts(setup)}
    assert {mounts[f"/hospitals/{h}"] for h in HOSPITALS} == set(HOSPITALS)
    owners = setup["environment"]
    assert (
        owners["COORDINATOR_OWNER"] == f"{IMAGES['fedtune-coordinator']['uid']}:{IMAGES['fedtune-coordinator']['uid']}"
    )
    assert owners["HOSPITAL_OWNER"] == f"{IMAGES['fedtune-client']['uid']}:{IMAGES['fedtune-client']['uid']}"
    shims, chowns = tmp_path / "shims", tmp_path / "chown.log"
    _shim(shims, "chown", chowns)  # records what would be handed to whom (needs root for real)
    env = dict(
        os.environ,
        COORD=str(tmp_path / "coordinator"),
        HOSPITALS=str(tmp_path / "hospitals"),
        INCOMING=str(tmp_path / "incoming"),
        WORK=str(tmp_path / "work"),
        PATH=os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **owners,
    )
    script = DEPLOY / "compose" / "setup.sh"
    out = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    health = re.search(r"http://([^/]+)/health", IMAGES["fedtune-client"]["healthcheck"])
    for h in HOSPITALS:
        cfg = load_hospital_config(tmp_path / "hospitals" / h / "hospital.toml")  # checks every key and file
        assert cfg.name == h and cfg.coordinator.address == "coordinator:9092"
        assert health and cfg.daemon.health == health.group(1) and cfg.model.path == "smollm2"
    assert sorted(chowns.read_text().splitlines()) == sorted(
        [f"-R {owners['COORDINATOR_OWNER']} {tmp_path / 'coordinator'}"]
        + [f"-R {owners['HOSPITAL_OWNER']} {tmp_path / 'hospitals' / h}" for h in HOSPITALS]
    )
    # the CA key is in no volume; the coordinator gets only what `fedtune server start` needs
    assert not list(tmp_path.rglob("ca.key"))  # not even in the scratch folder it was made in
    assert {p.name for p in (tmp_path / "coordinator" / "pki").iterdir()} == {
        "ca.pem",
        "server.pem",
        "server.key",
        "coordinator.key",
        "coordinator.pub",
    }
    incoming = sorted(p.name for p in (tmp_path / "incoming").iterdir())
    assert incoming == sorted([f"{h}.node.pub" for h in HOSPITALS] + [f"{h}.pub" for h in HOSPITALS])
    again = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already set up" in again.stdout  # idempotent: keys are never replaced

    # admission, with `fedtune` recorded: each hospital's two public keys, from `incoming`
    calls = tmp_path / "fedtune.log"
    _shim(shims, "fedtune", calls)
    admit_env = dict(env, HOME_DIR=str(tmp_path / "coordinator"))
    out = subprocess.run(["sh", str(DEPLOY / "compose" / "admit.sh")], env=admit_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for line, h in zip(calls.read_text().splitlines(), HOSPITALS, strict=True):
        args = shlex.split(line)
        assert args[:2] == ["server", "add-hospital"] and args[args.index("--name") + 1] == h
        for flag in ("--node-key", "--envelope-key"):
            assert Path(args[args.index(flag) + 1]).parent == tmp_path / "incoming"
            assert Path(args[args.index(flag) + 1]).exists()
    for script_name in ("setup.sh", "admit.sh"):
        assert subprocess.run(["sh", "-n", str(DEPLOY / "compose" / script_name)]).returncode == 0


def test_run_configs_validate_and_meet_the_hospitals_policy() -> None:
    compose_run = load_config(DEPLOY / "compose" / "run.toml")
    assert compose_run.federation.min_clients <= len(HOSPITALS)
    k8s_run = load_config(DEPLOY / "k8s" / "run.toml")
    hospital = load_hospital_config(DEPLOY / "k8s" / "hospital.toml", check_files=False)
    if hospital.privacy.require_dp:  # else every round is refused and nothing trains
        assert k8s_run.dp.enabled and k8s_run.dp.noise_multiplier >= hospital.privacy.min_noise_multiplier
    assert k8s_run.federation.min_clients == 1  # the manifests define one hospital
