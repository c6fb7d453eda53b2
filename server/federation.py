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
from fedtune.lora.delta import State, l2_norm
from fedtune.lora.merge import make_rule
from fedtune.lora.optimizers import DEFAULT_LR, make_server_optimizer
from fedtune.models import load_model_config, resolve_model_dir
from fedtune.privacy.accounting import BudgetExceeded
from fedtune.runfolder import RunFolder
from fedtune.security.witness import WitnessLog
from fedtune.server.client_dp import ClientLevelDP
from fedtune.server.grid import exchange
from fedtune.server.secagg import secagg_train_round
from fedtune.server.strategy import Combine, LoraStrategy, NormBounds, TrainReport


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


def build_strategy(
    cfg: ExperimentConfig,
    meta: dict[str, str],
    client_dp: ClientLevelDP | None,
    *,
    opener: wire.Opener | None = None,
    run_id: str = "",
    witness: WitnessLog | None = None,
    node_names: dict[int, str] | None = None,
) -> LoraStrategy:
    """The round's strategy: samples ``cfg.sampled_per_round()`` hospitals, needs ``min_clients`` or all of them."""
    # Flower's FedAvg samples max(int(N * fraction_train), min_train_nodes) nodes a round.
    sampled = cfg.sampled_per_round()
    fed = cfg.federation
    optimizer = make_server_optimizer(
        fed.server_optimizer,
        lr=fed.server_lr or DEFAULT_LR[fed.server_optimizer],
        momentum=fed.server_momentum,
        beta1=fed.server_beta1,
        beta2=fed.server_beta2,
        tau=fed.server_tau,
    )
    strategy = LoraStrategy(
        spec_sha256=meta[META_SPEC],
        base_sha256=meta[META_BASE],
        min_updates=cfg.federation.min_clients or sampled,
        num_nodes=cfg.data.hospitals,
        client_dp=client_dp,
        opener=opener,
        run_id=run_id,
        bounds=NormBounds(relative=cfg.security.norm_bound, absolute=cfg.security.max_update_norm),
        rule=make_rule(fed.strategy, alpha=cfg.lora.alpha, rank=cfg.lora.rank, seed=cfg.lora.init_seed),
        combine=Combine(fed.aggregation, fed.trim_fraction),
        optimizer=optimizer,
        witness=witness,
        node_names=node_names,
    )
    strategy.fraction_train = cfg.federation.fraction_train
    strategy.min_train_nodes = sampled
    return strategy


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


def _secure_round(
    grid: Grid,
    context: Context | None,
    cfg: ExperimentConfig,
    strategy: LoraStrategy,
    state: State,
    rnd: int,
    run_id: str,
) -> ArrayRecord:
    """Train through SecAgg+; the strategy's report gets what the coordinator may see."""
    if context is None:
        raise FedTuneError("`security.secure_aggregation` needs the ServerApp's context")
    result = secagg_train_round(
        grid,
        context,
        cfg.security,
        global_state=state,
        reference=strategy.rule.reference(state),
        server_round=rnd,
        num_rounds=cfg.federation.rounds,
        sample_size=cfg.sampled_per_round(),
        run_id=run_id,
        seed=cfg.run.seed,
        timeout=cfg.federation.round_timeout,
    )
    if len(result.metrics) < strategy.min_updates:
        raise FedTuneError(
            f"round {rnd}: only {len(result.metrics)} hospital(s) completed secure aggregation, "
            f"the round needs {strategy.min_updates} (`federation.min_clients`)"
        )
    norm = l2_norm(result.mean_delta)
    if strategy.bounds.absolute and norm > strategy.bounds.absolute:
        raise FedTuneError(f"round {rnd}: the aggregate update's norm {norm:.4g} is over `security.max_update_norm`")
    dropped = [{"site": "(secure aggregation)", "reason": f"{result.dropped} hospital(s) dropped out"}]
    strategy.report = TrainReport(accepted=result.metrics, rejected=dropped if result.dropped else [])
    strategy.current = state
    return wire.to_arrays(strategy.step(result.mean_delta))


def _settle(live: LiveStatus, kind: str, nodes: dict[int, dict[str, str]]) -> None:
    for node, outcome in nodes.items():
        live.outcome(kind, node, outcome["state"], hospital=outcome["hospital"], why=outcome["why"])
    live.settle(kind)


def _exchange(
    grid: Grid, messages: list[Message], *, kind: str, live: LiveStatus, timeout: float
) -> list[Message]:
    live.sampled(kind, [m.metadata.dst_node_id for m in messages])
    return exchange(
        grid, messages, timeout=timeout, on_reply=lambda msg: live.answered(kind, msg.metadata.src_node_id)
    )


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
    if cfg.security.seal and opener is None:
        raise FedTuneError("`security.seal` is on but the coordinator has no keys to open envelopes with")
    witness = WitnessLog(folder.witness_path) if opener is not None else None  # kept across resumes: facts
    strategy = build_strategy(
        cfg, meta, client_dp, opener=opener, run_id=folder.root.name, witness=witness, node_names=folder.node_names()
    )
    if done:  # round 0 has no optimizer state yet; a later round's must be there
        strategy.optimizer.load_state_dict(resumed.aux)
    timeout = cfg.federation.round_timeout
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
        live.phase(rnd, "train")
        start = time.perf_counter()
        config = wire.instruction_config(num_rounds=rounds, run_id=folder.root.name)
        try:
            if client_dp is not None:
                client_dp.check_next(rnd)
            if cfg.security.secure_aggregation:
                arrays = _secure_round(grid, context, cfg, strategy, state, rnd, folder.root.name)
            else:
                messages = list(strategy.configure_train(rnd, wire.to_arrays(state), config, grid))
                replies = _exchange(grid, messages, kind="train", live=live, timeout=timeout)
                try:
                    arrays, _ = strategy.aggregate_train(rnd, replies)
                finally:
                    _settle(live, "train", strategy.report.nodes)
        except (FederationStopped, BudgetExceeded) as stop:
            stopped = str(stop)
            state_extra = {"client_dp": client_dp.state_dict()} if client_dp is not None else {}
            save_checkpoint(
                folder.root,
                Checkpoint(done, state, meta, strategy.optimizer.state_dict()),  # no step was taken this round
                extra={**state_extra, "stopped": stopped},
            )
            say(f"stopping after round {done}/{rounds}: {stopped}")
            break
        if arrays is None:  # LoraStrategy raises instead; a plain FedAvg would return None
            raise FedTuneError(f"round {rnd}: no update could be merged")
        state = wire.from_arrays(arrays)
        train_seconds = time.perf_counter() - start
        live.phase(rnd, "evaluate")
        messages = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord(dict(config)), grid))
        eval_replies = _exchange(grid, messages, kind="evaluate", live=live, timeout=timeout)
        evaluation = _eval_record(strategy.evaluate_replies(rnd, eval_replies))
        _settle(live, "evaluate", strategy.eval_nodes)
        report = strategy.report
        record: dict[str, Any] = {
            "kind": "round",
            "round": rnd,
            "train": report.accepted,
            "rejected": report.rejected,
            "refused": report.refused,
            "eval": evaluation,
            "download-bytes": report.download_bytes,
            "train-seconds": train_seconds,
            "seconds": time.perf_counter() - start,
        }
        if report.client_dp:
            record["client-dp"] = report.client_dp
        metrics.append(record)
        meta = {**meta, META_BASE: strategy.base_sha256}
        state_extra = {"client_dp": client_dp.state_dict()} if client_dp is not None else {}
        save_checkpoint(folder.root, Checkpoint(rnd, state, meta, strategy.optimizer.state_dict()), extra=state_extra)
        done = rnd
        say(round_line(record, rounds))
    if not done:  # round 0 is the untrained initial adapter: nothing to hand anyone
        say(f"no round was trained: nothing exported ({stopped or 'no rounds configured'})")
        return state, done, stopped
    export_peft(
        folder.adapter_dir,
        state,
        cfg.lora,
        base_model_path=str(resolve_model_dir(cfg.model.source)),
        base_sha256=meta[META_BASE],
    )
    say(f"exported the global adapter of round {done} (PEFT format) to {folder.adapter_dir}")
    return state, done, stopped
