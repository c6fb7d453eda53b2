"""The real thing, small: the ServerApp and ClientApp under `flwr run` against a local
SuperLink in simulation mode, with the tiny model; then a crash and a resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.checkpoint import latest_round, load_checkpoint
from fedtune.config import replace
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.flowerhome import run_processes
from fedtune.lora.adapter import read_exported
from fedtune.runfolder import RunFolder

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]


def test_two_clients_two_rounds_under_flwr_run(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    lines: list[str] = []
    folder = prepare_run(tiny_cfg, run_dir=tmp_path / "run")
    run_simulation(folder, say=lines.append)

    rounds = round_records(folder)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert set(r["train"]) == set(folder.sites()) and len(r["train"]) == 2
        assert r["rejected"] == []
        assert set(r["eval"]) == {*folder.sites(), "pooled"}
        assert r["eval"]["pooled"]["n"] == 8
    # the base model stays resident: one load per worker process, never one per round
    assert all(m["base-model-loads"] == 1 for m in rounds[-1]["train"].values())
    assert any(line.startswith("round 2/2") for line in lines)

    # the global adapter moved, and the export is exactly the last checkpoint
    first, last = load_checkpoint(folder.root, 0).state, load_checkpoint(folder.root, 2).state
    assert any(not torch.equal(first[k], last[k]) for k in first)
    exported, meta = read_exported(folder.adapter_dir)
    assert all(torch.equal(exported[k], last[k]) for k in last)
    assert len(meta["fedtune.base_sha256"]) == 64

    # plain peft loads it onto the base
    base = AutoModelForCausalLM.from_pretrained(Path(os.environ["FEDTUNE_CACHE"]) / "models" / "tiny-llama")
    PeftModel.from_pretrained(base, str(folder.adapter_dir))
    assert (folder.root / "summary.md").is_file() and (folder.plots_dir / "metric.png").is_file()
    assert run_processes(folder) == []  # every Flower process was stopped


def _wait_for_round(folder: RunFolder, k: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"simulate exited early with {proc.returncode}")
        latest = latest_round(folder.root)
        if latest is not None and latest[0] >= k:
            return
        time.sleep(0.2)
    raise AssertionError(f"round {k} never finished")


def test_killed_simulation_resumes_without_losing_or_repeating_rounds(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.cli.loopback import until
    from fedtune.flowerhome import ray_tmpdir

    # enough local steps that a tiny-model round takes seconds, so the crash lands mid-run
    cfg = replace(tiny_cfg, federation={"rounds": 3}, train={"local_steps": 100, "batch_size": 8})
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    link = ray_tmpdir(folder)
    assert link != folder.ray_dir  # a deep folder: Ray's sockets go through a short link in the temp dir
    cmd = [sys.executable, "-m", "fedtune", "simulate", "--resume", str(folder.root)]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_round(folder, 1, proc, timeout=300)
        assert link.is_symlink() and len(run_processes(folder)) > 3  # SuperLink, flwr run, ServerApp, Ray...
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # `fedtune simulate` alone dies hard, mid-run, as the OOM killer does
        proc.wait()
    # Flower starts its ServerApp and Ray detached; nothing of the run may go on without its coordinator
    until(lambda: run_processes(folder) == [], "every process of the run to die with fedtune simulate", 10)
    until(lambda: not link.is_symlink(), "the run's temp link to go", 10)
    crashed_at = latest_round(folder.root)
    assert crashed_at is not None and crashed_at[0] < 3

    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-2000:]
    if crashed_at[0] > 0:
        assert f"resuming after round {crashed_at[0]}/3" in done.stdout
    assert [r["round"] for r in round_records(folder)] == [1, 2, 3]
    assert latest_round(folder.root)[0] == 3  # type: ignore[index]
    assert folder.adapter_dir.is_dir()
    assert run_processes(folder) == [] and not link.is_symlink()  # Ray's agents too, and the link
