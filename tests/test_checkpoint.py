"""Atomic writes, checkpoints, and the metrics log that resume relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedtune.atomic import atomic_directory, atomic_write_bytes
from fedtune.checkpoint import (
    Checkpoint,
    MetricsLog,
    checkpoint_path,
    latest_round,
    load_checkpoint,
    save_checkpoint,
)
from fedtune.errors import CheckpointError


def test_atomic_write_replaces_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    atomic_write_bytes(path, b"old")
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]  # no temp files left


def test_atomic_directory_keeps_old_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "adapter"
    with atomic_directory(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "a").write_text("2")
        raise RuntimeError("crash while writing")
    assert (target / "a").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_checkpoint_round_trip_and_latest(tmp_path: Path) -> None:
    assert latest_round(tmp_path) is None
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    save_checkpoint(tmp_path, Checkpoint(0, state, {"k": "v"}))
    save_checkpoint(tmp_path, Checkpoint(1, {"w": state["w"] + 1}, {"k": "v"}), extra={"x": 1})
    assert latest_round(tmp_path) == (1, {"x": 1})
    ckpt = load_checkpoint(tmp_path, 1)
    assert ckpt.meta == {"k": "v"} and torch.equal(ckpt.state["w"], state["w"] + 1)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, Checkpoint(1, {"w": torch.zeros(2)}, {}))
    checkpoint_path(tmp_path, 1).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path, 1)
    (tmp_path / "checkpoints" / "latest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="unreadable"):
        latest_round(tmp_path)


def test_metrics_log_truncates_unfinished_rounds_and_torn_lines(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for r in (1, 2, 3):
        log.append({"kind": "round", "round": r})
    with open(log.path, "a") as f:
        f.write('{"kind": "round", "rou')  # a crash mid-line
    assert [r["round"] for r in log.read()] == [1, 2, 3]
    log.keep_rounds_up_to(2)
    assert [json.loads(x)["round"] for x in log.path.read_text().splitlines()] == [1, 2]
