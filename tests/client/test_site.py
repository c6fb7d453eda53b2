"""A real hospital's privacy policy, through its ClientApp in-process: the noise floor holds
whether the run fixes the noise or a target epsilon, and a privacy ledger older than what
the hospital already sent (a restored backup) is refused at start and before a DP round."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedtune import wire
from fedtune.client import client_app
from fedtune.client.audit import AuditLog
from fedtune.client.dp_round import plan_mechanism
from fedtune.client.hospital import load_hospital_config
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.ledger_rollback import LedgerRolledBack, check_ledger_current
from fedtune.client.site import Site, Sites
from fedtune.config import DPSettings, ExperimentConfig, LoraSettings, ModelSettings, load_config
from fedtune.errors import UpdateRejected
from fedtune.security.keys import AllowList, load_private, load_public
from tests.client.hospital_app import hospital_context, hospital_folder

pytestmark = pytest.mark.usefixtures("flower_run_id")

FLOOR = 1.5
TRAIN_RECORDS = 10


@pytest.fixture()
def hospital(tmp_path: Path) -> Path:
    """hospital.toml of `st-elsewhere` (tiny model, floor FLOOR), with real keys and records."""
    text = hospital_folder(tmp_path, tmp_path / "coordinator", train=TRAIN_RECORDS)
    old, new = "min_noise_multiplier = 0.5", f"min_noise_multiplier = {FLOOR}"
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


def _train(config: Path, cfg: ExperimentConfig, rnd: int, dtype: str = "float32") -> wire.Reply | wire.Refusal:
    """One train message through the hospital's ClientApp (its mods included), opened as the coordinator would."""
    context, run_dir = hospital_context(config, cfg)
    state = client_app.SITES.hospital(config, cfg.to_toml(), str(run_dir)).runtime.state()
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
    expected = wire.Expected(run=run_dir.name, round=rnd, kind="train", challenge=challenge, dtype=dtype)
    return wire.open_content(reply.content, opener=opener, expected=expected)


def _releases(config: Path) -> int:
    ledger = load_hospital_config(config).ledger_path
    return PrivacyLedger.open(ledger).releases() if ledger.exists() else 0


def _audit(config: Path) -> list[dict[str, Any]]:
    return AuditLog(load_hospital_config(config).audit_path).records()


# -- the resident cache ----------------------------------------------------------------


def test_each_message_builds_its_site_once(hospital: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Context] = []
    build = client_app._site

    def counted(context: Context) -> Site:
        built.append(context)
        return build(context)

    monkeypatch.setattr(client_app, "_site", counted)
    assert isinstance(_train(hospital, _run(noise_multiplier=2.0), 1), wire.Reply)
    assert len(built) == 1  # the `audited` mod and the train handler share one site
    assert isinstance(_train(hospital, _run(noise_multiplier=2.0), 2), wire.Reply)
    assert len(built) == 2  # the next message builds its own


def test_one_base_model_per_process_and_a_new_model_replaces_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedtune.client import site as site_module

    monkeypatch.setattr(site_module, "SiteRuntime", lambda model, lora: object())  # no model is loaded
    sites = Sites()
    tiny, other, lora = ModelSettings(source="tiny"), ModelSettings(source="smollm2"), LoraSettings(rank=2)
    first = sites.runtime(tiny, lora)
    assert sites.runtime(tiny, lora) is first and sites.base_model_loads == 1  # resident across rounds
    own_rank = sites.runtime(tiny, dataclasses.replace(lora, rank=4))  # a hospital at its own rank: kept beside
    assert sites.runtime(tiny, lora) is first and own_rank is not first
    sites.runtime(other, lora)  # another model replaces every runtime of the old one
    assert sites.runtime(tiny, lora) is not first and sites.base_model_loads == 4


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
    assert record["kind"] == "train" and record["ledger_releases"] == 0


def test_noise_planned_above_the_floor_trains_and_is_spent(hospital: Path) -> None:
    cfg = _run(target_epsilon=1.0)
    reply = _train(hospital, cfg, 1)
    assert isinstance(reply, wire.Reply) and reply.delta
    assert reply.metrics["dp-noise-multiplier"] >= FLOOR
    assert _releases(hospital) == 1
    assert [r["ledger_releases"] for r in _audit(hospital)] == [1]


# -- a ledger that went backwards ------------------------------------------------------


def test_a_ledger_restored_from_an_older_copy_is_refused_at_start_and_before_a_round(
    hospital: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune.cli import main

    cfg = _run(noise_multiplier=2.0)
    ledger = load_hospital_config(hospital).ledger_path
    assert isinstance(_train(hospital, cfg, 1), wire.Reply)
    backup = ledger.read_bytes()  # last night's backup
    assert isinstance(_train(hospital, cfg, 2), wire.Reply)
    newest = ledger.read_bytes()
    assert check_ledger_current(ledger, load_hospital_config(hospital).audit_path) == 2

    ledger.write_bytes(backup)  # the restore: the ledger forgets round 2's release
    sent = _audit(hospital)[-1]
    with pytest.raises(LedgerRolledBack) as err:
        check_ledger_current(ledger, load_hospital_config(hospital).audit_path)
    message = str(err.value)
    assert "\n" not in message
    assert f"privacy ledger {ledger} holds 1 releases, but record {sent['seq']} of the audit trail" in message
    assert "when it held 2: it is an older copy" in message and "restore the newest ledger" in message

    for command in ("start", "check"):  # the daemon does not start; `check` says the same
        assert main(["client", command, "--config", str(hospital)]) == 2
        out = capsys.readouterr().err
        assert out.count("\n") == 1 and out.startswith("fedtune: error: ") and message in out

    refusal = _train(hospital, cfg, 3)  # a daemon already running refuses the next DP round
    assert isinstance(refusal, wire.Refusal) and refusal.kind == wire.REFUSED_POLICY
    assert "privacy ledger is older than what it already sent" in refusal.reason
    assert str(ledger) not in refusal.reason  # the coordinator learns no paths
    assert _releases(hospital) == 1  # nothing trained on the old copy

    ledger.write_bytes(newest)  # restoring the newest ledger is accepted
    assert main(["client", "check", "--config", str(hospital)]) == 0
    assert "privacy ledger current (2 releases)" in capsys.readouterr().out
    assert isinstance(_train(hospital, cfg, 3), wire.Reply)
    assert _releases(hospital) == 3


def test_a_bfloat16_run_sends_its_delta_in_bfloat16_and_the_coordinator_reads_float32(hospital: Path) -> None:
    cfg = _run(noise_multiplier=2.0)
    bf16 = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, wire_dtype="bfloat16"))
    reply = _train(hospital, bf16, 1, dtype="bfloat16")  # through the ClientApp, sealed, opened
    assert isinstance(reply, wire.Reply) and reply.delta is not None
    assert all(v.dtype == torch.float32 for v in reply.delta.values())
    assert any(bool(v.abs().sum() > 0) for v in reply.delta.values())  # it trained
    assert all(torch.equal(v, v.bfloat16().float()) for v in reply.delta.values())  # bfloat16 values
    with pytest.raises(UpdateRejected, match=r"is bfloat16 on the wire, the run's `federation.wire_dtype` is float32"):
        _train(hospital, bf16, 2)  # a coordinator that expects float32 refuses it
