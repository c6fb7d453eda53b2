"""The release gate's rule (field accuracy, its floor, the audit bound on a really overfitted
adapter), its settings' one-line errors, and ``fedtune client release``."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from fedtune.client import release
from fedtune.client.hospital import ReleasePolicy, load_hospital_config
from fedtune.client.hospital_example import EXAMPLE
from fedtune.client.release_store import ReleaseStore, release_view
from fedtune.config import LoraSettings, ModelSettings, TrainSettings
from fedtune.data import clinical
from fedtune.errors import ConfigError
from fedtune.lora.adapter import initial_state
from fedtune.models import load_model_config
from fedtune.runtime import SiteRuntime, site_data
from tests.client.release_common import make_site, offer

MINIMAL = '[hospital]\nname = "h"\n[coordinator]\naddress = "c.example.org:9092"\n[data]\ntrain = ["t.jsonl"]\n'
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_the_rule_on_field_accuracy_its_floor_and_the_audit_bound() -> None:
    rule = ReleasePolicy(max_drop=0.02, min_metric=0.3)
    adopted = release.Measured(0.53, 1.0, "the adopted adapter's")
    drop = release.judge(rule, release.Measured(0.41, 0.9), adopted)
    assert not drop.accepted and drop.rule == "release.max_drop"
    assert drop.reason == (
        "held-out field accuracy 0.410 is 0.120 below the adopted adapter's 0.530 (release.max_drop = 0.02)"
    )
    assert release.judge(rule, release.Measured(0.52, 9.0), adopted).accepted  # within max_drop; loss not the metric
    floor = release.judge(rule, release.Measured(0.25, 0.5), release.Measured(0.2, 1.0, "the base model's"))
    assert not floor.accepted and floor.rule == "release.min_metric"
    assert floor.reason == "held-out field accuracy 0.250 is below release.min_metric = 0.3"
    nan = release.judge(rule, release.Measured(float("nan"), float("nan")), adopted)
    assert not nan.accepted and nan.rule == "release.metric"


def test_bad_release_settings_are_one_line_errors(tmp_path: Path) -> None:
    cases = {
        'metric = "bleu"': "`release.metric` must be one of field_accuracy, loss, got 'bleu'",
        "max_drop = -0.1": "`release.max_drop` must be >= 0",
        "max_drop = nan": "`release.max_drop` must be >= 0",
        "min_metric = 1.5": "`release.min_metric` must be a field accuracy in [0, 1]",
        "max_audit_auc = 0.4": "`release.max_audit_auc` must be 0 (no audit) or in (0.5, 1]",
        "audit_members = 3": "`release.audit_members` must be 10-100000",
        'enabled = "yes"': "`release.enabled` must be bool",
        "bound = 1": "unknown field `release.bound`",
    }
    config = tmp_path / "hospital.toml"
    for line, expected in cases.items():
        config.write_text(f"{MINIMAL}[release]\n{line}\n")
        with pytest.raises(ConfigError) as err:
            load_hospital_config(config, check_files=False)
        message = str(err.value)
        assert message.startswith(f"{config}: ") and expected in message and "\n" not in message, message
    config.write_text(EXAMPLE)
    assert load_hospital_config(config, check_files=False).release == ReleasePolicy()  # the example: the defaults
    off = EXAMPLE.replace("enabled = true ", "enabled = false")
    assert off != EXAMPLE
    config.write_text(off)
    assert not load_hospital_config(config, check_files=False).release.enabled


def test_the_release_command_shows_the_adopted_adapter_and_the_decisions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune.cli import main

    config = tmp_path / "hospital.toml"
    config.write_text(EXAMPLE)
    folder = load_hospital_config(config, check_files=False).release_dir
    store = ReleaseStore(folder)
    assert main(["client", "release", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "adopted adapter: none yet (the hospital uses the base model)" in out and "no decisions yet" in out
    sha = hashlib.sha256(b"a").hexdigest()
    record = {"time": "t1", "run": "run-7", "round": 2, "sha256": sha, "metrics": {"field_accuracy": 0.5, "loss": 1.0}}
    store.adopt({**record, "audit": None}, lambda out: out.mkdir(parents=True))
    for rnd, decision in ((2, "accepted"), (3, "rejected")):
        store.record(
            {
                "time": f"t{rnd}",
                "run": "run-7",
                "round": rnd,
                "sha256": sha,
                "metric": "field_accuracy",
                "candidate": {"field_accuracy": 0.5},
                "current": {"field_accuracy": 0.4},
                "audit": None,
                "decision": decision,
                "reason": f"why {rnd}",
            }
        )
    assert main(["client", "release", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert (
        "adopted adapter: run run-7 round 2, adopted t1; held-out field accuracy 0.500, loss 1.000; "
        f"no audit; sha256 {sha}" in out
    )
    assert f"PEFT folder {folder / 'adapters' / sha[:16]}" in out
    assert "decisions: 2 (1 accepted)" in out and "why 3" in out and "why 2" not in out
    assert release_view(folder)["last"][0]["reason"] == "why 3"  # the hospital's page: the last decision
    assert main(["client", "release", "--config", str(config), "--history"]) == 0
    assert "why 2" in capsys.readouterr().out
    assert main(["client", "release", "--config", str(config), "--history", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["adopted"]["round"] == 2 and [d["round"] for d in doc["decisions"]] == [2, 3]
    assert doc["path"] == str(folder / "adapters" / sha[:16])


def test_the_audit_rule_rejects_an_adapter_that_gives_its_training_records_away(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # every linear layer at rank 16: enough for the tiny model to memorise its 12 training records
    lora = LoraSettings(rank=16, alpha=32, target_modules=ALL_LINEAR)
    rt = SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), lora)
    train, held = clinical.generate(1, n_train=12, n_eval=12, seed=0)["st-elsewhere"]
    data = site_data(rt, "st-elsewhere", train, held, 256)
    overfit = TrainSettings(lr=1e-2, batch_size=6, max_length=256, lr_schedule="constant")
    start = initial_state(load_model_config("tiny"), lora)  # seeded: the same adapter in every run
    rt.train_steps(start, data, overfit, steps=40, seed=0)
    candidate = rt.state()
    strict = ReleasePolicy(metric="loss", max_drop=10.0, max_audit_auc=0.8, audit_members=10)
    site = make_site((rt, data), tmp_path / "strict", strict)
    store = ReleaseStore(site.hospital.release_dir)  # type: ignore[union-attr]
    with caplog.at_level("WARNING"):
        offer(site, 1, candidate)
    (last,) = store.decisions()
    assert (last["decision"], last["rule"]) == ("rejected", "release.max_audit_auc") and store.adopted() is None
    audit = last["audit"]
    assert audit["auc"] > 0.8 and (audit["members"], audit["nonmembers"]) == (10, 10)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"membership-inference AUC {audit['auc']:.3f} (interval {audit['auc_low']:.3f}-" in warning
    assert warning.endswith("is above release.max_audit_auc = 0.8; keeping the base model (no adapter adopted yet)")

    loose = make_site((rt, data), tmp_path / "loose", dataclasses.replace(strict, max_audit_auc=1.0))
    offer(loose, 1, candidate)  # the same adapter under a bound it keeps: adopted, its audit kept with it
    adopted = ReleaseStore(loose.hospital.release_dir).adopted()  # type: ignore[union-attr]
    assert adopted is not None and adopted["audit"] == audit  # the audit is seeded: the same result
    assert "<= release.max_audit_auc = 1" in ReleaseStore(loose.hospital.release_dir).decisions()[-1]["reason"]  # type: ignore[union-attr]
