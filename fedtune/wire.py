"""The only place that packs and unpacks Flower records.

Both roles import the record keys from here, so the protocol is written down once.

Server -> client (train and evaluate): ``global`` (ArrayRecord, the adapter) and
``config`` (ConfigRecord: ``server-round``, ``num-rounds``).

Server -> client config also carries ``run-id`` and ``challenge`` (fresh random hex for
every train and evaluate request): a sealed reply must echo both, so an envelope from an
earlier round, attempt or run is refused.

Client -> server, sealed (the default): one ConfigRecord ``envelope`` holding the bytes of
a :mod:`fedtune.security.envelope`, whose header names the sender, run, round, kind, challenge, the
adapter and base hashes and the head of the hospital's audit trail when the reply was
built (:class:`~fedtune.security.witness.ChainHead`), and whose encrypted payload is a safetensors
blob: the delta's tensors (train only) with ``num-examples``, ``metrics`` and ``refusal``
in its metadata. The coordinator records each opened envelope's audit head with the
SHA-256 of the content as received (:func:`wire_bytes`, the serialization the hospital's
audit trail hashes) in the run's ``witness.jsonl`` (:mod:`fedtune.security.witness`).

Client -> server, plain (``security.seal = false``, research only): ``delta`` (ArrayRecord,
train only), ``metrics`` (MetricRecord with ``num-examples`` and numbers only) and
``identity`` (ConfigRecord: ``site``, ``base-sha256``, ``spec-sha256``).

A hospital that will not train (its privacy budget is spent) sends a refusal (``kind``,
``reason``): no delta and no number computed from its data.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common import Code, FitRes, Parameters, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.serde import recorddict_to_proto
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fedtune.errors import InvalidEnvelope, UpdateRejected
from fedtune.lora.delta import State
from fedtune.security.envelope import EnvelopeHeader, now_ms, open_envelope, seal
from fedtune.security.keys import AllowList, KeyPair, PublicIdentity
from fedtune.security.witness import ChainHead

GLOBAL = "global"
CONFIG = "config"
DELTA = "delta"
METRICS = "metrics"
IDENTITY = "identity"
REFUSAL = "refusal"
ENVELOPE = "envelope"
NUM_EXAMPLES = "num-examples"
REFUSED_PRIVACY_BUDGET = "privacy-budget"
REFUSED_POLICY = "hospital-policy"



PACKED = "adapter"  # every tensor of the adapter, float32, one after another in key order
INDEX = "index"  # UTF-8 JSON [[key, shape], ...] as uint8: where each tensor lies in PACKED
_MAX_INDEX_BYTES = 1 << 24


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors -> ArrayRecord of two Arrays: the packed float32 values and their index.

    Flower moves every Array of a message as its own object (one HTTP request and several
    SuperLink database queries each, per hospital): SmolLM2's adapter as 240 Arrays took
    480 requests a message. Packed, it is one Array (in 5 MB chunks) and a small index.
    """
    keys = sorted(state)
    parts = [np.ascontiguousarray(state[k].detach().cpu().numpy(), dtype=np.float32).ravel() for k in keys]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    index = json.dumps([[k, list(state[k].shape)] for k in keys], separators=(",", ":")).encode()
    return ArrayRecord(
        {
            INDEX: Array.from_numpy_ndarray(np.frombuffer(index, dtype=np.uint8).copy()),
            PACKED: Array.from_numpy_ndarray(flat),
        }
    )


def from_arrays(record: ArrayRecord) -> State:
    """ArrayRecord -> adapter tensors (writable copies); ``ValueError`` naming what is malformed."""
    if set(record) != {INDEX, PACKED}:
        raise ValueError(f"an adapter record holds `{INDEX}` and `{PACKED}`, got {sorted(record)[:4]}")
    raw = record[INDEX].numpy()
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _MAX_INDEX_BYTES:
        raise ValueError("the adapter index is not a byte string of sane size")
    try:
        index = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError("the adapter index is not JSON") from err
    flat = record[PACKED].numpy()
    if flat.dtype != np.float32 or flat.ndim != 1:
        raise ValueError(f"the packed adapter must be a float32 vector, got {flat.dtype} of {flat.ndim} dims")
    if not isinstance(index, list):
        raise ValueError("the adapter index must be a list")
    out: State = {}
    offset = 0
    for entry in index:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
        if not ok or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1]):
            raise ValueError("an adapter index entry must be [key, [non-negative dims]]")
        key, shape = entry[0], tuple(entry[1])
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if key in out or offset + size > flat.size:
            raise ValueError(f"the adapter index does not fit the packed values (at {key!r})")
        out[key] = torch.from_numpy(np.array(flat[offset : offset + size], copy=True).reshape(shape))
        offset += size
    if offset != flat.size:
        raise ValueError(f"{flat.size - offset} packed values are not named by the index")
    return out


@dataclass(frozen=True)
class Identity:
    """Who sent a reply and what it was computed against."""

    site: str
    base_sha256: str
    spec_sha256: str

    def to_record(self) -> ConfigRecord:
        return ConfigRecord({"site": self.site, "base-sha256": self.base_sha256, "spec-sha256": self.spec_sha256})

    @staticmethod
    def from_record(record: ConfigRecord) -> Identity:
        try:
            values = (record["site"], record["base-sha256"], record["spec-sha256"])
        except KeyError as err:
            raise UpdateRejected(f"reply identity lacks {err}") from err
        if not all(isinstance(v, str) for v in values):
            raise UpdateRejected("reply identity fields must be strings")
        return Identity(*values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class RoundInstruction:
    """What the server asks of a client for one round."""

    state: State
    server_round: int
    num_rounds: int
    run_id: str = ""
    challenge: str = ""


def instruction_config(*, num_rounds: int, run_id: str = "") -> ConfigRecord:
    """The round's config; the strategy adds ``server-round`` and the ``challenge``."""
    return ConfigRecord({"num-rounds": num_rounds, "run-id": run_id})


def new_challenge() -> str:
    """A fresh, unpredictable value a sealed reply must echo (128 bits)."""
    return secrets.token_hex(16)


def unpack_instruction(content: RecordDict) -> RoundInstruction:
    config = content.config_records[CONFIG]
    return RoundInstruction(
        state=from_arrays(content.array_records[GLOBAL]),
        server_round=int(config["server-round"]),  # type: ignore[arg-type]
        num_rounds=int(config["num-rounds"]),  # type: ignore[arg-type]
        run_id=str(config.get("run-id", "")),
        challenge=str(config.get("challenge", "")),
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
    """What a reply's header must say to belong to this request."""

    run: str
    round: int
    kind: str
    challenge: str


def encode_payload(
    *,
    metrics: Mapping[str, float],
    num_examples: int,
    delta: Mapping[str, torch.Tensor] | None = None,
    refusal: Mapping[str, str] | None = None,
) -> bytes:
    """The plaintext inside an envelope: safetensors (no pickle), numbers in its metadata."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in (delta or {}).items()}
    metadata = {
        NUM_EXAMPLES: str(int(num_examples)),
        METRICS: json.dumps({k: float(v) for k, v in metrics.items()}),
        REFUSAL: json.dumps(dict(refusal or {})),
    }
    return bytes(save_safetensors(tensors, metadata=metadata))


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


def _seal_content(
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
    envelope = seal(payload, header, sender=sealer.keys, recipient=sealer.coordinator)
    return RecordDict({ENVELOPE: ConfigRecord({"data": envelope})})


def open_sealed(content: RecordDict, *, opener: Opener) -> tuple[EnvelopeHeader, bytes]:
    """Verify and decrypt a sealed reply: (authenticated header, payload); InvalidEnvelope otherwise."""
    record = content.config_records.get(ENVELOPE)
    data = record.get("data") if record is not None else None
    if not isinstance(data, bytes):
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
    return _checked_reply(identity, num, metrics, tensors if expected.kind == "train" else None, expected.kind)


def open_content(content: RecordDict, *, opener: Opener, expected: Expected) -> Reply | Refusal:
    """Open a sealed reply: InvalidEnvelope for anything cryptographic, UpdateRejected with the
    reason when an authentic envelope answers another request or carries a bad payload."""
    header, payload = open_sealed(content, opener=opener)
    return check_opened(header, payload, expected=expected)


def pack_reply(
    identity: Identity,
    metrics: Mapping[str, float],
    *,
    num_examples: int,
    delta: Mapping[str, torch.Tensor] | None = None,
    sealer: Sealer | None = None,
    instruction: RoundInstruction | None = None,
    audit: ChainHead | None = None,
) -> RecordDict:
    """A train reply (with ``delta``) or an evaluate reply (without); sealed when ``sealer`` is given,
    naming ``audit``, the head of the hospital's audit trail before this message."""
    if sealer is not None:
        if instruction is None or audit is None:
            raise ValueError("a sealed reply needs the instruction it answers and the hospital's audit head")
        payload = encode_payload(metrics=metrics, num_examples=num_examples, delta=delta)
        kind = "train" if delta is not None else "evaluate"
        return _seal_content(payload, identity, sealer=sealer, instruction=instruction, kind=kind, audit=audit)
    record = RecordDict(
        {
            METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples), **{k: float(v) for k, v in metrics.items()}}),
            IDENTITY: identity.to_record(),
        }
    )
    if delta is not None:
        record[DELTA] = to_arrays(delta)
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
        return _seal_content(payload, identity, sealer=sealer, instruction=instruction, kind="train", audit=audit)
    return RecordDict({IDENTITY: identity.to_record(), REFUSAL: ConfigRecord({"kind": kind, "reason": reason})})


@dataclass(frozen=True)
class Refusal:
    """A site's refusal to take part in a round."""

    identity: Identity
    kind: str
    reason: str


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


@dataclass(frozen=True)
class Reply:
    """A client's reply, unpacked and type-checked (not yet validated against the global)."""

    identity: Identity
    num_examples: int
    metrics: dict[str, float]
    delta: State | None


def _checked_reply(
    identity: Identity, num: float | None, metrics: dict[str, float], delta: State | None, kind: str
) -> Reply:
    if num is None or num <= 0 or num != int(num):
        raise UpdateRejected(f"reply `{NUM_EXAMPLES}` must be a positive integer, got {num}")
    if kind == "train" and delta is None:
        raise UpdateRejected("train reply carries no delta")
    return Reply(identity=identity, num_examples=int(num), metrics=metrics, delta=delta)


def unpack_reply(content: RecordDict, *, expect_delta: bool) -> Reply:
    """Unpack a plain reply; anything malformed raises :class:`UpdateRejected` with the reason."""
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
            delta = from_arrays(content.array_records[DELTA])
        except (ValueError, TypeError, OSError) as err:
            raise UpdateRejected(f"delta arrays cannot be decoded ({err})") from err
    return _checked_reply(identity, num, metrics, delta, "train" if expect_delta else "evaluate")


def message_bytes(content: RecordDict) -> int:
    """Serialized size of a message body as it travels (protobuf bytes)."""
    return len(recorddict_to_proto(content).SerializeToString())


def wire_bytes(content: RecordDict) -> bytes:
    """A message body serialized deterministically: what the hospital's audit trail hashes
    (``sha256`` and ``bytes`` of each record) and the coordinator's witness hashes on receipt."""
    return recorddict_to_proto(content).SerializeToString(deterministic=True)


# -- secure aggregation: Flower's legacy FitIns / FitRes records, which SecAgg+ masks ---------


def is_secagg_train(content: RecordDict) -> bool:
    """Is this a train request from Flower's SecAgg+ workflow (legacy FitIns records)?"""
    return "fitins.parameters" in content.array_records


def to_parameters(state: Mapping[str, torch.Tensor]) -> Parameters:
    """Adapter tensors -> legacy Parameters, in canonical (sorted) key order: they carry no names."""
    return ndarrays_to_parameters([np.ascontiguousarray(state[k].detach().cpu().numpy()) for k in sorted(state)])


def from_parameters(parameters: Parameters, reference: Mapping[str, torch.Tensor]) -> State:
    """Legacy Parameters -> tensors named and shaped like ``reference``; UpdateRejected if they do not fit."""
    arrays = parameters_to_ndarrays(parameters)
    keys = sorted(reference)
    if len(arrays) != len(keys):
        raise UpdateRejected(f"{len(arrays)} arrays for an adapter of {len(keys)} tensors")
    out = {}
    for key, array in zip(keys, arrays, strict=True):
        if tuple(array.shape) != tuple(reference[key].shape):
            raise UpdateRejected(f"tensor {key} has shape {tuple(array.shape)}, expected {tuple(reference[key].shape)}")
        out[key] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    return out


def secagg_instruction(*, num_rounds: int, run_id: str, server_round: int, challenge: str) -> dict[str, Scalar]:
    """The FitIns config a SecAgg+ round sends (the same fields as the Message API's)."""
    return {"num-rounds": num_rounds, "run-id": run_id, "server-round": server_round, "challenge": challenge}


def unpack_secagg_instruction(content: RecordDict, reference: Mapping[str, torch.Tensor]) -> RoundInstruction:
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = fitins.config
    return RoundInstruction(
        state=from_parameters(fitins.parameters, reference),
        server_round=int(config["server-round"]),
        num_rounds=int(config["num-rounds"]),
        run_id=str(config.get("run-id", "")),
        challenge=str(config.get("challenge", "")),
    )


def pack_secagg_reply(
    identity: Identity, metrics: Mapping[str, float], *, num_examples: int, delta: Mapping[str, torch.Tensor]
) -> RecordDict:
    """A legacy FitRes: SecAgg+ masks its parameters before they leave; the numbers travel as they are."""
    numbers: dict[str, Scalar] = {k: float(v) for k, v in metrics.items()}
    numbers.update({"site": identity.site, "base-sha256": identity.base_sha256, "spec-sha256": identity.spec_sha256})
    fitres = FitRes(Status(Code.OK, ""), to_parameters(delta), int(num_examples), numbers)
    return compat.fitres_to_recorddict(fitres, keep_input=True)
