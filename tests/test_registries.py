"""Each fact is written once: a registry owns its names, and config's torch-free name lists
(what a config is validated against) must equal them, in the same order (error messages
list them in that order)."""

from __future__ import annotations

import pytest

from fedtune import config
from fedtune.data.partition import PARTITIONS
from fedtune.lora.aggregate import COMBINES
from fedtune.lora.merge import RULES
from fedtune.lora.optimizers import DEFAULT_LR, SERVER_OPTIMIZERS


@pytest.mark.parametrize(
    ("names", "registry"),
    [
        (config.STRATEGIES, RULES),
        (config.SERVER_OPTIMIZERS, SERVER_OPTIMIZERS),
        (config.AGGREGATIONS, COMBINES),
        (config.PARTITIONS, PARTITIONS),
    ],
    ids=["merge rules", "server optimizers", "combines", "partitions"],
)
def test_config_names_equal_their_registry(names: tuple[str, ...], registry: dict[str, object]) -> None:
    assert names == tuple(registry)


def test_linear_strategies_are_the_linear_rules() -> None:
    assert config.LINEAR_STRATEGIES == tuple(name for name, rule in RULES.items() if rule.linear)


def test_registered_names_are_the_objects_own() -> None:
    assert all(rule.name == name for name, rule in RULES.items())
    assert all(cls.name == name for name, cls in SERVER_OPTIMIZERS.items())
    assert tuple(DEFAULT_LR) == config.SERVER_OPTIMIZERS
