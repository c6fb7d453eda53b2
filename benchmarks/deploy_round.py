"""What a deployment round costs on top of its training, and where the rest goes.

In one run, with the tiny model and 3 hospitals on loopback (TLS and SuperNode
authentication on, every reply sealed), this measures:

- the **deployment** round: ``fedtune server start`` + 3 ``fedtune client start``
  daemons + ``fedtune run``, round seconds as the coordinator records them;
- the same round in **simulation** (``fedtune simulate``'s engine, same config);
- the **local training steps alone** (the same steps on the same data, one process);

and breaks the deployment round down from the hospitals' logs: each message's time in
the hospital's app (training, evaluation, sealing: fedtune's own work), the time from
the SuperNode receiving a message to it sending the reply, and the rest (Flower moving
messages: the SuperNode's pull interval, pushes, the ServerApp's collection).

Usage: python benchmarks/deploy_round.py [--rounds 3] [--steps 5]
Writes benchmarks/results/deploy_round.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fedtune.cli.loopback import HOSPITALS, federation
from fedtune.config import load_config
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.runfolder import RunFolder
from fedtune.runtime import SiteRuntime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_overhead import local_steps_alone  # noqa: E402 - the sibling benchmark's measurement

RESULTS = Path(__file__).resolve().parent / "results"
SERVED = re.compile(r"served in ([0-9.]+) s in the daemon's process")
COUNT = 3
RECORDS = 12  # per hospital: 10 train, 2 held out


def _run_toml(rounds: int, steps: int) -> str:
    return (
        f'[run]\nname = "bench"\nbaselines = false\n[model]\nsource = "tiny"\nthreads = 1\nprecision = "fp32"\n'
        f"[train]\nlocal_steps = {steps}\nbatch_size = 4\nmax_length = 256\n[eval]\nmax_new_tokens = 4\n"
        f"[federation]\nrounds = {rounds}\nmin_clients = 0\nround_timeout = 120.0\njoin_timeout = 120.0\n"
    )


def _stamp(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["time"])).timestamp()


def hospital_breakdown(records: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per message at one hospital: SuperNode received -> app done -> SuperNode sent."""
    out: list[dict[str, float]] = []
    received: float | None = None
    served: float | None = None
    for r in records:
        message = str(r.get("message", ""))
        if message.startswith("Receiving:"):
            received, served = _stamp(r), None
        elif (match := SERVED.search(message)) and received is not None:
            served = _stamp(r)
            out.append({"received": received, "served": served, "app_s": float(match[1])})
        elif message.startswith("Sent successfully") and served is not None and out:
            out[-1]["sent"] = _stamp(r)
            received = served = None
    return out


def deployment(tmp: Path, rounds: int, steps: int) -> dict[str, Any]:
    from fedtune.cli import main

    fed = federation(tmp / "deploy", COUNT, records=RECORDS)
    try:
        config = tmp / "run.toml"
        config.write_text(_run_toml(rounds, steps))
        t0 = time.time()
        code = main(["run", str(config), "--home", str(fed.home.root)])
        wall = time.time() - t0
    finally:
        codes = fed.close()
    if code != 0 or any(codes.values()):
        raise SystemExit(f"the deployment run failed (run {code}, processes {codes})")
    (run_dir,) = list(fed.home.runs_dir.iterdir())
    rounds_done = round_records(RunFolder(run_dir))
    messages = {name: hospital_breakdown(fed.log(name)) for name in HOSPITALS[:COUNT]}
    start = wall - sum(r["seconds"] for r in rounds_done)  # ServerApp process, hospitals joining, export
    return {"wall_s": wall, "start_s": start, "rounds": rounds_done, "messages": messages}


def simulation(tmp: Path, rounds: int, steps: int) -> list[dict[str, Any]]:
    cfg = load_config(
        None,
        {
            "model.source": "tiny",
            "model.threads": 1,
            "model.precision": "fp32",
            "data.hospitals": COUNT,
            "data.train_per_hospital": RECORDS - 2,
            "data.eval_per_hospital": 2,
            "train.local_steps": steps,
            "train.batch_size": 4,
            "train.max_length": 256,
            "eval.max_new_tokens": 4,
            "federation.rounds": rounds,
            "run.baselines": False,
        },
    )
    folder = prepare_run(cfg, run_dir=tmp / "simulation")
    run_simulation(folder, say=lambda line: print(f"  [simulation] {line}", flush=True))
    return round_records(folder), cfg  # type: ignore[return-value]


def local_alone(cfg: Any, folder: RunFolder, steps: int) -> float:
    """One site's local steps alone in this process (the mean over the sites)."""
    _, sites, seconds = local_steps_alone(cfg, folder, steps)
    return seconds / len(sites)


def seal_seconds(folder: RunFolder, cfg: Any) -> float:
    """Seal + open of one reply of this adapter's size (what each hospital adds per message)."""
    from fedtune import wire
    from fedtune.security.keys import AllowList, KeyPair
    from fedtune.security.witness import ChainHead

    runtime = SiteRuntime(cfg.model, cfg.lora)
    delta = runtime.state()
    coordinator, hospital = KeyPair.generate("coordinator", "coordinator"), KeyPair.generate("h", "hospital")
    sealer, opener = wire.Sealer(hospital, coordinator.public), wire.Opener(coordinator, AllowList([hospital.public]))
    identity = wire.Identity("h", "b" * 64, "s" * 64)
    instruction = wire.RoundInstruction(state=delta, server_round=1, num_rounds=1, run_id="r", challenge="c" * 32)
    expected = wire.Expected(run="r", round=1, kind="train", challenge="c" * 32)
    head = ChainHead(0, "0" * 64)
    t0 = time.perf_counter()
    for _ in range(5):
        content = wire.pack_reply(
            identity, {}, num_examples=1, delta=delta, sealer=sealer, instruction=instruction, audit=head
        )
        wire.open_content(content, opener=opener, expected=expected)
    return (time.perf_counter() - t0) / 5


def process_start_seconds() -> float:
    """What a ClientApp process per message would cost before it did anything: start and import the app."""
    import subprocess

    cmd = [sys.executable, "-c", "import fedtune.client.client_app"]
    subprocess.run(cmd, check=True)  # warm the file cache
    t0 = time.perf_counter()
    for _ in range(3):
        subprocess.run(cmd, check=True)
    return (time.perf_counter() - t0) / 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5, help="local steps per hospital per round")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as name:
        tmp = Path(name)
        print(f"== deployment: {COUNT} hospitals on loopback, TLS + node auth, {args.rounds} rounds", flush=True)
        deployed = deployment(tmp, args.rounds, args.steps)
        print(f"== simulation: the same {args.rounds} rounds", flush=True)
        simulated, cfg = simulation(tmp, args.rounds, args.steps)  # type: ignore[misc]
        folder = RunFolder(tmp / "simulation")
        alone = local_alone(cfg, folder, args.steps)
        seal = seal_seconds(folder, cfg)
        spawn = process_start_seconds()
    steady = slice(1, None)  # round 1 also builds each hospital's site (model load, tokenization)
    dep = [r["seconds"] for r in deployed["rounds"]][steady]
    sim = [r["seconds"] for r in simulated][steady]
    train = [max(m["train-seconds"] for m in r["train"].values()) for r in deployed["rounds"]][steady]
    msgs = [m for per in deployed["messages"].values() for m in per]
    later = [m for per in deployed["messages"].values() for m in per[2:]]  # after round 1's two messages
    app = statistics.median(m["app_s"] for m in later) if later else float("nan")
    at_hospital = statistics.median(m["sent"] - m["received"] for m in later if "sent" in m) if later else 0.0
    d, s = statistics.median(dep), statistics.median(sim)
    t = statistics.median(train)
    flower = d - 2 * at_hospital  # two exchanges a round; each hospital works in parallel
    rows = [
        ("deployment round (coordinator's clock)", d),
        ("simulation round (same config)", s),
        ("local training alone (one hospital's steps)", alone),
        ("  of the deployment round: training (slowest hospital)", t),
        ("  per message in the hospital's app (train or evaluate, incl. sealing)", app),
        ("  per message SuperNode received -> reply sent", at_hospital),
        ("  seal + open of one reply", seal),
        ("  Flower moving messages (round - 2 x at hospital)", flower),
        ("  process start per message (none now; a ClientApp process would cost)", spawn),
        ("outside the rounds: ServerApp start, hospitals joining, export (once a run)", deployed["start_s"]),
    ]
    print()
    print(f"{'what':72} {'seconds':>8}")
    for what, value in rows:
        print(f"{what:72} {value:8.3f}")
    print(
        f"\ndeployment round - training = {d - t:.2f} s (target: within 3 s); deployment / simulation = {d / s:.2f}; "
        f"deployment / local training = {d / alone:.1f}; messages measured: {len(msgs)}"
    )
    RESULTS.mkdir(exist_ok=True)
    out = {
        "meta": {"cpus": os.cpu_count(), "rounds": args.rounds, "steps": args.steps, "hospitals": COUNT},
        "seconds": dict(rows),
        "deployment_rounds_s": [r["seconds"] for r in deployed["rounds"]],
        "simulation_rounds_s": [r["seconds"] for r in simulated],
        "deployment_over_training_s": d - t,
    }
    (RESULTS / "deploy_round.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {RESULTS / 'deploy_round.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
