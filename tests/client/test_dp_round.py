"""A hospital's DP round: budget checked before training, spend recorded before sending."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

import pytest

from fedtune import wire
from fedtune.client import client_app
from fedtune.client.dp_round import open_ledger, plan_mechanism, private_train_round
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.site import Site
from fedtune.config import DPSettings, LoraSettings, ModelSettings, TrainSettings, load_config
from fedtune.data import clinical
from fedtune.data.records import dataset_id, record_digests
from fedtune.lora.merge import make_rule
from fedtune.privacy.accounting import BudgetExceeded, epsilon_spent
from fedtune.runtime import SiteRuntime, site_data

TRAIN = TrainSettings(local_steps=2, batch_size=4, lr=1e-2)
RULE = make_rule("fedavg", alpha=16, rank=2)


@pytest.fixture(scope="module")
def site(tiny_dir: Path):  # type: ignore[no-untyped-def]
    rt = SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), LoraSettings(rank=2))
    train, held = clinical.generate(1, n_train=20, n_eval=2, seed=0)["st-elsewhere"]
    return rt, site_data(rt, "st-elsewhere", train, held, 256)


def _instruction(rt: SiteRuntime, rnd: int = 1, rounds: int = 3) -> wire.RoundInstruction:
    return wire.RoundInstruction(state=rt.state(), server_round=rnd, num_rounds=rounds)


def test_a_round_records_its_release_and_reports_only_the_mechanism(site, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    rt, data = site
    dp = DPSettings(enabled=True, target_epsilon=3.0, budget_epsilon=5.0)
    ledger = open_ledger(tmp_path / "ledger.json", dp)
    done = private_train_round(rt, _instruction(rt), data, TRAIN, dp, ledger, run_id="run-a", rule=RULE)
    ds = dataset_id(record_digests(data.train))
    assert done.epsilon == pytest.approx(ledger.spent(ds)) and 0 < done.epsilon <= 3.0
    assert done.mechanism == plan_mechanism(dp, TRAIN, num_examples=20, num_rounds=3)
    assert done.mechanism.sample_rate == pytest.approx(4 / 20)
    # all three planned rounds fit the target: the noise was planned for the whole run
    assert epsilon_spent([done.mechanism] * 3, delta=dp.delta) <= 3.0
    metrics = done.metrics()
    assert "train-loss" not in metrics and "examples-seen" not in metrics  # not private
    assert metrics["dp-epsilon"] == done.epsilon and metrics["dp-budget"] == 5.0
    assert [r["server_round"] for r in ledger.history(ds)] == [1]


def test_a_spent_budget_refuses_before_any_training(site, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    rt, data = site
    dp = DPSettings(enabled=True, noise_multiplier=1.0, budget_epsilon=4.0)
    ledger = open_ledger(tmp_path / "ledger.json", dp)
    rounds = 0
    with pytest.raises(BudgetExceeded, match="nothing was sent") as info:
        for rnd in range(1, 50):
            private_train_round(rt, _instruction(rt, rnd, 50), data, TRAIN, dp, ledger, run_id="run-a", rule=RULE)
            rounds += 1
    assert rounds >= 1
    ds = dataset_id(record_digests(data.train))
    assert ds[:12] in str(info.value)  # the hospital's own log names the dataset ...
    public = info.value.public_reason()  # ... what the refusal tells the coordinator does not
    assert ds[:12] not in public and "st-elsewhere" not in public
    assert f"{info.value.spent:.3f}" in public and info.value.after > 4.0 >= info.value.spent
    assert len(ledger.history(ds)) == rounds and ledger.spent(ds) <= 4.0

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("trained although the budget is spent")

    monkeypatch.setattr(rt, "train_round_dp", no_training)
    restarted = open_ledger(tmp_path / "ledger.json", dp)  # a restart does not reset the spend
    with pytest.raises(BudgetExceeded):
        private_train_round(rt, _instruction(rt, 1, 50), data, TRAIN, dp, restarted, run_id="run-b", rule=RULE)
    assert len(restarted.history(ds)) == rounds


def _crash_between_record_and_send(run_dir: str, cache: str) -> None:
    """Child process: a DP round through the ClientApp that dies where the reply would be packed."""
    os.environ["FEDTUNE_CACHE"] = cache
    from flwr.app import Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedtune.client.site import simulated_ledger_path

    for field in ("_run_id", "_node_id", "_task_id"):
        setattr(TaskIdentity, field, 1)
    cfg = load_config(
        None,
        {
            "model.source": "tiny",
            "model.precision": "fp32",
            "dp.enabled": True,
            "dp.noise_multiplier": 1.0,
            "train.local_steps": 1,
        },
    )
    rt = SiteRuntime(cfg.model, cfg.lora)
    train, held = clinical.generate(1, n_train=20, n_eval=2, seed=0)["st-elsewhere"]
    data = site_data(rt, "st-elsewhere", train, held, 256)
    instruction = _instruction(rt)
    msg = Message(RecordDict(), dst_node_id=0, message_type=MessageType.TRAIN)
    wire.pack_reply = lambda *a, **k: os._exit(9)  # type: ignore[assignment]  # the process dies here
    ledger = simulated_ledger_path(Path(run_dir), "st-elsewhere", cfg.dp)
    site = Site(cfg, 0, rt, data, Path(run_dir).name, None, ledger, Path(run_dir) / "audit.jsonl")
    delta, metrics = client_app._local_update(instruction, site)  # records the release in the ledger
    client_app.reply(site, msg, instruction, metrics, num_examples=len(data.train), delta=delta)  # dies packing it
    os._exit(0)  # not reached


def test_a_crash_after_recording_and_before_sending_leaves_the_spend_counted(tiny_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    # spawn, not fork: a forked child of a process whose OpenMP pool already ran can hang in torch
    proc = multiprocessing.get_context("spawn").Process(
        target=_crash_between_record_and_send, args=(str(run_dir), os.environ["FEDTUNE_CACHE"])
    )
    proc.start()
    proc.join(timeout=300)
    if proc.exitcode is None:
        proc.kill()
    assert proc.exitcode == 9  # it died at the send
    ledger = PrivacyLedger.open(run_dir / "privacy" / "st-elsewhere.json")
    (row,) = ledger.report()
    assert row["releases"] == 1 and row["epsilon"] > 0
