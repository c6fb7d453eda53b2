"""The strategy wrapper: open, authenticate and validate every reply, then merge.

Flower's FedAvg averages whole ArrayRecords and trusts them; here each reply is first
opened (a sealed envelope: verified, decrypted, checked against this round's run, kind
and challenge), then validated (adapter spec and base model hashes, keys, shapes, dtypes,
finiteness, one update per hospital, norm bounds), and only then merged, in four steps
(the pattern Flower's own DP wrappers use):

1. each reply becomes an update in the LoRA merge rule's update space
   (:mod:`fedtune.lora.merge`: ``fedavg``, ``ffa`` or ``svd``);
2. the updates are combined: weighted mean, coordinate-wise trimmed mean or median, or
   :class:`~fedtune.server.client_dp.ClientLevelDP`'s noisy clipped mean;
3. the server optimizer (:mod:`fedtune.lora.optimizers`) turns the combined update into a step;
4. the rule applies the step to the global adapter.

Every authentic envelope (signature verified, decrypted) is witnessed before anything
else is checked: its sender, run, round, kind, the sender's audit trail head it carries
and the SHA-256 of the content as received go to the run's ``witness.jsonl``
(:mod:`fedtune.security.witness`), which ``fedtune server witness`` hands to a hospital to check
its audit trail against.

A rejected reply is logged with its site and reason, counted, and kept out of the merge;
the round goes on with the valid ones if enough remain. A site that refuses a round (its
privacy budget is spent) is counted apart; when refusals leave too few updates, the
federation stops cleanly after its last completed round.
"""

from __future__ import annotations

import hashlib
import random
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedtune import wire
from fedtune.errors import FederationStopped, FedTuneError, InvalidEnvelope, UpdateRejected
from fedtune.evaluate import EvalResult
from fedtune.lora.aggregate import COMBINES
from fedtune.lora.delta import State, l2_norm
from fedtune.lora.merge import MergeRule
from fedtune.lora.optimizers import ServerOptimizer, make_server_optimizer
from fedtune.security.envelope import EnvelopeHeader, peek_header
from fedtune.security.witness import WitnessEntry, WitnessLog
from fedtune.server.client_dp import ClientLevelDP


@dataclass
class TrainReport:
    """What one training round accepted, rejected and was refused."""

    accepted: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    download_bytes: int = 0
    client_dp: dict[str, float] = field(default_factory=dict)
    # per sampled node: its state (accepted, refused, rejected, no reply), who it proved to be, and why
    nodes: dict[int, dict[str, str]] = field(default_factory=dict)

    def node(self, node: int, state: str, *, hospital: str = "", why: str = "") -> None:
        self.nodes[node] = {"state": state, "hospital": hospital, "why": why}


@dataclass(frozen=True)
class NormBounds:
    """``relative``: over this many times the median norm of the round's others (0: off);
    ``absolute``: over this L2 norm (0: off)."""

    relative: float = 0.0
    absolute: float = 0.0

    def violation(self, norm: float, others: list[float]) -> str:
        """Why an update of L2 norm ``norm`` is out of bounds, or "" when it is not."""
        if self.absolute and norm > self.absolute:
            return f"update norm {norm:.4g} is over `security.max_update_norm` = {self.absolute:g}"
        if self.relative and others:
            median = statistics.median(others)
            if norm > self.relative * median:
                return (
                    f"update norm {norm:.4g} is over {self.relative:g} x the median of the others "
                    f"({median:.4g}; `security.norm_bound`)"
                )
        return ""


@dataclass(frozen=True)
class Combine:
    """How the round's updates are combined: ``mean`` (weighted by records),
    ``trimmed_mean`` (``trim_fraction`` cut at each end) or ``median``, coordinate-wise."""

    rule: str = "mean"
    trim_fraction: float = 0.2

    def __call__(self, updates: list[State], weights: list[float]) -> State:
        return COMBINES[self.rule](updates, weights, trim_fraction=self.trim_fraction)


class LoraStrategy(FedAvg):
    """Flower's FedAvg skeleton over authenticated, validated LoRA updates.

    Parameters
    ----------
    spec_sha256
        Hash of the adapter spec every reply must have been computed for.
    base_sha256
        Hash of the base model, or "" to adopt the most common one in the first round.
    min_updates
        Valid updates a round needs; fewer fails the round with a clear error.
    client_dp
        Client-level DP merge, or None for the plain weighted mean.
    opener
        The coordinator's keys and allow-list: replies must be sealed envelopes. None
        accepts plain replies (research simulations with ``security.seal = false``).
    run_id
        This run's id, which every sealed reply must name.
    bounds
        Norm bounds beyond which an update is rejected (in the rule's update space).
    rule
        The LoRA merge rule (default ``fedavg``).
    combine
        How the valid updates are combined (ignored under client-level DP).
    optimizer
        The server optimizer (default: the plain step, server learning rate 1).
    witness
        Where every authentic sealed reply's audit head and content hash are recorded
        (the run's ``witness.jsonl``); None records nothing.
    """

    def __init__(
        self,
        *,
        spec_sha256: str,
        base_sha256: str,
        min_updates: int,
        num_nodes: int,
        client_dp: ClientLevelDP | None = None,
        opener: wire.Opener | None = None,
        run_id: str = "",
        bounds: NormBounds = NormBounds(),
        rule: MergeRule | None = None,
        combine: Combine = Combine(),
        optimizer: ServerOptimizer | None = None,
        witness: WitnessLog | None = None,
        node_names: Mapping[int, str] | None = None,
    ) -> None:
        super().__init__(
            min_train_nodes=num_nodes,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            weighted_by_key=wire.NUM_EXAMPLES,
            arrayrecord_key=wire.GLOBAL,
            configrecord_key=wire.CONFIG,
        )
        self.spec_sha256 = spec_sha256
        self.base_sha256 = base_sha256
        self.node_names = dict(node_names or {})  # deployment: Flower node id -> the hospital admitted with it
        self.min_updates = max(1, min_updates)
        self.current: State = {}
        self.report = TrainReport()
        self.client_dp = client_dp
        self.opener = opener
        self.run_id = run_id
        self.bounds = bounds
        self.rule = rule if rule is not None else MergeRule(alpha=1.0, rank=1)
        self.combine = combine
        self.optimizer = optimizer if optimizer is not None else make_server_optimizer("none", lr=1.0)
        self.witness = witness
        self._expected: dict[str, wire.Expected] = {}
        self._sent_train = 0
        # per node of the round's evaluation: (state, hospital, why), as TrainReport.nodes
        self.eval_nodes: dict[int, dict[str, str]] = {}

    # -- requests ----------------------------------------------------------------------
    def _challenge(self, server_round: int, config: ConfigRecord, kind: str) -> None:
        challenge = wire.new_challenge()
        config["challenge"] = challenge
        config["run-id"] = self.run_id
        self._expected[kind] = wire.Expected(self.run_id, server_round, kind, challenge)

    def _sample(self, grid: Grid, fraction: float, at_least: int) -> list[int]:
        """Flower's rule, max(int(N x fraction), at_least) of the N connected hospitals, but
        never more than are connected and never an unbounded wait: Flower's own sampling
        blocks until ``min_available_nodes`` connect, forever if one has died. The round
        loop waits for hospitals, within ``federation.join_timeout``, before each round."""
        nodes = sorted(grid.get_node_ids())
        return random.sample(nodes, min(len(nodes), max(int(len(nodes) * fraction), at_least)))

    def _messages(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, nodes: list[int], kind: str
    ) -> list[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        # group_id carries the round, as in Flower's SecAgg+ workflow (hospitals' audit trails read it)
        return [Message(record, dst_node_id=n, message_type=kind, group_id=str(server_round)) for n in nodes]

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = wire.from_arrays(arrays)
        self._challenge(server_round, config, "train")
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes)
        messages = self._messages(server_round, arrays, config, nodes, MessageType.TRAIN)
        self._sent_train = len(messages)
        self.report = TrainReport(download_bytes=wire.message_bytes(messages[0].content) if messages else 0)
        for n in nodes:
            self.report.node(n, "no reply")  # until its reply says otherwise
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._challenge(server_round, config, "evaluate")
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        self.eval_nodes = {n: {"state": "no reply", "hospital": "", "why": ""} for n in nodes}
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)

    # -- replies -----------------------------------------------------------------------
    def _open(self, msg: Message, *, kind: str, server_round: int) -> wire.Reply | wire.Refusal:
        """Authenticate and unpack one reply (no check against the global adapter yet)."""
        if msg.has_error():
            raise UpdateRejected(f"client failed: {msg.error.reason}")
        if self.opener is not None:
            expected = self._expected.get(kind)
            if expected is None or expected.round != server_round:
                raise UpdateRejected(f"no {kind} request is open for round {server_round}")
            header, payload = wire.open_sealed(msg.content, opener=self.opener)
            self._witness(msg, header)
            return wire.check_opened(header, payload, expected=expected)
        refusal = wire.unpack_refusal(msg.content)
        return refusal if refusal is not None else wire.unpack_reply(msg.content, expect_delta=kind == "train")

    def _witness(self, msg: Message, header: EnvelopeHeader) -> None:
        """Record an authentic reply's audit head and content hash, as the hospital signed and sent it.

        What the header says (run, round, kind), not what this request expected: a late or
        replayed envelope is still a message the hospital sent."""
        if self.witness is None:
            return
        data = wire.wire_bytes(msg.content)
        entry = WitnessEntry(
            hospital=header.sender,
            run=header.run,
            round=header.round,
            kind=header.kind,
            audit_seq=header.audit_seq,
            audit_head=header.audit_head,
            sha256=hashlib.sha256(data).hexdigest(),
            bytes=len(data),
        )
        self.witness.append(entry)

    def _check_identity(self, identity: wire.Identity) -> None:
        if identity.spec_sha256 != self.spec_sha256:
            raise UpdateRejected("adapter spec differs from the coordinator's (rank, alpha or target modules)")
        if self.base_sha256 and identity.base_sha256 != self.base_sha256:
            raise UpdateRejected(f"trained on base model {identity.base_sha256[:12]}, expected {self.base_sha256[:12]}")

    def _pin_base(self, identities: list[wire.Identity]) -> None:
        """Adopt the base model most authenticated replies report, once, when none was configured."""
        if self.base_sha256 or not identities:
            return
        self.base_sha256 = Counter(i.base_sha256 for i in identities).most_common(1)[0][0]
        log(INFO, "base model pinned to %s", self.base_sha256[:12])

    def _reject(
        self, server_round: int, site: str, reason: str, *, msg: Message | None = None, proven: bool = False
    ) -> None:
        log(WARNING, "round %d: rejected update from %s: %s", server_round, site, reason)
        self.report.rejected.append({"site": site, "reason": reason})
        if msg is not None:
            self.report.node(msg.metadata.src_node_id, "rejected", hospital=site if proven else "", why=reason)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        opened: list[tuple[Message, wire.Reply]] = []
        replies = list(replies)
        missing = self._sent_train - len(replies)
        if missing > 0:  # Flower returns only the replies that came within the timeout
            self._reject(server_round, "(no reply)", f"{missing} hospital(s) sent nothing within `round_timeout`")
        for msg in replies:
            try:
                item = self._open(msg, kind="train", server_round=server_round)
            except (UpdateRejected, InvalidEnvelope) as err:
                self._reject(server_round, _site_hint(msg, self.node_names), str(err), msg=msg)
                continue
            if isinstance(item, wire.Refusal):
                log(WARNING, "round %d: %s refused to train: %s", server_round, item.identity.site, item.reason)
                self.report.refused.append({"site": item.identity.site, "kind": item.kind, "reason": item.reason})
                node = msg.metadata.src_node_id
                self.report.node(node, "refused", hospital=item.identity.site, why=f"{item.kind}: {item.reason}")
            else:
                opened.append((msg, item))
        self._pin_base([reply.identity for _, reply in opened])
        valid: list[tuple[Message, wire.Reply]] = []
        for msg, reply in opened:
            site = reply.identity.site
            try:
                self._check_identity(reply.identity)
                if reply.delta is None:  # _checked_reply already refuses this; keeps types honest
                    raise UpdateRejected("train reply carries no delta")
                self.rule.check(reply.delta, self.current)
                if any(r.identity.site == site for _, r in valid):
                    raise UpdateRejected("a second update from the same hospital in one round")
            except UpdateRejected as err:
                self._reject(server_round, site, str(err), msg=msg, proven=self.opener is not None)
                continue
            valid.append((msg, reply))
        computed = self.rule.updates(self.current, [r.delta or {} for _, r in valid])
        updates = {r.identity.site: u for (_, r), u in zip(valid, computed, strict=True)}
        valid = self._within_bounds(server_round, valid, updates)
        if len(valid) < self.min_updates:
            if self.report.refused:
                sites = ", ".join(f"{r['site']}: {r['kind']}" for r in self.report.refused)
                reasons = "; ".join(dict.fromkeys(r["reason"][:200] for r in self.report.refused if r["reason"]))
                raise FederationStopped(
                    f"round {server_round}: {len(self.report.refused)} site(s) refused to train ({sites}), "
                    f"leaving {len(valid)} valid update(s) of the {self.min_updates} a round needs"
                    + (f"; why: {reasons}" if reasons else "")
                )
            raise FedTuneError(
                f"round {server_round}: only {len(valid)} valid update(s), the round needs "
                f"{self.min_updates} (`federation.min_clients`); "
                + "; ".join(f"{r['site']}: {r['reason']}" for r in self.report.rejected)
            )
        kept = [updates[reply.identity.site] for _, reply in valid]
        for msg, reply in valid:
            self.report.node(msg.metadata.src_node_id, "accepted", hospital=reply.identity.site)
            self.report.accepted[reply.identity.site] = {
                **reply.metrics,
                "num-examples": float(reply.num_examples),
                "delta-norm": l2_norm(updates[reply.identity.site]),
                "lora-rank": float(self.rule.reply_rank(reply.delta or {})),  # as the reply's shapes show
                "upload-bytes": float(wire.message_bytes(msg.content)),
            }
        if self.client_dp is not None:
            combined, self.report.client_dp = self.client_dp.release(kept)
        else:
            combined = self.combine(kept, [float(reply.num_examples) for _, reply in valid])
        merged = self.step(combined)
        counts = MetricRecord(
            {"accepted": len(valid), "rejected": len(self.report.rejected), "refused": len(self.report.refused)}
        )
        return wire.to_arrays(merged), counts

    def step(self, combined: State) -> State:
        """The next global adapter: the server optimizer's step along ``combined``, applied by the rule."""
        return self.rule.apply(self.current, self.optimizer.step(combined))

    def _within_bounds(
        self, server_round: int, valid: list[tuple[Message, wire.Reply]], updates: dict[str, State]
    ) -> list[tuple[Message, wire.Reply]]:
        """Drop updates whose norm is out of bounds; each is judged against the others' median."""
        norms = [l2_norm(updates[reply.identity.site]) for _, reply in valid]
        kept = []
        for i, item in enumerate(valid):
            reason = self.bounds.violation(norms[i], norms[:i] + norms[i + 1 :])
            if reason:
                self._reject(server_round, item[1].identity.site, reason, msg=item[0], proven=self.opener is not None)
            else:
                kept.append(item)
        return kept

    def evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> dict[str, EvalResult]:
        """Per-site evaluation sums from evaluate replies (bad ones are logged and skipped)."""
        results: dict[str, EvalResult] = {}
        for msg in replies:
            node = msg.metadata.src_node_id
            self.eval_nodes[node] = {"state": "failed", "hospital": "", "why": ""}
            try:
                reply = self._open(msg, kind="evaluate", server_round=server_round)
                if isinstance(reply, wire.Refusal):
                    raise UpdateRejected(f"refused: {reply.reason}")
                self._check_identity(reply.identity)
                m = reply.metrics
                results[reply.identity.site] = EvalResult(
                    loss_sum=m["loss-sum"],
                    tokens=int(m["tokens"]),
                    metric_sum=m["metric-sum"],
                    exact_sum=m["exact-sum"],
                    n=reply.num_examples,
                )
                self.eval_nodes[node] = {"state": "evaluated", "hospital": reply.identity.site, "why": ""}
            except (UpdateRejected, InvalidEnvelope, KeyError) as err:
                who = _site_hint(msg, self.node_names)
                log(WARNING, "round %d: evaluation reply from %s ignored: %s", server_round, who, err)
                self.eval_nodes[node]["why"] = str(err)
        return results


def _site_hint(msg: Message, names: Mapping[int, str]) -> str:
    """Who a reply says it is from, for logs; for a reply that failed to open, only a claim.

    In deployment the Flower node id names the hospital admitted with it (its node key
    authenticated the reply's transport); in simulation only a claim can name it.
    """
    src = msg.metadata.src_node_id
    node = names.get(src, f"node-{src}")
    if msg.has_error():
        return node
    envelope = msg.content.config_records.get(wire.ENVELOPE)
    if envelope is not None:
        data = envelope.get("data")
        try:
            claimed = peek_header(data).sender if isinstance(data, bytes) else ""
        except InvalidEnvelope:
            claimed = ""
        return f"{node} (claims {claimed})" if claimed and claimed != node else node
    identity = msg.content.config_records.get(wire.IDENTITY)
    site = str(identity.get("site", "")) if identity is not None else ""
    return site or node
