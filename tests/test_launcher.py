"""The launcher's bookkeeping: what a run's Flower log says went wrong."""

from __future__ import annotations

from pathlib import Path

from fedtune.launcher import last_error
from fedtune.runfolder import RunFolder


def test_last_error_reads_the_box_flwr_draws(tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    folder.logs_dir.mkdir()
    (folder.logs_dir / "flower.log").write_text(
        "INFO :      round 1/5  train loss 5.917\n"
        "╭─ Error ──────────────────────────────────────────╮\n"
        "│ Connection to the SuperLink is unavailable.      │\n"
        "│ Please check your network connection.            │\n"
        "╰──────────────────────────────────────────────────╯\n"
    )
    assert last_error(folder) == "Connection to the SuperLink is unavailable. Please check your network connection."
    (folder.logs_dir / "flower.log").write_text("fedtune.errors.FedTuneError: round 1: only 1 valid update(s)\n")
    assert last_error(folder) == "round 1: only 1 valid update(s)"
