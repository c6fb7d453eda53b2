"""The only place that packs and unpacks Flower records.

Both roles import the record keys from here (``from fedtune import wire``), so the protocol
is written down once. The package's modules: ``messages`` (record keys, identity, round
instruction, unpacked replies, message bytes), ``arrays`` (the adapter as one packed
Array; the dtype a delta travels in), ``sealed`` (envelopes: payload, seal, open, check), ``replies`` (packing replies
and refusals, sealed or plain; unpacking plain ones), ``secagg`` (SecAgg+'s legacy records).

Server -> client (train and evaluate): ``global`` (ArrayRecord, the adapter) and
``config`` (ConfigRecord: ``server-round``, ``num-rounds``).

Server -> client config also carries ``run-id`` and ``challenge`` (fresh random hex for
every train and evaluate request): a sealed reply must echo both, so an envelope from an
earlier round, attempt or run is refused.

Client -> server, sealed (the default): one ConfigRecord ``envelope`` holding the bytes of
a :mod:`fedtune.security.envelope`, whose header names the sender, run, round, kind, challenge, the
adapter and base hashes and the head of the hospital's audit trail when the reply was
built (:class:`~fedtune.security.witness.ChainHead`), and whose encrypted payload is a safetensors
blob: the delta's tensors (train only, in the run's ``federation.wire_dtype``) with
``num-examples``, ``metrics`` and ``refusal`` in its metadata. The coordinator records each
opened envelope's audit head with the SHA-256 of the content as received (:func:`wire_bytes`,
the serialization the hospital's audit trail hashes) in the run's ``witness.jsonl`` (:mod:`fedtune.security.witness`).

Client -> server, plain (``security.seal = false``, research only): ``delta`` (ArrayRecord
packed in the run's ``federation.wire_dtype``, train only), ``metrics`` (MetricRecord with
``num-examples`` and numbers only) and ``identity`` (ConfigRecord: ``site``, ``base-sha256``, ``spec-sha256``).

A delta in ``bfloat16`` or ``float16`` is decoded to float32 on receipt; one in any other dtype
than the run's is rejected. The global adapter always goes out as float32.

A hospital that will not train (its privacy budget is spent) sends a refusal (``kind``,
``reason``): no delta and no number computed from its data.
"""

from __future__ import annotations

from fedtune.wire.arrays import INDEX, PACKED, WIRE_DTYPES, from_arrays, from_wire, to_arrays, to_wire
from fedtune.wire.messages import (
    CONFIG,
    DELTA,
    ENVELOPE,
    GLOBAL,
    IDENTITY,
    METRICS,
    NUM_EXAMPLES,
    REFUSAL,
    REFUSED_POLICY,
    REFUSED_PRIVACY_BUDGET,
    Identity,
    Refusal,
    Reply,
    RoundInstruction,
    instruction_config,
    message_bytes,
    new_challenge,
    unpack_instruction,
    wire_bytes,
)
from fedtune.wire.replies import pack_refusal, pack_reply, unpack_refusal, unpack_reply
from fedtune.wire.sealed import (
    Expected,
    Opener,
    Sealer,
    check_opened,
    decode_payload,
    encode_payload,
    open_content,
    open_sealed,
)
from fedtune.wire.secagg import (
    from_parameters,
    is_secagg_train,
    pack_secagg_reply,
    secagg_instruction,
    to_parameters,
    unpack_secagg_instruction,
)

__all__ = [
    "CONFIG",
    "DELTA",
    "ENVELOPE",
    "Expected",
    "GLOBAL",
    "IDENTITY",
    "INDEX",
    "Identity",
    "METRICS",
    "NUM_EXAMPLES",
    "Opener",
    "PACKED",
    "REFUSAL",
    "REFUSED_POLICY",
    "REFUSED_PRIVACY_BUDGET",
    "Refusal",
    "Reply",
    "RoundInstruction",
    "Sealer",
    "check_opened",
    "decode_payload",
    "encode_payload",
    "from_arrays",
    "from_parameters",
    "instruction_config",
    "is_secagg_train",
    "message_bytes",
    "new_challenge",
    "open_content",
    "open_sealed",
    "pack_refusal",
    "pack_reply",
    "pack_secagg_reply",
    "secagg_instruction",
    "to_arrays",
    "to_parameters",
    "unpack_instruction",
    "unpack_refusal",
    "unpack_reply",
    "unpack_secagg_instruction",
    "wire_bytes",
    "WIRE_DTYPES",
    "from_wire",
    "to_wire",
]
