"""Secure aggregation under `flwr run`: Flower's SecAgg+ gives the coordinator the mean of
the deltas within the documented quantization error, and survives a hospital lost
mid-round."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from fedtune import flowerhome, launcher, process
from fedtune.checkpoint import load_checkpoint
from fedtune.config import replace
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.server.secagg import quantization_error_bound

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_secagg_matches_the_plain_merge_within_the_quantization_bound(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # `ffa` (linear, B only) here; the crash tests below run `fedavg` through SecAgg+
    base = replace(tiny_cfg, data={"hospitals": 3}, federation={"rounds": 1, "strategy": "ffa"})
    plain = prepare_run(base, run_dir=tmp_path / "plain")
    run_simulation(plain, say=lambda _: None)
    secure = prepare_run(replace(base, security={"secure_aggregation": True}), run_dir=tmp_path / "secure")
    run_simulation(secure, say=lambda _: None)

    start = load_checkpoint(plain.root, 0).state
    exact, masked = load_checkpoint(plain.root, 1).state, load_checkpoint(secure.root, 1).state
    bound = quantization_error_bound(base.security, [24, 24, 24])
    moved = _max_diff(exact, start)
    assert moved > 10 * bound  # the update is far larger than what quantization can change
    assert 0 < _max_diff(masked, exact) <= bound
    assert all(torch.equal(masked[k], start[k]) for k in start if ".lora_A." in k)  # A stays the shared A
    (record,) = round_records(secure)
    assert set(record["train"]) == {"st-elsewhere", "northgate-general", "riverside-community"}
    assert all("delta-norm" not in m for m in record["train"].values())  # no hospital's update was seen


def test_secagg_completes_when_a_hospital_crashes_mid_round(tiny_cfg, tmp_path: Path, client_app_module) -> None:  # type: ignore[no-untyped-def]
    two = prepare_run(tiny_cfg, run_dir=tmp_path / "two-plain")  # same rounds: the LR schedule spans them
    run_simulation(two, say=lambda _: None)

    cfg = replace(tiny_cfg, data={"hospitals": 3}, security={"secure_aggregation": True}, federation={"min_clients": 2})
    folder = prepare_run(cfg, run_dir=tmp_path / "secure")
    client_app_module("dropout_app")
    run_simulation(folder, say=lambda _: None)

    records = round_records(folder)
    assert [r["round"] for r in records] == [1, 2]  # the run went on after the loss
    assert set(records[0]["train"]) == {"st-elsewhere", "northgate-general"}
    assert "1 hospital(s) dropped out" in records[0]["rejected"][0]["reason"]
    assert len(records[1]["train"]) == 3  # the crashed hospital is back for round 2
    # round 1's mean is the two survivors' mean: the lost one's masks were removed from key shares
    bound = quantization_error_bound(cfg.security, [24, 24])
    assert _max_diff(load_checkpoint(folder.root, 1).state, load_checkpoint(two.root, 1).state) <= bound


def test_secagg_completes_when_a_hospital_is_killed_mid_round(tiny_cfg, tmp_path: Path, client_app_module) -> None:  # type: ignore[no-untyped-def]
    """Flower's deployment engine on loopback: a SuperLink, three SuperNodes, ``flwr run``;
    one hospital's SuperNode and ClientApp are SIGKILLed while it computes its masked update."""
    one_round = replace(tiny_cfg, federation={"rounds": 1})
    two = prepare_run(one_round, run_dir=tmp_path / "two-plain")
    run_simulation(two, say=lambda _: None)

    cfg = replace(
        one_round,
        data={"hospitals": 3},
        security={"secure_aggregation": True},
        federation={"min_clients": 2, "round_timeout": 30.0, "join_timeout": 120.0},
    )
    folder = prepare_run(cfg, run_dir=tmp_path / "deployed")
    client_app_module("dropout_app")
    (folder.root / "kill-victim").touch()
    env = flowerhome.flower_env(folder)
    launcher.write_app(folder)
    marker = folder.root / "victim-waiting"
    with launcher.local_superlink(folder, env, simulation=False) as port, contextlib.ExitStack() as stack:
        hospitals = [
            stack.enter_context(launcher.local_supernode(folder, env, port, partition_id=i, num_partitions=3))
            for i in range(3)
        ]
        run = launcher.start_run(folder, env)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists() and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.5)
            assert marker.exists(), "the victim never reached its masked update; see logs/"
            victim = hospitals[int(marker.read_text())]
            os.killpg(victim.pid, signal.SIGKILL)  # the SuperNode and its ClientApp, no goodbye
            victim.wait(timeout=30)
            run.wait(timeout=400)
        finally:
            process.stop(run, grace=10, nudge=2.0)
    assert flowerhome.kill_run_processes(folder) == 0
    assert run.returncode == 0, (folder.logs_dir / "flower.log").read_text()[-3000:]

    (record,) = round_records(folder)
    assert set(record["train"]) == {"st-elsewhere", "northgate-general"}
    assert "1 hospital(s) dropped out" in record["rejected"][0]["reason"]
    assert set(record["eval"]) >= {"st-elsewhere", "northgate-general", "pooled"}
    bound = quantization_error_bound(cfg.security, [24, 24])
    assert _max_diff(load_checkpoint(folder.root, 1).state, load_checkpoint(two.root, 1).state) <= bound
    assert (folder.adapter_dir / "adapter_model.safetensors").exists()
