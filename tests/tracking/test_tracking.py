"""Tracking without Flower: the run's poll loop stands in for `flwr run` (rounds appended to
metrics.jsonl as the coordinator writes them), so the tracking paths run as in a real run."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path
from typing import Any

import pytest

from fedtune.atomic import atomic_write_json
from fedtune.checkpoint import MetricsLog
from fedtune.cli import main
from fedtune.config import load_config, replace
from fedtune.errors import ConfigError
from fedtune.experiments import simulate, sweep
from fedtune.runfolder import RunFolder


def fake_flwr_run(folder: RunFolder, *, on_poll: Any = None, **_: Any) -> None:
    """Each round's metrics line and checkpoint pointer, then the exported adapter; no training."""
    cfg = folder.load_config()
    log = MetricsLog(folder.metrics_path)
    for n in range(1, cfg.federation.rounds + 1):
        train = {s: {"train-loss": 2.0 / n + i, "upload-bytes": 1000 + i} for i, s in enumerate(folder.sites())}
        if cfg.dp.enabled:
            for i, m in enumerate(train.values()):
                m["dp-epsilon"] = 0.5 * n + i
        ev = {s: {"metric": 0.1 * n, "exact": 0.0, "loss": 2.0, "n": 4} for s in [*folder.sites(), "pooled"]}
        record = {"kind": "round", "round": n, "train": train, "eval": ev, "rejected": [], "refused": []}
        log.append({**record, "download-bytes": 4000, "seconds": 1.5, "train-seconds": 1.0})
        atomic_write_json(folder.root / "checkpoints" / "latest.json", {"server_round": n})
        if on_poll is not None:
            on_poll()
    folder.adapter_dir.mkdir()
    (folder.adapter_dir / "adapter_config.json").write_text("{}")


@pytest.fixture()
def no_flower(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.experiments import baselines

    monkeypatch.setattr(simulate, "flwr_run", fake_flwr_run)
    monkeypatch.setattr(simulate, "cleanup", lambda folder: None)

    def base_only(folder: RunFolder, *, say: Any = print, only: Any = None) -> None:
        folder.baselines_path.write_text(json.dumps({"base": {"pooled": {"metric": 0.05, "exact": 0.0, "loss": 3.0}}}))

    monkeypatch.setattr(baselines, "run_baselines", base_only)


def test_a_sweep_is_a_parent_run_with_its_sub_runs_as_children(tiny_cfg, tmp_path: Path, no_flower: None) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    uri = (tmp_path / "mlruns").as_uri()  # a file:// store
    cfg = replace(tiny_cfg, tracking={"uri": uri}, run={"name": "sw"})
    root = sweep.prepare_sweep(cfg, [1.0], root=tmp_path / "sweep")
    lines: list[str] = []
    sweep.run_sweep(root, say=lines.append)

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([client.get_experiment_by_name("sw").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.run_name == "sweep" and set(children) == {"no-dp", "eps-1"} and len(runs) == 3
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"privacy_utility.md", "privacy_utility.png"}
    private = children["eps-1"]
    assert private.data.params["dp.target_epsilon"] == "1.0" and children["no-dp"].data.params["dp.enabled"] == "False"
    first = f"train.{RunFolder(root / 'eps-1').sites()[0]}.dp-epsilon"
    epsilon = [(m.step, m.value) for m in client.get_metric_history(private.info.run_id, first)]
    assert sorted(epsilon) == [(1, 0.5), (2, 1.0)]
    assert all(r.info.status == "FINISHED" for r in runs)
    assert not [line for line in lines if "WARNING" in line]

    # a resumed sweep logs into the same runs, and adds no round twice
    sweep.run_sweep(root, say=lines.append)
    assert len(client.search_runs([parent.info.experiment_id])) == 3
    assert len(client.get_metric_history(private.info.run_id, first)) == 2


def test_an_unreachable_tracking_server_is_one_warning_and_the_run_finishes(
    tiny_cfg, tmp_path: Path, no_flower: None
) -> None:  # type: ignore[no-untyped-def]
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    folder = simulate.prepare_run(replace(tiny_cfg, tracking={"uri": uri}), run_dir=tmp_path / "run")
    lines: list[str] = []
    table = simulate.run_simulation(folder, say=lines.append)
    assert table.startswith("| model") and (folder.root / "summary.md").is_file()
    (warning,) = [line for line in lines if "WARNING" in line]
    assert warning.startswith(f"WARNING: MLflow tracking at {uri} failed (") and "goes on without tracking" in warning
    assert any(line.startswith("round 2/2") for line in lines)


def test_tracking_without_mlflow_installed_fails_before_the_run_starts(
    tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if the extra were not installed
    cfg = replace(tiny_cfg, tracking={"uri": "sqlite:///mlflow.db"})
    with pytest.raises(ConfigError, match=r"needs MLflow, which is not installed: pip install 'fedtune\[tracking\]'"):
        simulate.prepare_run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
    path = tmp_path / "tracked.toml"
    path.write_text('[model]\nsource = "tiny"\n[tracking]\nuri = "sqlite:///mlflow.db"\n')
    assert main(["simulate", str(path), "--out", str(tmp_path / "cli")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pip install 'fedtune[tracking]'" in line and not (tmp_path / "cli").exists()


def test_tracking_section_is_checked_and_kept_from_the_hospitals(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedtune.launcher import write_app

    with pytest.raises(ConfigError, match=r"`tracking.uri` must be an MLflow tracking URI .* got 'mlruns'"):
        load_config(None, {"tracking.uri": "mlruns"})
    assert not load_config(None).tracking.enabled
    uri = "https://mlflow.internal.example:5000"
    folder = simulate.prepare_run(replace(tiny_cfg, tracking={"uri": uri}), run_dir=tmp_path / "run")
    assert folder.load_config().tracking.uri == uri  # the coordinator's run folder keeps it
    write_app(folder)
    shipped = (folder.app_dir / "pyproject.toml").read_text()
    assert "mlflow.internal" not in shipped and "[run]" in shipped


def test_untracked_runs_never_import_mlflow_and_keys_and_values_fit_mlflows_limits(tmp_path: Path) -> None:
    import subprocess

    code = (
        "import sys; from pathlib import Path; from fedtune.config import load_config; from fedtune import tracking\n"
        f"t = tracking.open_run(Path({str(tmp_path)!r}), load_config(None), say=print); t.rounds(); t.finish(True)\n"
        "assert 'mlflow' not in sys.modules, 'imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    from fedtune.tracking.flatten import MAX_KEY, MAX_PARAM_VALUE, key, params, round_metrics

    long = {"data": {"files": ["x" * 4000, "y" * 4000]}, "tracking": {"uri": "http://secret:5000"}}
    ((name, value),) = params(long).items()
    assert name == "data.files" and len(value) == MAX_PARAM_VALUE and value.startswith('["xxx')
    assert key("summary.federated (2 rounds).pooled field acc") == "summary.federated _2 rounds_.pooled field acc"
    assert len(key("k" * 400)) == MAX_KEY
    record = {
        "kind": "round",
        "round": 3,
        "rejected": [{"site": "a"}],
        "train": {"a": {"ok": True, "loss": float("nan")}},
    }
    assert round_metrics({**record, "seconds": 2}) == {"rejected": 1.0, "seconds": 2.0}  # finite numbers only
