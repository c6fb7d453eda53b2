"""The sealed envelope: what a hospital sends the coordinator, encrypted and signed.

Format, version 2 (all integers big-endian)::

    offset  size  field
    0       3     magic b"FTE"
    3       1     format version (2)
    4       2     header length H (<= 4096)
    6       H     header: canonical JSON (sorted keys, no spaces), see EnvelopeHeader
    6+H     32    ephemeral X25519 public key
    38+H    12    AES-GCM nonce
    50+H    C     AES-256-GCM ciphertext of the payload, with its 16-byte tag
    50+H+C  64    Ed25519 signature of the sender over bytes [0, 50+H+C)

The AES key is HKDF-SHA256 of the X25519 agreement between the ephemeral key and the
coordinator's key, with both public keys in HKDF's info: only that coordinator can
decrypt, and a fresh ephemeral key per message makes every key single-use. Bytes
[0, 50+H) are GCM's associated data, so the header (run, round, sender, adapter and
base hashes, time, the round's challenge, the hospital's audit chain head) is bound to
the ciphertext; the signature binds all of it to the sender. Opening verifies the
signature before decrypting, and every failure (format, unknown sender, signature, tag)
is the same opaque :class:`~fedtune.errors.InvalidEnvelope`; an envelope of another
format version is refused before anything else with
:class:`~fedtune.errors.EnvelopeVersionError` (an ``InvalidEnvelope`` whose message
names the version: the version byte is public, so saying it costs nothing).

Version 2 added ``audit_seq`` and ``audit_head`` to the header: the sequence number and
hash of the last record of the hospital's audit trail when the reply was built (0 and
the trail's genesis value for an empty trail). The coordinator records them, so a
trail rewritten or extended after the fact no longer matches what the coordinator saw
(``fedtune server witness``, ``fedtune client audit verify --witness``). Version 1
envelopes (no audit head) are refused.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from dataclasses import asdict, dataclass

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from fedtune.errors import EnvelopeVersionError, InvalidEnvelope
from fedtune.security.keys import AllowList, KeyPair, PublicIdentity

MAGIC = b"FTE"
VERSION = 2
MAX_HEADER = 4096
_PREFIX = struct.Struct(">3sBH")  # magic, version, header length
_EPH, _NONCE, _TAG, _SIG = 32, 12, 16, 64
_INFO = b"fedtune envelope v2"
KINDS = ("train", "evaluate")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class EnvelopeHeader:
    """What an envelope says about itself; authenticated, not secret."""

    run: str
    round: int
    sender: str
    kind: str
    spec: str
    base: str
    time_ms: int
    challenge: str
    audit_seq: int  # the hospital's audit trail: seq of its last record before this message (0: none)
    audit_head: str  # ... and that record's hash (the trail's genesis value when empty)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @staticmethod
    def decode(raw: bytes) -> EnvelopeHeader:
        """Strict: exactly the known fields with their types, else InvalidEnvelope."""
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidEnvelope() from err
        fields = EnvelopeHeader.__dataclass_fields__
        if not isinstance(doc, dict) or set(doc) != set(fields):
            raise InvalidEnvelope()
        for name in fields:
            want = int if name in ("round", "time_ms", "audit_seq") else str
            value = doc[name]
            if not isinstance(value, want) or isinstance(value, bool):
                raise InvalidEnvelope()
        if doc["kind"] not in KINDS or doc["audit_seq"] < 0 or not _SHA256_HEX.fullmatch(doc["audit_head"]):
            raise InvalidEnvelope()
        return EnvelopeHeader(**doc)


def _key(shared: bytes, eph_pub: bytes, recipient_pub: bytes) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO + eph_pub + recipient_pub)
    return hkdf.derive(shared)


def _raw(key: X25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def now_ms() -> int:
    return int(time.time() * 1000)


def seal(
    payload: bytes,
    header: EnvelopeHeader,
    *,
    sender: KeyPair,
    recipient: PublicIdentity,
    ephemeral: X25519PrivateKey | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """Encrypt ``payload`` for ``recipient`` and sign it as ``sender``.

    ``ephemeral`` and ``nonce`` are for known-answer tests only; by default both are
    fresh from the OS's CSPRNG.
    """
    if header.sender != sender.name:
        raise ValueError(f"header sender {header.sender!r} is not the signing key's {sender.name!r}")
    if header.audit_seq < 0 or not _SHA256_HEX.fullmatch(header.audit_head):
        got = f"{header.audit_seq}, {header.audit_head!r}"
        raise ValueError(f"header audit head must be a seq >= 0 and a SHA-256 hex, got {got}")
    encoded = header.encode()
    if len(encoded) > MAX_HEADER:
        raise ValueError(f"envelope header of {len(encoded)} bytes exceeds {MAX_HEADER}")
    eph = ephemeral if ephemeral is not None else X25519PrivateKey.generate()
    nonce = nonce if nonce is not None else os.urandom(_NONCE)
    if len(nonce) != _NONCE:
        raise ValueError("nonce must be 12 bytes")
    eph_pub, recipient_pub = _raw(eph.public_key()), _raw(recipient.encryption)
    key = _key(eph.exchange(recipient.encryption), eph_pub, recipient_pub)
    aad = _PREFIX.pack(MAGIC, VERSION, len(encoded)) + encoded + eph_pub + nonce
    body = aad + AESGCM(key).encrypt(nonce, payload, aad)
    return body + sender.signing.sign(body)


def peek_header(data: bytes) -> EnvelopeHeader:
    """The header of an envelope, NOT verified: for routing and logs only."""
    if len(data) < _PREFIX.size:
        raise InvalidEnvelope()
    magic, version, length = _PREFIX.unpack_from(data)
    if magic != MAGIC or length > MAX_HEADER:
        raise InvalidEnvelope()
    if version != VERSION:
        raise EnvelopeVersionError(version, VERSION)
    if len(data) < _PREFIX.size + length + _EPH + _NONCE + _TAG + _SIG:
        raise InvalidEnvelope()
    return EnvelopeHeader.decode(data[_PREFIX.size : _PREFIX.size + length])


def open_envelope(data: bytes, *, recipient: KeyPair, senders: AllowList) -> tuple[EnvelopeHeader, bytes]:
    """Verify, then decrypt: (header, payload). Any failure is the one opaque InvalidEnvelope."""
    if not isinstance(data, bytes | bytearray):
        raise InvalidEnvelope()
    data = bytes(data)
    header = peek_header(data)
    identity = senders.get(header.sender)
    if identity is None:
        raise InvalidEnvelope()
    body, signature = data[:-_SIG], data[-_SIG:]
    try:
        identity.signing.verify(signature, body)
    except InvalidSignature as err:
        raise InvalidEnvelope() from err
    start = _PREFIX.size + len(header.encode())
    if data[_PREFIX.size : start] != header.encode():  # only the canonical encoding is accepted
        raise InvalidEnvelope()
    eph_pub, nonce = body[start : start + _EPH], body[start + _EPH : start + _EPH + _NONCE]
    aad_end = start + _EPH + _NONCE
    try:
        eph = X25519PublicKey.from_public_bytes(eph_pub)
        key = _key(recipient.encryption.exchange(eph), eph_pub, _raw(recipient.encryption.public_key()))
        payload = AESGCM(key).decrypt(nonce, body[aad_end:], body[:aad_end])
    except (InvalidTag, ValueError) as err:  # ValueError: a low-order point gives an all-zero secret
        raise InvalidEnvelope() from err
    return header, payload
