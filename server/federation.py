"""The coordinator's round loop: train, merge, evaluate, log, checkpoint; resumable.

Flower's ``Strategy.start`` always begins at round 1, so the loop is ours; the
strategy's own ``configure_*`` / ``aggregate_*`` do the sampling and merging. A round
is done when its checkpoint is written; a restarted coordinator continues after the
last checkpoint and drops any metrics line of a round that did not finish.

The loop keeps the run's ``status.json`` (:mod:`fedtune.live`) current: round, phase,
and what became of each sampled hospital's message, for ``fedtune status``. It exports
the global adapter only when at least one round was trained: a federation that stops
before its first round (every hospital refused) exports nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message
from flwr.serverapp import Grid

from fedtune import wire
from fedtune.checkpoint import Checkpoint, MetricsLog, latest_round, load_checkpoint, save_checkpoint
from fedtune.config import ExperimentConfig
from fedtune.errors import CheckpointError, FederationStopped, FedTuneError
from fedtune.evaluate import EvalResult
from fedtune.experiments.report import round_line
from fedtune.live import LiveStatus
from fedtune.lora.adapter import META_BASE, META_SPEC, export_peft, initial_state, spec_sha256
from fedtune.lora.delta import State
from fedtune.models import load_model_config, resolve_model_dir
from fedtune.privacy.accounting import BudgetExceeded
from fedtune.runfolder import RunFolder
from fedtune.security.witness import WitnessLog
from fedtune.server.client_dp import ClientLevelDP
from fedtune.server.grid import exchange
from fedtune.server.replies import TrainReport
from fedtune.server.sampling import await_hospitals
from fedtune.server.secagg import secagg_train_round
from fedtune.server.strategy import LoraStrategy


def _start_state(folder: RunFolder, cfg: ExperimentConfig) -> tuple[Checkpoint, dict[str, Any]]:
    """(last completed round's checkpoint, strategy state); writes round 0 when fresh."""
    latest = latest_round(folder.root)
    if latest is None:
        state = initial_state(load_model_config(cfg.model.source), cfg.lora)
        ckpt = Checkpoint(0, state, {META_SPEC: spec_sha256(cfg.lora, state), META_BASE: ""})
        save_checkpoint(folder.root, ckpt)
        return ckpt, {}
    done, extra = latest
    ckpt = load_checkpoint(folder.root, done)
    if ckpt.meta.get(META_SPEC) != spec_sha256(cfg.lora, ckpt.state):
        raise CheckpointError(
            f"{folder.root}: checkpoint does not match the run's `lora` settings; was config.toml edited?"
        )
    return ckpt, extra


def _eval_record(results: dict[str, EvalResult]) -> dict[str, Any]:
    pooled = sum(results.values(), EvalResult())
    record = {site: r.as_metrics() for site, r in sorted(results.items())}
    record["pooled"] = pooled.as_metrics()
    return record


def _client_dp(cfg: ExperimentConfig, extra: dict[str, Any], num_sampled: int) -> ClientLevelDP | None:
    if not cfg.client_dp.enabled:
        return None
    dp = ClientLevelDP(cfg.client_dp, num_sampled=num_sampled)
    if "client_dp" in extra:
        dp.load_state_dict(extra["client_dp"])
    return dp


def _round(
    grid: Grid,
    context: Context | None,
    cfg: ExperimentConfig,
    strategy: LoraStrategy,
    live: LiveStatus,
    client_dp: ClientLevelDP | None,
    *,
    state: State,
    rnd: int,
) -> tuple[State, dict[str, Any]]:
    """Train and evaluate round ``rnd``: (the new global adapter, the round's metrics line)."""
    live.phase(rnd, "train")
    start = time.perf_counter()
    config = wire.instruction_config(num_rounds=cfg.federation.rounds, run_id=strategy.run_id)
    if client_dp is not None:
        client_dp.check_next(rnd)
    arrays = _train(grid, context, cfg, strategy, live, state=state, rnd=rnd, config=config)
    train_seconds = time.perf_counter() - start
    live.phase(rnd, "evaluate")
    timeout = cfg.federation.round_timeout
    evaluation = _evaluate(grid, strategy, live, rnd=rnd, arrays=arrays, config=config, timeout=timeout)
    seconds = time.perf_counter() - start
    record = _round_record(rnd, strategy.report, evaluation, train_seconds=train_seconds, seconds=seconds)
    return wire.from_arrays(arrays), record


def _train(
    grid: Grid,
    context: Context | None,
    cfg: ExperimentConfig,
    strategy: LoraStrategy,
    live: LiveStatus,
    *,
    state: State,
    rnd: int,
    config: ConfigRecord,
) -> ArrayRecord:
    """One training round, plain or through SecAgg+, merged and recorded by the strategy."""
    if cfg.security.secure_aggregation:
        if context is None:
            raise FedTuneError("`security.secure_aggregation` needs the ServerApp's context")
        result = secagg_train_round(
            grid,
            context,
            cfg.security,
            global_state=state,
            reference=strategy.merge.rule.reference(state),
            server_round=rnd,
            num_rounds=cfg.federation.rounds,
            sample_size=cfg.sampled_per_round(),
            run_id=strategy.run_id,
            seed=cfg.run.seed,
            timeout=cfg.federation.round_timeout,
        )
        arrays, _ = strategy.aggregate_secure(rnd, state, result)
        return arrays
    messages = list(strategy.configure_train(rnd, wire.to_arrays(state), config, grid))
    replies = _exchange(grid, messages, kind="train", live=live, timeout=cfg.federation.round_timeout)
    try:
        merged, _ = strategy.aggregate_train(rnd, replies)
    finally:
        _settle(live, "train", strategy.report.nodes)
    if merged is None:  # LoraStrategy raises instead; a plain FedAvg would return None
        raise FedTuneError(f"round {rnd}: no update could be merged")
    return merged


def _evaluate(
    grid: Grid,
    strategy: LoraStrategy,
    live: LiveStatus,
    *,
    rnd: int,
    arrays: ArrayRecord,
    config: ConfigRecord,
    timeout: float,
) -> dict[str, Any]:
    """The round's evaluation of the new global adapter, pooled over the hospitals that answered."""
    messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), grid))
    replies = _exchange(grid, messages, kind="evaluate", live=live, timeout=timeout)
    evaluation = _eval_record(strategy.evaluate_replies(rnd, replies))
    _settle(live, "evaluate", strategy.eval_nodes)
    return evaluation


def _round_record(
    rnd: int, report: TrainReport, evaluation: dict[str, Any], *, train_seconds: float, seconds: float
) -> dict[str, Any]:
    """The round's line in ``metrics.jsonl``."""
    record: dict[str, Any] = {
        "kind": "round",
        "round": rnd,
        "train": report.accepted,
        "rejected": report.rejected,
        "refused": report.refused,
        "eval": evaluation,
        "download-bytes": report.download_bytes,
        "train-seconds": train_seconds,
        "seconds": seconds,
    }
    if report.client_dp:
        record["client-dp"] = report.client_dp
    return record


def _save(folder: RunFolder, ckpt: Checkpoint, client_dp: ClientLevelDP | None, *, stopped: str | None = None) -> None:
    """The round's checkpoint, with client-level DP's accountant and why the federation stopped."""
    extra: dict[str, Any] = {"client_dp": client_dp.state_dict()} if client_dp is not None else {}
    save_checkpoint(folder.root, ckpt, extra=extra if stopped is None else {**extra, "stopped": stopped})


def _settle(live: LiveStatus, kind: str, nodes: dict[int, dict[str, str]]) -> None:
    for node, outcome in nodes.items():
        live.outcome(kind, node, outcome["state"], hospital=outcome["hospital"], why=outcome["why"])
    live.settle(kind)


def _exchange(grid: Grid, messages: list[Message], *, kind: str, live: LiveStatus, timeout: float) -> list[Message]:
    live.sampled(kind, [m.metadata.dst_node_id for m in messages])
    return exchange(grid, messages, timeout=timeout, on_reply=lambda msg: live.answered(kind, msg.metadata.src_node_id))


def run_federation(
    grid: Grid,
    folder: RunFolder,
    cfg: ExperimentConfig,
    *,
    opener: wire.Opener | None = None,
    context: Context | None = None,
    say: Callable[[str], None] = print,
) -> State:
    """Run (or finish) the rounds of the run in ``folder``; returns the final global adapter.

    When the sites' privacy budgets (or the client-level DP limit) do not allow another
    round, the federation stops after its last completed round, says why, records the
    stop in ``latest.json`` and exports that round's adapter (none when no round was
    trained).
    """
    live = LiveStatus(
        folder.status_path,
        rounds=cfg.federation.rounds,
        flower_run_id=str(context.run_id) if context is not None else "",
    )
    try:
        state, done, stopped = _rounds(grid, folder, cfg, live, opener=opener, context=context, say=say)
    except FedTuneError as err:
        live.end("failed", str(err))
        raise
    live.end("stopped" if stopped else "finished", stopped)
    return state


def _rounds(
    grid: Grid,
    folder: RunFolder,
    cfg: ExperimentConfig,
    live: LiveStatus,
    *,
    opener: wire.Opener | None,
    context: Context | None,
    say: Callable[[str], None],
) -> tuple[State, int, str]:
    """The round loop of :func:`run_federation`: (final adapter, rounds done, why it stopped or "")."""
    resumed, extra = _start_state(folder, cfg)
    done, state, meta = resumed.server_round, resumed.state, resumed.meta
    metrics = MetricsLog(folder.metrics_path)
    metrics.keep_rounds_up_to(done)
    rounds = cfg.federation.rounds
    client_dp = _client_dp(cfg, extra, cfg.sampled_per_round())
    strategy = _strategy(folder, cfg, meta, client_dp, opener=opener)
    strategy.merge.require_fits(state)  # a dense merge path over its limit: refused before any round
    if done:  # round 0 has no optimizer state yet; a later round's must be there
        strategy.merge.optimizer.load_state_dict(resumed.aux)
    stopped = str(extra.get("stopped", ""))
    if stopped:
        say(f"the federation stopped after round {done}/{rounds}: {stopped}")
    elif done:
        say(f"resuming after round {done}/{rounds}")
    # SecAgg+ with fewer than 3 hospitals would let each learn the other's update from the sum
    need = max(strategy.min_updates, 3 if cfg.security.secure_aggregation else 1)
    why = " (secure aggregation needs 3)" if need > strategy.min_updates else " (`federation.min_clients`)"
    for rnd in range(done + 1, rounds + 1):
        if stopped:
            break
        # before this process's first round wait for every hospital; later, for enough of them
        want = max(cfg.data.hospitals, need) if rnd == done + 1 else need
        live.phase(rnd, "waiting")
        await_hospitals(grid, want=want, need=need, timeout=cfg.federation.join_timeout, say=say, why=why)
        try:
            state, record = _round(grid, context, cfg, strategy, live, client_dp, state=state, rnd=rnd)
        except (FederationStopped, BudgetExceeded) as stop:
            stopped = str(stop)
            optimizer = strategy.merge.optimizer.state_dict()
            _save(folder, Checkpoint(done, state, meta, optimizer), client_dp, stopped=stopped)  # no step was taken
            say(f"stopping after round {done}/{rounds}: {stopped}")
            break
        metrics.append(record)
        meta = {**meta, META_BASE: strategy.base_sha256}
        _save(folder, Checkpoint(rnd, state, meta, strategy.merge.optimizer.state_dict()), client_dp)
        done = rnd
        say(round_line(record, rounds))
    _export(folder, cfg, state, meta, done=done, stopped=stopped, say=say)
    return state, done, stopped


def _strategy(
    folder: RunFolder,
    cfg: ExperimentConfig,
    meta: dict[str, str],
    client_dp: ClientLevelDP | None,
    *,
    opener: wire.Opener | None,
) -> LoraStrategy:
    """The run's strategy; sealed replies are witnessed in the run's ``witness.jsonl``."""
    if cfg.security.seal and opener is None:
        raise FedTuneError("`security.seal` is on but the coordinator has no keys to open envelopes with")
    witness = WitnessLog(folder.witness_path) if opener is not None else None  # kept across resumes: facts
    return LoraStrategy.from_config(
        cfg,
        meta,
        client_dp=client_dp,
        run_id=folder.root.name,
        opener=opener,
        witness=witness,
        node_names=folder.node_names(),
    )


def _export(
    folder: RunFolder,
    cfg: ExperimentConfig,
    state: State,
    meta: dict[str, str],
    *,
    done: int,
    stopped: str,
    say: Callable[[str], None],
) -> None:
    """The global adapter of the last trained round, in PEFT format; nothing when none was trained."""
    if not done:  # round 0 is the untrained initial adapter: nothing to hand anyone
        say(f"no round was trained: nothing exported ({stopped or 'no rounds configured'})")
        return
    export_peft(
        folder.adapter_dir,
        state,
        cfg.lora,
        base_model_path=str(resolve_model_dir(cfg.model.source)),
        base_sha256=meta[META_BASE],
    )
    say(f"exported the global adapter of round {done} (PEFT format) to {folder.adapter_dir}")
