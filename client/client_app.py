"""The hospital's Flower ClientApp: thin wiring from messages to the site runtime."""

from __future__ import annotations

from logging import WARNING
from pathlib import Path

from fedtune.client.dp_round import open_ledger, private_train_round
from fedtune.client.site import base_model_loads, round_seed, simulated_ledger_path, simulated_site
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.supercore import log

from fedtune import wire
from fedtune.config import ExperimentConfig
from fedtune.privacy import BudgetExceeded
from fedtune.runfolder import RunFolder
from fedtune.runtime import SiteData, SiteRuntime

app = ClientApp()


def _site(context: Context) -> tuple[ExperimentConfig, int, SiteRuntime, SiteData]:
    run_dir = Path(str(context.run_config["run-dir"]))
    cfg = RunFolder(run_dir).load_config()
    partition = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    runtime, data = simulated_site(run_dir, partition, cfg)
    return cfg, partition, runtime, data


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this site's data; reply with the delta."""
    cfg, partition, runtime, data = _site(context)
    instruction = wire.unpack_instruction(msg.content)
    if cfg.dp.enabled:
        return _train_private(msg, instruction, Path(str(context.run_config["run-dir"])), cfg, runtime, data)
    seed = round_seed(cfg.run.seed, partition, instruction.server_round)
    delta, result = runtime.train_round(instruction, data, cfg.train, seed=seed)
    metrics = {
        "train-loss": result.mean_loss,
        "steps": result.steps,
        "examples-seen": result.examples_seen,
        "train-seconds": result.seconds,
        "base-model-loads": base_model_loads(),
    }
    content = wire.pack_reply(runtime.identity(data.site), metrics, num_examples=len(data.train), delta=delta)
    return Message(content, reply_to=msg)


def _train_private(
    msg: Message,
    instruction: wire.RoundInstruction,
    run_dir: Path,
    cfg: ExperimentConfig,
    runtime: SiteRuntime,
    data: SiteData,
) -> Message:
    """DP-SGD under the hospital's ledger; a spent budget is refused with nothing sent."""
    ledger = open_ledger(simulated_ledger_path(run_dir, data.site, cfg.dp), cfg.dp)
    try:
        done = private_train_round(runtime, instruction, data, cfg.train, cfg.dp, ledger, run_id=run_dir.name)
    except BudgetExceeded as err:
        log(WARNING, "%s: round %d refused: %s", data.site, instruction.server_round, err)
        # the full message (with the dataset's id) stays in the hospital's log
        reason = err.public_reason()
        refusal = wire.pack_refusal(runtime.identity(data.site), kind=wire.REFUSED_PRIVACY_BUDGET, reason=reason)
        return Message(refusal, reply_to=msg)
    metrics = {**done.metrics(), "base-model-loads": base_model_loads()}
    content = wire.pack_reply(runtime.identity(data.site), metrics, num_examples=len(data.train), delta=done.delta)
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out split."""
    cfg, _, runtime, data = _site(context)
    instruction = wire.unpack_instruction(msg.content)
    result = runtime.evaluate(instruction.state, data, cfg.eval)
    metrics = {
        "loss-sum": result.loss_sum,
        "tokens": result.tokens,
        "metric-sum": result.metric_sum,
        "exact-sum": result.exact_sum,
    }
    content = wire.pack_reply(runtime.identity(data.site), metrics, num_examples=result.n)
    return Message(content, reply_to=msg)
