"""Who a round asks: the hospitals it waits for, and Flower's sampling rule without Flower's unbounded wait."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flwr.serverapp import Grid

from fedtune.errors import ConfigError, FedTuneError

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig


@dataclass(frozen=True)
class Sampling:
    """Who a training round asks and what it needs back: Flower's rule, max(int(N x
    ``fraction``), ``at_least``) of the N connected hospitals, and ``min_updates`` valid updates."""

    at_least: int
    fraction: float = 1.0
    min_updates: int = 1

    def __post_init__(self) -> None:
        if self.at_least < 1 or self.min_updates < 1 or not 0 < self.fraction <= 1:
            raise ConfigError(
                f"sampling needs `at_least` >= 1, 0 < `fraction` <= 1 and `min_updates` >= 1, "
                f"got {self.at_least}, {self.fraction:g} and {self.min_updates}"
            )

    @classmethod
    def from_config(cls, cfg: ExperimentConfig) -> Sampling:
        """``cfg.sampled_per_round()`` hospitals a round; ``federation.min_clients`` of them, or all."""
        sampled = cfg.sampled_per_round()
        return cls(sampled, cfg.federation.fraction_train, cfg.federation.min_clients or sampled)


def sample(grid: Grid, fraction: float, at_least: int) -> list[int]:
    """Flower's rule, max(int(N x fraction), at_least) of the N connected hospitals, but
    never more than are connected and never an unbounded wait: Flower's own sampling
    blocks until ``min_available_nodes`` connect, forever if one has died. The round
    loop waits for hospitals, within ``federation.join_timeout``, before each round."""
    nodes = sorted(grid.get_node_ids())
    return random.sample(nodes, min(len(nodes), max(int(len(nodes) * fraction), at_least)))


def await_hospitals(
    grid: Grid, *, want: int, need: int, timeout: float, say: Callable[[str], None], why: str = ""
) -> int:
    """Wait until ``want`` hospitals are connected, or ``timeout`` seconds; return how many are.

    After the timeout the round goes on with fewer if at least ``need`` are connected;
    otherwise the federation fails with a message that says what is missing. A dead
    SuperNode counts as connected until Flower's heartbeat marks it offline; a round that
    samples it loses its reply at ``round_timeout`` and goes on with the others.
    """
    deadline = time.monotonic() + timeout
    shown = -1
    while True:
        online = len(list(grid.get_node_ids()))
        if online >= want:
            return online
        if time.monotonic() >= deadline:
            if online >= need:
                say(f"{online} of {want} hospitals connected after {timeout:.0f} s; going on with them")
                return online
            raise FedTuneError(
                f"only {online} hospital(s) connected within `federation.join_timeout` ({timeout:.0f} s), "
                f"a round needs {need}{why}; start more hospitals or lower `federation.min_clients`"
            )
        if online != shown:
            say(f"waiting for hospitals: {online}/{want} connected")
            shown = online
        time.sleep(1.0)
