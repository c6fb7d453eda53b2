"""The command line: one-line errors with a non-zero exit, `fedtune data`, light commands that
stay light, and a parser that knows every command the docs name."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fedtune.cli import build_parser, main
from fedtune.data.records import load_records

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("argv", "pattern"),
    [
        (["simulate", "--set", "train.lr=-1"], "`train.lr` must be positive, got -1.0"),
        (["simulate", "--set", "nonsense"], "must look like section.field=value"),
        (["simulate", "--set", "train.warp=9"], "unknown field `train.warp`"),
        (["simulate", "/no/such/config.toml"], "cannot read config"),
        (["simulate", "--resume", "/no/such/run"], "not a fedtune run folder"),
        (["simulate", "--model", "org/some-hub-model", "--no-baselines"], "never downloaded from a hub"),
        (["simulate", "--target-epsilon", "20"], "`dp.target_epsilon` (20.0) is above `dp.budget_epsilon`"),
        (["simulate", "--set", "dp.enabled=true"], "set exactly one of `dp.noise_multiplier` and `dp.target_epsilon`"),
        (["simulate", "--epsilons", "1,-2"], "--epsilons must list positive numbers"),
        (["simulate", "--epsilons", "1", "--target-epsilon", "2"], "drop --target-epsilon and --noise-multiplier"),
        (["simulate", "--set", "client_dp.clipping_norm=0"], "`client_dp.clipping_norm` must be positive"),
        (["client", "privacy", "/no/such/ledger.json"], "no privacy ledger at /no/such/ledger.json"),
        # secure aggregation shows the coordinator only a sum: non-linear merges are refused before any round
        (
            ["simulate", "--set", "security.secure_aggregation=true", "--set", 'federation.strategy="svd"'],
            "`federation.strategy` = 'svd' is not a linear merge",
        ),
        (
            ["simulate", "--set", "security.secure_aggregation=true", "--set", 'federation.aggregation="median"'],
            "`federation.aggregation` = 'median' needs each hospital's update",
        ),
        (["simulate", "--set", "lora.site_ranks=[4, 8, 16]"], "only `federation.strategy` = 'svd' can merge"),
        (["simulate", "--set", 'federation.server_optimizer="adam"'], "must be one of none, fedavgm, fedadam, fedyogi"),
    ],
)
def test_errors_are_one_line_with_exit_2(
    argv: list[str], pattern: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    if argv[0] == "simulate" and "--resume" not in argv:
        argv = [*argv, "--out", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedtune: error: ") and err.count("\n") == 1
    assert pattern in err
    assert not (tmp_path / "run").exists()  # refused before any run folder (or round) exists


def test_resume_refuses_extra_flags(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--resume", str(tmp_path), "--rounds", "2"]) == 2
    assert "--resume continues a run with its own config.toml" in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "keep.txt").write_text("precious")
    assert main(["simulate", "--out", str(tmp_path)]) == 2
    assert "already exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_data_command_writes_loadable_files(tmp_path: Path) -> None:
    assert main(["data", "--out", str(tmp_path), "--hospitals", "2", "--train", "5", "--eval", "2"]) == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == [
        "northgate-general.eval.jsonl",
        "northgate-general.train.jsonl",
        "st-elsewhere.eval.jsonl",
        "st-elsewhere.train.jsonl",
    ]
    records = load_records(tmp_path / "st-elsewhere.train.jsonl")
    assert len(records) == 5 and records[0].target.startswith('{"age": ')


def test_console_script_entry_point() -> None:
    out = subprocess.run([sys.executable, "-m", "fedtune", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("fedtune ")


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.split("```")[1].strip().splitlines() if line.strip()]
    assert len(commands) == 2, "the README opens with exactly two commands"
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
    assert commands[0].endswith("fedtune simulate") and commands[1].endswith("python -m pytest")


def test_client_privacy_reports_and_refuses_an_open_ledger(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import hashlib
    import json

    from fedtune.client.ledger import Policy, PrivacyLedger
    from fedtune.privacy.accounting import Mechanism

    path = tmp_path / "st-elsewhere.json"
    ledger = PrivacyLedger(path, Policy(8.0, 1e-5))
    ds = ledger.register([hashlib.sha256(b"record").digest()], label="st-elsewhere")
    spent = ledger.record(ds, Mechanism(1.0, 0.1, 10), release_id="r1", run_id="run-a", server_round=1)
    assert main(["client", "privacy", str(tmp_path), "--history"]) == 0
    out = capsys.readouterr().out
    assert "epsilon 8 per record at delta 1e-05" in out and ds[:12] in out and "run-a" in out
    assert f"{spent:.3f}" in out and f"{8.0 - spent:.3f}" in out
    assert main(["client", "privacy", str(path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)[str(path)]
    assert row["releases"] == 1 and row["label"] == "st-elsewhere"
    path.chmod(0o644)
    assert main(["client", "privacy", str(path)]) == 2
    assert f"run `chmod 600 {path}`" in capsys.readouterr().err


def test_keys_create_and_show(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import stat

    assert main(["keys", "create", "--role", "hospital", "--name", "st-elsewhere", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    fingerprint = out.split("fingerprint of st-elsewhere: ")[1].splitlines()[0]
    assert stat.S_IMODE((tmp_path / "st-elsewhere.key").stat().st_mode) == 0o600
    assert main(["keys", "show", str(tmp_path / "st-elsewhere.pub"), str(tmp_path / "st-elsewhere.key")]) == 0
    assert capsys.readouterr().out.count(fingerprint) == 2  # the private and public file agree
    assert main(["keys", "create", "--role", "hospital", "--name", "st-elsewhere", "--out", str(tmp_path)]) == 2
    assert "pass --force" in capsys.readouterr().err
    (tmp_path / "st-elsewhere.key").chmod(0o640)
    assert main(["keys", "show", str(tmp_path / "st-elsewhere.key")]) == 2
    assert "chmod 600" in capsys.readouterr().err


# What a command that does no model work must not import: each costs 0.1-1.5 s at start
# (benchmarks/startup.py times them; this keeps them out without timing anything).
HEAVY = {"torch", "transformers", "peft", "opacus", "flwr", "ray", "safetensors", "matplotlib", "numpy", "mlflow"}


@pytest.fixture(scope="module")
def light_commands(tmp_path_factory: pytest.TempPathFactory) -> list[list[str]]:
    """The light commands, on files fedtune itself made: a coordinator home with its PKI, a hospital's folder."""
    from fedtune.cli.loopback import Loopback

    fed = Loopback(tmp_path_factory.mktemp("light"))
    fed.pki()
    config = fed.add_hospital("st-elsewhere", 0)
    return [
        ["--help"],
        ["client", "example-config"],
        ["client", "check", "--config", str(config)],
        ["status", "--home", str(fed.home.root)],
        ["pki", "show", str(fed.home.ca_cert), str(fed.home.pki_dir / "coordinator.pub")],
        ["keys", "show", str(fed.home.pki_dir / "coordinator.pub")],
        ["plan", "llama-8b", "--quantization", "4bit", "--gpu-gb", "24"],
    ]


def test_light_commands_import_no_model_library(light_commands: list[list[str]]) -> None:
    for argv in light_commands:
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "fedtune", *argv], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in done.stderr.splitlines() if "|" in line}
        assert not imported & HEAVY, f"`fedtune {' '.join(argv[:2])}` imports {sorted(imported & HEAVY)}"


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


# Mentions in the docs that name no command yet; each must still be there (delete it when fixed).
STALE: set[str] = set()  # mentions the docs may keep although no command has them (none)


def test_parser_knows_every_command_the_docs_name() -> None:
    """Every `fedtune WORD [WORD ...]` in a code span or block of README and docs/ is a command."""
    texts = {p.name: p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
    unknown: set[str] = set()
    found = 0
    for text in texts.values():
        blocks = re.findall(r"```[^\n]*\n(.*?)```", text, flags=re.S)
        spans = re.findall(r"`([^`\n]+(?:\n[^`\n]+)?)`", re.sub(r"```.*?```", "", text, flags=re.S))
        for code in [*blocks, *spans]:
            for mention in re.finditer(r"(?<![\w./-])fedtune((?: +[a-z][a-z-]*)+)", code.replace("\n", " ")):
                parser, said = build_parser(), "fedtune"
                for word in mention.group(1).split():
                    subs = _subcommands(parser)
                    if not subs:
                        break  # a command's own arguments follow
                    said += f" {word}"
                    if word not in subs:
                        unknown.add(said)
                        break
                    parser = subs[word]
                found += 1
    assert found > 50  # the scan sees the docs' commands
    assert unknown == STALE, f"not commands of `fedtune`: {sorted(unknown - STALE)}; fixed: {sorted(STALE - unknown)}"


def test_the_cli_keeps_bitsandbytes_hub_notice_out_of_the_terminal() -> None:
    """peft imports bitsandbytes whenever it is installed, and bitsandbytes then logs that it
    could not fetch a CPU kernel from the Hugging Face hub: noise in every simulation's output."""
    code = "from fedtune.cli import _quiet_libraries; _quiet_libraries(models=False); import bitsandbytes"
    quiet = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels-community" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", "import bitsandbytes"], capture_output=True, text=True, check=True)
    if "kernels-community" not in loud.stderr:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes has no hub kernel to ask for")
