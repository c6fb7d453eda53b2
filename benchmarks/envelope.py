"""What does sealing cost? Seal+open throughput and the envelope's byte overhead.

For a delta the size of SmolLM2's adapter (rank 8 on q/k/v/o, 921,600 float32 values)
and for a 100 MB delta, this times the whole path a sealed update takes: payload encoding
(safetensors), sealing (X25519 + HKDF + AES-256-GCM + Ed25519), opening (verify, decrypt)
and decoding; it prints MB/s and the envelope's bytes over the plain payload. In the same
run it times one SmolLM2 round of local training (the default 5 steps of batch 4) and
prints seal+open as a share of it.

Usage: python benchmarks/envelope.py [--repeats 5] [--no-training]
Writes benchmarks/results/envelope.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from fedtune import wire
from fedtune.security.envelope import EnvelopeHeader, open_envelope, seal
from fedtune.security.keys import AllowList, KeyPair

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_ADAPTER = 921_600  # float32 values: 30 layers x (q 9216 + k 6144 + v 6144 + o 9216) at rank 8


def _delta(values: int) -> dict[str, torch.Tensor]:
    """``values`` float32 values in 120 tensors, like an adapter's many small matrices."""
    g = torch.Generator().manual_seed(0)
    per, rest = divmod(values, 120)
    return {f"t{i:03d}": torch.randn(per + (rest if i == 0 else 0), generator=g) for i in range(120)}


def smollm2_delta() -> dict[str, torch.Tensor]:
    """A random delta with SmolLM2's real adapter keys and shapes (built without loading weights)."""
    from fedtune.config import LoraSettings
    from fedtune.lora.adapter import initial_state
    from fedtune.models import load_model_config

    g = torch.Generator().manual_seed(0)
    state = initial_state(load_model_config("smollm2"), LoraSettings())
    return {k: torch.randn(v.shape, generator=g) for k, v in state.items()}


def time_path(delta: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    coordinator = KeyPair.generate("coordinator", "coordinator")
    hospital = KeyPair.generate("st-elsewhere", "hospital")
    allow = AllowList([hospital.public])
    header = EnvelopeHeader("run", 1, "st-elsewhere", "train", "a" * 64, "b" * 64, 0, "c" * 32, 0, "d" * 64)
    seal_s, open_s = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        payload = wire.encode_payload(metrics={"train-loss": 0.5}, num_examples=160, delta=delta)
        envelope = seal(payload, header, sender=hospital, recipient=coordinator.public)
        mid = time.perf_counter()
        _, opened = open_envelope(envelope, recipient=coordinator, senders=allow)
        tensors, *_ = wire.decode_payload(opened)
        end = time.perf_counter()
        assert all(torch.equal(tensors[k], delta[k]) for k in delta)
        seal_s.append(mid - start)
        open_s.append(end - mid)
    plain = sum(v.numel() * 4 for v in delta.values())
    total = statistics.median(seal_s) + statistics.median(open_s)
    return {
        "delta_bytes": plain,
        "envelope_bytes": len(envelope),
        "overhead_fraction": (len(envelope) - plain) / plain,
        "seal_s": statistics.median(seal_s),
        "open_s": statistics.median(open_s),
        "seal_open_mb_s": plain / 1e6 / total,
    }


def training_round_seconds() -> float:
    """One SmolLM2 round of local training as the default simulation runs it (5 steps of batch 4)."""
    from fedtune.config import LoraSettings, ModelSettings, TrainSettings
    from fedtune.data import clinical
    from fedtune.runtime import SiteRuntime, site_data
    from fedtune.train import train_local

    runtime = SiteRuntime(ModelSettings(source="smollm2"), LoraSettings())
    train, held = clinical.generate(1, n_train=160, n_eval=1, seed=0)["st-elsewhere"]
    data = site_data(runtime, "s", train, held, 256)
    settings = TrainSettings()
    pad = int(runtime.base.tokenizer.pad_token_id)
    train_local(runtime.model, data.train_tokens, TrainSettings(local_steps=1), pad_id=pad, seed=0)  # warm-up
    start = time.perf_counter()
    train_local(runtime.model, data.train_tokens, settings, pad_id=pad, seed=1)
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-training", action="store_true", help="skip the SmolLM2 training baseline")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    deltas = {"smollm2 adapter": smollm2_delta(), "100 MB delta": _delta(25_000_000)}
    assert sum(v.numel() for v in deltas["smollm2 adapter"].values()) == SMOLLM2_ADAPTER
    results = {name: time_path(delta, args.repeats) for name, delta in deltas.items()}
    print(f"{'delta':16} {'delta MB':>9} {'envelope +B':>12} {'overhead':>9} {'seal s':>8} {'open s':>8} {'MB/s':>7}")
    for name, r in results.items():
        print(
            f"{name:16} {r['delta_bytes'] / 1e6:9.2f} {r['envelope_bytes'] - r['delta_bytes']:12d} "
            f"{r['overhead_fraction']:9.2e} {r['seal_s']:8.4f} {r['open_s']:8.4f} {r['seal_open_mb_s']:7.0f}"
        )
    out: dict[str, object] = {"cpus": os.cpu_count(), "repeats": args.repeats, "results": results}
    if not args.no_training:
        train_s = training_round_seconds()
        small = results["smollm2 adapter"]
        share = (small["seal_s"] + small["open_s"]) / train_s
        out["smollm2_round_train_s"] = train_s
        out["seal_open_share_of_round"] = share
        print(
            f"\nSmolLM2 local training round (5 steps, batch 4): {train_s:.2f} s; seal+open of its adapter "
            f"{small['seal_s'] + small['open_s']:.4f} s = {share:.2%} of it"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "envelope.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'envelope.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
