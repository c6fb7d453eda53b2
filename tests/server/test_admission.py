"""`fedtune server invite`: a hospital's startup kit, which validates once the hospital made its keys and data."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.client.hospital import load_hospital_config
from fedtune.data.clinical import generate_site
from fedtune.data.records import write_records
from fedtune.server.home import CoordinatorHome


@pytest.fixture()
def home(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> CoordinatorHome:
    home = CoordinatorHome(tmp_path / "coordinator")
    pki = str(home.pki_dir)
    assert main(["pki", "ca", "--out", pki]) == 0
    assert main(["pki", "server", "--ca", pki, "--out", pki, "--address", "coord.example.org"]) == 0
    capsys.readouterr()
    return home


def test_the_kit_validates_once_the_hospital_made_its_keys_and_data(
    home: CoordinatorHome, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    kit = tmp_path / "kit"
    args = ["server", "invite", "--home", str(home.root), "--name", "lakeside-university", "--out", str(kit)]
    assert main([*args, "--address", "coord.example.org:9092"]) == 0
    assert "it holds no secret" in capsys.readouterr().out
    files = sorted(str(p.relative_to(kit)) for p in kit.rglob("*") if p.is_file())
    assert files == ["INSTRUCTIONS.txt", "hospital.toml", "keys/ca.pem", "keys/coordinator.pub"]
    assert (kit / "keys" / "ca.pem").read_bytes() == home.ca_cert.read_bytes()
    assert not any(b"PRIVATE KEY" in p.read_bytes() or b'"private"' in p.read_bytes() for p in kit.rglob("*.*"))
    config = tomllib.loads((kit / "hospital.toml").read_text())
    assert config["hospital"]["name"] == "lakeside-university"
    assert config["coordinator"]["address"] == "coord.example.org:9092"
    text = (kit / "INSTRUCTIONS.txt").read_text()
    assert "fedtune pki hospital --name lakeside-university --out keys" in text
    assert "fedtune client check --config hospital.toml" in text and "keys/lakeside-university.node.pub" in text

    # the hospital follows the instructions: keys, its data, its model
    monkeypatch.chdir(kit)
    assert main(["pki", "hospital", "--name", "lakeside-university", "--out", "keys"]) == 0
    records = generate_site(3, 12, seed=0)
    write_records(kit / "data" / "train.jsonl", records[:10])
    write_records(kit / "data" / "eval.jsonl", records[10:])
    toml = kit / "hospital.toml"
    toml.write_text(toml.read_text().replace('path = "models/SmolLM2-135M-Instruct"', 'path = "tiny"'))
    capsys.readouterr()
    assert main(["client", "check", "--config", "hospital.toml"]) == 0
    assert "OK, hospital `lakeside-university` -> coord.example.org:9092" in capsys.readouterr().out
    cfg = load_hospital_config(toml)
    assert cfg.path(cfg.keys.node_key) == kit / "keys" / "lakeside-university.node.key"


def test_an_invite_is_refused_with_one_line(home: CoordinatorHome, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    base = ["server", "invite", "--home", str(home.root)]
    cases = [
        (["--name", "bad name", "--out", str(tmp_path / "a"), "--address", "coord.example.org:9092"], "`--name`"),
        (["--name", "x", "--out", str(tmp_path / "b")], "`--address` is needed: no SuperLink of"),
        (["--name", "x", "--out", str(tmp_path / "c"), "--address", "10.9.9.9:9092"], "does not name '10.9.9.9'"),
        (["--name", "x", "--out", str(tmp_path / "d"), "--address", "coord.example.org"], "must be HOST:PORT"),
    ]
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "hospital.toml").write_text("mine")
    cases.append((["--name", "x", "--out", str(tmp_path / "full"), "--address", "coord.example.org:1"], "not empty"))
    for args, says in cases:
        capsys.readouterr()
        assert main([*base, *args]) == 2, args
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err
    assert (tmp_path / "full" / "hospital.toml").read_text() == "mine"
    assert not any((tmp_path / d).exists() for d in "abcd")
    empty = CoordinatorHome(tmp_path / "nothing")
    assert main(["server", "invite", "--home", str(empty.root), "--name", "x", "--out", str(tmp_path / "e"),
                 "--address", "h:1"]) == 2  # fmt: skip
    assert "ca.pem is missing; create the PKI first" in capsys.readouterr().err
