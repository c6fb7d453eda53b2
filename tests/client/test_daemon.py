"""The daemon's structured log, and its start: a second daemon of a hospital stops at once,
a SuperNode an earlier daemon left is cleared."""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import pytest

from fedtune.client.daemon_log import StructuredLog


def test_the_log_rotates_by_size_and_keeps_its_backups(tmp_path: Path) -> None:
    path = tmp_path / "state" / "client.log.jsonl"
    echo = io.StringIO()
    log = StructuredLog(path, "st-elsewhere", echo, max_bytes=600, backups=2)
    for i in range(40):
        log.event("DEBUG" if i % 2 else "INFO", f"line {i:02d} " + "x" * 40)
    log.close()
    files = sorted(p.name for p in path.parent.iterdir())
    assert files == ["client.log.jsonl", "client.log.jsonl.1", "client.log.jsonl.2"]
    assert all(p.stat().st_size <= 600 and p.stat().st_mode & 0o777 == 0o600 for p in path.parent.iterdir())
    assert json.loads(path.read_text().splitlines()[-1])["message"].startswith("line 39")
    newest_backup = [
        json.loads(x)["message"][:7] for x in (path.parent / "client.log.jsonl.1").read_text().splitlines()
    ]
    oldest_kept = json.loads(path.read_text().splitlines()[0])["message"][:7]
    assert int(newest_backup[-1][5:]) + 1 == int(oldest_kept[5:])  # nothing lost between files
    shown = echo.getvalue()
    assert "line 38" in shown and "line 39" not in shown  # DEBUG records stay out of the console


def test_the_supernode_lines_go_through_the_watch_into_the_log(tmp_path: Path) -> None:
    import sys

    from fedtune.client.causes import Identity
    from fedtune.client.daemon_supernode import SuperNode
    from fedtune.client.health import Memory, Watch
    from fedtune.client.health_routes import Link

    who = Identity("st-elsewhere", "coord.example.org:9092", "keys/ca.pem", "keys/st-elsewhere.node.key", "SHA256:a")
    watch = Watch(who, Link(who), Memory(tmp_path / "connection.json"))
    log = StructuredLog(tmp_path / "client.log.jsonl", "st-elsewhere", None)
    script = "print('INFO : SuperNode ID: 42'); print('INFO : Received successfully'); raise SystemExit(3)"
    woken: list[int] = []
    supernode = SuperNode(
        [sys.executable, "-c", script],
        env=dict(os.environ),
        cwd=tmp_path,
        hospital="st-elsewhere",
        log=log,
        watch=watch,
        wake=lambda: woken.append(1),
    )
    watch.begin()
    assert supernode.run() == 3  # its exit code, for the watch to decide on
    log.close()
    assert watch.link.state == "connected" and watch.node_id == 42 and woken == [1]  # the app is woken at once
    records = [json.loads(line) for line in (tmp_path / "client.log.jsonl").read_text().splitlines()]
    assert [(r["source"], r["message"]) for r in records] == [
        ("supernode", "SuperNode ID: 42"),
        ("fedtune", "connected to the coordinator at coord.example.org:9092 as node 42"),
        ("supernode", "Received successfully"),
    ]


@pytest.mark.flower
def test_a_second_daemon_stops_at_once_and_a_start_clears_a_stale_supernode(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import socket
    import subprocess
    import sys

    from fedtune.cli import main
    from fedtune.cli.loopback import Loopback
    from fedtune.client.daemon import _clear_stale, _DaemonHome
    from fedtune.client.hospital import load_hospital_config
    from fedtune.flowerhome import run_processes

    fed = Loopback(tmp_path)
    fed.pki()
    config = fed.add_hospital("st-elsewhere", 0)
    cfg = load_hospital_config(config)
    host, _, port = cfg.daemon.health.rpartition(":")
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        capsys.readouterr()
        assert main(["client", "start", "--config", str(config), "--max-retries", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`daemon.health` 127.0.0.1:" in err and "already running?" in err
    assert not cfg.log_path.exists()  # stopped before it started anything

    # a SuperNode an earlier daemon left (its Flower home is this hospital's): stopped, and said so
    home = _DaemonHome(cfg.state_dir)
    env = {**os.environ, "FLWR_HOME": str(home.flwr_home)}
    stale = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], env=env)
    try:
        deadline = time.monotonic() + 30
        while stale.pid not in run_processes(home):  # type: ignore[arg-type]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        log = StructuredLog(cfg.log_path, cfg.name, None)
        _clear_stale(cfg, log)
        log.close()
        assert stale.wait(timeout=30) != 0
        (said,) = [json.loads(line) for line in cfg.log_path.read_text().splitlines()]
        assert said["level"] == "WARNING" and said["message"] == (
            f"stopped 1 process(es) left by an earlier daemon of this hospital (pid {stale.pid})"
        )
    finally:
        if stale.poll() is None:
            stale.kill()
            stale.wait()
