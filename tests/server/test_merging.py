"""The round's merge and sampling, built once from the run's config."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.lora.optimizers import DEFAULT_LR
from fedtune.server.client_dp import ClientLevelDP
from fedtune.server.merging import Combine, Merge, NormBounds
from fedtune.server.sampling import Sampling


def test_the_merge_is_the_configs_rule_bounds_combine_and_server_optimizer() -> None:
    cfg = load_config(
        None,
        {
            "federation.strategy": "ffa",
            "federation.aggregation": "trimmed_mean",
            "federation.trim_fraction": 0.1,
            "federation.server_optimizer": "fedadam",
            "security.norm_bound": 5.0,
            "security.max_update_norm": 2.0,
        },
    )
    merge = Merge.from_config(cfg)
    assert (merge.rule.name, merge.rule.alpha, merge.rule.rank) == ("ffa", cfg.lora.alpha, cfg.lora.rank)
    assert merge.bounds == NormBounds(relative=5.0, absolute=2.0)
    assert merge.combine == Combine("trimmed_mean", 0.1)
    assert merge.optimizer.name == "fedadam" and merge.optimizer.lr == DEFAULT_LR["fedadam"]
    assert merge.client_dp is None
    dp = ClientLevelDP(load_config(None, {"client_dp.enabled": True}).client_dp, num_sampled=2)
    assert Merge.from_config(cfg, client_dp=dp).client_dp is dp


def test_without_client_dp_the_combine_decides_and_nothing_is_accounted() -> None:
    updates = [{"w": torch.full((2,), 1.0)}, {"w": torch.full((2,), 4.0)}, {"w": torch.full((2,), 100.0)}]
    mean, account = Merge().combined(updates, [1.0, 1.0, 2.0])
    torch.testing.assert_close(mean["w"], torch.full((2,), 51.25))  # (1 + 4 + 200) / 4
    assert account == {}
    median, _ = Merge(combine=Combine("median")).combined(updates, [1.0, 1.0, 2.0])
    torch.testing.assert_close(median["w"], torch.full((2,), 4.0))


def test_sampling_follows_fraction_train_and_min_clients() -> None:
    assert Sampling.from_config(load_config(None, {"data.hospitals": 4, "federation.fraction_train": 0.5})) == Sampling(
        2, 0.5, 2
    )
    assert Sampling.from_config(load_config(None, {"data.hospitals": 4, "federation.min_clients": 3})) == Sampling(
        4, 1.0, 3
    )
    with pytest.raises(ConfigError, match=r"`min_updates` >= 1, got 3, 1 and 0"):
        Sampling(3, min_updates=0)
