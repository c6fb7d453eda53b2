"""The hospital's Flower ClientApp: thin wiring from messages to the site runtime.

Every reply is sealed for the coordinator (``security.seal``, on by default): encrypted
to its key and signed with the hospital's, bound to the request's run, round and
challenge. In secure-aggregation rounds Flower's ``secaggplus_mod`` masks the delta
instead, and the coordinator sees only the sum.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from logging import ERROR, INFO, WARNING
from pathlib import Path

import torch
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.common.serde import recorddict_to_proto
from flwr.supercore import log

from fedtune import progress, wire
from fedtune.client import release
from fedtune.client.audit import Outgoing
from fedtune.client.dp_round import open_ledger, private_train_round
from fedtune.client.ledger_rollback import LedgerRolledBack, check_ledger_current
from fedtune.client.sim_audit import audit_round
from fedtune.client.site import Site, Sites, round_seed
from fedtune.errors import FedTuneError
from fedtune.privacy.accounting import BudgetExceeded


def secagg_when_asked(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's SecAgg+ client mod, for secure rounds only (it fails on any other train message)."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def audited(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Record every outgoing message in the hospital's audit trail before Flower sends it.

    The outermost mod: it sees the exact content that leaves (sealed envelopes, SecAgg+
    keys, shares and masked vectors, error replies) and hashes its wire serialization.
    """
    reply = call_next(msg, context)
    site = site_of(msg, context)
    payload = b"" if reply.has_error() else recorddict_to_proto(reply.content).SerializeToString(deterministic=True)
    group = msg.metadata.group_id
    epsilon, delta, releases = site.privacy_spent()  # after the reply: the ledger holds its release
    identity = site.identity()
    site.audit.append(
        Outgoing(
            run=site.run_id,
            round=int(group) if group.isdigit() else 0,
            kind=_kind(msg, reply),
            payload=payload,
            epsilon=epsilon,
            delta=delta,
            adapter_sha256=identity.spec_sha256,
            base_sha256=identity.base_sha256,
            ledger_releases=releases,
        )
    )
    return reply


def _kind(msg: Message, reply: Message) -> str:
    """The message type, with the SecAgg+ stage where there is one; "error" for error replies."""
    kind = msg.metadata.message_type
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS) if not msg.has_error() else None
    if configs is not None and SecAggKey.STAGE in configs:
        kind = f"{kind}/secagg-{configs[SecAggKey.STAGE]!s}"
    return f"{kind}/error" if reply.has_error() else kind


SITES = Sites()  # what this process keeps resident: one base model, the sites' data and keys, the hospital's run
app = ClientApp(mods=[audited, secagg_when_asked])


def reply(
    site: Site,
    msg: Message,
    instruction: wire.RoundInstruction,
    metrics: Mapping[str, float],
    *,
    num_examples: int,
    delta: dict[str, torch.Tensor] | None = None,
) -> Message:
    content = wire.pack_reply(
        site.identity(),
        metrics,
        num_examples=num_examples,
        delta=delta,
        sealer=site.sealer,
        instruction=instruction,
        audit=site.audit.head(),  # the trail's head now: the `prev` of the record `audited` appends for this reply
        wire_dtype=site.cfg.federation.wire_dtype,
    )
    return Message(content, reply_to=msg)


def _site(context: Context) -> Site:
    """The site ``context`` is for, from the process's resident :data:`SITES`."""
    if "hospital-config" in context.node_config:  # a real hospital's daemon
        config = Path(str(context.node_config["hospital-config"]))
        return SITES.hospital(config, str(context.run_config["experiment"]), str(context.run_config["run-dir"]))
    return SITES.simulated(Path(str(context.run_config["run-dir"])), int(context.node_config["partition-id"]))  # type: ignore[arg-type]


def site_of(msg: Message, context: Context) -> Site:
    """The site ``msg`` is for, built once per message: the ``audited`` mod and the handler share it."""
    return SITES.once(msg, lambda: _site(context))


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this site's data; reply with the delta."""
    site = site_of(msg, context)
    refusal = site.refusal or _ledger_refusal(site)
    if refusal:
        log(WARNING, "%s: round refused: %s", site.data.site, refusal)
    if wire.is_secagg_train(msg.content):
        if refusal:  # a hospital refusing a secure round drops out of it, sending nothing
            raise FedTuneError(f"{site.data.site} refuses this run: {refusal}")
        instruction = wire.unpack_secagg_instruction(msg.content, site.runtime.state())
        # Under DP a spent budget raises here: the hospital drops out of the secure round, sending nothing.
        delta, metrics = _local_update(instruction, site)
        identity = site.identity()
        content = wire.pack_secagg_reply(identity, metrics, num_examples=len(site.data.train), delta=delta)
        return Message(content, reply_to=msg)
    instruction = wire.unpack_instruction(msg.content)
    if refusal:
        content = wire.pack_refusal(
            site.identity(),
            kind=wire.REFUSED_POLICY,
            reason=refusal,
            sealer=site.sealer,
            instruction=instruction,
            audit=site.audit.head(),
        )
        return Message(content, reply_to=msg)
    try:
        delta, metrics = _local_update(instruction, site)
    except BudgetExceeded as err:
        spent = wire.pack_refusal(
            site.identity(),
            kind=wire.REFUSED_PRIVACY_BUDGET,
            reason=err.public_reason(),  # the full message (with the dataset's id) stays in the hospital's log
            sealer=site.sealer,
            instruction=instruction,
            audit=site.audit.head(),
        )
        return Message(spent, reply_to=msg)
    return reply(site, msg, instruction, metrics, num_examples=len(site.data.train), delta=delta)


def _ledger_refusal(site: Site) -> str:
    """Before every DP round: why this hospital's ledger may not be trained on ("" when current).

    An older copy of the ledger under-counts what was spent (``check_ledger_current``); the
    hospital's log gets the whole line, the coordinator only that the hospital refuses.
    """
    if not site.cfg.dp.enabled:
        return ""
    try:
        check_ledger_current(site.ledger_path, site.audit_path)
    except LedgerRolledBack as err:
        log(ERROR, "%s: %s", site.data.site, err)
        return err.public_reason()
    return ""


def _local_update(instruction: wire.RoundInstruction, site: Site) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One round of local training, its steps reported as they go (:mod:`fedtune.progress`)."""
    with progress.reporting(_step_reporter(site, instruction)):
        return _train_round(instruction, site)


def _step_reporter(site: Site, instruction: wire.RoundInstruction) -> progress.StepReporter:
    """A simulated hospital's steps go to the run's ``progress.jsonl`` (the researcher's terminal
    shows them); a real hospital's to its daemon's log (or Flower's log outside a daemon)."""
    emit: progress.Emit
    if site.progress_file is not None:
        emit = functools.partial(progress.append_record, site.progress_file)
    elif SITES.progress_log is not None:
        emit = SITES.progress_log
    else:
        emit = lambda record: log(INFO, "%s", progress.describe(record))  # noqa: E731
    return progress.StepReporter(
        emit, site=site.data.site, server_round=instruction.server_round, rounds=instruction.num_rounds, run=site.run_id
    )


def _train_round(instruction: wire.RoundInstruction, site: Site) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One round of local training: DP-SGD under the hospital's ledger, or plain training."""
    cfg, data = site.cfg, site.data
    if cfg.dp.enabled:
        ledger = open_ledger(site.ledger_path, cfg.dp)
        try:
            done = private_train_round(
                site.runtime, instruction, data, cfg.train, cfg.dp, ledger, run_id=site.run_id, rule=site.rule
            )
        except BudgetExceeded as err:
            log(WARNING, "%s: round %d refused: %s", data.site, instruction.server_round, err)
            raise
        return done.delta, {
            **done.metrics(),
            "lora-rank": site.runtime.lora.rank,
            "base-model-loads": SITES.base_model_loads,
        }
    seed = round_seed(cfg.run.seed, site.seed_index, instruction.server_round)
    delta, result = site.runtime.train_round(instruction, data, cfg.train, seed=seed, rule=site.rule)
    metrics = {
        "lora-rank": site.runtime.lora.rank,
        "train-loss": result.mean_loss,
        "steps": result.steps,
        "examples-seen": result.examples_seen,
        "train-seconds": result.seconds,
        "base-model-loads": SITES.base_model_loads,
    }
    return delta, metrics


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out split."""
    site = site_of(msg, context)
    instruction = wire.unpack_instruction(msg.content)
    # a hospital at its own rank (`svd`) evaluates the global adapter at that rank: what it can run
    own = site.rule.local_start(instruction.state, rank=site.runtime.lora.rank)
    result = site.runtime.evaluate(own, site.data, site.cfg.eval)
    audit_round(site, context, own, instruction)  # [privacy_audit]: written locally, never replied
    release.consider(site, instruction.server_round, own, result, SITES.event_log)  # the hospital's; nothing is sent
    metrics = {
        "loss-sum": result.loss_sum,
        "tokens": result.tokens,
        "metric-sum": result.metric_sum,
        "exact-sum": result.exact_sum,
    }
    return reply(site, msg, instruction, metrics, num_examples=result.n)
