"""Key pairs for sealing updates: X25519 to encrypt to the coordinator, Ed25519 to sign.

Every party (the coordinator, each hospital) has one private key file and one public
identity file:

- ``<name>.key``: JSON with both private keys (raw, base64); mode 0600, and refused at
  load when group or others may read it;
- ``<name>.pub``: JSON with the name, role and both public keys; shared freely, and its
  fingerprint (SHA-256 of the public keys) is compared out of band, read aloud or on paper.

The coordinator trusts the hospitals whose ``.pub`` files sit in its allow-list folder;
a hospital holds the coordinator's ``.pub``. All files are written atomically.
"""

from __future__ import annotations

import base64
import hashlib
import json
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

from fedtune.atomic import atomic_write_bytes
from fedtune.errors import ConfigError, KeyFileError

KEY_VERSION = 1
ROLES = ("coordinator", "hospital")


def _raw_public(key: X25519PublicKey | Ed25519PublicKey) -> bytes:
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_name(name: str) -> None:
    """A party's name: 1-64 letters, digits, '-', '_' or '.', not starting with '.' (one-line error)."""
    if not (name and len(name) <= 64 and all(c.isalnum() or c in "-_." for c in name)) or name.startswith("."):
        raise ConfigError(f"key name must be 1-64 letters, digits, '-', '_' or '.', got {name!r}")


@dataclass(frozen=True)
class PublicIdentity:
    """What others know of a party: its name, role and public keys."""

    name: str
    role: str
    encryption: X25519PublicKey
    signing: Ed25519PublicKey

    @property
    def key_bytes(self) -> bytes:
        """The 64 bytes that identify the party: X25519 public || Ed25519 public."""
        return _raw_public(self.encryption) + _raw_public(self.signing)

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the public keys, as 16 groups of 4 hex digits (compare it out of band)."""
        digest = hashlib.sha256(self.key_bytes).hexdigest()
        return " ".join(digest[i : i + 4] for i in range(0, 64, 4))

    def to_json(self) -> bytes:
        doc = {
            "version": KEY_VERSION,
            "name": self.name,
            "role": self.role,
            "x25519": base64.b64encode(_raw_public(self.encryption)).decode(),
            "ed25519": base64.b64encode(_raw_public(self.signing)).decode(),
            "fingerprint": self.fingerprint,
        }
        return (json.dumps(doc, indent=1) + "\n").encode()


@dataclass(frozen=True)
class KeyPair:
    """A party's private keys."""

    name: str
    role: str
    encryption: X25519PrivateKey
    signing: Ed25519PrivateKey

    @staticmethod
    def generate(name: str, role: str) -> KeyPair:
        check_name(name)
        if role not in ROLES:
            raise ConfigError(f"key role must be one of {', '.join(ROLES)}, got {role!r}")
        return KeyPair(name, role, X25519PrivateKey.generate(), Ed25519PrivateKey.generate())

    @property
    def public(self) -> PublicIdentity:
        return PublicIdentity(self.name, self.role, self.encryption.public_key(), self.signing.public_key())

    def to_json(self) -> bytes:
        def raw(key: X25519PrivateKey | Ed25519PrivateKey) -> str:
            return base64.b64encode(key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())).decode()

        doc = {
            "version": KEY_VERSION,
            "name": self.name,
            "role": self.role,
            "x25519_private": raw(self.encryption),
            "ed25519_private": raw(self.signing),
        }
        return (json.dumps(doc, indent=1) + "\n").encode()


def _b64_32(doc: Mapping[str, object], field: str, path: Path) -> bytes:
    value = doc.get(field)
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (ValueError, TypeError) as err:
        raise KeyFileError(f"{path}: `{field}` is not base64; the key file is damaged") from err
    if len(raw) != 32:
        raise KeyFileError(f"{path}: `{field}` must hold 32 bytes, got {len(raw)}; the key file is damaged")
    return raw


def _read_doc(path: Path, kind: str) -> dict[str, object]:
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError as err:
        raise KeyFileError(f"{path}: no such {kind}; create one with `fedtune keys create`") from err
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{path}: unreadable {kind} ({err}); restore it or create a new one") from err
    if not isinstance(doc, dict) or doc.get("version") != KEY_VERSION:
        raise KeyFileError(f"{path}: not a fedtune {kind} (version {KEY_VERSION}); check the path")
    name, role = doc.get("name"), doc.get("role")
    if not isinstance(name, str) or role not in ROLES:
        raise KeyFileError(f"{path}: `name` or `role` missing or wrong; the {kind} is damaged")
    return doc


def check_private_mode(path: Path) -> None:
    """Refuse a private key file that anyone but its owner may read or write."""
    if path.exists():
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeyFileError(f"{path} has mode {oct(mode)}, readable by others; run `chmod 600 {path}`")


def load_private(path: Path) -> KeyPair:
    """Load a private key file; refused when others than its owner may read it."""
    path = Path(path)
    check_private_mode(path)
    doc = _read_doc(path, "private key file")
    return KeyPair(
        str(doc["name"]),
        str(doc["role"]),
        X25519PrivateKey.from_private_bytes(_b64_32(doc, "x25519_private", path)),
        Ed25519PrivateKey.from_private_bytes(_b64_32(doc, "ed25519_private", path)),
    )


def load_public(path: Path) -> PublicIdentity:
    """Load a public identity file."""
    path = Path(path)
    doc = _read_doc(path, "public key file")
    return PublicIdentity(
        str(doc["name"]),
        str(doc["role"]),
        X25519PublicKey.from_public_bytes(_b64_32(doc, "x25519", path)),
        Ed25519PublicKey.from_public_bytes(_b64_32(doc, "ed25519", path)),
    )


def load_identity(path: Path) -> PublicIdentity:
    """The public identity in a key file: ``.key`` (private, mode-checked) or ``.pub``."""
    path = Path(path)
    return load_private(path).public if path.suffix == ".key" else load_public(path)


def save_keys(pair: KeyPair, folder: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``<name>.key`` (0600) and ``<name>.pub`` into ``folder``; never overwrite by accident."""
    folder = Path(folder)
    private, public = folder / f"{pair.name}.key", folder / f"{pair.name}.pub"
    if not overwrite and (private.exists() or public.exists()):
        raise ConfigError(f"{private} or {public} already exists; pass --force to replace the keys")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(private, pair.to_json(), mode=0o600)
    atomic_write_bytes(public, pair.public.to_json(), mode=0o644)
    return private, public


class AllowList:
    """The hospitals the coordinator accepts updates from, by name."""

    def __init__(self, identities: Iterable[PublicIdentity]) -> None:
        self._by_name: dict[str, PublicIdentity] = {}
        for ident in identities:
            if ident.role != "hospital":
                raise ConfigError(
                    f"allow-list entry `{ident.name}` has role {ident.role!r}; only hospitals belong there"
                )
            if ident.name in self._by_name:
                raise ConfigError(f"allow-list names `{ident.name}` twice; keep one public key per hospital")
            self._by_name[ident.name] = ident

    @staticmethod
    def from_folder(folder: Path) -> AllowList:
        """Every ``*.pub`` in ``folder``; a file whose name differs from its identity's is refused."""
        folder = Path(folder)
        if not folder.is_dir():
            raise KeyFileError(f"{folder}: no allow-list folder; put each hospital's .pub file in it")
        identities = []
        for path in sorted(folder.glob("*.pub")):
            ident = load_public(path)
            if path.stem != ident.name:
                raise KeyFileError(f"{path}: holds the key of `{ident.name}`; rename it to {ident.name}.pub")
            identities.append(ident)
        return AllowList(identities)

    def get(self, name: str) -> PublicIdentity | None:
        return self._by_name.get(name)

    def names(self) -> list[str]:
        return sorted(self._by_name)
