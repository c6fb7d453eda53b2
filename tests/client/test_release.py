"""The hospital's release gate: it adopts a global adapter only by its own rule, keeps the
previous one when it rejects, says why, survives a failed write, and sends nothing."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.client import release
from fedtune.client.hospital import (
    CoordinatorSection,
    HospitalConfig,
    HospitalData,
    HospitalSection,
    ReleasePolicy,
    load_hospital_config,
)
from fedtune.client.hospital_example import EXAMPLE
from fedtune.client.release_store import ADOPTED, DECISIONS, ReleaseStore, release_view
from fedtune.client.site import Site
from fedtune.config import LoraSettings, ModelSettings, TrainSettings, load_config
from fedtune.data import clinical
from fedtune.errors import ConfigError
from fedtune.runtime import SiteData, SiteRuntime, site_data

TRAIN = TrainSettings(local_steps=4, batch_size=4, lr=1e-2)
LOSS_RULE = ReleasePolicy(metric="loss", max_drop=0.05)
MINIMAL = '[hospital]\nname = "h"\n[coordinator]\naddress = "c.example.org:9092"\n[data]\ntrain = ["t.jsonl"]\n'


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[SiteRuntime, SiteData]:
    rt = SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), LoraSettings(rank=2))
    train, held = clinical.generate(1, n_train=16, n_eval=4, seed=0)["st-elsewhere"]
    return rt, site_data(rt, "st-elsewhere", train, held, 256)


def _site(tiny: tuple[SiteRuntime, SiteData], tmp_path: Path, policy: ReleasePolicy, run: str = "run-x") -> Site:
    rt, data = tiny
    hospital = HospitalConfig(
        hospital=HospitalSection("st-elsewhere"),
        coordinator=CoordinatorSection("coordinator.example.org:9092"),
        data=HospitalData(train=("train.jsonl",)),
        release=policy,
        source=tmp_path / "hospital.toml",
    )
    cfg = load_config(None, {"model.source": "tiny", "eval.max_new_tokens": 4, "train.max_length": 256})
    return Site(cfg, 0, rt, data, run, None, tmp_path / "ledger.json", tmp_path / "audit.jsonl", hospital=hospital)


def _trained(rt: SiteRuntime, data: SiteData, start: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    rt.train_steps(start, data, TRAIN, steps=4, seed=seed)
    return rt.state()


def _offer(site: Site, rnd: int, state: dict[str, torch.Tensor]) -> None:
    """What client_app.evaluate does: evaluate the candidate, then the gate decides."""
    result = site.runtime.evaluate(state, site.data, site.cfg.eval)
    release.consider(site, rnd, state, result)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _plain_peft_logits(tiny_dir: Path, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(fresh, str(folder)).eval()(input_ids=ids).logits


def _runtime_logits(rt: SiteRuntime, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    from fedtune.lora import adapter

    adapter.set_state(rt.model, state)
    with torch.no_grad():
        return rt.model.eval()(input_ids=ids).logits


def test_a_degraded_adapter_is_rejected_and_the_previous_one_kept(
    tiny: tuple[SiteRuntime, SiteData], tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt, data = tiny
    site = _site(tiny, tmp_path, LOSS_RULE)
    folder = site.hospital.release_dir  # type: ignore[union-attr]
    store = ReleaseStore(folder)
    first = _trained(rt, data, rt.state(), seed=0)
    with caplog.at_level("INFO"):
        _offer(site, 1, first)  # judged against the base model: training lowered the held-out loss
    adopted = store.adopted()
    assert adopted is not None and (adopted["run"], adopted["round"]) == ("run-x", 1)
    assert adopted["sha256"] == release.adapter_sha256(first)
    assert any(
        r.levelname == "INFO" and "release gate adopted run run-x round 1" in r.getMessage() for r in caplog.records
    )
    (accepted,) = store.decisions()
    assert accepted["decision"] == "accepted" and "against the base model's" in accepted["reason"]
    assert accepted["candidate"]["loss"] < accepted["current"]["loss"]
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 3]])
    torch.testing.assert_close(
        _plain_peft_logits(tiny_dir, store.adapter_dir(adopted), ids),
        _runtime_logits(rt, first, ids),
        rtol=1e-5,
        atol=1e-5,
    )

    before = _files(folder / "adapters") | {ADOPTED: (folder / ADOPTED).read_bytes()}
    degraded = {k: v * 30 if ".lora_B." in k else v for k, v in first.items()}
    caplog.clear()
    with caplog.at_level("INFO"):
        _offer(site, 2, degraded)
    assert _files(folder / "adapters") | {ADOPTED: (folder / ADOPTED).read_bytes()} == before  # kept, untouched
    last = store.decisions()[-1]
    assert (last["round"], last["decision"], last["rule"]) == (2, "rejected", "release.max_drop")
    assert last["sha256"] == release.adapter_sha256(degraded) and last["audit"] is None
    rise = last["candidate"]["loss"] - last["current"]["loss"]
    assert rise > 0.05 and last["current"]["loss"] == pytest.approx(adopted["metrics"]["loss"])
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    said = warning.getMessage()
    assert said.startswith("release gate rejected run run-x round 2: held-out loss ")
    assert f"is {rise:.3f} above the adopted adapter's {last['current']['loss']:.3f} (release.max_drop = 0.05)" in said
    assert said.endswith("; keeping run run-x round 1") and "\n" not in said

    better = _trained(rt, data, first, seed=1)  # more training: the held-out loss goes down again
    _offer(site, 3, better)
    now = store.adopted()
    assert now is not None and now["round"] == 3 and now["sha256"] == release.adapter_sha256(better)
    assert [p.name for p in (folder / "adapters").iterdir()] == [now["sha256"][:16]]  # the old folder is gone
    torch.testing.assert_close(
        _plain_peft_logits(tiny_dir, store.adapter_dir(now), ids),
        _runtime_logits(rt, better, ids),
        rtol=1e-5,
        atol=1e-5,
    )
    assert [d["decision"] for d in store.decisions()] == ["accepted", "rejected", "accepted"]
    _offer(site, 4, better)  # the same adapter again (a re-run round): nothing to decide
    assert len(store.decisions()) == 3

    import tarfile

    from fedtune.client.backup import backup

    backup(site.hospital, tmp_path / "backup.tar.gz")  # type: ignore[arg-type]
    with tarfile.open(tmp_path / "backup.tar.gz") as tar:
        names = {n for n in tar.getnames() if n.startswith("state/release/")}
    held = f"state/release/adapters/{now['sha256'][:16]}"
    assert names == {
        "state/release/adopted.json",
        "state/release/baseline.json",
        "state/release/decisions.jsonl",
        f"{held}/adapter_config.json",
        f"{held}/adapter_model.safetensors",
    }


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


def test_a_failed_write_keeps_the_previous_state_and_the_error_is_one_line(
    tiny: tuple[SiteRuntime, SiteData],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fedtune.client import release_store

    rt, data = tiny
    site = _site(tiny, tmp_path, LOSS_RULE, run="run-y")
    folder = site.hospital.release_dir  # type: ignore[union-attr]
    first = _trained(rt, data, rt.state(), seed=2)
    _offer(site, 1, first)
    before = _files(folder)
    honest = release_store.atomic_write_json

    def dies(path: Path, obj: Any) -> None:  # the process dies at the commit: adopted.json is not replaced
        if path.name == ADOPTED:
            raise OSError(28, "No space left on device")
        honest(path, obj)

    monkeypatch.setattr(release_store, "atomic_write_json", dies)
    with caplog.at_level("INFO"):
        _offer(site, 2, _trained(rt, data, first, seed=3))  # an improvement: it would be adopted
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.getMessage() == (
        "release gate failed on run run-y round 2 (the adopted adapter is unchanged): "
        "[Errno 28] No space left on device"
    )
    store = ReleaseStore(folder)
    adopted = store.adopted()
    assert adopted is not None and adopted["round"] == 1  # the previous adopted adapter, whole
    assert _files(store.adapter_dir(adopted)) == {
        k.split("/", 2)[2]: v for k, v in before.items() if k.startswith(f"adapters/{adopted['sha256'][:16]}/")
    }
    assert (folder / ADOPTED).read_bytes() == before[ADOPTED]
    assert (folder / DECISIONS).read_bytes() == before[DECISIONS]  # no decision recorded for it
    monkeypatch.setattr(release_store, "atomic_write_json", honest)
    third = _trained(rt, data, first, seed=4)
    _offer(site, 3, third)  # the next round adopts normally and clears the half-written folder
    now = store.adopted()
    assert now is not None and now["round"] == 3
    assert [p.name for p in (folder / "adapters").iterdir()] == [now["sha256"][:16]]

    def no_history(self: ReleaseStore, decision: dict[str, Any]) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ReleaseStore, "record", no_history)  # the commit went through, the history line did not
    caplog.clear()
    with caplog.at_level("ERROR"):
        _offer(site, 4, _trained(rt, data, third, seed=6))
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "round 4 (it was adopted, but its decision is not in the history): [Errno 5]" in error
    assert store.adopted()["round"] == 4  # type: ignore[index]


def test_a_simulated_site_or_a_gate_turned_off_decides_nothing(
    tiny: tuple[SiteRuntime, SiteData], tmp_path: Path
) -> None:
    site = _site(tiny, tmp_path, dataclasses.replace(LOSS_RULE, enabled=False))
    state = tiny[0].state()
    _offer(site, 1, state)
    _offer(dataclasses.replace(site, hospital=None), 1, state)
    assert not (tmp_path / "state").exists()


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


def test_new_held_out_records_score_the_adopted_adapter_again(
    tiny: tuple[SiteRuntime, SiteData], tmp_path: Path
) -> None:
    rt, data = tiny
    site = _site(tiny, tmp_path, LOSS_RULE, run="run-z")
    store = ReleaseStore(site.hospital.release_dir)  # type: ignore[union-attr]
    first = _trained(rt, data, rt.state(), seed=5)
    _offer(site, 1, first)
    adopted = store.adopted()
    assert adopted is not None
    other = clinical.generate(1, n_train=16, n_eval=4, seed=9)["st-elsewhere"][1]  # the hospital's new eval file
    moved = dataclasses.replace(site, data=site_data(rt, "st-elsewhere", data.train, other, 256))
    expected = rt.evaluate(first, moved.data, site.cfg.eval)
    current = release.current_scores(moved, store, adopted)
    assert current.loss == pytest.approx(expected.loss) and current.label == "the adopted adapter's"
    assert abs(expected.loss - adopted["metrics"]["loss"]) > 1e-6  # other records, another score
    again = store.adopted()
    assert again is not None and again["heldout"] == release.heldout_key(moved) != adopted["heldout"]
    assert again["metrics"]["loss"] == pytest.approx(expected.loss) and again["sha256"] == adopted["sha256"]


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def test_the_audit_rule_rejects_an_adapter_that_gives_its_training_records_away(
    tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # every linear layer at rank 16: enough for the tiny model to memorise its 12 training records
    lora = LoraSettings(rank=16, alpha=32, target_modules=ALL_LINEAR)
    rt = SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), lora)
    train, held = clinical.generate(1, n_train=12, n_eval=12, seed=0)["st-elsewhere"]
    data = site_data(rt, "st-elsewhere", train, held, 256)
    overfit = TrainSettings(lr=1e-2, batch_size=6, max_length=256, lr_schedule="constant")
    rt.train_steps(rt.state(), data, overfit, steps=40, seed=0)
    candidate = rt.state()
    strict = ReleasePolicy(metric="loss", max_drop=10.0, max_audit_auc=0.8, audit_members=10)
    site = _site((rt, data), tmp_path / "strict", strict)
    store = ReleaseStore(site.hospital.release_dir)  # type: ignore[union-attr]
    with caplog.at_level("WARNING"):
        _offer(site, 1, candidate)
    (last,) = store.decisions()
    assert (last["decision"], last["rule"]) == ("rejected", "release.max_audit_auc") and store.adopted() is None
    audit = last["audit"]
    assert audit["auc"] > 0.8 and (audit["members"], audit["nonmembers"]) == (10, 10)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert f"membership-inference AUC {audit['auc']:.3f} (interval {audit['auc_low']:.3f}-" in warning
    assert warning.endswith("is above release.max_audit_auc = 0.8; keeping the base model (no adapter adopted yet)")

    loose = _site((rt, data), tmp_path / "loose", dataclasses.replace(strict, max_audit_auc=1.0))
    _offer(loose, 1, candidate)  # the same adapter under a bound it keeps: adopted, its audit kept with it
    adopted = ReleaseStore(loose.hospital.release_dir).adopted()  # type: ignore[union-attr]
    assert adopted is not None and adopted["audit"] == audit  # the audit is seeded: the same result
    assert "<= release.max_audit_auc = 1" in ReleaseStore(loose.hospital.release_dir).decisions()[-1]["reason"]  # type: ignore[union-attr]
