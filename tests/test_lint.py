"""Static checks as tests, so CI enforces them: ruff on everything, mypy on the packages."""

from __future__ import annotations

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


def test_mypy() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "fedtune", "server", "client"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout[-3000:]
