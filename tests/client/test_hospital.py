"""hospital.toml: the daemon validates the whole file at start, and every mistake is one
line naming the file and the field, with a non-zero exit from the command."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedtune.client.hospital import load_hospital_config
from fedtune.client.hospital_example import EXAMPLE
from fedtune.data.clinical import generate_site
from fedtune.data.records import write_records
from fedtune.errors import ConfigError
from fedtune.security import pki
from fedtune.security.keys import KeyPair, save_keys


@pytest.fixture()
def hospital_dir(tmp_path: Path) -> Path:
    """A hospital folder laid out as EXAMPLE expects, with real keys and records."""
    keys = tmp_path / "keys"
    ca = pki.create_ca(tmp_path / "coordinator")
    (keys).mkdir()
    (keys / "ca.pem").write_bytes(ca.cert.read_bytes())
    save_keys(KeyPair.generate("coordinator", "coordinator"), tmp_path / "coordinator")
    (keys / "coordinator.pub").write_bytes((tmp_path / "coordinator" / "coordinator.pub").read_bytes())
    pki.create_node_key(keys, "st-elsewhere")
    save_keys(KeyPair.generate("st-elsewhere", "hospital"), keys)
    records = generate_site(0, 12, seed=0)
    write_records(tmp_path / "data" / "train.jsonl", records[:10])
    write_records(tmp_path / "data" / "eval.jsonl", records[10:])
    text = EXAMPLE.replace('path = "models/SmolLM2-135M-Instruct"', 'path = "tiny"')
    (tmp_path / "hospital.toml").write_text(text)
    return tmp_path


def _error(path: Path) -> str:
    with pytest.raises(ConfigError) as err:
        load_hospital_config(path)
    message = str(err.value)
    assert "\n" not in message and message.startswith(str(path.resolve()))
    return message


def test_the_example_config_is_valid_and_paths_are_relative_to_it(hospital_dir: Path) -> None:
    cfg = load_hospital_config(hospital_dir / "hospital.toml")
    assert cfg.name == "st-elsewhere" and cfg.privacy.require_dp and cfg.privacy.budget_epsilon == 8.0
    assert cfg.ledger_path == hospital_dir / "state" / "privacy.json"
    assert cfg.path(cfg.data.train[0]) == hospital_dir / "data" / "train.jsonl"


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ('device = "auto"', 'devcie = "auto"', "unknown field `model.devcie`"),
        ("[daemon]", "[deamon]", "unknown section `[deamon]`"),
        ('address = "coordinator.example.org:9092"', 'address = "https://coord:9092"', "`coordinator.address` must be"),
        ('address = "coordinator.example.org:9092"', 'address = "coord"', "`coordinator.address` must be HOST:PORT"),
        ('address = "coordinator.example.org:9092"', 'address = "coord:99999"', "`coordinator.address` must be"),
        ('name = "st-elsewhere"', 'name = ""', "`hospital.name` is required"),
        ("budget_epsilon = 8.0", 'budget_epsilon = "eight"', "`privacy.budget_epsilon` must be float"),
        ('health = "127.0.0.1:9094"', 'health = "0.0.0.0:9094"', "`daemon.health` must listen on loopback"),
        ('train = ["data/train.jsonl"]', 'train = ["data/missing.jsonl"]', "`data.train[0]`: "),
        ('ca = "keys/ca.pem"', 'ca = "keys/nothing.pem"', "nothing.pem does not exist: copy the coordinator's ca.pem"),
        (
            'envelope_key = "keys/coordinator.pub"',
            'envelope_key = "keys/gone.pub"',
            "gone.pub does not exist: copy the coordinator's coordinator.pub there",
        ),
        ('node_key = "keys/st-elsewhere.node.key"', 'node_key = "keys/x.node.key"', "x.node.key: no such node key"),
        ('envelope_key = "keys/st-elsewhere.key"', 'envelope_key = "keys/coordinator.pub"', "coordinator.pub has mode"),
        ('path = "tiny"', 'path = "data"', "`model.path`: "),
        ("[hospital]", "[hospital]\nlocation = 1", "unknown field `hospital.location`"),
        ("lora_rank = 0", "lora_rank = -4", "`model.lora_rank` must be >= 0 (0: the run's rank), got -4"),
        ("log_max_mb = 50", "log_max_mb = -1", "`daemon.log_max_mb` must be 0 (never rotate) or 0.01-100000 (MB)"),
        ("log_backups = 5", "log_backups = 500", "`daemon.log_backups` must be 0-100 rotated files, got 500"),
        (
            'log_file = "state/client.log.jsonl"',
            'log_file = "state/audit.jsonl"',
            "`daemon.log_file` must not be the same file as `audit.log`",
        ),
    ],
)
def test_each_mistake_is_one_line_naming_the_field(hospital_dir: Path, old: str, new: str, expected: str) -> None:
    path = hospital_dir / "hospital.toml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))
    assert expected in _error(path)


def test_missing_unparsable_and_unreadable(hospital_dir: Path) -> None:
    assert "no such file" in _error(hospital_dir / "nowhere.toml")
    path = hospital_dir / "hospital.toml"
    path.write_text(path.read_text() + "\n[broken\n")
    assert "not valid TOML" in _error(path)
    path.write_text(EXAMPLE.replace('path = "models/SmolLM2-135M-Instruct"', 'path = "tiny"'))
    (hospital_dir / "keys" / "st-elsewhere.node.key").write_text("garbage")
    assert "st-elsewhere.node.key: not an unencrypted OpenSSH private key" in _error(path)


@pytest.mark.parametrize("key", ["st-elsewhere.node.key", "st-elsewhere.key"])
def test_private_keys_readable_by_others_are_refused(hospital_dir: Path, key: str) -> None:
    os.chmod(hospital_dir / "keys" / key, 0o644)
    assert "readable by others; run `chmod 600" in _error(hospital_dir / "hospital.toml")


def test_another_hospitals_envelope_key_is_refused(hospital_dir: Path) -> None:
    save_keys(KeyPair.generate("northgate-general", "hospital"), hospital_dir / "keys")
    path = hospital_dir / "hospital.toml"
    path.write_text(path.read_text().replace("keys/st-elsewhere.key", "keys/northgate-general.key"))
    assert "is the key of hospital 'northgate-general', not of hospital 'st-elsewhere'" in _error(path)


def test_the_commands_print_an_example_and_check_with_an_exit_code(hospital_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.cli import main

    assert main(["client", "example-config"]) == 0
    assert capsys.readouterr().out == EXAMPLE
    path = hospital_dir / "hospital.toml"
    assert main(["client", "check", "--config", str(path)]) == 0
    assert "OK, hospital `st-elsewhere`" in capsys.readouterr().out
    path.write_text(path.read_text().replace("threads = 0", "threads = -1"))
    assert main(["client", "check", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`model.threads` must be >= 0" in err


@pytest.mark.parametrize(("strategy", "refused"), [("fedavg", True), ("ffa", True), ("svd", False)])
def test_a_hospital_at_its_own_rank_takes_part_only_in_svd_runs(
    hospital_dir: Path, strategy: str, refused: bool
) -> None:
    from fedtune.client.policy import policy_refusal
    from fedtune.config import load_config

    path = hospital_dir / "hospital.toml"
    path.write_text(path.read_text().replace("lora_rank = 0", "lora_rank = 4"))
    hospital = load_hospital_config(path)
    cfg = load_config(None, {"federation.strategy": strategy, "dp.enabled": True, "dp.noise_multiplier": 1.0})
    reason = policy_refusal(hospital, cfg, num_examples=10)
    assert ("trains at rank 4 (`model.lora_rank`)" in reason) is refused
    assert not reason or "only 'svd' merges mixed ranks" in reason


def test_relative_paths_work_from_any_folder(hospital_dir: Path, monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.cli import main

    elsewhere = hospital_dir / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    relative = os.path.relpath(hospital_dir / "hospital.toml", elsewhere)
    assert relative.startswith("..")
    assert main(["client", "check", "--config", relative]) == 0
    assert f"{hospital_dir / 'hospital.toml'}: OK" in capsys.readouterr().out  # named absolutely
    cfg = load_hospital_config(relative)
    assert cfg.source == hospital_dir / "hospital.toml" and cfg.state_dir == hospital_dir / "state"
    assert all(p.is_absolute() for p in (cfg.ledger_path, cfg.audit_path, cfg.log_path, cfg.path(cfg.keys.node_key)))


def _backup_while_a_round_holds_the_ledger(config: Path, out: Path) -> list[int]:
    """A round holding the ledger: the backup waits for it, so it never copies half a round."""
    import threading

    from fedtune.cli import main
    from fedtune.client.backup import _holding
    from fedtune.client.ledger import lock_path

    held, release = threading.Event(), threading.Event()

    def round_in_progress() -> None:
        with _holding(lock_path(load_hospital_config(config).ledger_path)):
            held.set()
            release.wait(30)

    holder = threading.Thread(target=round_in_progress)
    holder.start()
    held.wait(30)
    codes: list[int] = []
    copier = threading.Thread(
        target=lambda: codes.append(main(["client", "backup", "--config", str(config), "--out", str(out)]))
    )
    copier.start()
    copier.join(0.5)
    assert copier.is_alive() and not out.exists()
    release.set()
    copier.join(60)
    holder.join(30)
    return codes


def test_a_backup_is_consistent_private_and_restores_to_a_working_hospital(hospital_dir: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import hashlib
    import json
    import tarfile

    from fedtune.cli import main
    from fedtune.client.audit import AuditLog, Outgoing
    from fedtune.client.ledger import Policy, PrivacyLedger

    cfg = load_hospital_config(hospital_dir / "hospital.toml")
    PrivacyLedger(cfg.ledger_path, Policy(8.0, 1e-5)).register([hashlib.sha256(b"record").digest()], label="site")
    AuditLog(cfg.audit_path).append(Outgoing(run="r1", round=1, kind="train", payload=b"delta", ledger_releases=0))
    (cfg.state_dir / "runs.json").write_text("{}")
    out = hospital_dir / "backups" / "st-elsewhere.tar.gz"
    out.parent.mkdir()

    codes = _backup_while_a_round_holds_the_ledger(hospital_dir / "hospital.toml", out)
    assert codes == [0]
    said = capsys.readouterr().out
    assert said.count("\n") == 1 and "0600: it holds the private keys" in said and "audit trail of 1 records" in said
    assert out.stat().st_mode & 0o777 == 0o600
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        manifest = json.loads(tar.extractfile("BACKUP-MANIFEST.json").read())  # type: ignore[union-attr]
        restored = hospital_dir.parent / "restored"
        tar.extractall(restored, filter="data")
    assert {
        "hospital.toml",
        "keys/ca.pem",
        "keys/coordinator.pub",
        "keys/st-elsewhere.node.key",
        "keys/st-elsewhere.node.pub",
        "keys/st-elsewhere.key",
        "keys/st-elsewhere.pub",
        "state/privacy.json",
        "state/audit.jsonl",
        "state/audit.jsonl.head",
        "state/runs.json",
    } <= names
    assert any(n.startswith("state/privacy.json.records/") for n in names)
    assert not any(n.startswith("data/") or n.endswith(".lock") for n in names)  # the data are not the state
    assert manifest["hospital"] == "st-elsewhere" and manifest["audit_records"] == 1
    assert (restored / "keys" / "st-elsewhere.node.key").stat().st_mode & 0o777 == 0o600
    # a restored hospital (its data back from the hospital's own backups) checks clean
    (restored / "data").symlink_to(hospital_dir / "data")
    assert main(["client", "check", "--config", str(restored / "hospital.toml")]) == 0
    assert AuditLog(restored / "state" / "audit.jsonl").verify().ok
    capsys.readouterr()
    assert main(["client", "backup", "--config", str(hospital_dir / "hospital.toml"), "--out", str(out)]) == 2
    assert "exists; a backup is never overwritten" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("hospital_line", "run", "want"),
    [
        ('quantization = ""', {"model.quantization": "4bit"}, ("4bit", False)),  # "": the run's request
        ('quantization = "none"', {"model.quantization": "4bit"}, ("none", False)),  # the hospital decides
        ('quantization = "4bit"', {}, ("4bit", False)),
        ("gradient_checkpointing = true", {}, ("none", True)),  # on when either asks
        ("gradient_checkpointing = false", {"model.gradient_checkpointing": True}, ("none", True)),
    ],
)
def test_the_hospital_decides_how_it_holds_its_base(
    hospital_dir: Path, hospital_line: str, run: dict[str, object], want: tuple[str, bool]
) -> None:
    from fedtune.client.policy import hospital_run
    from fedtune.config import load_config

    path = hospital_dir / "hospital.toml"
    text = path.read_text()
    key = hospital_line.split(" =")[0]
    old = next(line for line in text.splitlines() if line.startswith(f"{key} ="))
    path.write_text(text.replace(old, hospital_line, 1))
    cfg, why = hospital_run(load_hospital_config(path), load_config(None, run).to_toml())
    assert why == "" and (cfg.model.quantization, cfg.model.gradient_checkpointing) == want


def test_a_bad_quantization_in_hospital_toml_is_one_line(hospital_dir: Path) -> None:
    path = hospital_dir / "hospital.toml"
    path.write_text(path.read_text().replace('quantization = ""', 'quantization = "2bit"', 1))
    assert "`model.quantization` must be one of none, 8bit, 4bit, got '2bit'" in _error(path)
