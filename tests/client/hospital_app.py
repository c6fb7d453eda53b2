"""A real hospital's ClientApp context for tests that send it messages directly."""

from __future__ import annotations

from pathlib import Path

from flwr.app import Context, RecordDict

from fedtune.config import ExperimentConfig


def hospital_context(config: Path, cfg: ExperimentConfig) -> tuple[Context, Path]:
    """The context the daemon's app process gives the ClientApp for run ``run-a``, and that run's folder."""
    run_dir = config.parent / "runs" / "run-a"
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"hospital-config": str(config)},
        state=RecordDict(),
        run_config={"experiment": cfg.to_toml(), "run-dir": str(run_dir)},
    )
    return context, run_dir
