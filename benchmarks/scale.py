"""Does a simulated hospital cost flat memory and time? Simulations of 2, 8 and 32 hospitals
(tiny model) and 2 and 8 (SmolLM2, with ``--smollm2``), each against 2 hospitals of the same
model in the same run.

Each is a fresh ``fedtune simulate`` (2 rounds, 1 local step per hospital, no baselines, the
default resources: all CPUs per hospital, so Ray keeps one ClientApp worker and hospitals
train one after another). While it runs, the resident memory of every process of the run
(the command's process tree plus what carries the run folder's markers: the SuperLink, the
ServerApp, Ray's GCS, raylet and workers, which Flower starts detached) is summed every
0.25 s; the peak is reported. Seconds per round are round 2's (round 1 also starts Ray's
worker and loads the base model). Targets: 8 SmolLM2 hospitals within 1.5x the memory of 2,
32 tiny within 2x, and seconds per round growing no faster than the total training work
(hospitals x local steps, i.e. N/2 against 2 hospitals).

Usage: python benchmarks/scale.py [--smollm2] [--tiny 2,8,32]
Writes benchmarks/results/scale.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_MEMORY = {"tiny": 2.0, "smollm2": 1.5}  # peak at the most hospitals / peak at 2


def _rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int(Path(entry, "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(root: int) -> set[int]:
    kids, out, todo = _children(), set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in out:
            out.add(pid)
            todo.extend(kids.get(pid, []))
    return out


class Sampler(threading.Thread):
    """Peak of the summed RSS of a process tree and of the run folder's marked processes."""

    def __init__(self, root: int, run: Path) -> None:
        super().__init__(daemon=True)
        self.root, self.folder, self.peak, self.done = root, run, 0, threading.Event()

    def run(self) -> None:  # noqa: D102
        from fedtune.flowerhome import run_processes
        from fedtune.runfolder import RunFolder

        folder = RunFolder(self.folder)
        while not self.done.is_set():
            pids = _tree(self.root) | (set(run_processes(folder)) if folder.root.is_dir() else set())
            self.peak = max(self.peak, sum(_rss(p) for p in pids))
            self.done.wait(0.25)


def simulate(model: str, hospitals: int, root: Path) -> dict[str, float]:
    run = root / f"{model}-{hospitals}"
    cmd = [sys.executable, "-m", "fedtune", "simulate", "--model", model, "--hospitals", str(hospitals)]
    cmd += ["--rounds", "2", "--local-steps", "1", "--batch-size", "4", "--no-baselines", "--out", str(run)]
    for setting in ("data.train_per_hospital=16", "data.eval_per_hospital=2", "eval.max_new_tokens=8"):
        cmd += ["--set", setting]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid, run)
    sampler.start()
    out, _ = proc.communicate()
    sampler.done.set()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"{model} x {hospitals} failed:\n{out[-2000:]}")
    rounds = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "round"' in x]
    last = rounds[-1]
    train = sum(m["train-seconds"] for m in last["train"].values())
    return {
        "hospitals": hospitals,
        "peak_rss_gb": sampler.peak / 1e9,
        "round_seconds": last["seconds"],
        "train_seconds": train,
        "wall_seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smollm2", action="store_true", help="also 2 and 8 SmolLM2 hospitals (slow on CPU)")
    parser.add_argument("--tiny", default="2,8,32", help="tiny-model hospital counts (the first is the baseline)")
    args = parser.parse_args()
    plan = [("tiny", int(n)) for n in args.tiny.split(",")]
    if args.smollm2:
        plan += [("smollm2", 2), ("smollm2", 8)]
    results: dict[str, list[dict[str, float]]] = {}
    print(f"cpus {os.cpu_count()}; each: 2 rounds, 1 local step per hospital, all CPUs per hospital", flush=True)
    with tempfile.TemporaryDirectory(prefix="ftscale-") as tmp:
        for model, n in plan:
            r = simulate(model, n, Path(tmp))
            base = results.setdefault(model, [r])[0]
            if r is not base:
                results[model].append(r)
            mem, sec, work = (
                r["peak_rss_gb"] / base["peak_rss_gb"],
                r["round_seconds"] / base["round_seconds"],
                n / base["hospitals"],
            )
            target = TARGET_MEMORY[model] if n == max(m for k, m in plan if k == model) else None
            print(
                f"{model:8s} {n:3d} hospitals: peak RSS {r['peak_rss_gb']:.2f} GB ({mem:.2f}x"
                + (
                    f", target <= {target}x: {'met' if mem <= target else 'MISSED'}"
                    if target and n != base["hospitals"]
                    else ""
                )
                + f"), round {r['round_seconds']:.1f} s ({sec:.2f}x against {work:.2f}x the training work: "
                + f"{'met' if sec <= work else 'MISSED'}), training itself {r['train_seconds']:.2f} s",
                flush=True,
            )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
