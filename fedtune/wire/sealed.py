"""Sealed replies: the payload inside an envelope, sealing it, and opening and checking one."""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import ConfigRecord, RecordDict
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedtune.errors import InvalidEnvelope, UpdateRejected
from fedtune.lora.delta import State
from fedtune.security.envelope import EnvelopeHeader, now_ms, open_envelope, seal
from fedtune.security.keys import AllowList, KeyPair, PublicIdentity
from fedtune.security.witness import ChainHead
from fedtune.wire.arrays import from_wire, to_wire
from fedtune.wire.messages import (
    ENVELOPE,
    METRICS,
    NUM_EXAMPLES,
    REFUSAL,
    Identity,
    Refusal,
    Reply,
    RoundInstruction,
    checked_reply,
)


@dataclass(frozen=True)
class Sealer:
    """A hospital's means to seal its replies: its keys and the coordinator's public identity."""

    keys: KeyPair
    coordinator: PublicIdentity


@dataclass(frozen=True)
class Opener:
    """The coordinator's means to open replies: its keys and the hospitals it accepts."""

    keys: KeyPair
    senders: AllowList


@dataclass(frozen=True)
class Expected:
    """What a reply's header must say to belong to this request, and the dtype its delta must travel in."""

    run: str
    round: int
    kind: str
    challenge: str
    dtype: str = "float32"  # the run's `federation.wire_dtype`


def encode_payload(
    *,
    metrics: Mapping[str, float],
    num_examples: int,
    delta: Mapping[str, torch.Tensor] | None = None,
    refusal: Mapping[str, str] | None = None,
    dtype: str = "float32",
) -> bytes:
    """The plaintext inside an envelope: safetensors (no pickle) of the delta in the wire ``dtype``,
    numbers in its metadata."""
    tensors = to_wire(delta or {}, dtype)
    metadata = {
        NUM_EXAMPLES: str(int(num_examples)),
        METRICS: json.dumps({k: float(v) for k, v in metrics.items()}),
        REFUSAL: json.dumps(dict(refusal or {})),
    }
    return save_safetensors(tensors, metadata=metadata)


def decode_payload(data: bytes) -> tuple[State, int, dict[str, float], dict[str, str]]:
    """(tensors, num-examples, metrics, refusal) from an opened payload; UpdateRejected if malformed."""
    try:
        tensors = load_safetensors(data)
        size = int.from_bytes(data[:8], "little")
        meta: Any = json.loads(data[8 : 8 + size]).get("__metadata__", {})
        num = int(meta[NUM_EXAMPLES])
        metrics = json.loads(meta[METRICS])
        refusal = json.loads(meta[REFUSAL])
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UpdateRejected(f"sealed payload cannot be decoded ({type(err).__name__})") from err
    ok = isinstance(metrics, dict) and all(isinstance(v, int | float) for v in metrics.values())
    ok = ok and isinstance(refusal, dict) and all(isinstance(v, str) for v in refusal.values())
    if not ok:
        raise UpdateRejected("sealed payload metrics must be numbers and its refusal strings")
    return tensors, num, {str(k): float(v) for k, v in metrics.items()}, refusal


def seal_content(
    payload: bytes, identity: Identity, *, sealer: Sealer, instruction: RoundInstruction, kind: str, audit: ChainHead
) -> RecordDict:
    header = EnvelopeHeader(
        run=instruction.run_id,
        round=instruction.server_round,
        sender=identity.site,
        kind=kind,
        spec=identity.spec_sha256,
        base=identity.base_sha256,
        time_ms=now_ms(),
        challenge=instruction.challenge,
        audit_seq=audit.seq,
        audit_head=audit.hash,
    )
    sealed = seal(payload, header, sender=sealer.keys, recipient=sealer.coordinator)
    return RecordDict({ENVELOPE: ConfigRecord({"data": list(sealed)})})  # in parts: no copy of the ciphertext


def open_sealed(content: RecordDict, *, opener: Opener) -> tuple[EnvelopeHeader, bytes]:
    """Verify and decrypt a sealed reply: (authenticated header, payload); InvalidEnvelope otherwise."""
    record = content.config_records.get(ENVELOPE)
    data = record.get("data") if record is not None else None
    if not isinstance(data, bytes | list):  # the envelope in its three parts (or whole)
        raise InvalidEnvelope()
    return open_envelope(data, recipient=opener.keys, senders=opener.senders)


def check_opened(header: EnvelopeHeader, payload: bytes, *, expected: Expected) -> Reply | Refusal:
    """An opened envelope's reply, or UpdateRejected with the reason when it answers another
    request or carries a bad payload."""
    for field, want in (("kind", expected.kind), ("run", expected.run), ("round", expected.round)):
        if getattr(header, field) != want:
            raise UpdateRejected(f"envelope is for {field} {getattr(header, field)!r}, expected {want!r}")
    if not secrets.compare_digest(header.challenge, expected.challenge):
        raise UpdateRejected("envelope answers another request (challenge differs): a replay")
    identity = Identity(site=header.sender, base_sha256=header.base, spec_sha256=header.spec)
    tensors, num, metrics, refusal = decode_payload(payload)
    if refusal:
        return Refusal(identity, refusal.get("kind", ""), refusal.get("reason", "")[:2000])
    delta = from_wire(tensors, expected.dtype) if expected.kind == "train" else None
    return checked_reply(identity, num, metrics, delta, expected.kind)


def open_content(content: RecordDict, *, opener: Opener, expected: Expected) -> Reply | Refusal:
    """Open a sealed reply: InvalidEnvelope for anything cryptographic, UpdateRejected with the
    reason when an authentic envelope answers another request or carries a bad payload."""
    header, payload = open_sealed(content, opener=opener)
    return check_opened(header, payload, expected=expected)
