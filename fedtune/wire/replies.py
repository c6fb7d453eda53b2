"""Packing a reply or a refusal (sealed when the hospital seals, else plain records) and
unpacking a plain one."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedtune.errors import UpdateRejected
from fedtune.security.witness import ChainHead
from fedtune.wire.arrays import from_arrays, to_arrays
from fedtune.wire.messages import (
    DELTA,
    IDENTITY,
    METRICS,
    NUM_EXAMPLES,
    REFUSAL,
    Identity,
    Refusal,
    Reply,
    RoundInstruction,
    checked_reply,
)
from fedtune.wire.sealed import Sealer, encode_payload, seal_content


def pack_reply(
    identity: Identity,
    metrics: Mapping[str, float],
    *,
    num_examples: int,
    delta: Mapping[str, torch.Tensor] | None = None,
    sealer: Sealer | None = None,
    instruction: RoundInstruction | None = None,
    audit: ChainHead | None = None,
    wire_dtype: str = "float32",
) -> RecordDict:
    """A train reply (with ``delta``, in ``wire_dtype``) or an evaluate reply (without); sealed when
    ``sealer`` is given, naming ``audit``, the head of the hospital's audit trail before this message."""
    if sealer is not None:
        if instruction is None or audit is None:
            raise ValueError("a sealed reply needs the instruction it answers and the hospital's audit head")
        payload = encode_payload(metrics=metrics, num_examples=num_examples, delta=delta, dtype=wire_dtype)
        kind = "train" if delta is not None else "evaluate"
        return seal_content(payload, identity, sealer=sealer, instruction=instruction, kind=kind, audit=audit)
    record = RecordDict(
        {
            METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples), **{k: float(v) for k, v in metrics.items()}}),
            IDENTITY: identity.to_record(),
        }
    )
    if delta is not None:
        record[DELTA] = to_arrays(delta, wire_dtype)
    return record


def pack_refusal(
    identity: Identity,
    *,
    kind: str,
    reason: str,
    sealer: Sealer | None = None,
    instruction: RoundInstruction | None = None,
    audit: ChainHead | None = None,
) -> RecordDict:
    """A reply that says why this site sends nothing this round (sealed when ``sealer`` is given,
    naming ``audit``, the head of the hospital's audit trail before this message)."""
    if sealer is not None:
        if instruction is None or audit is None:
            raise ValueError("a sealed refusal needs the instruction it answers and the hospital's audit head")
        payload = encode_payload(metrics={}, num_examples=0, refusal={"kind": kind, "reason": reason})
        return seal_content(payload, identity, sealer=sealer, instruction=instruction, kind="train", audit=audit)
    return RecordDict({IDENTITY: identity.to_record(), REFUSAL: ConfigRecord({"kind": kind, "reason": reason})})


def unpack_refusal(content: RecordDict) -> Refusal | None:
    """The refusal carried by a reply, or None for an ordinary reply."""
    if REFUSAL not in content.config_records:
        return None
    try:
        identity = Identity.from_record(content.config_records[IDENTITY])
    except KeyError as err:
        raise UpdateRejected("refusal lacks the identity record") from err
    record = content.config_records[REFUSAL]
    return Refusal(identity, str(record.get("kind", "")), str(record.get("reason", ""))[:2000])


def unpack_reply(content: RecordDict, *, expect_delta: bool, dtype: str = "float32") -> Reply:
    """Unpack a plain reply, its delta packed in ``dtype`` (decoded to float32); anything malformed
    raises :class:`UpdateRejected` with the reason."""
    try:
        identity = Identity.from_record(content.config_records[IDENTITY])
        metrics_record = content.metric_records[METRICS]
    except KeyError as err:
        raise UpdateRejected(f"reply lacks the {err} record") from err
    metrics = {k: float(v) for k, v in metrics_record.items() if isinstance(v, int | float)}  # type: ignore[arg-type]
    num = metrics.pop(NUM_EXAMPLES, None)
    delta = None
    if expect_delta:
        if DELTA not in content.array_records:
            raise UpdateRejected("train reply carries no delta")
        try:
            delta = from_arrays(content.array_records[DELTA], dtype)
        except (ValueError, TypeError, OSError) as err:
            raise UpdateRejected(f"delta arrays cannot be decoded ({err})") from err
    return checked_reply(identity, num, metrics, delta, "train" if expect_delta else "evaluate")
