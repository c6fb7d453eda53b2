"""``fedtune status``: the coordinator's SuperLink, its hospitals, its runs, and for each
run in progress its round, phase and each sampled hospital's state in it."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from fedtune import process
from fedtune.server.home import CoordinatorHome, flwr_cli


def status_rows(home: CoordinatorHome) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """(server line, hospitals, runs) for `fedtune status`."""
    info = home.server()
    if info is None:
        line = f"SuperLink of {home.root}: not running"
        nodes: dict[int, dict[str, Any]] = {}
    else:
        mode = "INSECURE" if info["insecure"] else "TLS + SuperNode authentication"
        line = f"SuperLink of {home.root}: running (pid {info['pid']}), {info['address']}:{info['port']}, {mode}"
        nodes = {int(n["node-id"]): n for n in flwr_cli(home, "supernode", "list").get("nodes", [])}
    hospitals = []
    for name, entry in sorted(home.registry().items()):
        node = nodes.get(int(entry["node-id"]), {})
        hospitals.append(
            {
                "hospital": name,
                "node id": entry["node-id"],
                "status": node.get("status", "unknown (SuperLink not running)" if info is None else "missing"),
                "online since": node.get("online-at", "-"),
                "node key": entry["node-key"][:20],
                "envelope key": entry["envelope-key"][:16],
            }
        )
    runs = []
    from fedtune.experiments.report import run_status

    for folder in sorted(home.runs_dir.glob("*")) if home.runs_dir.exists() else []:
        if folder.is_dir():
            runs.append(run_status(folder))
    return line, hospitals, runs


def status_data(home: CoordinatorHome) -> dict[str, Any]:
    """Everything ``fedtune status`` shows: the SuperLink, hospitals, runs, and for each
    run in progress its round, phase and each hospital's state in the round."""
    from fedtune.experiments.report import live_rows
    from fedtune.live import ENDED, read_status

    line, hospitals, runs = status_rows(home)
    names = {int(entry["node-id"]): name for name, entry in home.registry().items()}
    live: dict[str, Any] = {}
    for row in runs:
        status = read_status(home.runs_dir / row["run"])
        if status is None or status.get("phase") in ENDED or not process.running(int(status.get("pid", 0)), "flwr"):
            continue
        live[row["run"]] = {
            **{k: status.get(k) for k in ("flower-run-id", "round", "rounds", "phase", "since", "updated")},
            "hospitals": live_rows(status, names),
        }
    return {"superlink": line, "hospitals": hospitals, "runs": runs, "live": live}


def main_status(home: CoordinatorHome, *, as_json: bool = False) -> str:
    from fedtune.experiments.report import markdown_table

    data = status_data(home)
    if as_json:
        return json.dumps(data, indent=1, default=str) + "\n"
    hospitals, runs = data["hospitals"], data["runs"]
    parts = [data["superlink"], "", "hospitals:", markdown_table(hospitals) if hospitals else "(none registered)"]
    parts += ["", "runs:", markdown_table(runs) if runs else "(none)"]
    for run, live in data["live"].items():
        since = time.time() - float(live.get("since") or time.time())
        parts += [
            "",
            f"run {run} (Flower run {live['flower-run-id']}): round {live['round']}/{live['rounds']}, "
            f"{live['phase']} for {since:.0f} s",
            markdown_table(live["hospitals"]) if live["hospitals"] else "(no hospital sampled yet)",
        ]
    return "\n".join(parts) + "\n"


def watch_status(
    home: CoordinatorHome,
    *,
    every: float,
    as_json: bool = False,
    out: Callable[[str], None] = print,
    sleep: Callable[[float], None] = time.sleep,
    clear: bool = False,
) -> int:
    """``fedtune status --watch``: show the status every ``every`` seconds until Ctrl-C; exit 0."""
    try:
        while True:
            text = main_status(home, as_json=as_json)
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            out(("\033[2J\033[H" if clear else "") + (text if as_json else f"--- {stamp}\n{text}"))
            sleep(every)
    except KeyboardInterrupt:
        return 0
