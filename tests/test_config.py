from __future__ import annotations

from pathlib import Path

import pytest

from fedtune.config import ExperimentConfig, load_config, parse_config
from fedtune.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_default_toml_spells_out_the_embedded_defaults() -> None:
    assert load_config(ROOT / "simulations" / "default.toml") == ExperimentConfig()


def test_toml_round_trip() -> None:
    cfg = load_config(None, {"train.local_steps": 3, "lora.target_modules": ["q_proj"], "data.partition": "iid"})
    assert parse_config(cfg.to_toml()) == cfg
    assert cfg.lora.target_modules == ("q_proj",)


def test_int_widens_to_float() -> None:
    assert load_config(None, {"train.lr": 1}).train.lr == 1.0


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"train.lr": -1.0}, r"`train.lr` must be positive, got -1.0"),
        ({"train.bogus": 1}, r"unknown field `train.bogus`"),
        ({"secagg.on": True}, r"unknown section `\[secagg\]`"),
        ({"data.partition": "random"}, r"`data.partition` must be one of natural, iid, dirichlet, got 'random'"),
        ({"train.local_steps": "8"}, r"`train.local_steps` must be int, got '8'"),
        ({"train.local_steps": True}, r"`train.local_steps` must be int"),
        ({"lora.rank": 0}, r"`lora.rank` must be a positive integer, got 0"),
        ({"lora.target_modules": "q_proj"}, r"`lora.target_modules` must be a list of strings"),
        (
            {"federation.min_clients": 9},
            r"`federation.min_clients` \(9\) cannot exceed the hospitals sampled per round \(3 ",
        ),
        (
            {"federation.min_clients": 3, "federation.fraction_train": 0.5},
            r"cannot exceed the hospitals sampled per round \(1 = `federation.fraction_train` 0.5 x `data.hospitals` 3",
        ),
        ({"data.source": "files"}, r"`data.files` must list one file per hospital"),
        ({"model.precision": "fp8"}, r"`model.precision` must be one of auto, fp32, bf16"),
    ],
)
def test_bad_values_name_the_field(overrides: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_bad_toml_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.toml"
    path.write_text("[train\nlr = 1")
    with pytest.raises(ConfigError, match=rf"{path}: not valid TOML"):
        load_config(path)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    path.write_text("[train]\nlr = -2.0\n")
    with pytest.raises(ConfigError, match=rf"{path}: `train.lr` must be positive"):
        load_config(path)


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        ({"dp.enabled": True}, r"set exactly one of `dp.noise_multiplier` and `dp.target_epsilon`"),
        ({"dp.enabled": True, "dp.noise_multiplier": 1.0, "dp.target_epsilon": 3.0}, "set exactly one of"),
        ({"dp.delta": 0.0}, r"`dp.delta` must be in \(0, 1\), got 0.0"),
        ({"dp.accountant": "gdp"}, r"`dp.accountant` must be one of rdp, prv, got 'gdp'"),
        ({"dp.grad_sample_mode": "ghost"}, r"`dp.grad_sample_mode` must be one of hooks, functorch"),
        ({"dp.budget_epsilon": -1.0}, r"`dp.budget_epsilon` must be positive, got -1.0"),
        ({"dp.enabled": True, "dp.target_epsilon": 12.0}, r"`dp.target_epsilon` \(12.0\) is above `dp.budget_epsilon`"),
        ({"client_dp.noise_multiplier": 0.0}, r"`client_dp.noise_multiplier` must be positive"),
        ({"client_dp.delta": 2.0}, r"`client_dp.delta` must be in \(0, 1\)"),
        ({"client_dp.max_epsilon": -1.0}, r"`client_dp.max_epsilon` must be >= 0"),
    ],
)
def test_dp_settings_are_validated(overrides: dict[str, object], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)
    assert load_config(None, {"dp.enabled": True, "dp.target_epsilon": 4.0}).dp.target_epsilon == 4.0


def test_hospitals_sampled_per_round_follow_flowers_rule() -> None:
    assert load_config(None, {"data.hospitals": 4, "federation.fraction_train": 0.5}).sampled_per_round() == 2
    assert load_config(None, {"data.hospitals": 3, "federation.fraction_train": 0.7}).sampled_per_round() == 2
    assert load_config(None, {"data.hospitals": 3, "federation.fraction_train": 0.1}).sampled_per_round() == 1


def test_every_shipped_experiment_loads() -> None:
    """The configs in simulations/ that the README and docs tell people to run parse whole."""
    paths = sorted((ROOT / "simulations").glob("*.toml"))
    assert {p.name for p in paths} >= {"default.toml", "dp.toml", "dp_realistic.toml", "strategies.toml"}
    from fedtune.experiments.compare import load_plan

    for path in paths:
        if path.name == "strategies.toml":  # a comparison plan: its variants are whole configs
            assert len(load_plan(path)) >= 2
        else:
            load_config(path)
    realistic = load_config(ROOT / "simulations" / "dp_realistic.toml")
    assert realistic.data.train_per_hospital == 2000 and realistic.privacy_audit.membership
