"""The strategy wrapper: open, authenticate and validate every reply, then merge.

Flower's FedAvg averages whole ArrayRecords and trusts them; here each reply is first
opened (a sealed envelope: verified, decrypted, checked against this round's run, kind
and challenge; witnessed, :mod:`fedtune.server.replies`), then validated (adapter spec and
base model hashes, keys, shapes, dtypes, finiteness, one update per hospital, norm
bounds), and only then merged, in four steps (the pattern Flower's own DP wrappers use;
the parts are :class:`~fedtune.server.merging.Merge`'s):

1. each reply becomes an update in the LoRA merge rule's update space
   (:mod:`fedtune.lora.merge`: ``fedavg``, ``ffa`` or ``svd``);
2. the updates are combined: weighted mean, coordinate-wise trimmed mean or median, or
   :class:`~fedtune.server.client_dp.ClientLevelDP`'s noisy clipped mean;
3. the server optimizer (:mod:`fedtune.lora.optimizers`) turns the combined update into a step;
4. the rule applies the step to the global adapter.

A secure-aggregation round (:mod:`fedtune.server.secagg`) hands the strategy only the
mean of the updates (:meth:`LoraStrategy.aggregate_secure`); it is recorded and stepped
the same way as a plain round.

A rejected reply is logged with its site and reason, counted, and kept out of the merge;
the round goes on with the valid ones if enough remain. A site that refuses a round (its
privacy budget is spent) is counted apart; when refusals leave too few updates, the
federation stops cleanly after its last completed round.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedtune import wire
from fedtune.errors import FedTuneError, InvalidEnvelope, UpdateRejected
from fedtune.evaluate import EvalResult
from fedtune.lora.delta import State, l2_norm
from fedtune.lora.factored import Update, update_norm
from fedtune.security.witness import WitnessLog
from fedtune.server.client_dp import ClientLevelDP
from fedtune.server.merging import Merge
from fedtune.server.replies import TrainReport, open_reply, site_hint
from fedtune.server.sampling import Sampling, sample

if TYPE_CHECKING:
    from fedtune.config import ExperimentConfig
    from fedtune.server.secagg import SecAggResult

Opened = list[tuple[Message, wire.Reply]]


class LoraStrategy(FedAvg):
    """Flower's FedAvg skeleton over authenticated, validated LoRA updates.

    Parameters
    ----------
    spec_sha256
        Hash of the adapter spec every reply must have been computed for.
    base_sha256
        Hash of the base model, or "" to adopt the most common one in the first round.
    sampling
        How many hospitals a round samples and how many valid updates it needs (fewer
        fails the round with a clear error).
    merge
        The merge rule, norm bounds, combine or client-level DP, and server optimizer
        (default: the plain weighted mean of ``fedavg`` deltas).
    run_id
        This run's id, which every sealed reply must name.
    opener
        The coordinator's keys and allow-list: replies must be sealed envelopes. None
        accepts plain replies (research simulations with ``security.seal = false``).
    witness
        Where every authentic sealed reply's audit head and content hash are recorded
        (the run's ``witness.jsonl``); None records nothing.
    node_names
        Deployment: Flower node id -> the hospital admitted with it, for the logs.
    wire_dtype
        The dtype every delta must travel in (``federation.wire_dtype``); decoded to float32.
    """

    def __init__(
        self,
        *,
        spec_sha256: str,
        base_sha256: str,
        sampling: Sampling,
        merge: Merge | None = None,
        run_id: str = "",
        opener: wire.Opener | None = None,
        witness: WitnessLog | None = None,
        node_names: Mapping[int, str] | None = None,
        wire_dtype: str = "float32",
    ) -> None:
        super().__init__(
            fraction_train=sampling.fraction,
            min_train_nodes=sampling.at_least,
            min_evaluate_nodes=1,
            min_available_nodes=1,
            weighted_by_key=wire.NUM_EXAMPLES,
            arrayrecord_key=wire.GLOBAL,
            configrecord_key=wire.CONFIG,
        )
        self.spec_sha256 = spec_sha256
        self.base_sha256 = base_sha256
        self.sampling = sampling
        self.merge = merge if merge is not None else Merge()
        self.run_id = run_id
        self.opener = opener
        self.witness = witness
        self.node_names = dict(node_names or {})
        self.wire_dtype = wire_dtype
        self.current: State = {}
        self.report = TrainReport()
        self._expected: dict[str, wire.Expected] = {}
        self._sent_train = 0
        # per node of the round's evaluation: (state, hospital, why), as TrainReport.nodes
        self.eval_nodes: dict[int, dict[str, str]] = {}

    @classmethod
    def from_config(
        cls,
        cfg: ExperimentConfig,
        meta: Mapping[str, str],
        *,
        client_dp: ClientLevelDP | None = None,
        run_id: str = "",
        opener: wire.Opener | None = None,
        witness: WitnessLog | None = None,
        node_names: Mapping[int, str] | None = None,
    ) -> LoraStrategy:
        """The run's strategy, for the adapter and base model its checkpoint's ``meta`` names."""
        from fedtune.lora.adapter import META_BASE, META_SPEC  # PEFT and transformers: only when a run starts

        return cls(
            spec_sha256=meta[META_SPEC],
            base_sha256=meta[META_BASE],
            sampling=Sampling.from_config(cfg),
            merge=Merge.from_config(cfg, client_dp=client_dp),
            run_id=run_id,
            opener=opener,
            witness=witness,
            node_names=node_names,
            wire_dtype=cfg.federation.wire_dtype,
        )

    @property
    def min_updates(self) -> int:
        return self.sampling.min_updates

    # -- requests ----------------------------------------------------------------------
    def _challenge(self, server_round: int, config: ConfigRecord, kind: str) -> None:
        challenge = wire.new_challenge()
        config["challenge"] = challenge
        config["run-id"] = self.run_id
        self._expected[kind] = wire.Expected(self.run_id, server_round, kind, challenge, self.wire_dtype)

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
        nodes = sample(grid, self.fraction_train, self.min_train_nodes)
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
        nodes = sample(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        self.eval_nodes = {n: {"state": "no reply", "hospital": "", "why": ""} for n in nodes}
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)

    # -- replies -----------------------------------------------------------------------
    def _open(self, msg: Message, *, kind: str, server_round: int) -> wire.Reply | wire.Refusal:
        expected = self._expected.get(kind)
        return open_reply(
            msg, kind=kind, server_round=server_round, opener=self.opener, expected=expected, witness=self.witness
        )

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

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The next global adapter from the round's valid updates, and the round's counts."""
        valid = self._validated(server_round, self._opened(server_round, list(replies)))
        computed = self.merge.rule.updates(self.current, [r.delta or {} for _, r in valid])
        updates = {r.identity.site: u for (_, r), u in zip(valid, computed, strict=True)}
        valid = self._within_bounds(server_round, valid, updates)
        self.report.require(server_round, valid=len(valid), needed=self.min_updates)
        for msg, reply in valid:
            self._accept(msg, reply, updates[reply.identity.site])
        kept = [updates[reply.identity.site] for _, reply in valid]
        combined, self.report.client_dp = self.merge.combined(kept, [float(r.num_examples) for _, r in valid])
        return self._close(combined)

    def aggregate_secure(
        self, server_round: int, current: State, result: SecAggResult
    ) -> tuple[ArrayRecord, MetricRecord]:
        """The next global adapter from a SecAgg+ round, which shows the coordinator only the
        mean of the updates (and each hospital's plain numbers): what can be checked is
        checked on that mean; the round is recorded and stepped as a plain one."""
        self.current = current
        dropped = [{"site": "(secure aggregation)", "reason": f"{result.dropped} hospital(s) dropped out"}]
        self.report = TrainReport(accepted=dict(result.metrics), rejected=dropped if result.dropped else [])
        if len(result.metrics) < self.min_updates:
            raise FedTuneError(
                f"round {server_round}: only {len(result.metrics)} hospital(s) completed secure aggregation, "
                f"the round needs {self.min_updates} (`federation.min_clients`)"
            )
        norm = l2_norm(result.mean_delta)
        if self.merge.bounds.absolute and norm > self.merge.bounds.absolute:
            raise FedTuneError(
                f"round {server_round}: the aggregate update's norm {norm:.4g} is over `security.max_update_norm`"
            )
        return self._close(result.mean_delta)

    def _close(self, combined: Update) -> tuple[ArrayRecord, MetricRecord]:
        """Every round's end, plain or secure: the step along ``combined``, and the round's counts."""
        return wire.to_arrays(self.merge.step(self.current, combined)), self.report.counts()

    def _opened(self, server_round: int, replies: list[Message]) -> Opened:
        """The replies that opened; refusals, failures and missing replies are recorded."""
        missing = self._sent_train - len(replies)
        if missing > 0:  # Flower returns only the replies that came within the timeout
            self.report.reject(server_round, "(no reply)", f"{missing} hospital(s) sent nothing within `round_timeout`")
        opened: Opened = []
        for msg in replies:
            try:
                item = self._open(msg, kind="train", server_round=server_round)
            except (UpdateRejected, InvalidEnvelope) as err:
                self.report.reject(server_round, site_hint(msg, self.node_names), str(err), node=_node(msg))
                continue
            if isinstance(item, wire.Refusal):
                self.report.refuse(server_round, item, node=_node(msg))
            else:
                opened.append((msg, item))
        return opened

    def _validated(self, server_round: int, opened: Opened) -> Opened:
        """The opened replies made for this adapter and base model, one per hospital."""
        self._pin_base([reply.identity for _, reply in opened])
        valid: Opened = []
        for msg, reply in opened:
            site = reply.identity.site
            try:
                self._check_identity(reply.identity)
                if reply.delta is None:  # _checked_reply already refuses this; keeps types honest
                    raise UpdateRejected("train reply carries no delta")
                self.merge.rule.check(reply.delta, self.current)
                if any(r.identity.site == site for _, r in valid):
                    raise UpdateRejected("a second update from the same hospital in one round")
            except UpdateRejected as err:
                self.report.reject(server_round, site, str(err), node=_node(msg), proven=self.opener is not None)
                continue
            valid.append((msg, reply))
        return valid

    def _within_bounds(self, server_round: int, valid: Opened, updates: dict[str, Update]) -> Opened:
        """Drop updates whose norm is out of bounds; each is judged against the others' median."""
        norms = [update_norm(updates[reply.identity.site]) for _, reply in valid]
        kept = []
        for i, item in enumerate(valid):
            reason = self.merge.bounds.violation(norms[i], norms[:i] + norms[i + 1 :])
            if reason:
                site = item[1].identity.site
                self.report.reject(server_round, site, reason, node=_node(item[0]), proven=self.opener is not None)
            else:
                kept.append(item)
        return kept

    def _accept(self, msg: Message, reply: wire.Reply, update: Update) -> None:
        metrics = {
            **reply.metrics,
            "num-examples": float(reply.num_examples),
            "delta-norm": update_norm(update),
            "lora-rank": float(self.merge.rule.reply_rank(reply.delta or {})),  # as the reply's shapes show
            "upload-bytes": float(wire.message_bytes(msg.content)),
        }
        self.report.accept(reply.identity.site, metrics, node=msg.metadata.src_node_id)

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
                who = site_hint(msg, self.node_names)
                log(WARNING, "round %d: evaluation reply from %s ignored: %s", server_round, who, err)
                self.eval_nodes[node]["why"] = str(err)
        return results


def _node(msg: Message) -> int:
    """The Flower node a reply came from."""
    return msg.metadata.src_node_id
