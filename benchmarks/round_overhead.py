"""What does federation cost on top of local training? And what travels per round?

For each model (the tiny test model and SmolLM2-135M) this runs a real federation
(``flwr run`` against a local SuperLink in simulation mode, 3 sites, 2 rounds) and, in
the same run, the same local training steps alone in one process. It prints:

- the train phase of a federated round (server wall time: send, train on every site,
  receive, validate, merge) against the same sites' local steps run back to back;
- the bytes one client receives and sends per round against the full model's bytes
  (what FedAvg over all weights would move), with the delta on the wire in each of
  ``--wire-dtypes`` (``federation.wire_dtype``; one federation each, sealed replies);
- for SmolLM2, the step time with bf16 autocast against float32 on this CPU.

``--bytes-only`` skips the federations and the timing: it packs the sealed train reply a
hospital sends (``wire.pack_reply``, as the ClientApp does, with the adapter's real keys and
shapes) in each wire dtype and prints its bytes against the model's, the numbers the
federations report as ``upload-bytes``.

Usage: python benchmarks/round_overhead.py [--models tiny smollm2] [--steps 3] [--wire-dtypes float32 bfloat16]
       [--bytes-only]
Writes benchmarks/results/round_overhead.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedtune import wire
from fedtune.config import load_config
from fedtune.experiments.report import round_records
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.runtime import SiteData, SiteRuntime, site_data
from fedtune.security.keys import KeyPair
from fedtune.security.witness import ChainHead

RESULTS = Path(__file__).resolve().parent / "results"


def _config(model: str, steps: int, batch: int, wire_dtype: str = "float32"):  # type: ignore[no-untyped-def]
    return load_config(
        None,
        {
            "model.source": model,
            "data.hospitals": 3,
            "data.train_per_hospital": 64,
            "data.eval_per_hospital": 2,
            "eval.max_new_tokens": 4,
            "train.local_steps": steps,
            "train.batch_size": batch,
            "federation.rounds": 2,
            "federation.wire_dtype": wire_dtype,
            "run.baselines": False,
        },
    )


def federated(model: str, steps: int, batch: int, workdir: Path, wire_dtype: str):  # type: ignore[no-untyped-def]
    """One federation with deltas in ``wire_dtype``: (its config, its folder, its steady round's numbers)."""
    cfg = _config(model, steps, batch, wire_dtype)
    folder = prepare_run(cfg, run_dir=workdir / f"fed-{model}-{wire_dtype}")
    run_simulation(folder, say=lambda line: print(f"  [{model} {wire_dtype}] {line}", flush=True))
    steady = round_records(folder)[-1]  # round 1 also loads the model in the worker
    upload = sum(m["upload-bytes"] for m in steady["train"].values()) / len(steady["train"])
    numbers = {
        "federated_round_train_s": steady["train-seconds"],
        "download_bytes_per_client": float(steady["download-bytes"]),
        "upload_bytes_per_client": upload,
    }
    return cfg, folder, numbers


def measure(model: str, steps: int, batch: int, workdir: Path, wire_dtypes: list[str]) -> dict[str, object]:
    runs = {dtype: federated(model, steps, batch, workdir, dtype) for dtype in wire_dtypes}
    cfg, folder, _ = runs[wire_dtypes[0]]

    # The same local steps, alone, in this process, on the same sites and data.
    runtime, sites, local_seconds = local_steps_alone(cfg, folder, steps)

    full_bytes = sum(p.numel() * p.element_size() for p in runtime.base.model.parameters())
    wire: dict[str, dict[str, float]] = {}
    for dtype, (_, _, numbers) in runs.items():
        upload = numbers["upload_bytes_per_client"]
        wire[dtype] = {
            **numbers,
            "round_over_local": numbers["federated_round_train_s"] / local_seconds,
            "upload_over_full_model": upload / full_bytes,
            "full_model_over_upload": full_bytes / upload,
        }
    out: dict[str, object] = {"local_alone_s": local_seconds, "full_model_bytes": float(full_bytes), "wire": wire}
    if model == "smollm2":
        out.update(_precision(runtime, sites[0], cfg, steps))
    return out


def local_steps_alone(cfg, folder, steps: int) -> tuple[SiteRuntime, list[SiteData], float]:  # type: ignore[no-untyped-def]
    """Every site's ``steps`` local steps back to back in this process, after a warm-up step:
    (the runtime, the sites' data, the seconds they took together)."""
    runtime = SiteRuntime(cfg.model, cfg.lora)
    sites = [site_data(runtime, s, *folder.read_site(s), cfg.train.max_length) for s in folder.sites()]
    start = runtime.state()
    runtime.train_steps(start, sites[0], cfg.train, steps=1, seed=0)  # warm-up
    t0 = time.perf_counter()
    for i, data in enumerate(sites):
        runtime.train_steps(start, data, cfg.train, steps=steps, seed=i)
    return runtime, sites, time.perf_counter() - t0


def _precision(runtime: SiteRuntime, data: SiteData, cfg, steps: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    times = {}
    start = runtime.state()
    for precision in ("fp32", "bf16"):
        runtime.settings = dataclasses.replace(runtime.settings, precision=precision)
        runtime.train_steps(start, data, cfg.train, steps=1, seed=0)
        t0 = time.perf_counter()
        runtime.train_steps(start, data, cfg.train, steps=steps, seed=0)
        times[precision] = (time.perf_counter() - t0) / steps
    return {"step_fp32_s": times["fp32"], "step_bf16_s": times["bf16"], "bf16_over_fp32": times["bf16"] / times["fp32"]}


def reply_bytes(model: str, wire_dtypes: list[str]) -> dict[str, object]:
    """The sealed train reply one hospital sends per round, in each wire dtype, against the model's bytes
    (a random delta with the adapter's keys and shapes: the bytes do not depend on the values)."""
    cfg = _config(model, 1, 1)
    runtime = SiteRuntime(cfg.model, cfg.lora)
    full_bytes = sum(p.numel() * p.element_size() for p in runtime.base.model.parameters())
    g = torch.Generator().manual_seed(0)
    delta = {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in runtime.state().items()}
    sealer = wire.Sealer(KeyPair.generate("st-elsewhere", "hospital"), KeyPair.generate("c", "coordinator").public)
    instruction = wire.RoundInstruction(runtime.state(), 1, 2, run_id="run", challenge=wire.new_challenge())
    out: dict[str, dict[str, float]] = {}
    for dtype in wire_dtypes:
        content = wire.pack_reply(
            runtime.identity("st-elsewhere"),
            {"train-loss": 0.5, "steps": 3.0},
            num_examples=64,
            delta=delta,
            sealer=sealer,
            instruction=instruction,
            audit=ChainHead(0, "0" * 64),
            wire_dtype=dtype,
        )
        upload = wire.message_bytes(content)
        out[dtype] = {"upload_bytes_per_client": float(upload), "full_model_over_upload": full_bytes / upload}
    values = sum(v.numel() for v in delta.values())
    return {"full_model_bytes": float(full_bytes), "adapter_values": float(values), "wire": out}


def report_bytes(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    print(f"{'model':8} {'wire':9} {'adapter values':>15} {'up B/client':>12} {'full model B':>13} {'full/up':>8}")
    for model, r in results.items():
        for dtype, w in r["wire"].items():
            print(
                f"{model:8} {dtype:9} {r['adapter_values']:15.0f} {w['upload_bytes_per_client']:12.0f} "
                f"{r['full_model_bytes']:13.0f} {w['full_model_over_upload']:8.1f}"
            )


def report(results: dict[str, dict]) -> None:  # type: ignore[type-arg]
    print(
        f"{'model':8} {'wire':9} {'fed round (train) s':>20} {'local alone s':>14} {'ratio':>6} "
        f"{'down B/client':>14} {'up B/client':>12} {'full model B':>13} {'up/full':>8} {'full/up':>8}"
    )
    for model, r in results.items():
        for dtype, w in r["wire"].items():
            print(
                f"{model:8} {dtype:9} {w['federated_round_train_s']:20.2f} {r['local_alone_s']:14.2f} "
                f"{w['round_over_local']:6.2f} {w['download_bytes_per_client']:14.0f} "
                f"{w['upload_bytes_per_client']:12.0f} {r['full_model_bytes']:13.0f} "
                f"{w['upload_over_full_model']:8.4f} {w['full_model_over_upload']:8.1f}"
            )
    if "smollm2" in results:
        r = results["smollm2"]
        print(
            f"\nSmolLM2 step time: fp32 {r['step_fp32_s']:.2f}s, bf16 autocast {r['step_bf16_s']:.2f}s, "
            f"bf16/fp32 = {r['bf16_over_fp32']:.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny", "smollm2"])
    parser.add_argument("--steps", type=int, default=3, help="local steps per site per round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--wire-dtypes", nargs="+", default=["float32", "bfloat16"], help="federation.wire_dtype")
    parser.add_argument("--bytes-only", action="store_true", help="only the reply's bytes, no federation")
    args = parser.parse_args()
    results = {}
    if args.bytes_only:
        results = {model: reply_bytes(model, args.wire_dtypes) for model in args.models}
        report_bytes(results)
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "round_overhead_bytes.json").write_text(json.dumps(results, indent=2) + "\n")
        print(f"\nwrote {RESULTS / 'round_overhead_bytes.json'}")
        return 0
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as tmp:
        for model in args.models:
            print(f"== {model}: 3 sites x {args.steps} steps x batch {args.batch_size}, 2 rounds", flush=True)
            results[model] = measure(model, args.steps, args.batch_size, Path(tmp), args.wire_dtypes)
    print()
    report(results)
    RESULTS.mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "steps": args.steps, "batch": args.batch_size}
    (RESULTS / "round_overhead.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'round_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
