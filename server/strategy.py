"""The strategy wrapper: open and validate every reply, then merge deltas into the global.

Flower's FedAvg averages whole ArrayRecords and trusts them; here each reply is
unpacked, checked (identity, keys, shapes, dtypes, finiteness) and only then merged:
``global + weighted_mean(deltas)`` (the pattern Flower's own DP wrappers use). A rejected
reply is logged with its site and reason, counted, and kept out of the mean. A site that
refuses a round (its privacy budget is spent) is counted apart; when refusals leave too
few updates, the federation stops cleanly after its last completed round. With
client-level DP the merge is :class:`~fedtune.server.client_dp.ClientLevelDP`'s noisy
clipped mean instead of the weighted mean.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import torch
from fedtune.server.client_dp import ClientLevelDP
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from flwr.supercore import log

from fedtune import wire
from fedtune.aggregate import validate_update, weighted_mean
from fedtune.delta import apply_delta, l2_norm
from fedtune.errors import FederationStopped, FedTuneError, UpdateRejected
from fedtune.evaluate import EvalResult

State = dict[str, torch.Tensor]


@dataclass
class TrainReport:
    """What one training round accepted and rejected."""

    accepted: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    download_bytes: int = 0
    client_dp: dict[str, float] = field(default_factory=dict)


class DeltaFedAvg(FedAvg):
    """FedAvg over validated adapter deltas.

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
    """

    def __init__(
        self,
        *,
        spec_sha256: str,
        base_sha256: str,
        min_updates: int,
        num_nodes: int,
        client_dp: ClientLevelDP | None = None,
    ) -> None:
        super().__init__(
            min_train_nodes=num_nodes,
            min_evaluate_nodes=num_nodes,
            min_available_nodes=num_nodes,
            weighted_by_key=wire.NUM_EXAMPLES,
            arrayrecord_key=wire.GLOBAL,
            configrecord_key=wire.CONFIG,
        )
        self.spec_sha256 = spec_sha256
        self.base_sha256 = base_sha256
        self.min_updates = max(1, min_updates)
        self.current: State = {}
        self.report = TrainReport()
        self.client_dp = client_dp

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.current = wire.from_arrays(arrays)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.report = TrainReport(download_bytes=wire.message_bytes(messages[0].content) if messages else 0)
        return messages

    def _open(self, msg: Message, *, expect_delta: bool) -> wire.Reply:
        if msg.has_error():
            raise UpdateRejected(f"client failed: {msg.error.reason}")
        reply = wire.unpack_reply(msg.content, expect_delta=expect_delta)
        if reply.identity.spec_sha256 != self.spec_sha256:
            raise UpdateRejected("adapter spec differs from the coordinator's (rank, alpha or target modules)")
        if self.base_sha256 and reply.identity.base_sha256 != self.base_sha256:
            raise UpdateRejected(
                f"trained on base model {reply.identity.base_sha256[:12]}, expected {self.base_sha256[:12]}"
            )
        return reply

    def _pin_base(self, replies: list[Message]) -> None:
        """Adopt the base model most sites report, once, when none was configured."""
        if self.base_sha256:
            return
        seen = Counter(
            str(m.content.config_records[wire.IDENTITY].get("base-sha256", ""))
            for m in replies
            if not m.has_error() and wire.IDENTITY in m.content.config_records
        )
        if seen:
            self.base_sha256 = seen.most_common(1)[0][0]
            log(INFO, "base model pinned to %s", self.base_sha256[:12])

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        self._pin_base(replies)
        deltas: list[State] = []
        weights: list[float] = []
        for msg in replies:
            node = str(msg.metadata.src_node_id)
            try:
                refusal = None if msg.has_error() else wire.unpack_refusal(msg.content)
                if refusal is not None:
                    self._refused(server_round, refusal)
                    continue
                reply = self._open(msg, expect_delta=True)
                if reply.delta is None:  # unpack_reply already refuses this; keeps types honest
                    raise UpdateRejected("train reply carries no delta")
                validate_update(reply.delta, self.current)
            except UpdateRejected as err:
                site = _site_of(msg) or f"node-{node}"
                log(WARNING, "round %d: rejected update from %s: %s", server_round, site, err)
                self.report.rejected.append({"site": site, "reason": str(err)})
                continue
            deltas.append(reply.delta)
            weights.append(float(reply.num_examples))
            self.report.accepted[reply.identity.site] = {
                **reply.metrics,
                "num-examples": float(reply.num_examples),
                "delta-norm": l2_norm(reply.delta),
                "upload-bytes": float(wire.message_bytes(msg.content)),
            }
        if len(deltas) < self.min_updates:
            if self.report.refused:
                sites = ", ".join(f"{r['site']}: {r['kind']}" for r in self.report.refused)
                raise FederationStopped(
                    f"round {server_round}: {len(self.report.refused)} site(s) refused to train ({sites}), "
                    f"leaving {len(deltas)} valid update(s) of the {self.min_updates} a round needs"
                )
            raise FedTuneError(
                f"round {server_round}: only {len(deltas)} valid update(s), the round needs "
                f"{self.min_updates} (`federation.min_clients`); rejected: {self.report.rejected}"
            )
        if self.client_dp is not None:
            mean, self.report.client_dp = self.client_dp.release(deltas)
        else:
            mean = weighted_mean(deltas, weights)
        merged = apply_delta(self.current, mean)
        counts = MetricRecord(
            {"accepted": len(deltas), "rejected": len(self.report.rejected), "refused": len(self.report.refused)}
        )
        return wire.to_arrays(merged), counts

    def _refused(self, server_round: int, refusal: wire.Refusal) -> None:
        site = refusal.identity.site
        log(WARNING, "round %d: %s refused to train: %s", server_round, site, refusal.reason)
        self.report.refused.append({"site": site, "kind": refusal.kind, "reason": refusal.reason})

    def evaluate_replies(self, server_round: int, replies: Iterable[Message]) -> dict[str, EvalResult]:
        """Per-site evaluation sums from evaluate replies (bad ones are logged and skipped)."""
        results: dict[str, EvalResult] = {}
        for msg in replies:
            try:
                reply = self._open(msg, expect_delta=False)
                m = reply.metrics
                results[reply.identity.site] = EvalResult(
                    loss_sum=m["loss-sum"],
                    tokens=int(m["tokens"]),
                    metric_sum=m["metric-sum"],
                    exact_sum=m["exact-sum"],
                    n=reply.num_examples,
                )
            except (UpdateRejected, KeyError) as err:
                log(
                    WARNING,
                    "round %d: evaluation reply from %s ignored: %s",
                    server_round,
                    _site_of(msg) or msg.metadata.src_node_id,
                    err,
                )
        return results


def _site_of(msg: Message) -> str:
    if msg.has_error():
        return ""
    identity = msg.content.config_records.get(wire.IDENTITY)
    return str(identity.get("site", "")) if identity is not None else ""
