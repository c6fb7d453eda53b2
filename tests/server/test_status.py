"""What `fedtune status` says about runs (live, interrupted, stopped) and how `fedtune run` and
`fedtune simulate` end when a federation trained nothing or stopped early; no Flower process.

The live runs here are faked: a ``status.json`` written by the round loop's own writer
(:class:`fedtune.live.LiveStatus`) and a sleeping process named like a ServerApp.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedtune.atomic import atomic_write_json
from fedtune.checkpoint import Checkpoint, save_checkpoint
from fedtune.cli import main
from fedtune.cli.loopback import until
from fedtune.config import load_config
from fedtune.errors import FedTuneError, StoppedEarly
from fedtune.experiments.report import run_status
from fedtune.experiments.simulate import ended_early, federation_done
from fedtune.live import LiveStatus, read_status
from fedtune.runfolder import RunFolder
from fedtune.server.home import CoordinatorHome
from fedtune.server.status import status_data, watch_status

RUN = "e2e-20260101-000000"
NODES = {"st-elsewhere": 11, "northgate-general": 22}


@pytest.fixture()
def server_app() -> Iterator[subprocess.Popen[bytes]]:
    """A process that looks like a run's ServerApp (its command line names flwr-serverapp)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "flwr-serverapp"])
    yield proc
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()


def _home(tmp_path: Path) -> tuple[CoordinatorHome, RunFolder]:
    home = CoordinatorHome(tmp_path / "coordinator")
    registry = {name: {"node-id": node, "node-key": "SHA256:x", "envelope-key": "ab"} for name, node in NODES.items()}
    atomic_write_json(home.registry_path, registry)
    folder = RunFolder(home.runs_dir / RUN)
    folder.root.mkdir(parents=True)
    cfg = load_config(None, {"federation.rounds": 3, "model.source": "tiny", "data.hospitals": 2})
    folder.config_path.write_text(cfg.to_toml())
    return home, folder


def _checkpoint(folder: RunFolder, done: int, **extra: str) -> None:
    save_checkpoint(folder.root, Checkpoint(done, {"w": torch.zeros(1)}, {}), extra=extra)


def test_status_shows_a_live_round_and_each_hospital_in_it(
    tmp_path: Path, server_app: subprocess.Popen[bytes], capsys: pytest.CaptureFixture[str]
) -> None:
    home, folder = _home(tmp_path)
    _checkpoint(folder, 1)
    live = LiveStatus(folder.status_path, rounds=3, flower_run_id="4242", pid=server_app.pid)
    live.phase(2, "train")
    live.sampled("train", [11, 22, 33])
    live.answered("train", 11)
    capsys.readouterr()
    assert main(["status", "--home", str(home.root), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    (row,) = data["runs"]
    assert row["state"] == "running: round 2/3, train (1 answered, 2 sampled)" and row["flower run"] == "4242"
    shown = data["live"][RUN]
    assert (shown["flower-run-id"], shown["round"], shown["phase"]) == ("4242", 2, "train")
    assert [(h["hospital"], h["train"]) for h in shown["hospitals"]] == [
        ("st-elsewhere", "answered"),  # named from the coordinator's registry by node id
        ("northgate-general", "sampled"),
        ("node 33", "sampled"),  # a node the registry does not know
    ]

    live.outcome("train", 11, "accepted", hospital="st-elsewhere")
    live.outcome("train", 22, "refused", hospital="northgate-general", why="hospital-policy: requires DP-SGD")
    live.settle("train")  # 33 never answered
    live.phase(2, "evaluate")
    live.sampled("evaluate", [11])
    assert main(["status", "--home", str(home.root)]) == 0
    text = capsys.readouterr().out
    assert f"run {RUN} (Flower run 4242): round 2/3, evaluate for" in text
    assert "| northgate-general | refused | - | hospital-policy: requires DP-SGD |" in text
    assert "| node 33 | no reply | - | - |" in text and "| st-elsewhere | accepted | sampled | - |" in text

    server_app.send_signal(signal.SIGKILL)  # the coordinator died mid-round
    server_app.wait()
    status = run_status(folder.root)
    assert status["state"] == "interrupted in round 2/3 (evaluate); resume with `fedtune run --resume`"
    assert status_data(home)["live"] == {}


def test_status_says_how_runs_ended(tmp_path: Path) -> None:
    home, folder = _home(tmp_path)
    assert run_status(folder.root)["state"] == "not started"
    _checkpoint(folder, 0, stopped="round 1: 2 site(s) refused to train")
    LiveStatus(folder.status_path, rounds=3, flower_run_id="7").end("stopped", "round 1: 2 site(s) refused")
    row = run_status(folder.root)
    assert row["state"] == "stopped (nothing trained): round 1: 2 site(s) refused to train"
    assert (row["rounds"], row["flower run"]) == ("0/3", "7")
    failed = RunFolder(home.runs_dir / "other")
    failed.root.mkdir()
    failed.config_path.write_text(folder.config_path.read_text())
    live = LiveStatus(failed.status_path, rounds=3)
    live.phase(1, "train")
    live.end("failed", "round 1: only 1 valid update(s), the round needs 2")
    assert run_status(failed.root)["state"] == "failed in round 1/3: round 1: only 1 valid update(s), the round needs 2"
    assert read_status(failed.root)["reason"].startswith("round 1: only 1")  # type: ignore[index]
    with pytest.raises(ValueError, match="unknown phase"):
        live.phase(2, "dreaming")


def test_watch_refreshes_until_ctrl_c(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    home, _ = _home(tmp_path)
    frames: list[str] = []
    naps: list[float] = []

    def sleep(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 2:
            raise KeyboardInterrupt

    assert watch_status(home, every=3.0, out=frames.append, sleep=sleep) == 0
    assert len(frames) == 2 and naps == [3.0, 3.0]
    assert all(f.startswith("--- ") and "SuperLink of" in f and RUN in f for f in frames)
    assert main(["status", "--home", str(home.root), "--watch", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`--watch` must be a positive number of seconds, got 0" in err


def test_a_launch_refuses_a_live_serverapp_and_stops_a_dead_launchs_flower_run(
    tmp_path: Path, server_app: subprocess.Popen[bytes]
) -> None:
    from fedtune.server.runs import _take_over

    home, folder = _home(tmp_path)
    LiveStatus(folder.status_path, rounds=3, flower_run_id="4242", pid=server_app.pid).phase(2, "train")
    said: list[str] = []
    with pytest.raises(FedTuneError, match=r"still running at the coordinator \(Flower run 4242, round 2"):
        _take_over(home, folder, said.append)
    server_app.send_signal(signal.SIGKILL)  # the coordinator died mid-round
    server_app.wait()
    _take_over(home, folder, said.append)  # no SuperLink here: the stop is best effort, the launch goes on
    assert said == ["the previous launch of this run (Flower run 4242) died with the coordinator: stopping it first"]


def test_ctrl_c_stops_a_command_even_when_its_parent_left_sigint_ignored(tmp_path: Path) -> None:
    """A script's `cmd &` starts it with SIGINT ignored, and Python keeps it so: fedtune takes it back."""
    home, _ = _home(tmp_path)
    out = tmp_path / "watch.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fedtune", "status", "--home", str(home.root), "--watch", "0.2"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as bash does for `&`
        )
    try:
        until(lambda: out.read_text().count("--- ") >= 2 or proc.poll() is not None, "two frames", 60)
        assert proc.poll() is None, out.read_text()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=20) == 0, out.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_run_that_trained_nothing_or_stopped_early_says_so_and_exits_non_zero(tmp_path: Path) -> None:
    _, folder = _home(tmp_path)
    cfg = folder.load_config()
    assert not federation_done(folder, cfg) and ended_early(folder, cfg) is None
    _checkpoint(folder, 0, stopped="round 1: 2 site(s) refused to train")
    assert federation_done(folder, cfg)  # over, with nothing to export
    nothing = ended_early(folder, cfg)
    assert type(nothing) is FedTuneError and nothing.exit_code == 2
    assert str(nothing) == f"run {RUN} trained nothing, so nothing was exported: round 1: 2 site(s) refused to train"
    _checkpoint(folder, 2, stopped="round 3: budgets spent")
    assert not federation_done(folder, cfg)  # its round-2 adapter is not exported yet
    folder.adapter_dir.mkdir()
    early = ended_early(folder, cfg)
    assert isinstance(early, StoppedEarly) and early.exit_code == 3
    assert "stopped early, after round 2/3: round 3: budgets spent; the adapter of round 2 is exported" in str(early)


@pytest.mark.parametrize(("done", "code", "says"), [(0, 2, "trained nothing"), (1, 3, "stopped early, after round 1")])
@pytest.mark.flower
def test_simulate_exits_non_zero_when_the_federation_ended_early(  # type: ignore[no-untyped-def]
    tiny_cfg, tmp_path: Path, capsys: pytest.CaptureFixture[str], done: int, code: int, says: str
) -> None:
    from fedtune.experiments.simulate import prepare_run

    folder = prepare_run(tiny_cfg, run_dir=tmp_path / "run")
    _checkpoint(folder, done, stopped=f"round {done + 1}: 2 site(s) refused to train")
    if done:
        folder.adapter_dir.mkdir()
    capsys.readouterr()
    assert main(["simulate", "--resume", str(folder.root)]) == code
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and says in err and "refused to train" in err
    assert ("no round trained, no adapter" in out) == (not done)
    assert folder.adapter_dir.is_dir() == bool(done)
    assert os.path.isfile(folder.root / "summary.md")
