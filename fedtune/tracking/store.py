"""The MLflow side of :mod:`fedtune.tracking`; imported only when a run is tracked.

Every call into MLflow runs on one worker thread, in order, so the loop that drives the
rounds (and prints their lines) never waits on MLflow; only the end of the run waits for
what is queued. Each goes through :meth:`MlflowRun._guard`: the first failure is one
WARNING line (through the run's ``say``) and turns tracking off for the rest of the run.
Against a tracking server, MLflow's HTTP retries and timeout are shortened (unless set in
the environment), so an unreachable server costs seconds once, not minutes per call.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_json
from fedtune.checkpoint import latest_round
from fedtune.config import ExperimentConfig
from fedtune.experiments.report import round_records
from fedtune.runfolder import RunFolder
from fedtune.tracking import Parent, Say, Tracker
from fedtune.tracking.flatten import params, round_metrics, summary_metrics

STATE = "tracking.json"  # <run>/tracking.json: the MLflow run this folder logs into
_HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}
BATCH = 1000  # MLflow's log_batch: at most 1000 metrics, 100 parameters per call


def _environment(uri: str) -> None:
    """Quiet, bounded MLflow: the user's own settings win."""
    if uri.startswith("file:"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores unless asked
    for name, value in _HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)
    import mlflow  # noqa: F401 - configures its loggers on import: quiet them after

    for name in ("mlflow", "alembic", "urllib3.connectionpool"):
        logging.getLogger(name).setLevel(logging.ERROR)


class MlflowRun(Tracker):
    """One run folder's MLflow run (created, or the one ``tracking.json`` names on resume)."""

    def __init__(self, root: Path, cfg: ExperimentConfig, *, say: Say, parent: Parent | None, kind: str) -> None:
        self.root, self.cfg, self.say = root, cfg, say
        self.uri = cfg.tracking.uri
        self.off = False
        self.client: Any = None
        self.experiment_id = ""
        self.logged = 0  # the last round logged
        self._tasks: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._rounds_queued = threading.Event()
        self._started = threading.Event()
        self._worker = threading.Thread(target=self._work, name="fedtune-tracking", daemon=True)
        self._worker.start()
        self._tasks.put(lambda: self._guard(self._start, parent, kind))

    def _work(self) -> None:
        """Every MLflow call, in order, on this one thread: the run's own loop never waits on MLflow."""
        while (task := self._tasks.get()) is not None:
            task()
            self._started.set()

    def _guard(self, call: Callable[..., None], *args: Any) -> None:
        if self.off:
            return
        try:
            call(*args)
        except Exception as err:  # noqa: BLE001 - tracking never breaks a run
            self.off = True
            why = (str(err).strip().splitlines() or [""])[0][:200]
            self.say(
                f"WARNING: MLflow tracking at {self.uri} failed ({type(err).__name__}: {why}); "
                "the run goes on without tracking"
            )

    def _start(self, parent: Parent | None, kind: str) -> None:
        _environment(self.uri)
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        state = self._state()
        if state.get("uri") == self.uri and state.get("run-id"):
            self.run_id = str(state["run-id"])
            self.experiment_id = str(state["experiment-id"])
            self.client.update_run(self.run_id, status="RUNNING")
            latest = latest_round(self.root)  # rounds after the last checkpoint run again
            self.logged = min(int(state.get("rounds", 0)), latest[0] if latest else 0)
            return
        self.experiment_id = parent.experiment_id if parent else self._experiment()
        tags = {"fedtune.kind": kind, "fedtune.folder": str(self.root)}
        if parent is not None:
            tags["mlflow.parentRunId"] = parent.run_id
        run = self.client.create_run(self.experiment_id, run_name=self.root.name, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        flat = [Param(k, v) for k, v in params(self.cfg.to_dict()).items()]
        for i in range(0, len(flat), 100):
            self.client.log_batch(self.run_id, params=flat[i : i + 100])
        self._save()

    def _experiment(self) -> str:
        name = self.cfg.tracking.experiment or self.cfg.run.name
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        return str(self.client.create_experiment(name, artifact_location=artifact_location(self.uri)))

    def _state(self) -> dict[str, Any]:
        try:
            data = json.loads((self.root / STATE).read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self) -> None:
        state = {"uri": self.uri, "experiment-id": self.experiment_id, "run-id": self.run_id, "rounds": self.logged}
        atomic_write_json(self.root / STATE, state)

    def parent(self) -> Parent | None:
        self._started.wait()  # the sub-runs need the parent's ids: its start is the one call waited for
        return None if self.off else Parent(self.experiment_id, self.run_id)

    def _log(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(metrics), BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i : i + BATCH])

    def _rounds(self) -> None:
        for record in round_records(RunFolder(self.root)):
            if int(record["round"]) > self.logged:
                self._log(round_metrics(record), int(record["round"]))
                self.logged = int(record["round"])
                self._save()

    def rounds(self) -> None:
        if not self._rounds_queued.is_set():  # one pending look at metrics.jsonl is enough
            self._rounds_queued.set()
            self._tasks.put(self._queued_rounds)

    def _queued_rounds(self) -> None:
        self._rounds_queued.clear()
        self._guard(self._rounds)

    def _finish(self, ok: bool, files: Sequence[Path]) -> None:
        self._rounds()
        summary = self.root / "summary.json"
        if ok and summary.is_file():
            self._log(summary_metrics(json.loads(summary.read_text())), self.logged)
        if ok and self.cfg.tracking.artifacts:
            self._artifacts(files)
        self.client.set_terminated(self.run_id, status="FINISHED" if ok else "FAILED")

    def _artifacts(self, files: Sequence[Path]) -> None:
        names = ("config.toml", "metrics.jsonl", "summary.md", "summary.json", "baselines.json")
        for path in [*(self.root / n for n in names), *files]:
            if path.is_file():
                self.client.log_artifact(self.run_id, str(path))
        for folder, under in ((self.root / "plots", "plots"), (self.root / "adapter", "adapter")):
            if folder.is_dir():
                self.client.log_artifacts(self.run_id, str(folder), under)

    def finish(self, ok: bool, *, files: Sequence[Path] = ()) -> None:
        """The last rounds, the summary and artifacts; waits for everything queued to be sent."""
        self._tasks.put(lambda: self._guard(self._finish, ok, files))
        self._tasks.put(None)
        self._worker.join()


def artifact_location(uri: str) -> str | None:
    """A new experiment's artifacts in a SQLite store: ``mlartifacts/`` beside the database
    (as ``mlflow server`` does), not MLflow's default ``./mlruns`` in whatever folder the
    command ran from. Other stores: MLflow's default (None)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri[len(prefix) :] in ("", ":memory:"):
        return None
    return (Path(uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()
