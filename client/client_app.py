"""The hospital's Flower ClientApp: thin wiring from messages to the site runtime.

Every reply is sealed for the coordinator (``security.seal``, on by default): encrypted
to its key and signed with the hospital's, bound to the request's run, round and
challenge. In secure-aggregation rounds Flower's ``secaggplus_mod`` masks the delta
instead, and the coordinator sees only the sum.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from logging import WARNING
from pathlib import Path

import torch
from fedtune.client import worker
from fedtune.client.audit import AuditLog, Outgoing
from fedtune.client.dp_round import open_ledger, private_train_round
from fedtune.client.site import (
    base_model_loads,
    hospital_site,
    round_seed,
    simulated_audit_path,
    simulated_ledger_path,
    simulated_sealer,
    simulated_site,
)
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.common.secure_aggregation.secaggplus_constants import Key as SecAggKey
from flwr.common.serde import recorddict_to_proto
from flwr.supercore import log

from fedtune import wire
from fedtune.config import ExperimentConfig
from fedtune.data import record_digests
from fedtune.errors import FedTuneError
from fedtune.privacy import BudgetExceeded
from fedtune.runfolder import RunFolder
from fedtune.runtime import SiteData, SiteRuntime


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
    site = _site(context)
    payload = b"" if reply.has_error() else recorddict_to_proto(reply.content).SerializeToString(deterministic=True)
    group = msg.metadata.group_id
    epsilon, delta = site.privacy_spent()
    identity = site.runtime.identity(site.data.site)
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


def relay_to_worker(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """At a real hospital, hand the message to the daemon's resident worker (the base
    model stays loaded there); the worker runs this same app without the relay."""
    path = context.node_config.get(worker.NODE_CONFIG_KEY)
    if path and not os.environ.get(worker.IN_WORKER):
        return worker.call_worker(Path(str(path)), msg, context)
    return call_next(msg, context)


app = ClientApp(mods=[relay_to_worker, audited, secagg_when_asked])


@dataclass(frozen=True)
class _Site:
    """Everything this process holds for the hospital a message is for."""

    cfg: ExperimentConfig
    partition: int  # the simulated site's index; a real hospital's seed index
    runtime: SiteRuntime
    data: SiteData
    run_dir: Path  # the run folder (a real hospital has no access to it: only its name)
    sealer: wire.Sealer | None
    ledger_path: Path
    audit_path: Path
    refusal: str = ""  # the hospital's policy refuses this run's rounds, and says why

    def reply(
        self,
        msg: Message,
        instruction: wire.RoundInstruction,
        metrics: Mapping[str, float],
        *,
        num_examples: int,
        delta: dict[str, torch.Tensor] | None = None,
    ) -> Message:
        identity = self.runtime.identity(self.data.site)
        content = wire.pack_reply(
            identity, metrics, num_examples=num_examples, delta=delta, sealer=self.sealer, instruction=instruction
        )
        return Message(content, reply_to=msg)

    @property
    def run_id(self) -> str:
        return self.run_dir.name

    @property
    def audit(self) -> AuditLog:
        return AuditLog(self.audit_path)

    def privacy_spent(self) -> tuple[float | None, float | None]:
        """Epsilon spent so far on this hospital's training records, at the policy's delta."""
        if not self.cfg.dp.enabled:
            return None, None
        ledger = open_ledger(self.ledger_path, self.cfg.dp)
        dataset = ledger.register(record_digests(self.data.train), label=self.data.site)
        return ledger.spent(dataset), self.cfg.dp.delta


def _site(context: Context) -> _Site:
    run_dir = Path(str(context.run_config["run-dir"]))
    if "hospital-config" in context.node_config:  # a real hospital's daemon
        return _hospital_site(Path(str(context.node_config["hospital-config"])), context)
    cfg = RunFolder(run_dir).load_config()
    partition = int(context.node_config["partition-id"])  # type: ignore[arg-type]
    runtime, data = simulated_site(run_dir, partition, cfg)
    sealer = simulated_sealer(run_dir, data.site) if cfg.security.seal else None
    ledger = simulated_ledger_path(run_dir, data.site, cfg.dp)
    return _Site(cfg, partition, runtime, data, run_dir, sealer, ledger, simulated_audit_path(run_dir, data.site))


def _hospital_site(config: Path, context: Context) -> _Site:
    """The hospital's own settings (hospital.toml) over the run's (sent by the coordinator)."""
    site = hospital_site(config, str(context.run_config["experiment"]), str(context.run_config["run-dir"]))
    return _Site(
        site.cfg,
        site.seed_index,
        site.runtime,
        site.data,
        Path(site.run_id),
        site.sealer,
        site.hospital.ledger_path,
        site.hospital.audit_path,
        site.refusal,
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this site's data; reply with the delta."""
    site = _site(context)
    if site.refusal:
        log(WARNING, "%s: round refused: %s", site.data.site, site.refusal)
    if wire.is_secagg_train(msg.content):
        if site.refusal:  # a hospital refusing a secure round drops out of it, sending nothing
            raise FedTuneError(f"{site.data.site} refuses this run: {site.refusal}")
        instruction = wire.unpack_secagg_instruction(msg.content, site.runtime.state())
        # Under DP a spent budget raises here: the hospital drops out of the secure round, sending nothing.
        delta, metrics = _local_update(instruction, site)
        identity = site.runtime.identity(site.data.site)
        content = wire.pack_secagg_reply(identity, metrics, num_examples=len(site.data.train), delta=delta)
        return Message(content, reply_to=msg)
    instruction = wire.unpack_instruction(msg.content)
    if site.refusal:
        refusal = wire.pack_refusal(
            site.runtime.identity(site.data.site),
            kind=wire.REFUSED_POLICY,
            reason=site.refusal,
            sealer=site.sealer,
            instruction=instruction,
        )
        return Message(refusal, reply_to=msg)
    try:
        delta, metrics = _local_update(instruction, site)
    except BudgetExceeded as err:
        refusal = wire.pack_refusal(
            site.runtime.identity(site.data.site),
            kind=wire.REFUSED_PRIVACY_BUDGET,
            reason=err.public_reason(),  # the full message (with the dataset's id) stays in the hospital's log
            sealer=site.sealer,
            instruction=instruction,
        )
        return Message(refusal, reply_to=msg)
    return site.reply(msg, instruction, metrics, num_examples=len(site.data.train), delta=delta)


def _local_update(instruction: wire.RoundInstruction, site: _Site) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """One round of local training: DP-SGD under the hospital's ledger, or plain training."""
    cfg, data = site.cfg, site.data
    if cfg.dp.enabled:
        ledger = open_ledger(site.ledger_path, cfg.dp)
        try:
            done = private_train_round(
                site.runtime, instruction, data, cfg.train, cfg.dp, ledger, run_id=site.run_dir.name
            )
        except BudgetExceeded as err:
            log(WARNING, "%s: round %d refused: %s", data.site, instruction.server_round, err)
            raise
        return done.delta, {**done.metrics(), "base-model-loads": base_model_loads()}
    seed = round_seed(cfg.run.seed, site.partition, instruction.server_round)
    delta, result = site.runtime.train_round(instruction, data, cfg.train, seed=seed)
    metrics = {
        "train-loss": result.mean_loss,
        "steps": result.steps,
        "examples-seen": result.examples_seen,
        "train-seconds": result.seconds,
        "base-model-loads": base_model_loads(),
    }
    return delta, metrics


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received global adapter on this site's held-out split."""
    site = _site(context)
    instruction = wire.unpack_instruction(msg.content)
    result = site.runtime.evaluate(instruction.state, site.data, site.cfg.eval)
    metrics = {
        "loss-sum": result.loss_sum,
        "tokens": result.tokens,
        "metric-sum": result.metric_sum,
        "exact-sum": result.exact_sum,
    }
    return site.reply(msg, instruction, metrics, num_examples=result.n)
