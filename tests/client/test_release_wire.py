"""The release gate through the hospital's ClientApp, in-process: the evaluation reply that
leaves is the same, byte for byte in size and value for value, with the gate on, off, or
failing; the gate's decision stays in the hospital's state folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from flwr.app import ConfigRecord, Message, MessageType, RecordDict

from fedtune import wire
from fedtune.client import client_app, release
from fedtune.client.audit import AuditLog
from fedtune.client.hospital import load_hospital_config
from fedtune.client.release_store import ReleaseStore
from fedtune.config import ExperimentConfig, load_config
from fedtune.security.keys import AllowList, load_private, load_public
from tests.client.hospital_app import hospital_context, hospital_folder

pytestmark = pytest.mark.usefixtures("flower_run_id")


@pytest.fixture()
def hospitals(tmp_path: Path) -> dict[str, Path]:
    """Two copies of hospital `st-elsewhere` (tiny model, real keys and records): the gate on, and off."""
    on = tmp_path / "on"
    text = hospital_folder(on, tmp_path / "coordinator", train=10, held_out=4)
    (on / "hospital.toml").write_text(text.replace('metric = "field_accuracy"', 'metric = "loss"    '))
    off = tmp_path / "off"
    shutil.copytree(on, off)
    (off / "hospital.toml").write_text(text.replace("enabled = true ", "enabled = false"))
    return {"on": on / "hospital.toml", "off": off / "hospital.toml"}


def _evaluate(config: Path, cfg: ExperimentConfig, state: dict[str, torch.Tensor]) -> wire.Reply:
    """One evaluate message through the hospital's ClientApp (its mods included), opened as the coordinator would."""
    context, run_dir = hospital_context(config, cfg)
    challenge = wire.new_challenge()
    settings = ConfigRecord({"num-rounds": 3, "run-id": run_dir.name, "server-round": 1, "challenge": challenge})
    msg = Message(
        RecordDict({wire.GLOBAL: wire.to_arrays(state), wire.CONFIG: settings}),
        dst_node_id=7,
        message_type=MessageType.EVALUATE,
        group_id="1",
    )
    reply = client_app.app(msg, context)
    assert not reply.has_error(), reply.error
    keys = config.parent / "keys"
    opener = wire.Opener(
        load_private(config.parent.parent / "coordinator" / "coordinator.key"),
        AllowList([load_public(keys / "st-elsewhere.pub")]),
    )
    expected = wire.Expected(run=run_dir.name, round=1, kind="evaluate", challenge=challenge)
    opened = wire.open_content(reply.content, opener=opener, expected=expected)
    assert isinstance(opened, wire.Reply)
    return opened


def test_the_eval_reply_is_the_same_with_the_gate_on_off_or_failing(
    hospitals: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(None, {"model.source": "tiny", "train.max_length": 256, "eval.max_new_tokens": 4})
    site = client_app.SITES.hospital(hospitals["on"], cfg.to_toml(), str(hospitals["on"].parent / "runs" / "run-a"))
    state = site.runtime.state()
    generator = torch.Generator().manual_seed(0)
    for key in state:  # a candidate that differs from the base model
        if ".lora_B." in key:
            state[key] = torch.randn(state[key].shape, generator=generator) * 0.05
    on = _evaluate(hospitals["on"], cfg, state)
    off = _evaluate(hospitals["off"], cfg, state)
    assert set(on.metrics) == {"loss-sum", "tokens", "metric-sum", "exact-sum"}  # what evaluate sends, nothing more
    assert on.metrics == off.metrics and on.num_examples == off.num_examples == 4 and on.delta is off.delta is None
    sizes = {
        name: [r["bytes"] for r in AuditLog(load_hospital_config(c).audit_path).records()]
        for name, c in hospitals.items()
    }
    assert sizes["on"] == sizes["off"]  # the sealed message that left has the same size: nothing was added
    decided = ReleaseStore(load_hospital_config(hospitals["on"]).release_dir).decisions()
    assert [(d["run"], d["round"], d["sha256"]) for d in decided] == [("run-a", 1, release.adapter_sha256(state))]
    assert not load_hospital_config(hospitals["off"]).release_dir.exists()  # the gate off decides nothing

    def broken(self: ReleaseStore) -> None:
        raise RuntimeError("the disk\nwent away")

    monkeypatch.setattr(ReleaseStore, "adopted", broken)
    said: list[tuple[str, str]] = []
    monkeypatch.setattr(client_app.SITES, "event_log", lambda level, message: said.append((level, message)))
    failing = _evaluate(hospitals["on"], cfg, state)  # in the daemon (which sets event_log: its JSON log)
    assert failing.metrics == on.metrics  # the reply still went out, the same
    assert said == [
        ("ERROR", "release gate failed on run run-a round 1 (the adopted adapter is unchanged): the disk went away")
    ]
