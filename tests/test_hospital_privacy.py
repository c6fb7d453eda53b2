"""A real hospital's privacy policy, through its ClientApp in-process: the noise floor holds
whether the run fixes the noise or a target epsilon."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from fedtune.client import client_app
from fedtune.client.audit import AuditLog
from fedtune.client.dp_round import plan_mechanism
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.site import hospital_site
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import pki, wire
from fedtune.clinical import generate_site
from fedtune.config import DPSettings, ExperimentConfig, load_config
from fedtune.data import write_records
from fedtune.hospital import EXAMPLE, load_hospital_config
from fedtune.keys import AllowList, KeyPair, load_private, load_public, save_keys

pytestmark = pytest.mark.usefixtures("flower_run_id")

FLOOR = 1.5
TRAIN_RECORDS = 10


@pytest.fixture()
def hospital(tmp_path: Path) -> Path:
    """hospital.toml of `st-elsewhere` (tiny model, floor FLOOR), with real keys and records."""
    keys = tmp_path / "keys"
    keys.mkdir()
    ca = pki.create_ca(tmp_path / "coordinator")
    (keys / "ca.pem").write_bytes(ca.cert.read_bytes())
    save_keys(KeyPair.generate("coordinator", "coordinator"), tmp_path / "coordinator")
    shutil.copy(tmp_path / "coordinator" / "coordinator.pub", keys / "coordinator.pub")
    pki.create_node_key(keys, "st-elsewhere")
    save_keys(KeyPair.generate("st-elsewhere", "hospital"), keys)
    records = generate_site(0, TRAIN_RECORDS + 2, seed=0)
    write_records(tmp_path / "data" / "train.jsonl", records[:TRAIN_RECORDS])
    write_records(tmp_path / "data" / "eval.jsonl", records[TRAIN_RECORDS:])
    text = EXAMPLE.replace('path = "models/SmolLM2-135M-Instruct"', 'path = "tiny"')
    for old, new in (("threads = 0", "threads = 1"), ("min_noise_multiplier = 0.5", f"min_noise_multiplier = {FLOOR}")):
        assert old in text
        text = text.replace(old, new)
    (tmp_path / "hospital.toml").write_text(text)
    return tmp_path / "hospital.toml"


def _run(**dp: Any) -> ExperimentConfig:
    return load_config(
        None,
        {
            "model.source": "tiny",
            "train.local_steps": 1,
            "train.batch_size": 4,
            "train.max_length": 256,
            "federation.rounds": 3,
            "dp.enabled": True,
            **{f"dp.{k}": v for k, v in dp.items()},
        },
    )


def _train(config: Path, cfg: ExperimentConfig, rnd: int) -> wire.Reply | wire.Refusal:
    """One train message through the hospital's ClientApp (its mods included), opened as the coordinator would."""
    run_dir = config.parent / "runs" / "run-a"
    context = Context(
        run_id=1,
        node_id=7,
        node_config={"hospital-config": str(config)},
        state=RecordDict(),
        run_config={"experiment": cfg.to_toml(), "run-dir": str(run_dir)},
    )
    state = hospital_site(config, cfg.to_toml(), str(run_dir)).runtime.state()
    challenge = wire.new_challenge()
    settings = ConfigRecord(
        {"num-rounds": cfg.federation.rounds, "run-id": run_dir.name, "server-round": rnd, "challenge": challenge}
    )
    msg = Message(
        RecordDict({wire.GLOBAL: wire.to_arrays(state), wire.CONFIG: settings}),
        dst_node_id=7,
        message_type=MessageType.TRAIN,
        group_id=str(rnd),
    )
    reply = client_app.app(msg, context)
    assert not reply.has_error(), reply.error
    keys = config.parent / "keys"
    opener = wire.Opener(
        load_private(config.parent / "coordinator" / "coordinator.key"),
        AllowList([load_public(keys / "st-elsewhere.pub")]),
    )
    expected = wire.Expected(run=run_dir.name, round=rnd, kind="train", challenge=challenge)
    return wire.open_content(reply.content, opener=opener, expected=expected)


def _releases(config: Path) -> int:
    ledger = load_hospital_config(config).ledger_path
    return sum(r["releases"] for r in PrivacyLedger.open(ledger).report()) if ledger.exists() else 0


def _audit(config: Path) -> list[dict[str, Any]]:
    return AuditLog(load_hospital_config(config).audit_path).records()


# -- the noise floor -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dp", "shown"),
    [({"target_epsilon": 8.0}, "`dp.target_epsilon` = 8 over 3 rounds"), ({"noise_multiplier": 0.7}, "run's")],
)
def test_noise_below_the_floor_is_refused_sealed_and_nothing_is_spent(
    hospital: Path, dp: dict[str, float], shown: str
) -> None:
    cfg = _run(**dp)
    # the hospital's own plan: its 10 examples, its delta and budget, the run's rounds and batches
    hospital_dp = DPSettings(enabled=True, delta=1e-5, budget_epsilon=8.0, **dp)
    planned = plan_mechanism(hospital_dp, cfg.train, num_examples=TRAIN_RECORDS, num_rounds=3).noise_multiplier
    assert planned < FLOOR
    refusal = _train(hospital, cfg, 1)
    assert isinstance(refusal, wire.Refusal) and refusal.kind == wire.REFUSED_POLICY
    assert shown in refusal.reason and "\n" not in refusal.reason
    number = f"{planned:.4g}" if "target_epsilon" in dp else f"{planned:g}"
    assert f"noise multiplier {number} " in refusal.reason
    assert f"is below this hospital's floor {FLOOR:g} (`privacy.min_noise_multiplier`)" in refusal.reason
    assert _releases(hospital) == 0  # nothing trained, nothing spent
    (record,) = _audit(hospital)  # the refusal left, and is on the record
    assert record["kind"] == "train"


def test_noise_planned_above_the_floor_trains_and_is_spent(hospital: Path) -> None:
    cfg = _run(target_epsilon=1.0)
    reply = _train(hospital, cfg, 1)
    assert isinstance(reply, wire.Reply) and reply.delta
    assert reply.metrics["dp-noise-multiplier"] >= FLOOR
    assert _releases(hospital) == 1
