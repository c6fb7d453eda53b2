"""Does sealing keep pace with its cipher? Seal + open against AES-256-GCM alone, in one run.

For SmolLM2's adapter (rank 8 on q/k/v/o, 921,600 float32 values), a 100 MB delta and a
160 MB delta (a 7B model's rank-16 adapter on every linear layer in float32), this times,
interleaved, the median of ``--repeats``:

- AES-256-GCM alone: encrypt and decrypt of the payload's bytes (a fresh key and nonce
  each time): the least any sealing of those bytes costs;
- the envelope: seal and open of the same payload (X25519, HKDF, AES-256-GCM, BLAKE3
  and Ed25519 over the digest; :mod:`fedtune.security.envelope`), in its three parts as a
  Flower message carries it (``seal``; ``.joined()`` would make the one byte string, one more copy);
- the whole path of a sealed update, tensors to tensors: payload encoding (safetensors),
  seal, open and decoding, with the delta on the wire in float32 and in bfloat16
  (``federation.wire_dtype``; decoded back to float32).

MB/s are of the float32 delta's bytes (1 MB = 10^6 bytes) over the sum of both halves'
times; ``ratio`` is the envelope's MB/s over AES-GCM's. In the same run it times one
SmolLM2 round of local training (5 steps of batch 4) and prints the seal + open of its
adapter as a share of it.

Sealing's torch work (casts, safetensors) runs on ``--threads`` threads (1 by default, like
``benchmarks/merge.py``; the training baseline on torch's own count): on a machine
whose cores are busy with other work, torch's OpenMP waits make per-tensor casts of a
120-tensor delta take seconds instead of tens of milliseconds.

Usage: python benchmarks/envelope.py [--repeats 5] [--threads 1] [--no-training]
Writes benchmarks/results/envelope.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from fedtune import wire
from fedtune.security.envelope import EnvelopeHeader, open_envelope, seal
from fedtune.security.keys import AllowList, KeyPair

RESULTS = Path(__file__).resolve().parent / "results"
SMOLLM2_ADAPTER = 921_600  # float32 values: 30 layers x (q 9216 + k 6144 + v 6144 + o 9216) at rank 8
COORDINATOR = KeyPair.generate("coordinator", "coordinator")
HOSPITAL = KeyPair.generate("st-elsewhere", "hospital")
ALLOW = AllowList([HOSPITAL.public])
HEADER = EnvelopeHeader("run", 1, "st-elsewhere", "train", "a" * 64, "b" * 64, 0, "c" * 32, 0, "d" * 64)


def _delta(values: int) -> dict[str, torch.Tensor]:
    """``values`` float32 values in 120 tensors, like an adapter's many small matrices."""
    g = torch.Generator().manual_seed(0)
    per, rest = divmod(values, 120)
    return {f"t{i:03d}": torch.randn(per + (rest if i == 0 else 0), generator=g) * 1e-3 for i in range(120)}


def smollm2_delta() -> dict[str, torch.Tensor]:
    """A random delta with SmolLM2's real adapter keys and shapes (built without loading weights)."""
    from fedtune.config import LoraSettings
    from fedtune.lora.adapter import initial_state
    from fedtune.models import load_model_config

    g = torch.Generator().manual_seed(0)
    state = initial_state(load_model_config("smollm2"), LoraSettings())
    return {k: torch.randn(v.shape, generator=g) * 1e-3 for k, v in state.items()}


def _aes(payload: bytes) -> tuple[float, float]:
    key, nonce = AESGCM.generate_key(bit_length=256), os.urandom(12)
    start = time.perf_counter()
    ciphertext = AESGCM(key).encrypt(nonce, payload, b"associated data")
    mid = time.perf_counter()
    plain = AESGCM(key).decrypt(nonce, ciphertext, b"associated data")
    end = time.perf_counter()
    assert len(plain) == len(payload)
    return mid - start, end - mid


def _envelope(payload: bytes) -> tuple[float, float]:
    start = time.perf_counter()
    envelope = list(seal(payload, HEADER, sender=HOSPITAL, recipient=COORDINATOR.public))
    mid = time.perf_counter()
    _, opened = open_envelope(envelope, recipient=COORDINATOR, senders=ALLOW)
    end = time.perf_counter()
    assert len(opened) == len(payload)
    return mid - start, end - mid


def _path(delta: dict[str, torch.Tensor], dtype: str) -> tuple[float, float]:
    """Tensors to tensors: encode in ``dtype``, seal | open, decode to float32 (checked)."""
    start = time.perf_counter()
    payload = wire.encode_payload(metrics={"train-loss": 0.5}, num_examples=160, delta=delta, dtype=dtype)
    envelope = list(seal(payload, HEADER, sender=HOSPITAL, recipient=COORDINATOR.public))
    mid = time.perf_counter()
    _, opened = open_envelope(envelope, recipient=COORDINATOR, senders=ALLOW)
    tensors, *_ = wire.decode_payload(opened)
    received = wire.from_wire(tensors, dtype)
    end = time.perf_counter()
    rtol = 0.0 if dtype == "float32" else 2.0**-8
    assert all(torch.allclose(received[k], v, rtol=rtol, atol=0.0) for k, v in delta.items())
    return mid - start, end - mid


def measure(delta: dict[str, torch.Tensor], repeats: int) -> dict[str, float]:
    payload = wire.encode_payload(metrics={"train-loss": 0.5}, num_examples=160, delta=delta)
    cases: dict[str, Callable[[], tuple[float, float]]] = {
        "aes": lambda: _aes(payload),
        "envelope": lambda: _envelope(payload),
        "path_float32": lambda: _path(delta, "float32"),
        "path_bfloat16": lambda: _path(delta, "bfloat16"),
    }
    for case in cases.values():
        case()  # warm-up, and the correctness checks
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(repeats):  # interleaved: a slow moment of the machine hits every case alike
        for name, case in cases.items():
            times[name].append(case())
    plain = sum(v.numel() * 4 for v in delta.values())
    out: dict[str, float] = {"delta_bytes": float(plain), "payload_bytes": float(len(payload))}
    for name, pairs in times.items():
        first, second = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        out[f"{name}_first_s"], out[f"{name}_second_s"] = first, second
        out[f"{name}_mb_s"] = plain / 1e6 / (first + second)
    out["envelope_over_aes"] = out["envelope_mb_s"] / out["aes_mb_s"]
    envelope = seal(payload, HEADER, sender=HOSPITAL, recipient=COORDINATOR.public).joined()
    out["envelope_overhead_bytes"] = float(len(envelope) - len(payload))
    bf16 = wire.encode_payload(metrics={"train-loss": 0.5}, num_examples=160, delta=delta, dtype="bfloat16")
    out["bfloat16_envelope_bytes"] = float(len(bf16) + out["envelope_overhead_bytes"])
    return out


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


def report(results: dict[str, dict[str, float]]) -> None:
    print(
        f"{'delta':16} {'MB':>7} {'AES-GCM MB/s':>13} {'seal+open MB/s':>15} {'ratio':>6} {'seal s':>7} "
        f"{'open s':>7} {'+B':>6} {'path f32 MB/s':>14} {'path bf16 MB/s':>15} {'bf16 MB':>8}"
    )
    for name, r in results.items():
        print(
            f"{name:16} {r['delta_bytes'] / 1e6:7.2f} {r['aes_mb_s']:13.0f} {r['envelope_mb_s']:15.0f} "
            f"{r['envelope_over_aes']:6.2f} {r['envelope_first_s']:7.4f} {r['envelope_second_s']:7.4f} "
            f"{r['envelope_overhead_bytes']:6.0f} {r['path_float32_mb_s']:14.0f} {r['path_bfloat16_mb_s']:15.0f} "
            f"{r['bfloat16_envelope_bytes'] / 1e6:8.2f}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--no-training", action="store_true", help="skip the SmolLM2 training baseline")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    deltas = {"smollm2 adapter": smollm2_delta, "100 MB delta": lambda: _delta(25_000_000)}
    deltas["160 MB delta"] = lambda: _delta(40_000_000)
    results = {}
    for name, build in deltas.items():
        delta = build()
        results[name] = measure(delta, args.repeats)
        del delta
    assert results["smollm2 adapter"]["delta_bytes"] == SMOLLM2_ADAPTER * 4
    report(results)
    out: dict[str, object] = {"cpus": os.cpu_count(), "threads": args.threads, "repeats": args.repeats}
    out["results"] = results
    if not args.no_training:
        torch.set_num_threads(threads)  # training as a hospital runs it: torch's own thread count
        train_s = training_round_seconds()
        small = results["smollm2 adapter"]
        sealing = small["envelope_first_s"] + small["envelope_second_s"]
        out["smollm2_round_train_s"] = train_s
        out["seal_open_share_of_round"] = sealing / train_s
        print(
            f"\nSmolLM2 local training round (5 steps, batch 4): {train_s:.2f} s; seal+open of its adapter "
            f"{sealing:.4f} s = {sealing / train_s:.2%} of it"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "envelope.json").write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {RESULTS / 'envelope.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
