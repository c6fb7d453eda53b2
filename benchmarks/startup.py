"""How fast do the commands that do no model work start? Each against ``python -c pass``.

``fedtune --help``, ``client example-config``, ``client check`` (without ``--dial``),
``status`` (no coordinator running), ``pki show`` and ``plan`` of a scale architecture read a
file or two (or nothing) and print; a hospital's IT and the coordinator's operator run them
by hand and in scripts. This
times each as a fresh process (the ``fedtune`` console script, else ``python -m
fedtune``), in a temporary folder whose files fedtune itself made (a CA, the
coordinator's certificate and keys, a hospital's keys, data and ``hospital.toml``), and
in the same run the bare interpreter, ``python -c pass``. Runs are interleaved (one of
each command per repeat) so load on the machine falls on all alike; it prints the
medians, their ratio to the bare interpreter, and which heavy libraries each command
imported (``-X importtime``): the target is under 0.5 s and none. It exits non-zero when
a command misses either.

Usage: python benchmarks/startup.py [--repeats 9]
Writes benchmarks/results/startup.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
LIMIT_S = 0.5
HEAVY = ("torch", "transformers", "peft", "opacus", "flwr", "ray", "safetensors", "matplotlib", "numpy", "mlflow")
HOSPITAL = "st-elsewhere"


def fedtune_command() -> list[str]:
    """The console script beside this interpreter (what users run), else ``python -m fedtune``."""
    script = Path(sys.executable).parent / "fedtune"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    found = shutil.which("fedtune")
    return [found] if found else [sys.executable, "-m", "fedtune"]


def make_files(root: Path) -> dict[str, list[str]]:
    """A coordinator home and a hospital's folder, made by fedtune's own commands; the argv to time."""
    from fedtune.cli.loopback import Loopback

    fed = Loopback(root)
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        fed.pki()
        config = fed.add_hospital(HOSPITAL, 0)
    return {
        "fedtune --help": ["--help"],
        "fedtune client example-config": ["client", "example-config"],
        "fedtune client check": ["client", "check", "--config", str(config)],
        "fedtune status": ["status", "--home", str(fed.home.root)],
        "fedtune pki show": ["pki", "show", str(fed.home.ca_cert), str(fed.folder(HOSPITAL) / "keys" / "ca.pem")],
        "fedtune plan llama-8b": ["plan", "llama-8b", "--quantization", "4bit", "--gpu-gb", "24"],
    }


def once(argv: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"`{' '.join(argv)}` failed ({done.returncode}): {done.stderr.strip()}")
    return seconds


def heavy_imports(argv: list[str], cwd: Path) -> list[str]:
    """The heavy libraries ``argv`` imports, from ``python -X importtime``'s report."""
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    done = subprocess.run(argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    names = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
    return [lib for lib in HEAVY if lib in names]


def measure(commands: dict[str, list[str]], cwd: Path, repeats: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {name: [] for name in commands}
    for argv in commands.values():
        once(argv, cwd)  # warm the file cache: every command starts from the same state
    for _ in range(repeats):
        for name, argv in commands.items():
            times[name].append(once(argv, cwd))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    fedtune = fedtune_command()
    with tempfile.TemporaryDirectory(prefix="fedtune-startup-") as tmp:
        root = Path(tmp)
        light = {name: [*fedtune, *argv] for name, argv in make_files(root).items()}
        commands = {"python -c pass": [sys.executable, "-c", "pass"], **light}
        times = measure(commands, root, args.repeats)
        loads = {name: heavy_imports(argv, root) for name, argv in light.items()}
    base = statistics.median(times["python -c pass"])
    print(f"start-up, median of {args.repeats} runs each, interleaved; `fedtune` = {' '.join(fedtune)}")
    print(f"{'command':31} {'median s':>9} {'x python':>9} {'under 0.5 s':>12}  heavy imports")
    results: dict[str, dict[str, object]] = {}
    failed = []
    for name, runs in times.items():
        median = statistics.median(runs)
        heavy = loads.get(name, [])
        results[name] = {"median_s": median, "ratio_to_python": median / base, "runs_s": runs, "heavy": heavy}
        under = "-" if name not in light else ("yes" if median < LIMIT_S else "NO")
        print(f"{name:31} {median:9.3f} {median / base:9.1f} {under:>12}  {', '.join(heavy) or '-'}")
        if name in light and (median >= LIMIT_S or heavy):
            failed.append(name)
    RESULTS.mkdir(exist_ok=True)
    how = "python -m fedtune" if fedtune[0] == sys.executable else "the fedtune console script"
    payload = {"repeats": args.repeats, "limit_s": LIMIT_S, "fedtune": how, "commands": results}
    (RESULTS / "startup.json").write_text(json.dumps(payload, indent=2) + "\n")
    if failed:
        raise SystemExit(f"over {LIMIT_S} s or importing a heavy library: {', '.join(failed)}")


if __name__ == "__main__":
    main()
