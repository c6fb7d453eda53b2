"""What does converting SmolLM2's GGUF file cost, and what does parsing it once save?

``fedtune.models`` converts a GGUF file once into a float32 safetensors folder in the model
cache (every SmolLM2 run, test session and fresh hospital pays it once). transformers reads
the file's header three times for one conversion (tokenizer, config, weights) and builds
gguf's tensor-name table once per module; fedtune memoizes both while converting. This runs
the conversion with and without that, alternating, each in a fresh process, and prints the
times and their ratio from the same run.

Usage: python benchmarks/gguf_convert.py [--repeats 2]
Writes benchmarks/results/gguf_convert.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODES = ("unmemoized", "parsed-once")


def worker(mode: str) -> float:
    from fedtune import models

    gguf = models.smollm2_gguf_path()
    memo = models._gguf_parsed_once() if mode == "parsed-once" else contextlib.nullcontext()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        with memo:
            models._convert_gguf(gguf, Path(out))
        return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.repeats):
        for mode in MODES:
            cmd = [sys.executable, __file__, "--worker", mode]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            times[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(f"{mode:12} {times[mode][-1]:6.1f} s", flush=True)
    best = {mode: min(t) for mode, t in times.items()}
    plain, once = best["unmemoized"], best["parsed-once"]
    print(
        f"SmolLM2 GGUF conversion, best of {args.repeats}: unmemoized {plain:.1f} s, "
        f"parsed once {once:.1f} s, unmemoized/parsed-once = {plain / once:.2f}"
    )
    RESULTS.mkdir(exist_ok=True)
    report = {"meta": {"cpus": os.cpu_count(), "repeats": args.repeats}, "seconds": times, "best": best}
    (RESULTS / "gguf_convert.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS / 'gguf_convert.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
