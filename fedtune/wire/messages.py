"""The record keys both roles use, who a reply comes from, what a round asks, what a reply
carries once unpacked, and a message's bytes as they travel and as the audit trail hashes them."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedtune.errors import UpdateRejected
from fedtune.lora.delta import State
from fedtune.wire.arrays import from_arrays

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
class Refusal:
    """A site's refusal to take part in a round."""

    identity: Identity
    kind: str
    reason: str


@dataclass(frozen=True)
class Reply:
    """A client's reply, unpacked and type-checked (not yet validated against the global)."""

    identity: Identity
    num_examples: int
    metrics: dict[str, float]
    delta: State | None


def checked_reply(
    identity: Identity, num: float | None, metrics: dict[str, float], delta: State | None, kind: str
) -> Reply:
    if num is None or num <= 0 or num != int(num):
        raise UpdateRejected(f"reply `{NUM_EXAMPLES}` must be a positive integer, got {num}")
    if kind == "train" and delta is None:
        raise UpdateRejected("train reply carries no delta")
    return Reply(identity=identity, num_examples=int(num), metrics=metrics, delta=delta)


def message_bytes(content: RecordDict) -> int:
    """Serialized size of a message body as it travels (protobuf bytes)."""
    return len(recorddict_to_proto(content).SerializeToString())


def wire_bytes(content: RecordDict) -> bytes:
    """A message body serialized deterministically: what the hospital's audit trail hashes
    (``sha256`` and ``bytes`` of each record) and the coordinator's witness hashes on receipt."""
    return recorddict_to_proto(content).SerializeToString(deterministic=True)
