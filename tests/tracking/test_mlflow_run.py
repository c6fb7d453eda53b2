"""A tiny simulation tracked in a local MLflow store, read back with MLflow's own client;
and the step progress every simulated hospital reports while it trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fedtune.config import replace
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.tracking.flatten import key as mlflow_key

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]
mlflow = pytest.importorskip("mlflow", reason="the tracking extra (mlflow-skinny) is not installed")


def test_a_tracked_simulation_reads_back_equal_to_its_run_folder(tiny_cfg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = replace(tiny_cfg, tracking={"uri": uri, "experiment": "tiny-tracked"})
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    lines: list[str] = []
    run_simulation(folder, say=lines.append)

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("tiny-tracked")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert json.loads((folder.root / "tracking.json").read_text())["run-id"] == run.info.run_id
    # the resolved config as parameters (not the tracking URI: it may name an internal server)
    params = run.data.params
    assert params["federation.rounds"] == "2" and params["model.source"] == "tiny"
    assert params["lora.target_modules"] == json.dumps(list(cfg.lora.target_modules))
    assert not any(k.startswith("tracking.") for k in params)

    # every round's numbers, with the round as step, equal metrics.jsonl's
    records = round_records(folder)
    assert [r["round"] for r in records] == [1, 2]
    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        numbers = {"eval.pooled.metric": r["eval"]["pooled"]["metric"], "download-bytes": r["download-bytes"]}
        numbers["seconds"] = r["seconds"]
        for site, m in r["train"].items():
            numbers.update({f"train.{site}.{k}": v for k, v in m.items() if isinstance(v, int | float)})
        for site, m in r["eval"].items():
            numbers.update({f"eval.{site}.{k}": v for k, v in m.items()})
        for key, value in numbers.items():
            expected.setdefault(key, []).append((r["round"], float(value)))
    assert any(k.endswith(".train-loss") for k in expected) and any("bytes" in k for k in expected)
    for key, history in expected.items():
        got = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(got) == history, key
    # the summary's numbers too
    summary = json.loads((folder.root / "summary.json").read_text())
    final = [row for row in summary if row["model"].startswith("federated")][0]
    logged = run.data.metrics[mlflow_key(f"summary.{final['model']}.pooled field acc")]  # "(" -> "_"
    assert math.isclose(logged, final["pooled field acc"])

    # artifacts: the plots, the PEFT adapter, the summary
    def names(path: str | None = None) -> set[str]:
        return {Path(a.path).name for a in client.list_artifacts(run.info.run_id, path)}

    assert {"summary.md", "config.toml", "metrics.jsonl", "plots", "adapter"} <= names()
    assert {p.name for p in folder.plots_dir.glob("*.png")} == names("plots") and "metric.png" in names("plots")
    assert {p.name for p in folder.adapter_dir.iterdir()} == names("adapter")
    assert "adapter_model.safetensors" in names("adapter")
    # kept beside the database, not in ./mlruns of the folder the test ran from
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert (tmp_path / "mlartifacts" / run.info.run_id / "artifacts" / "adapter").is_dir()
    assert not [line for line in lines if "WARNING" in line]

    _each_hospital_showed_its_steps(lines, folder.sites())


def _each_hospital_showed_its_steps(lines: list[str], sites: list[str]) -> None:
    """Step progress while each hospital trains: the last step of every round, at least."""
    steps = [line for line in lines if " training: " in line]
    for site in sites:
        for rnd in (1, 2):
            assert any(line.startswith(f"round {rnd}/2 training:") and f"{site} step 2/2" in line for line in steps)
    assert len(steps) <= 2 * 2 * len(sites)  # never more than one line per record
