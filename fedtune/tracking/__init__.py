"""Experiment tracking: a run (simulation or deployment) sent to an MLflow store.

Optional: a config's ``[tracking]`` section with a ``uri`` turns it on, and needs the
``tracking`` extra (``pip install 'fedtune[tracking]'``). MLflow is imported only then
(:mod:`fedtune.tracking.store`), and a config that asks for it without MLflow installed
fails before the run starts. Once running, tracking never breaks a run: the first
failure to log is one WARNING line and the run goes on untracked.

What goes there, all read from the run folder by the process that drives the rounds
(``fedtune simulate`` / ``fedtune run``, polling ``metrics.jsonl``): the resolved config
as parameters; each round's pooled and per-site metrics, epsilon and bytes with the round
as step, as soon as the round's line is written; at the end the summary (as metrics and
``summary.md``), the plots and the exported PEFT adapter as artifacts. A sweep or a
comparison is a parent run, its sub-runs its children. The MLflow run id is kept in
``<run>/tracking.json``, so a resumed run goes on logging into the same MLflow run.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedtune.config import ExperimentConfig
from fedtune.errors import ConfigError

INSTALL = "pip install 'fedtune[tracking]'"
Say = Callable[[str], None]


@dataclass(frozen=True)
class Parent:
    """A sweep's or comparison's MLflow run: where its sub-runs go as children."""

    experiment_id: str
    run_id: str


class Tracker:
    """Tracking that is off: every call does nothing. :func:`open_run` returns one of these
    or an MLflow run (:class:`fedtune.tracking.store.MlflowRun`) with the same methods."""

    run_id = ""

    def rounds(self) -> None:
        """Log the rounds ``metrics.jsonl`` gained since the last call."""

    def finish(self, ok: bool, *, files: Sequence[Path] = ()) -> None:
        """The last rounds, then (``ok``) the summary, plots, adapter and ``files``; end the run."""

    def parent(self) -> Parent | None:
        return None


def mlflow_installed() -> bool:
    try:
        return importlib.util.find_spec("mlflow") is not None
    except (ImportError, ValueError):
        return False


def require(cfg: ExperimentConfig) -> None:
    """A config that asks for tracking without MLflow installed fails here, before the run starts."""
    if cfg.tracking.enabled and not mlflow_installed():
        raise ConfigError(
            f"`tracking.uri` = {cfg.tracking.uri!r} needs MLflow, which is not installed: {INSTALL} "
            "(or remove the [tracking] section)"
        )


def open_run(
    root: Path, cfg: ExperimentConfig, *, say: Say, parent: Parent | None = None, kind: str = "simulation"
) -> Tracker:
    """The run in folder ``root`` as an MLflow run (a child of ``parent``), or a no-op tracker."""
    if not cfg.tracking.enabled:
        return Tracker()
    require(cfg)
    from fedtune.tracking.store import MlflowRun

    return MlflowRun(root, cfg, say=say, parent=parent, kind=kind)


def open_parent(root: Path, configs: Sequence[ExperimentConfig], *, say: Say, kind: str) -> Tracker:
    """A sweep's or comparison's parent run, with the first sub-run config that asks for tracking."""
    tracked = [c for c in configs if c.tracking.enabled]
    if not tracked:
        return Tracker()
    return open_run(root, tracked[0], say=say, kind=kind)


def run_group(
    root: Path,
    configs: Sequence[ExperimentConfig],
    *,
    say: Say,
    kind: str,
    body: Callable[[Parent | None], str],
    files: Sequence[str] = (),
) -> str:
    """Run ``body`` (a sweep's or comparison's sub-runs, given their parent) under a parent run;
    at the end the group's own ``files`` (its table and plot) go to the parent."""
    tracker = open_parent(root, configs, say=say, kind=kind)
    try:
        out = body(tracker.parent())
    except BaseException:
        tracker.finish(False)
        raise
    tracker.finish(True, files=[root / f for f in files])
    return out
