"""What the deployment tests share: the hospitals, a run's settings, and waiting on a live run."""

from __future__ import annotations

import json
from pathlib import Path

from fedtune.cli.loopback import HOSPITALS, Loopback, until
from fedtune.server.status import status_data

NAMES = list(HOSPITALS[:3])
RUN_TOML = (
    '[run]\nname = "{name}"\nbaselines = false\n[model]\nsource = "tiny"\nthreads = 1\nprecision = "fp32"\n'
    "[train]\nlocal_steps = 2\nbatch_size = 4\nmax_length = 256\n[eval]\nmax_new_tokens = 4\n"
    "[federation]\nrounds = {rounds}\nmin_clients = {min_clients}\nround_timeout = {timeout}\njoin_timeout = 120.0\n"
)


def slow_run(tmp_path: Path, name: str = "slow") -> Path:
    """A run whose rounds take long enough (many local steps) that a test acts mid-run, even on a
    loaded machine where `fedtune status` and `flwr ls` take seconds; every test using it stops it."""
    run_cfg = tmp_path / f"{name}.toml"
    text = RUN_TOML.format(name=name, rounds=3, min_clients=0, timeout=120.0)
    run_cfg.write_text(text.replace("local_steps = 2", "local_steps = 60"))
    return run_cfg


def live_run(fed: Loopback, round_at_least: int, hospitals: int = 0) -> tuple[str, dict[str, object]]:
    """Wait (bounded) until `fedtune status` shows a run live in round ``round_at_least`` or later,
    training, with at least ``hospitals`` hospitals sampled (a round's status names its phase
    a moment before its first hospital)."""
    seen: list[tuple[str, dict[str, object]]] = []

    def live() -> bool:
        for run, entry in status_data(fed.home)["live"].items():
            rows = entry.get("hospitals") or []
            if int(entry["round"]) >= round_at_least and entry["phase"] == "train" and len(rows) >= hospitals:
                seen.append((run, entry))
                return True
        return False

    until(live, f"a run live in round {round_at_least}", limit=240, step=0.5)
    return seen[-1]


def alive(pid: int) -> bool:
    from fedtune.process import running

    return running(pid, "flwr")


def round_records_of(folder: Path) -> list[dict[str, object]]:
    from fedtune.experiments.report import round_records
    from fedtune.runfolder import RunFolder

    return round_records(RunFolder(folder))


def errors(log: Path) -> list[str]:
    """The ERROR messages of a daemon's JSON log."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [str(r["message"]) for r in records if r["level"] == "ERROR"]
