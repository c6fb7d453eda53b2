"""Static checks as tests, so CI enforces them: ruff on everything, mypy on the packages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_ruff() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "fedtune", "server", "client", "tests", "benchmarks", "simulations"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:]


def installed_layout(tmp: Path) -> Path:
    """The package as it installs (``server/`` is ``fedtune.server``, ``client/`` ``fedtune.client``),
    built of symbolic links, so that mypy resolves every fedtune import and reports a missing one."""
    package = tmp / "fedtune"
    package.mkdir()
    for entry in (ROOT / "fedtune").iterdir():
        if entry.name != "__pycache__":
            (package / entry.name).symlink_to(entry)
    for role in ("server", "client"):
        (package / role).symlink_to(ROOT / role)
    return tmp


def test_mypy(tmp_path: Path) -> None:
    root = installed_layout(tmp_path)
    env = {**os.environ, "MYPYPATH": str(root)}
    config, cache = str(ROOT / "pyproject.toml"), str(tmp_path / ".mypy_cache")
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", config, "--cache-dir", cache, "-p", "fedtune"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout[-3000:]
    assert "Success: no issues found" in out.stdout
