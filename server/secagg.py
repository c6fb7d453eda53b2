"""Secure aggregation: the training half of a round through Flower's SecAgg+ workflow.

Flower 1.41 runs SecAgg+ only in its legacy workflow (``LegacyContext``,
``SecAggPlusWorkflow``, the client's ``secaggplus_mod``), which drives a legacy strategy's
``configure_fit`` / ``aggregate_fit``. Here a minimal legacy strategy samples the
hospitals and hands over the one thing the coordinator learns: the weighted mean of the
sampled hospitals' deltas (weights: their record counts), from which the masks cancel.
Each hospital clips its delta's values to +-``secagg_clipping_range`` and quantizes them
to ``secagg_quantization_bits`` bits before masking; a hospital that drops out mid-round
is unmasked from its neighbours' key shares when enough remain (``secagg_threshold``).

What the coordinator can no longer do, by design: look at one hospital's update. It
checks the aggregate (shapes, finite values, norm bound) instead; a hospital's own
misbehaviour within the clipping range is hidden in the sum.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import flwr.compat.common.recorddict_compat as compat
from flwr.app import ConfigRecord, Context
from flwr.common import EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Scalar
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager, SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedtune import wire
from fedtune.config import SecuritySettings
from fedtune.errors import FedTuneError, UpdateRejected
from fedtune.lora.aggregate import validate_update
from fedtune.lora.delta import State

MAX_WEIGHT = 1000.0  # Flower's default: a hospital's weight is num_examples / MAX_WEIGHT, quantized too


def quantization_error_bound(settings: SecuritySettings, num_examples: Sequence[int]) -> float:
    """Largest error SecAgg+ can add to one value of the weighted mean of the deltas.

    Each hospital sends its weighted values stochastically rounded to quanta of
    q = 2 * clipping_range / 2**bits (error below one quantum); the server divides the sum
    by the sum of the weights w_i = n_i / MAX_WEIGHT, so the mean is off by less than
    k * q / sum(w_i) for k hospitals. Values beyond +-clipping_range are clipped, not
    bounded by this (LoRA deltas are orders of magnitude smaller).
    """
    quantum = 2 * settings.secagg_clipping_range / 2**settings.secagg_quantization_bits
    return len(num_examples) * quantum / sum(n / MAX_WEIGHT for n in num_examples)


@dataclass
class SecAggResult:
    """What a secure round revealed: the mean delta, and each hospital's plain numbers."""

    mean_delta: State
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    dropped: int = 0


class _MeanOfSampled(Strategy):
    """The legacy strategy SecAgg+ drives: sample, then keep the workflow's aggregate."""

    def __init__(self, sample_size: int, config: dict[str, Scalar], seed: int) -> None:
        self.sample_size = sample_size
        self.config = config
        self.rng = random.Random(seed)
        self.aggregate: Parameters | None = None
        self.results: list[tuple[ClientProxy, FitRes]] = []
        self.sampled = 0

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        nodes = sorted(client_manager.all().values(), key=lambda c: c.cid)
        chosen = self.rng.sample(nodes, min(self.sample_size, len(nodes)))
        self.sampled = len(chosen)
        return [(client, FitIns(parameters, dict(self.config))) for client in chosen]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        self.results = results
        # SecAgg+ put the same aggregate (the weighted mean) into every result
        self.aggregate = results[0][1].parameters if results else None
        return self.aggregate, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None


def workflow(settings: SecuritySettings, *, timeout: float) -> SecAggPlusWorkflow:
    """Flower's SecAgg+ with every sampled hospital holding a key share of every other."""
    return SecAggPlusWorkflow(
        num_shares=1.0,
        reconstruction_threshold=settings.secagg_threshold,
        clipping_range=settings.secagg_clipping_range,
        quantization_range=2**settings.secagg_quantization_bits,
        modulus_range=2**32,
        max_weight=MAX_WEIGHT,
        timeout=timeout,
    )


def secagg_train_round(
    grid: Grid,
    context: Context,
    settings: SecuritySettings,
    *,
    global_state: State,
    reference: State,
    server_round: int,
    num_rounds: int,
    sample_size: int,
    run_id: str,
    seed: int,
    timeout: float,
) -> SecAggResult:
    """Run one secure training round; raise FedTuneError when SecAgg+ cannot finish it.

    ``global_state`` is sent; the hospitals' updates have the keys and shapes of
    ``reference`` (the merge rule's: the whole adapter for ``fedavg``, B only for ``ffa``).
    """
    config = wire.secagg_instruction(
        num_rounds=num_rounds, run_id=run_id, server_round=server_round, challenge=wire.new_challenge()
    )
    strategy = _MeanOfSampled(sample_size, config, seed=seed * 1_000_003 + server_round)
    manager = SimpleClientManager()
    for node_id in grid.get_node_ids():
        manager.register(GridClientProxy(node_id=node_id, grid=grid, run_id=grid.run.run_id))
    legacy = LegacyContext(
        context, config=ServerConfig(num_rounds=num_rounds), strategy=strategy, client_manager=manager
    )
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
        wire.to_parameters(global_state), keep_input=True
    )
    workflow(settings, timeout=timeout)(grid, legacy)
    if strategy.aggregate is None:
        raise FedTuneError(
            f"round {server_round}: secure aggregation halted (too few hospitals answered to unmask the sum; "
            "see the Flower log)"
        )
    try:
        mean = wire.from_parameters(strategy.aggregate, reference)
        validate_update(mean, reference)
    except UpdateRejected as err:
        raise FedTuneError(f"round {server_round}: the securely aggregated update is unusable: {err}") from err
    metrics: dict[str, dict[str, float]] = {}
    for _, res in strategy.results:
        site = str(res.metrics.get("site", "")) or "unknown"
        numbers = {k: float(v) for k, v in res.metrics.items() if isinstance(v, int | float) and not math.isnan(v)}
        metrics[site] = {**numbers, "num-examples": float(res.num_examples)}
    # Flower lists each failed message twice in `failures`; count hospitals instead
    return SecAggResult(mean_delta=mean, metrics=metrics, dropped=strategy.sampled - len(strategy.results))
