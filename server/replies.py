"""What the coordinator makes of one reply before any merge: opened (a sealed envelope
verified, decrypted and checked against its request; or a plain reply unpacked), witnessed,
and named for the logs; and what a training round made of each sampled node.

Every authentic envelope (signature verified, decrypted) is witnessed before anything
else is checked: its sender, run, round, kind, the sender's audit trail head it carries
and the SHA-256 of the content as received go to the run's ``witness.jsonl``
(:mod:`fedtune.security.witness`), which ``fedtune server witness`` hands to a hospital to check
its audit trail against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from logging import WARNING

from flwr.app import Message, MetricRecord
from flwr.supercore import log

from fedtune import wire
from fedtune.errors import FederationStopped, FedTuneError, InvalidEnvelope, UpdateRejected
from fedtune.security.envelope import EnvelopeHeader, peek_header
from fedtune.security.witness import WitnessEntry, WitnessLog


@dataclass
class TrainReport:
    """What one training round accepted, rejected and was refused: the round's metrics line
    (``train``, ``rejected``, ``refused``) and each sampled node's state in ``status.json``."""

    accepted: dict[str, dict[str, float]] = field(default_factory=dict)
    rejected: list[dict[str, str]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    download_bytes: int = 0
    client_dp: dict[str, float] = field(default_factory=dict)
    # per sampled node: its state (accepted, refused, rejected, no reply), who it proved to be, and why
    nodes: dict[int, dict[str, str]] = field(default_factory=dict)

    def node(self, node: int, state: str, *, hospital: str = "", why: str = "") -> None:
        self.nodes[node] = {"state": state, "hospital": hospital, "why": why}

    def accept(self, site: str, metrics: dict[str, float], *, node: int | None = None) -> None:
        self.accepted[site] = metrics
        if node is not None:
            self.node(node, "accepted", hospital=site)

    def reject(
        self, server_round: int, site: str, reason: str, *, node: int | None = None, proven: bool = False
    ) -> None:
        """Log and count a reply kept out of the merge; ``proven``: its envelope authenticated ``site``."""
        log(WARNING, "round %d: rejected update from %s: %s", server_round, site, reason)
        self.rejected.append({"site": site, "reason": reason})
        if node is not None:
            self.node(node, "rejected", hospital=site if proven else "", why=reason)

    def refuse(self, server_round: int, refusal: wire.Refusal, *, node: int) -> None:
        """Log and count a hospital that declined the round (its budget or its policy)."""
        site = refusal.identity.site
        log(WARNING, "round %d: %s refused to train: %s", server_round, site, refusal.reason)
        self.refused.append({"site": site, "kind": refusal.kind, "reason": refusal.reason})
        self.node(node, "refused", hospital=site, why=f"{refusal.kind}: {refusal.reason}")

    def require(self, server_round: int, *, valid: int, needed: int) -> None:
        """Stop the federation when refusals left fewer than ``needed`` valid updates; fail the
        round when rejections did."""
        if valid >= needed:
            return
        if self.refused:
            sites = ", ".join(f"{r['site']}: {r['kind']}" for r in self.refused)
            reasons = "; ".join(dict.fromkeys(r["reason"][:200] for r in self.refused if r["reason"]))
            raise FederationStopped(
                f"round {server_round}: {len(self.refused)} site(s) refused to train ({sites}), "
                f"leaving {valid} valid update(s) of the {needed} a round needs"
                + (f"; why: {reasons}" if reasons else "")
            )
        raise FedTuneError(
            f"round {server_round}: only {valid} valid update(s), the round needs "
            f"{needed} (`federation.min_clients`); " + "; ".join(f"{r['site']}: {r['reason']}" for r in self.rejected)
        )

    def counts(self) -> MetricRecord:
        return MetricRecord(
            {"accepted": len(self.accepted), "rejected": len(self.rejected), "refused": len(self.refused)}
        )


def open_reply(
    msg: Message,
    *,
    kind: str,
    server_round: int,
    opener: wire.Opener | None,
    expected: wire.Expected | None,
    witness: WitnessLog | None,
) -> wire.Reply | wire.Refusal:
    """Authenticate and unpack one reply to the ``kind`` request ``expected`` (no check against
    the global adapter yet). Without an ``opener``, replies are plain (research simulations
    with ``security.seal = false``)."""
    if msg.has_error():
        raise UpdateRejected(f"client failed: {msg.error.reason}")
    if opener is not None:
        if expected is None or expected.round != server_round:
            raise UpdateRejected(f"no {kind} request is open for round {server_round}")
        header, payload = wire.open_sealed(msg.content, opener=opener)
        if witness is not None:
            witness.append(witness_entry(msg, header))
        return wire.check_opened(header, payload, expected=expected)
    refusal = wire.unpack_refusal(msg.content)
    if refusal is not None:
        return refusal
    return wire.unpack_reply(msg.content, expect_delta=kind == "train", dtype=expected.dtype if expected else "float32")


def witness_entry(msg: Message, header: EnvelopeHeader) -> WitnessEntry:
    """An authentic reply's audit head and content hash, as the hospital signed and sent it.

    What the header says (run, round, kind), not what this request expected: a late or
    replayed envelope is still a message the hospital sent."""
    data = wire.wire_bytes(msg.content)
    return WitnessEntry(
        hospital=header.sender,
        run=header.run,
        round=header.round,
        kind=header.kind,
        audit_seq=header.audit_seq,
        audit_head=header.audit_head,
        sha256=hashlib.sha256(data).hexdigest(),
        bytes=len(data),
    )


def site_hint(msg: Message, names: Mapping[int, str]) -> str:
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
            claimed = peek_header(data).sender if isinstance(data, bytes | list) else ""
        except InvalidEnvelope:
            claimed = ""
        return f"{node} (claims {claimed})" if claimed and claimed != node else node
    identity = msg.content.config_records.get(wire.IDENTITY)
    site = str(identity.get("site", "")) if identity is not None else ""
    return site or node
