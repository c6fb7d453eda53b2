"""``fedtune client privacy-audit``: a hospital audits an exported adapter on its own records,
through the command line; the report stays in its state folder; bad adapters are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from fedtune.cli import main
from fedtune.client.hospital_example import EXAMPLE
from fedtune.config import LoraSettings, ModelSettings, TrainSettings
from fedtune.data.clinical import generate_site
from fedtune.data.records import write_records
from fedtune.lora.adapter import export_peft
from fedtune.runtime import SiteRuntime, site_data

TRAIN, HELD = 12, 12
LORA = LoraSettings(rank=16, alpha=32, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"))


@pytest.fixture()
def hospital(tmp_path: Path) -> Path:
    """hospital.toml of `st-elsewhere` on the tiny model: 12 training and 12 held-out records."""
    records = generate_site(0, TRAIN + HELD, seed=0)
    write_records(tmp_path / "data" / "train.jsonl", records[:TRAIN])
    write_records(tmp_path / "data" / "eval.jsonl", records[TRAIN:])
    text = EXAMPLE.replace('path = "models/SmolLM2-135M-Instruct"', 'path = "tiny"').replace(
        "threads = 0", "threads = 1"
    )
    text = text.replace('precision = "auto"', 'precision = "fp32"')
    (tmp_path / "hospital.toml").write_text(text)
    return tmp_path / "hospital.toml"


@pytest.fixture(scope="module")
def overfitted(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An adapter overfitted on the hospital's 12 training records, exported as the coordinator does."""
    records = generate_site(0, TRAIN + HELD, seed=0)
    runtime = SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), LORA)
    data = site_data(runtime, "st-elsewhere", records[:TRAIN], records[TRAIN:], 256)
    settings = TrainSettings(lr=1e-2, batch_size=6, max_length=256, lr_schedule="constant")
    runtime.train_steps(runtime.state(), data, settings, steps=40, seed=0)
    out = tmp_path_factory.mktemp("adapter") / "final"
    export_peft(out, runtime.state(), LORA, base_model_path="tiny", base_sha256=runtime.base.sha256)
    return out


def test_the_audit_finds_the_overfitted_records_and_keeps_its_report_local(
    hospital: Path, overfitted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["client", "privacy-audit", "--config", str(hospital), "--adapter", str(overfitted)]
    assert main([*argv, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    audit = report["audit"]
    assert (audit["members"], audit["nonmembers"]) == (HELD, HELD)  # default: as many as the held-out records
    assert audit["auc_low"] > 0.5 and audit["auc"] > 0.9
    assert report["nonmembers_from"] == "data.eval" and report["hospital"] == "st-elsewhere"
    written = Path(report["report"])
    assert written.parent == hospital.parent / "state" / "privacy-audits"
    assert json.loads(written.read_text())["audit"] == audit
    # the table: the numbers with their intervals, what they mean, the coarse 1% point
    assert main([*argv, "--members", "5"]) == 0
    text = capsys.readouterr().out
    assert "AUC" in text and "TPR@1%FPR" in text and "nothing was sent" in text
    assert "not 1%" in text and "members          5" in text
    assert len(list(written.parent.glob("*.json"))) == 2  # a second audit never overwrites the first


def test_an_untrained_adapter_shows_no_membership(hospital: Path, tiny_dir: Path, tmp_path: Path) -> None:
    runtime = SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), LORA)
    fresh = tmp_path / "fresh"
    export_peft(fresh, runtime.state(), LORA, base_model_path="tiny", base_sha256=runtime.base.sha256)  # B = 0
    assert main(["client", "privacy-audit", "--config", str(hospital), "--adapter", str(fresh)]) == 0
    (report,) = (hospital.parent / "state" / "privacy-audits").glob("*.json")
    audit = json.loads(report.read_text())["audit"]
    assert audit["auc"] == 0.5 and audit["auc_low"] < 0.5 < audit["auc_high"]


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedtune: error: ") and "\n" not in err
    return err


def test_bad_adapters_are_one_line_errors_naming_the_file(
    hospital: Path, overfitted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["client", "privacy-audit", "--config", str(hospital), "--adapter"]
    assert "adapter_config.json: no such file" in _error([*argv, str(tmp_path / "nowhere")], capsys)
    # trained on another base model
    state = load_file(overfitted / "adapter_model.safetensors")
    other = tmp_path / "other-base"
    export_peft(other, state, LORA, base_model_path="tiny", base_sha256="0" * 64)
    err = _error([*argv, str(other)], capsys)
    assert str(other / "adapter_model.safetensors") in err and "base model" in err
    # the config says rank 8, the tensors are rank 16
    wrong = tmp_path / "wrong-shape"
    export_peft(wrong, state, LORA, base_model_path="tiny", base_sha256="0" * 64)
    config = json.loads((overfitted / "adapter_config.json").read_text())
    (wrong / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    (wrong / "adapter_model.safetensors").write_bytes((overfitted / "adapter_model.safetensors").read_bytes())
    err = _error([*argv, str(wrong)], capsys)
    assert str(wrong / "adapter_model.safetensors") in err and "shape" in err
    (wrong / "adapter_config.json").write_text("{not json")
    assert str(wrong / "adapter_config.json") in _error([*argv, str(wrong)], capsys)


def test_a_hospital_without_held_out_records_is_told(
    hospital: Path, overfitted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (hospital.parent / "data" / "eval.jsonl").write_text("")
    err = _error(["client", "privacy-audit", "--config", str(hospital), "--adapter", str(overfitted)], capsys)
    assert str(hospital.parent / "data" / "eval.jsonl") in err and "no records" in err
