"""The researcher's simulation: prepare a run folder, run the federation on Flower's
engine, run the baselines, write the table and plots. Resumable at every stage.

A federation that stops before its last round (privacy budgets spent, every hospital
refusing) is an outcome, not a crash: :func:`run_simulation` finishes the folder (a
sweep or comparison tabulates it), and :func:`ended_early` is the error the single-run
commands (``fedtune simulate``, ``fedtune run``) then exit with: 2 when nothing was
trained (nothing is exported), 3 when the last trained round's adapter is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fedtune import tracking
from fedtune.atomic import atomic_write_bytes
from fedtune.checkpoint import latest_round
from fedtune.config import ExperimentConfig, replace
from fedtune.data import clinical
from fedtune.data.partition import partition, split_train_eval
from fedtune.data.records import Example, load_records
from fedtune.errors import CheckpointError, ConfigError, FedTuneError, StoppedEarly
from fedtune.experiments.report import round_printer, write_summary
from fedtune.flowerhome import cleanup
from fedtune.launcher import client_resources, flwr_run, last_error
from fedtune.models import resolve_model_dir
from fedtune.privacy.audit_data import SiteAudit, with_audit_data, write_audit_data
from fedtune.progress import PROGRESS_FILE, RoundOrder, progress_printer
from fedtune.runfolder import RunFolder, new_folder

Say = Callable[[str], None]


def site_splits(cfg: ExperimentConfig) -> dict[str, tuple[list[Example], list[Example]]]:
    """Each site's (train, eval) records, partitioned as configured."""
    data = cfg.data
    if data.source == "clinical":
        natural_count = data.hospitals if data.partition == "natural" else max(data.hospitals, len(clinical.HOSPITALS))
        natural = clinical.generate(
            natural_count, n_train=data.train_per_hospital, n_eval=data.eval_per_hospital, seed=cfg.run.seed
        )
        label_fn: Callable[[Example], str] = clinical.label_of
    else:
        natural = {}
        for i, name in enumerate(data.files):
            path = Path(name)
            site = path.stem
            if site in natural:
                site = f"{site}-{i}"
            natural[site] = split_train_eval(
                load_records(path, site=site), eval_fraction=data.eval_fraction, seed=cfg.run.seed
            )
        label_fn = lambda e: e.target  # noqa: E731 - the answer text is the label of a generic record
    count = data.hospitals if data.partition != "natural" else len(natural)
    train = partition(
        {s: t for s, (t, _) in natural.items()},
        scheme=data.partition,
        num_sites=count,
        seed=cfg.run.seed,
        alpha=data.dirichlet_alpha,
        label_fn=label_fn,
    )
    held = partition(
        {s: e for s, (_, e) in natural.items()},
        scheme=data.partition,
        num_sites=count,
        seed=cfg.run.seed + 1,
        alpha=data.dirichlet_alpha,
        label_fn=label_fn,
    )
    return {site: (train[site], held[site]) for site in train}


def prepare_run(cfg: ExperimentConfig, *, run_dir: Path | None = None) -> RunFolder:
    """Create a new run folder with its config and materialised site data."""
    run_dir = new_folder(run_dir, parent=cfg.run.output_dir, stem=cfg.run.name, what="run")
    if cfg.dp.ledger_dir:
        # Flower's workers run elsewhere than the user's shell: the run keeps an absolute path.
        cfg = replace(cfg, dp={"ledger_dir": str(Path(cfg.dp.ledger_dir).expanduser().resolve())})
    resolve_model_dir(cfg.model.source)  # a bad model source fails before anything is written
    tracking.require(cfg)  # and so does [tracking] without MLflow installed
    splits = site_splits(cfg)  # bad data files fail before anything is written
    empty = [s for s, (t, e) in splits.items() if not t or not e]
    if empty:
        raise ConfigError(
            f"sites {empty} got no training or no held-out records; use fewer `data.hospitals` "
            "or a larger `data.dirichlet_alpha`"
        )
    audits: dict[str, SiteAudit] = {}
    if cfg.privacy_audit.enabled:  # canaries into the training records, extra nonmembers beside them
        splits, audits = with_audit_data(cfg, splits)
    folder = RunFolder(run_dir.resolve())
    folder.root.mkdir(parents=True, exist_ok=True)
    folder.write_sites(splits)
    write_audit_data(folder.root, audits)
    if cfg.security.seal:
        folder.write_keys(list(splits))
    atomic_write_bytes(folder.config_path, cfg.to_toml().encode())
    return folder


def federation_done(folder: RunFolder, cfg: ExperimentConfig) -> bool:
    """All rounds ran and the adapter is out, or the federation stopped early (privacy
    budgets spent, every hospital refused) and what it trained, if anything, is out."""
    latest = latest_round(folder.root)
    if latest is None:
        return False
    done, extra = latest
    if extra.get("stopped"):
        return done == 0 or folder.adapter_dir.is_dir()
    return done >= cfg.federation.rounds and folder.adapter_dir.is_dir()


def ended_early(folder: RunFolder, cfg: ExperimentConfig) -> FedTuneError | None:
    """Why a finished federation did not run every round, as the error its command exits with;
    None when it ran them all (or has not ended)."""
    latest = latest_round(folder.root)
    if latest is None or not latest[1].get("stopped"):
        return None
    done, why = latest[0], str(latest[1]["stopped"])
    if done == 0:
        return FedTuneError(f"run {folder.root.name} trained nothing, so nothing was exported: {why}")
    return StoppedEarly(
        f"run {folder.root.name} stopped early, after round {done}/{cfg.federation.rounds}: {why}; "
        f"the adapter of round {done} is exported to {folder.adapter_dir}"
    )


def run_simulation(folder: RunFolder, *, say: Say = print, parent: tracking.Parent | None = None) -> str:
    """Run or finish the run in ``folder``; return the summary table (markdown).

    With ``[tracking]`` the run goes to MLflow as it runs (a child of ``parent``: a sweep's or comparison's).
    """
    cfg = folder.load_config()
    tracker = tracking.open_run(folder.root, cfg, say=say, parent=parent)
    try:
        table = _simulate(folder, cfg, say, tracker)
    except BaseException:
        tracker.finish(False)
        raise
    tracker.finish(True)
    return table


def _simulate(folder: RunFolder, cfg: ExperimentConfig, say: Say, tracker: tracking.Tracker) -> str:
    total = cfg.federation.rounds
    say(f"run folder: {folder.root}")
    start = time.perf_counter()
    say(f"preparing base model '{cfg.model.source}' ...")
    resolve_model_dir(cfg.model.source)  # convert/build once, before any worker starts
    if federation_done(folder, cfg):
        cleanup(folder)  # a crashed attempt's processes and temp link, though the rounds are all done
    else:
        in_order = RoundOrder(say)
        show_new_rounds = round_printer(folder, total, in_order)
        show_steps = progress_printer(folder.root / PROGRESS_FILE, in_order)

        def on_poll() -> None:
            show_steps()
            show_new_rounds()
            in_order.flush()
            tracker.rounds()

        latest = latest_round(folder.root)
        if latest is not None and latest[0] > 0:
            say(f"resuming after round {latest[0]}/{total}")
        say(
            f"federating {len(folder.sites())} sites for {total} rounds on Flower's simulation engine "
            f"(logs: {folder.logs_dir / 'flower.log'})"
        )

        sim = cfg.simulation
        cpus, gpus = client_resources(sim, cuda=torch.cuda.is_available(), cpu_count=os.cpu_count() or 1)
        if sim.ray_address:
            say(f"on the Ray cluster at {sim.ray_address}")
        flwr_run(
            folder,
            num_supernodes=len(folder.sites()),
            cpus_per_client=cpus,
            gpus_per_client=gpus,
            ray_address=sim.ray_address,
            on_poll=on_poll,
        )
        if not federation_done(folder, cfg):
            raise FedTuneError(
                f"the federation stopped before round {total}: {last_error(folder)}; "
                f"fix the cause and run `fedtune simulate --resume {folder.root}`"
            )
    latest = latest_round(folder.root)
    if latest is not None and latest[1].get("stopped"):
        say(f"the federation stopped after round {latest[0]}/{total}: {latest[1]['stopped']}")
    exported = f"adapter: {folder.adapter_dir}" if folder.adapter_dir.is_dir() else "no round trained, no adapter"
    say(f"federation done in {time.perf_counter() - start:.0f}s; {exported}")
    if cfg.run.baselines:
        from fedtune.experiments.baselines import run_baselines

        run_baselines(folder, say=say)
    table = write_summary(folder)
    say(f"total {time.perf_counter() - start:.0f}s; table: {folder.root / 'summary.md'}, plots: {folder.plots_dir}")
    return table


def resume_folder(path: Path) -> RunFolder:
    folder = RunFolder(path.resolve())
    if not folder.config_path.is_file():
        raise CheckpointError(f"{path}: not a fedtune run folder (no config.toml); pass the folder `simulate` printed")
    return folder
