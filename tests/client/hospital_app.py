"""A real hospital (keys, records, hospital.toml) and its ClientApp context, for tests that send
it messages directly."""

from __future__ import annotations

import shutil
from pathlib import Path

from flwr.app import Context, RecordDict

from fedtune.client.hospital_example import EXAMPLE
from fedtune.config import ExperimentConfig
from fedtune.data.clinical import generate_site
from fedtune.data.records import write_records
from fedtune.security import pki
from fedtune.security.keys import KeyPair, save_keys


def hospital_folder(root: Path, coordinator: Path, train: int, held_out: int = 2) -> str:
    """`st-elsewhere` under ``root``: its node key, envelope keys, the CA and coordinator key
    (made under ``coordinator``), ``train`` + ``held_out`` embedded records; the example
    hospital.toml for the tiny model, one thread (returned, not written)."""
    keys = root / "keys"
    keys.mkdir(parents=True)
    ca = pki.create_ca(coordinator)
    (keys / "ca.pem").write_bytes(ca.cert.read_bytes())
    save_keys(KeyPair.generate("coordinator", "coordinator"), coordinator)
    shutil.copy(coordinator / "coordinator.pub", keys / "coordinator.pub")
    pki.create_node_key(keys, "st-elsewhere")
    save_keys(KeyPair.generate("st-elsewhere", "hospital"), keys)
    records = generate_site(0, train + held_out, seed=0)
    write_records(root / "data" / "train.jsonl", records[:train])
    write_records(root / "data" / "eval.jsonl", records[train:])
    text = EXAMPLE.replace('path = "models/SmolLM2-135M-Instruct"', 'path = "tiny"')
    assert "threads = 0" in text
    return text.replace("threads = 0", "threads = 1")


def hospital_context(config: Path, cfg: ExperimentConfig) -> tuple[Context, Path]:
    """The context the daemon's app process gives the ClientApp for run ``run-a``, and that run's folder."""
    run_dir = config.parent / "runs" / "run-a"
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"hospital-config": str(config)},
        state=RecordDict(),
        run_config={"experiment": cfg.to_toml(), "run-dir": str(run_dir)},
    )
    return context, run_dir
