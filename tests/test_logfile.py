"""The coordinator's logs rotate by size: whole lines, a few backups, the oldest dropped."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.logfile import RotatingFile, pump
from fedtune.server.front import RefusalLog


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_log_rotates_by_size_keeping_whole_lines_and_three_backups(tmp_path: Path) -> None:
    log = RotatingFile(tmp_path / "superlink.log", max_bytes=100, backups=3)
    lines = [f"line {i:03d} {'x' * 20}\n" for i in range(40)]  # 30 bytes each: 3 lines a file
    for line in lines:
        log.write(line.encode())
    log.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["superlink.log", "superlink.log.1", "superlink.log.2", "superlink.log.3"]
    kept = [*_lines(tmp_path / "superlink.log.3"), *_lines(tmp_path / "superlink.log.2")]
    kept += [*_lines(tmp_path / "superlink.log.1"), *_lines(tmp_path / "superlink.log")]
    assert kept == [line.rstrip("\n") for line in lines[-len(kept) :]]  # the newest, in order, none split
    assert all(len(_lines(tmp_path / name)) == 3 for name in files[1:])
    assert all((tmp_path / name).stat().st_size <= 100 for name in files)


def test_a_child_process_output_is_pumped_into_the_rotating_log(tmp_path: Path) -> None:
    log = RotatingFile(tmp_path / "child.log", max_bytes=1000, backups=2)
    code = "import sys\nfor i in range(200): print(f'message {i:04d}', flush=True)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    thread = pump(proc.stdout, log)
    assert proc.wait(timeout=60) == 0
    thread.join(timeout=10)
    log.close()
    newest = [*_lines(tmp_path / "child.log.2"), *_lines(tmp_path / "child.log.1"), *_lines(tmp_path / "child.log")]
    assert newest[-1] == "message 0199" and newest == [f"message {i:04d}" for i in range(200 - len(newest), 200)]
    assert not (tmp_path / "child.log.3").exists()


def test_the_fronts_refusal_log_rotates_too(tmp_path: Path) -> None:
    refused = RefusalLog(tmp_path / "front.log", max_bytes=300)
    for i in range(20):
        refused("203.0.113.9", "POST", f"/v1/control/list-runs/{i}")
    refused.close()
    assert refused.count == 20
    assert (tmp_path / "front.log.1").exists() and "REFUSED 203.0.113.9" in (tmp_path / "front.log").read_text()


def test_a_rotating_log_needs_a_size_and_a_backup(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes > 0"):
        RotatingFile(tmp_path / "x.log", max_bytes=0)
