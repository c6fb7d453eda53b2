"""The only place that packs and unpacks Flower records.

Both roles import the record keys from here, so the protocol is written down once.

Server -> client (train and evaluate): ``global`` (ArrayRecord, the adapter) and
``config`` (ConfigRecord: ``server-round``, ``num-rounds``).

Client -> server: ``delta`` (ArrayRecord, train only), ``metrics`` (MetricRecord with
``num-examples`` and numbers only) and ``identity`` (ConfigRecord: ``site``,
``base-sha256``, ``spec-sha256``). A hospital that will not train (its privacy budget is
spent) answers with ``identity`` and ``refusal`` (ConfigRecord: ``kind``, ``reason``) only:
no delta and no number computed from its data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedtune.errors import UpdateRejected

GLOBAL = "global"
CONFIG = "config"
DELTA = "delta"
METRICS = "metrics"
IDENTITY = "identity"
REFUSAL = "refusal"
NUM_EXAMPLES = "num-examples"
REFUSED_PRIVACY_BUDGET = "privacy-budget"

State = dict[str, torch.Tensor]


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors -> ArrayRecord (float32, canonical key order)."""
    return ArrayRecord(
        {k: Array.from_numpy_ndarray(np.ascontiguousarray(v.detach().cpu().numpy())) for k, v in sorted(state.items())}
    )


def from_arrays(record: ArrayRecord) -> State:
    """ArrayRecord -> adapter tensors (writable copies)."""
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in record.items()}


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


def instruction_config(*, num_rounds: int) -> ConfigRecord:
    """The round's config; Flower's strategy adds ``server-round`` itself."""
    return ConfigRecord({"num-rounds": num_rounds})


def unpack_instruction(content: RecordDict) -> RoundInstruction:
    config = content.config_records[CONFIG]
    return RoundInstruction(
        state=from_arrays(content.array_records[GLOBAL]),
        server_round=int(config["server-round"]),  # type: ignore[arg-type]
        num_rounds=int(config["num-rounds"]),  # type: ignore[arg-type]
    )


def pack_reply(
    identity: Identity,
    metrics: Mapping[str, float],
    *,
    num_examples: int,
    delta: Mapping[str, torch.Tensor] | None = None,
) -> RecordDict:
    """A train reply (with ``delta``) or an evaluate reply (without)."""
    record = RecordDict(
        {
            METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples), **{k: float(v) for k, v in metrics.items()}}),
            IDENTITY: identity.to_record(),
        }
    )
    if delta is not None:
        record[DELTA] = to_arrays(delta)
    return record


def pack_refusal(identity: Identity, *, kind: str, reason: str) -> RecordDict:
    """A reply that says why this site sends nothing this round."""
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


def unpack_reply(content: RecordDict, *, expect_delta: bool) -> Reply:
    """Unpack a reply; anything malformed raises :class:`UpdateRejected` with the reason."""
    try:
        identity = Identity.from_record(content.config_records[IDENTITY])
        metrics_record = content.metric_records[METRICS]
    except KeyError as err:
        raise UpdateRejected(f"reply lacks the {err} record") from err
    metrics = {k: float(v) for k, v in metrics_record.items() if isinstance(v, int | float)}  # type: ignore[arg-type]
    num = metrics.pop(NUM_EXAMPLES, None)
    if num is None or num <= 0 or num != int(num):
        raise UpdateRejected(f"reply `{NUM_EXAMPLES}` must be a positive integer, got {num}")
    delta = None
    if expect_delta:
        if DELTA not in content.array_records:
            raise UpdateRejected("train reply carries no delta")
        try:
            delta = from_arrays(content.array_records[DELTA])
        except (ValueError, TypeError, OSError) as err:
            raise UpdateRejected(f"delta arrays cannot be decoded ({err})") from err
    return Reply(identity=identity, num_examples=int(num), metrics=metrics, delta=delta)


def message_bytes(content: RecordDict) -> int:
    """Serialized size of a message body as it travels (protobuf bytes)."""
    return len(recorddict_to_proto(content).SerializeToString())
