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


def test_free_ports_are_below_the_ephemeral_range_bindable_and_never_repeated() -> None:
    import socket

    from fedtune.launcher import _ephemeral_start, free_port

    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50 and all(20000 <= p < _ephemeral_start() for p in ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))  # free indeed
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # the kernel's own picks are elsewhere
        s.bind(("127.0.0.1", 0))
        assert s.getsockname()[1] >= _ephemeral_start()
