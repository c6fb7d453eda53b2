"""benchmarks/gpu_round.py: its CPU smoke run goes through every configuration's code and
writes the JSON the GPU run will; without CUDA the GPU run skips in one line; with CUDA
(``@pytest.mark.gpu``) it measures."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_round.py"
FIELDS = {"step_s", "tokens_per_s", "peak_allocated_mb", "peak_reserved_mb", "peak_rss_mb", "loss", "trainable"}


def _run(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path / "gpu_round.json"
    cmd = [sys.executable, str(SCRIPT), "--steps", "1", "--batch-size", "2", "--max-length", "64", "--out", str(out)]
    return subprocess.run([*cmd, *extra], capture_output=True, text=True, timeout=600), out


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gpu_round", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cpu_smoke_run_writes_every_configuration(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gpu_round.json"
    args = ["--device", "cpu", "--model", "tiny", "--scale", "micro", "--same-process", "--out", str(out)]
    assert _module().main([*args, "--steps", "1", "--batch-size", "2", "--max-length", "64"]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["device"] == "cpu" and report["meta"]["scale"] == "micro"
    results = report["results"]
    assert list(results) == ["bf16", "4bit", "qlora"]
    for name, row in results.items():
        assert set(row) == FIELDS, name
        assert row["step_s"] > 0 and row["tokens_per_s"] > 0 and math.isfinite(row["loss"]), name
        assert row["peak_allocated_mb"] is None and row["peak_reserved_mb"] is None and row["peak_rss_mb"] > 0
    # the same adapter (rank 8 on q/k/v/o) over float and NF4 bases; rank 16 on all seven linears
    assert results["bf16"]["trainable"] == results["4bit"]["trainable"] < results["qlora"]["trainable"]
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["bf16", "4bit", "qlora"] and "x bf16" in lines[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the skip without CUDA")
def test_without_cuda_the_gpu_run_skips_in_one_line(tmp_path: Path) -> None:
    done, out = _run(tmp_path)
    assert done.returncode == 0 and not out.exists()
    assert done.stdout.strip().count("\n") == 0 and "no CUDA device" in done.stdout


@pytest.mark.gpu
@pytest.mark.timeout(900)
def test_on_a_gpu_every_configuration_reports_its_peak_memory(tmp_path: Path) -> None:
    done, out = _run(tmp_path, "--device", "cuda")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    for row in results.values():
        assert row["peak_allocated_mb"] > 0 and row["peak_reserved_mb"] >= row["peak_allocated_mb"]
    assert results["4bit"]["peak_allocated_mb"] < results["bf16"]["peak_allocated_mb"]
