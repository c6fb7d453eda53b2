"""The strategy comparison: a plan of merge rules x configs, one table and one plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedtune.checkpoint import MetricsLog
from fedtune.cli import main
from fedtune.errors import CheckpointError, ConfigError
from fedtune.experiments.compare import load_plan, parse_variant, prepare_compare
from fedtune.runfolder import RunFolder

pytestmark = pytest.mark.timeout(600)

# A federation of the tiny model in seconds: 2 hospitals, 1 round of 1 step, few records.
TINY = """
[run]
name = "{name}"
baselines = false
[model]
source = "tiny"
precision = "fp32"
threads = 1
[data]
hospitals = 2
train_per_hospital = 8
eval_per_hospital = 2
[train]
local_steps = 1
batch_size = 4
[federation]
rounds = {rounds}
[eval]
max_new_tokens = 4
"""
DP = """
[dp]
enabled = true
target_epsilon = 4.0
"""


def _plan(tmp_path: Path, body: str, *, configs: dict[str, str] | None = None) -> Path:
    for name, text in (configs or {"a": TINY.format(name="a", rounds=1)}).items():
        (tmp_path / f"{name}.toml").write_text(text)
    path = tmp_path / "plan.toml"
    path.write_text(body)
    return path


def test_parse_variant() -> None:
    assert parse_variant("fedavg", source="p") == ("fedavg", "none", 0.0)
    assert parse_variant(" ffa+fedyogi ", source="p") == ("ffa", "fedyogi", 0.0)
    assert parse_variant("fedavg+fedadam@0.001", source="p") == ("fedavg", "fedadam", 0.001)


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ('strategies = ["fedavg"]\nconfigs = ["a.toml"]\nrounds = 3', r"plan\.toml: unknown key `rounds`"),
        ('strategies = []\nconfigs = ["a.toml"]', r"plan\.toml: `strategies` must be a non-empty list"),
        ('strategies = ["fedavg"]\nconfigs = []', r"plan\.toml: `configs` must be a non-empty list"),
        ('strategies = ["fedavg"]', r"`configs` must be a non-empty list of names, got None"),
        ('strategies = "fedavg"\nconfigs = ["a.toml"]', r"`strategies` must be a non-empty list"),
        (
            'strategies = ["fedavg+adam"]\nconfigs = ["a.toml"]',
            r"unknown server optimizer 'adam'; use one of fedavgm, fedadam, fedyogi",
        ),
        ('strategies = ["fedprox"]\nconfigs = ["a.toml"]', r"unknown strategy 'fedprox'; use one of fedavg, ffa, svd"),
        ('strategies = ["fedavg+none"]\nconfigs = ["a.toml"]', r"unknown server optimizer 'none'"),
        ('strategies = ["ffa", "fedavg", " ffa"]\nconfigs = ["a.toml"]', r"`strategies` lists 'ffa' twice; drop one"),
        ('strategies = ["fedavg"]\nconfigs = ["missing.toml"]', r"missing\.toml: cannot read config"),
        ('strategies = ["fedavg"]\nconfigs = ["a.toml", "a.toml"]', r"two `configs` share `run.name` 'a'"),
        ("strategies = [", r"plan\.toml: not valid TOML"),
        ('strategies = ["fedavg+fedadam@fast"]\nconfigs = ["a.toml"]', r"must give a positive server learning rate"),
        ('strategies = ["fedavg+fedadam@-1"]\nconfigs = ["a.toml"]', r"must give a positive server learning rate"),
    ],
)
def test_plan_errors(tmp_path: Path, body: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_plan(_plan(tmp_path, body))


def test_bad_config_and_variant_conflict(tmp_path: Path) -> None:
    bad = {"a": TINY.format(name="a", rounds=1) + "[lora]\nrank = 0\n"}
    with pytest.raises(ConfigError, match=r"a\.toml: `lora.rank` must be a positive integer"):
        load_plan(_plan(tmp_path, 'strategies = ["fedavg"]\nconfigs = ["a.toml"]', configs=bad))
    secagg = {
        "a": TINY.format(name="a", rounds=1).replace("hospitals = 2", "hospitals = 3")
        + "[security]\nsecure_aggregation = true\n"
    }
    with pytest.raises(ConfigError, match=r"variant 'svd' of config 'a': .*not a linear merge"):
        load_plan(_plan(tmp_path, 'strategies = ["fedavg", "svd"]\nconfigs = ["a.toml"]', configs=secagg))


@pytest.mark.flower
def test_compare_refuses_a_full_folder_and_a_non_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = _plan(tmp_path, 'strategies = ["fedavg"]\nconfigs = ["a.toml"]')
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        prepare_compare(plan, root=tmp_path)
    assert main(["compare", "--resume", str(tmp_path)]) == 2
    assert "no compare.json; pass the folder `fedtune compare` printed" in capsys.readouterr().err
    assert main(["compare", str(plan), "--resume", str(tmp_path)]) == 2
    assert "drop PLAN and --out" in capsys.readouterr().err
    assert main(["compare"]) == 2
    assert "give a plan" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        from fedtune.experiments.compare import read_plan

        read_plan(tmp_path)


def _fake_federation(folder: RunFolder, *, say: Any = print, parent: Any = None) -> str:
    """Stands in for a Flower run: metrics records as the coordinator writes them, no training."""
    cfg = folder.load_config()
    log = MetricsLog(folder.metrics_path)
    if log.read():
        return "resumed"
    rounds = 1 if cfg.run.name == "private-fedavg" else cfg.federation.rounds  # stopped early (budget)
    upload = 500.0 if cfg.federation.strategy == "ffa" else 1000.0
    for n in range(1, rounds + 1):
        train = {s: {"upload-bytes": upload + i} for i, s in enumerate(("north", "south"))}
        if cfg.dp.enabled:
            for i, m in enumerate(train.values()):
                m["dp-epsilon"] = n * (1.0 + i)
        pooled = {"metric": n / 10 + (upload == 500.0) / 100, "exact": 0.05 * n, "loss": 2.0 - n / 10}
        log.append({"kind": "round", "round": n, "train": train, "eval": {"pooled": pooled}})
    say(f"federated {rounds} round(s)")
    return "table"


def _fake_base(folder: RunFolder, *, say: Any = print, only: Any = None) -> dict[str, Any]:
    base = {"base": {"pooled": {"metric": 0.02, "exact": 0.0, "loss": 3.0}}}
    folder.baselines_path.write_text(json.dumps(base))
    return base


@pytest.mark.flower
def test_compare_rows_and_plot_of_two_configs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune.experiments import baselines, compare

    configs = {"plain": TINY.format(name="plain", rounds=2), "private": TINY.format(name="private", rounds=2) + DP}
    body = 'strategies = ["fedavg", "ffa"]\nconfigs = ["plain.toml", "private.toml"]'
    root = prepare_compare(_plan(tmp_path, body, configs=configs), root=tmp_path / "cmp")
    figures: list[Any] = []
    monkeypatch.setattr(compare, "run_simulation", _fake_federation)
    monkeypatch.setattr(baselines, "run_baselines", _fake_base)
    monkeypatch.setattr(compare, "save_figure", lambda fig, path: figures.append(fig) or path)
    lines: list[str] = []
    table = compare.run_compare(root, say=lines.append)
    assert "--- compare run 2/4: plain/ffa (strategy ffa, server optimizer none)" in lines
    assert "[private/ffa] federated 2 round(s)" in lines
    assert table.splitlines()[0] == (
        "| config | variant | DP-SGD | epsilon spent (max site) | round 1 | round 2 | pooled exact | pooled loss "
        "| upload bytes / site / round |"
    )
    assert table.splitlines()[2:] == [
        "| plain | fedavg | off |  | 0.100 | 0.200 | 0.100 | 1.800 | 1000 |",
        "| plain | ffa | off |  | 0.110 | 0.210 | 0.100 | 1.800 | 500 |",
        "| private | fedavg | on | 2.000 | 0.100 |  | 0.050 | 1.900 | 1000 |",
        "| private | ffa | on | 4.000 | 0.110 | 0.210 | 0.100 | 1.800 | 500 |",
    ]
    assert (root / "strategies.md").read_text().endswith(table)
    assert json.loads((root / "strategies.json").read_text())[2]["round 2"] is None
    (fig,) = figures
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["plain", "private (DP-SGD, eps 4.00)"]
    assert [line.get_label() for line in axes[0].get_lines()] == ["fedavg", "ffa"]
    assert list(axes[0].get_lines()[1].get_xdata()) == [0, 1, 2]  # round 0: the config's base model
    assert list(axes[1].get_lines()[0].get_ydata()) == [0.02, 0.1]
    assert axes[0].get_shared_y_axes().joined(axes[0], axes[1])


@pytest.mark.flower
def test_compare_end_to_end_and_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two real federations of the tiny model (about 20 s each, mostly Flower's start-up)."""
    plan = _plan(
        tmp_path,
        'strategies = ["fedavg", "fedavg+fedavgm"]\nconfigs = ["private.toml"]',
        configs={"private": TINY.format(name="private", rounds=1) + DP},
    )
    out = tmp_path / "cmp"
    assert main(["compare", str(plan), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--- compare run 2/2: private/fedavg+fedavgm (strategy fedavg, server optimizer fedavgm)" in printed
    assert "[private/fedavg+fedavgm] round 1/1" in printed
    runs = json.loads((out / "compare.json").read_text())["runs"]
    assert [(r["variant"], r["strategy"], r["optimizer"], r["base"]) for r in runs] == [
        ("fedavg", "fedavg", "none", True),
        ("fedavg+fedavgm", "fedavg", "fedavgm", False),
    ]
    assert 'server_optimizer = "fedavgm"' in (out / "private" / "fedavg-fedavgm" / "config.toml").read_text()
    rows = json.loads((out / "strategies.json").read_text())
    assert [(r["config"], r["variant"], r["DP-SGD"]) for r in rows] == [
        ("private", "fedavg", "on"),
        ("private", "fedavg+fedavgm", "on"),
    ]
    for r in rows:
        assert 0 < r["epsilon spent (max site)"] <= 4.0 and 0 <= r["round 1"] <= 1 and r["pooled loss"] > 0
        assert r["upload bytes / site / round"] > 1000
    assert "base" in json.loads((out / "private" / "fedavg" / "baselines.json").read_text())
    assert (out / "strategies.png").stat().st_size > 10_000
    assert "| private | fedavg+fedavgm | on |" in (out / "strategies.md").read_text()
    # resuming a finished comparison trains nothing more and gives the same table
    before = (out / "strategies.json").read_text()
    assert main(["compare", "--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "round 1/1" not in printed and "| private | fedavg+fedavgm | on |" in printed
    assert (out / "strategies.json").read_text() == before
