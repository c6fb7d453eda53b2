"""A federation run at the coordinator: ``fedtune run`` (prepare, launch, resume) and
``fedtune server witness``.

A run folder lives under the home's ``runs/``; every launch and resume refreshes its
coordinator key, its allow-list (the hospitals registered now) and its map of Flower node
ids to hospitals, signs its app (hospitals serve only runs the coordinator signed) and
``flwr run``s it on the home's SuperLink. Ctrl-C stops the run at the coordinator too.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune import process, tracking
from fedtune.atomic import atomic_write_json
from fedtune.errors import ConfigError, FedTuneError
from fedtune.launcher import flower_env
from fedtune.security.keys import KeyPair, load_private
from fedtune.security.witness import Witness, WitnessLog, gather
from fedtune.server.home import CONNECTION, CoordinatorHome, flwr_cli, superlink_answers

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.runfolder import RunFolder


def _coordinator_keys(home: CoordinatorHome) -> KeyPair:
    if not home.coordinator_key.exists():
        raise ConfigError(
            f"{home.coordinator_key} is missing: hospitals serve only runs signed with it; create it with "
            f"`fedtune pki server --ca {home.pki_dir} --out {home.pki_dir} --address ADDRESS`"
        )
    key = load_private(home.coordinator_key)  # checks mode and role
    if key.role != "coordinator":
        raise ConfigError(f"{home.coordinator_key} is a {key.role} key, not the coordinator's")
    return key


def install_run_keys(home: CoordinatorHome, folder: RunFolder) -> None:
    """The run's coordinator key and its allow-list: the hospitals registered now.

    Refreshed on every launch and resume, so a hospital removed in between is refused.
    """
    import shutil

    from fedtune.atomic import atomic_write_bytes

    _coordinator_keys(home)  # checks mode and role before copying
    atomic_write_bytes(folder.coordinator_key, home.coordinator_key.read_bytes(), mode=0o600)
    shutil.rmtree(folder.allowlist_dir, ignore_errors=True)
    folder.allowlist_dir.mkdir(parents=True)
    for name in home.registry():
        atomic_write_bytes(folder.allowlist_dir / f"{name}.pub", (home.hospitals_dir / f"{name}.pub").read_bytes())


def prepare_deployment_run(home: CoordinatorHome, cfg: ExperimentConfig) -> RunFolder:
    """A new run folder under ``home/runs`` for the registered hospitals."""
    from fedtune.atomic import atomic_write_bytes
    from fedtune.config import replace
    from fedtune.models import resolve_model_dir
    from fedtune.runfolder import RunFolder

    registry = home.registry()
    if not registry:
        raise ConfigError(f"no hospitals are registered in {home.root}; add them with `fedtune server add-hospital`")
    try:
        cfg = replace(cfg, data={"hospitals": len(registry)})
    except ConfigError as err:
        raise ConfigError(f"with the {len(registry)} registered hospital(s): {err}") from err
    resolve_model_dir(cfg.model.source)  # the coordinator builds the initial adapter from the base model's shape
    tracking.require(cfg)  # [tracking] without MLflow installed fails before the run folder is made
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = RunFolder((home.runs_dir / f"{cfg.run.name}-{stamp}").resolve())
    if folder.root.exists():
        raise ConfigError(f"run folder {folder.root} already exists; wait a second and launch again")
    folder.root.mkdir(parents=True)
    atomic_write_json(folder.data_dir / "sites.json", {"sites": sorted(registry)})
    if cfg.security.seal:
        install_run_keys(home, folder)
    atomic_write_bytes(folder.config_path, cfg.to_toml().encode())
    return folder


def launch(home: CoordinatorHome, folder: RunFolder, *, say: Callable[[str], None] = print, poll: float = 1.0) -> str:
    """``flwr run`` the run folder's federation on this SuperLink; stream round lines; summarise.

    Returns the summary table when every round ran. Otherwise raises, in one line, what
    ended it: the federation stopped early (:class:`~fedtune.errors.StoppedEarly`, exit 3,
    when the last trained round's adapter is exported; nothing trained, exit 2), failed
    (its error), or the coordinator's SuperLink stopped under it. Ctrl-C stops the run at
    the coordinator too, so that ``--resume`` never races a ServerApp still training.
    """
    from fedtune import process
    from fedtune.experiments.report import round_printer
    from fedtune.launcher import start_run, write_app

    info = home.server()
    if info is None:
        raise ConfigError(
            f"no SuperLink of {home.root} is running; start it with `fedtune server start --home {home.root}`"
        )
    cfg = folder.load_config()
    _take_over(home, folder, say)
    if cfg.security.seal:
        install_run_keys(home, folder)
    # replies then name the hospital, not a Flower node id (refreshed like the allow-list)
    atomic_write_json(folder.nodes_path, {str(e["node-id"]): name for name, e in home.registry().items()})
    write_app(folder, signer=_coordinator_keys(home))  # hospitals serve only runs the coordinator signed
    env = flower_env(home, ray=False)
    total = cfg.federation.rounds
    show_new_rounds = round_printer(folder, total, say)
    say(f"run folder: {folder.root}; {len(folder.sites())} registered hospitals, {total} rounds (log: logs/flower.log)")
    tracker = tracking.open_run(folder.root, cfg, say=say, kind="deployment")
    started = time.time()
    proc = start_run(folder, env, connection=CONNECTION)
    unanswered = 0
    try:
        while proc.poll() is None:
            show_new_rounds()
            tracker.rounds()
            # `flwr run` notices a SuperLink gone within a second or two; this is the backstop
            unanswered = 0 if superlink_answers(home, info) else unanswered + 1
            if unanswered >= 5:
                break
            time.sleep(poll)
    except KeyboardInterrupt:
        stop_flower_run(home, folder)
        tracker.finish(False)
        raise
    finally:
        process.stop(proc, grace=10, nudge=2.0)
    show_new_rounds()
    try:
        table = _run_outcome(home, folder, cfg, info, started=started, say=say)
    except BaseException:
        tracker.finish(folder.adapter_dir.is_dir())  # stopped early: what it trained is still logged
        raise
    tracker.finish(True)
    return table


def _run_outcome(
    home: CoordinatorHome,
    folder: RunFolder,
    cfg: ExperimentConfig,
    info: dict[str, Any],
    *,
    started: float,
    say: Callable[[str], None],
) -> str:
    """What ``fedtune run`` says (or raises) once ``flwr run`` has ended."""
    from fedtune.experiments.report import write_summary
    from fedtune.experiments.simulate import ended_early, federation_done
    from fedtune.launcher import last_error
    from fedtune.live import read_status

    total = cfg.federation.rounds
    resume = f"`fedtune run --resume {folder.root} --home {home.root}`"
    if federation_done(folder, cfg):
        early = ended_early(folder, cfg)
        if early is not None and not folder.adapter_dir.is_dir():
            raise early  # nothing trained, nothing exported: nothing to summarise
        table = str(write_summary(folder))
        if early is not None:
            say(table)
            raise early
        say(f"exported the global adapter (PEFT) to {folder.adapter_dir}; plots in {folder.plots_dir}")
        return table
    live = read_status(folder.root) or {}
    fresh = float(live.get("updated", 0)) >= started  # written by this launch's ServerApp
    at = f"round {live.get('round')}/{total}" if fresh and live.get("round") else f"its first round of {total}"
    if fresh and live.get("phase") == "failed":
        raise FedTuneError(f"the federation failed in {at}: {live.get('reason', '')}; fix the cause and run {resume}")
    if not superlink_answers(home, info, tries=3):
        raise FedTuneError(
            f"the coordinator's SuperLink stopped during {at} (`fedtune server start --home {home.root}` ended); "
            f"completed rounds are kept: start the coordinator again and continue with {resume}"
        )
    raise FedTuneError(
        f"the federation stopped before round {total}: {last_error(folder)}; fix the cause and run {resume}"
    )


def flower_run_id(folder: RunFolder) -> str:
    """The Flower run id of the run folder's latest launch: from its status.json, else its Flower log."""
    import re

    from fedtune.live import read_status

    live = read_status(folder.root) or {}
    if live.get("flower-run-id"):
        return str(live["flower-run-id"])
    log = folder.logs_dir / "flower.log"
    found = re.findall(r"Successfully started run (\d+)", log.read_text(errors="replace")) if log.is_file() else []
    return found[-1] if found else ""


def stop_flower_run(home: CoordinatorHome, folder: RunFolder, *, wait: float = 10.0) -> bool:
    """``flwr stop`` the run folder's Flower run and wait for its ServerApp to end; whether it did.

    Best effort (the caller is already on its way out): a SuperLink that is gone has
    stopped the run anyway.
    """
    from fedtune.live import read_status

    run_id = flower_run_id(folder)
    if not run_id or home.server() is None:
        return False
    with contextlib.suppress(FedTuneError, subprocess.TimeoutExpired):
        flwr_cli(home, "stop", run_id, timeout=wait)
    pid = int((read_status(folder.root) or {}).get("pid", 0))
    deadline = time.monotonic() + wait
    while process.running(pid, "flwr") and time.monotonic() < deadline:
        time.sleep(0.1)
    return not process.running(pid, "flwr")


def _take_over(home: CoordinatorHome, folder: RunFolder, say: Callable[[str], None]) -> None:
    """Before a launch, settle the run folder's previous one (its ``status.json``).

    Still running: refuse, since a second ServerApp on one run folder would train every round
    twice. Died mid-round with the coordinator (SIGKILL, power): its Flower run is still
    RUNNING in the SuperLink's state, and a hospital that pulled one of its messages waits on
    objects the dead ServerApp never pushed, about a minute, before the new launch's first
    round reaches it; ``flwr stop`` it first, so the hospitals drop it at once.
    """
    from fedtune.live import ENDED, read_status

    live = read_status(folder.root) or {}
    if not live or live.get("phase") in ENDED:
        return
    pid, run_id = int(live.get("pid", 0)), live.get("flower-run-id")
    if process.running(pid, "flwr"):
        raise ConfigError(
            f"run {folder.root.name} is still running at the coordinator (Flower run {run_id}, "
            f"round {live.get('round')}, ServerApp pid {pid}); watch it with `fedtune status --home {home.root} "
            f"--watch 5`, or stop it with `FLWR_HOME={home.flwr_home} flwr stop {run_id} {CONNECTION}`"
        )
    if run_id:
        say(f"the previous launch of this run (Flower run {run_id}) died with the coordinator: stopping it first")
        stop_flower_run(home, folder, wait=30.0)


def gather_witness(
    hospital: str, *, home: CoordinatorHome | None = None, run: str | None = None, run_dir: Path | None = None
) -> tuple[Witness, int]:
    """``fedtune server witness``: what the coordinator received from ``hospital`` (and lines skipped).

    Over every run of ``home`` (``all_runs``), one run of it (``run``), or one run folder
    (``run_dir``: a simulation's, or a copy of a deployment run's)."""
    from fedtune.runfolder import RunFolder

    if run_dir is not None:
        folder = RunFolder(Path(run_dir).resolve())
        folder.load_config()  # a clear error when it is not a run folder
        runs = {folder.root.name: WitnessLog(folder.witness_path)}
        where = f"run folder {folder.root}"
    else:
        home = home or CoordinatorHome(Path("coordinator"))
        names = sorted(p.name for p in home.runs_dir.iterdir() if p.is_dir()) if home.runs_dir.is_dir() else []
        if run is not None:
            if run not in names:
                raise ConfigError(f"`--run` {run!r} is not a run of {home.root} (runs: {', '.join(names) or 'none'})")
            names = [run]
        if not names:
            raise ConfigError(f"{home.runs_dir}: no runs yet; launch one with `fedtune run --home {home.root}`")
        runs = {name: WitnessLog(RunFolder(home.runs_dir / name).witness_path) for name in names}
        where = f"run {run} of {home.root}" if run is not None else f"the {len(names)} run(s) of {home.root}"
    witness, skipped, seen = gather(hospital, runs, all_runs=run_dir is None and run is None)
    if not witness.entries:
        raise ConfigError(
            f"no sealed reply from hospital `{hospital}` is recorded in {where} "
            f"(hospitals recorded there: {', '.join(sorted(seen)) or 'none'}); check `--hospital`"
        )
    return witness, skipped
