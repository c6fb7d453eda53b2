"""The federation's PKI: a certificate authority, the coordinator's TLS certificate, and
each hospital's SuperNode key, with the fedtune envelope keys beside them.

- The CA (``ca.key``, ``ca.pem``): self-signed, EC P-384, may sign end-entity
  certificates only (path length 0). It stays with the coordinator's operator, offline
  when possible; hospitals get ``ca.pem`` to verify the coordinator.
- The coordinator's TLS certificate (``server.key``, ``server.pem``): EC P-384, signed by
  the CA, for server authentication, naming every address hospitals dial (DNS names and
  IP addresses as subject alternative names: TLS checks the name, not the common name).
- A hospital's node key (``<name>.node.key``, ``<name>.node.pub``): the EC P-384 key pair
  Flower's SuperNode authentication uses (NIST curves only), in OpenSSH format as Flower
  reads it. The SuperLink admits a SuperNode only after its public key was registered.

A hospital with its own CA can use it instead: see the README's deployment section.
Private keys are written 0600 through an atomic rename and refused at load when others
can read them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.atomic import atomic_write_bytes
from fedtune.errors import ConfigError, KeyFileError
from fedtune.security.keys import check_private_mode

CURVE = ec.SECP384R1()
CA_DAYS = 3650
CERT_DAYS = 825  # the longest TLS server certificate lifetime clients commonly accept


@dataclass(frozen=True)
class CAFiles:
    key: Path
    cert: Path

    @staticmethod
    def at(folder: Path) -> CAFiles:
        return CAFiles(Path(folder) / "ca.key", Path(folder) / "ca.pem")


@dataclass(frozen=True)
class ServerFiles:
    key: Path
    cert: Path

    @staticmethod
    def at(folder: Path) -> ServerFiles:
        return ServerFiles(Path(folder) / "server.key", Path(folder) / "server.pem")


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not force:
        raise ConfigError(f"{existing[0]} already exists; pass --force to replace it")


def _write_private_pem(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    atomic_write_bytes(path, pem, mode=0o600)


def _load_ec_private(path: Path, what: str, form: str, create: str) -> ec.EllipticCurvePrivateKey:
    """An unencrypted EC private key in ``form`` ("PEM" or "OpenSSH"), refused when others can read it."""
    path = Path(path)
    if not path.exists():
        raise KeyFileError(f"{path}: no such {what}; create it with `{create}`")
    check_private_mode(path)
    load = serialization.load_pem_private_key if form == "PEM" else serialization.load_ssh_private_key
    try:
        key = load(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as err:
        raise KeyFileError(f"{path}: not an unencrypted {form} private key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: the {what} must be an EC key on a NIST curve, got {type(key).__name__}")
    return key


def load_private_pem(path: Path, what: str) -> ec.EllipticCurvePrivateKey:
    """A PEM private key (the CA's, the TLS server's), refused when others can read it."""
    return _load_ec_private(path, what, "PEM", "fedtune pki")


def load_cert(path: Path, what: str) -> x509.Certificate:
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError as err:
        raise KeyFileError(f"{path}: no such {what}; create it with `fedtune pki`") from err
    except (OSError, ValueError) as err:
        raise KeyFileError(f"{path}: not a PEM certificate ({what}): {err}") from err


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the certificate's DER, as colon-separated hex (what browsers and openssl show)."""
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def create_ca(
    folder: Path, *, name: str = "fedtune federation CA", days: int = CA_DAYS, force: bool = False
) -> CAFiles:
    """A new self-signed CA in ``folder``."""
    files = CAFiles.at(folder)
    _refuse_overwrite([files.key, files.cert], force)
    key = ec.generate_private_key(CURVE)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA384())
    )
    Path(folder).mkdir(parents=True, exist_ok=True)
    _write_private_pem(files.key, key)
    atomic_write_bytes(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def _san(address: str) -> x509.GeneralName:
    host = address.strip()
    if not host or any(c in host for c in " /:@") and not _is_ip(host):
        raise ConfigError(f"`--address` must be a host name or an IP address without port, got {address!r}")
    if _is_ip(host):
        return x509.IPAddress(ipaddress.ip_address(host))
    return x509.DNSName(host)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def issue_server_cert(
    ca_folder: Path, out: Path, addresses: list[str], *, days: int = CERT_DAYS, force: bool = False
) -> ServerFiles:
    """The coordinator's TLS key and certificate for ``addresses``, signed by the CA in ``ca_folder``."""
    if not addresses:
        raise ConfigError("give the coordinator's addresses (`--address`), the names or IPs hospitals will dial")
    ca = CAFiles.at(ca_folder)
    ca_key = load_private_pem(ca.key, "CA key")
    ca_cert = load_cert(ca.cert, "CA certificate")
    names = [_san(a) for a in addresses]
    files = ServerFiles.at(out)
    _refuse_overwrite([files.key, files.cert], force)
    key = ec.generate_private_key(CURVE)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, addresses[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    Path(out).mkdir(parents=True, exist_ok=True)
    _write_private_pem(files.key, key)
    atomic_write_bytes(files.cert, cert.public_bytes(serialization.Encoding.PEM))
    return files


def check_server_cert(files: ServerFiles, ca_cert_path: Path, *, address: str = "") -> x509.Certificate:
    """Refuse, with one line, a TLS key and certificate the hospitals would refuse."""
    cert = load_cert(files.cert, "TLS certificate")
    key = load_private_pem(files.key, "TLS key")
    ca = load_cert(ca_cert_path, "CA certificate")
    if cert.public_key().public_numbers() != key.public_key().public_numbers():  # type: ignore[union-attr]
        raise KeyFileError(
            f"{files.key} does not belong to {files.cert}; issue them together with `fedtune pki server`"
        )
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature) as err:
        raise KeyFileError(f"{files.cert} was not issued by the CA in {ca_cert_path}") from err
    now = _now()
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise KeyFileError(
            f"{files.cert} is valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}, "
            "not now; issue a new one with `fedtune pki server`"
        )
    if address:
        names = cert_addresses(cert)
        if address not in names:
            raise KeyFileError(
                f"{files.cert} does not name {address!r} (it names {', '.join(names)}); hospitals dialling it would "
                "refuse the connection; issue a certificate with `fedtune pki server --address`"
            )
    return cert


def cert_addresses(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(n.value) for n in san]


@dataclass(frozen=True)
class NodeKeyFiles:
    key: Path
    pub: Path

    @staticmethod
    def at(folder: Path, name: str) -> NodeKeyFiles:
        return NodeKeyFiles(Path(folder) / f"{name}.node.key", Path(folder) / f"{name}.node.pub")


def create_node_key(folder: Path, name: str, *, force: bool = False) -> NodeKeyFiles:
    """A hospital's SuperNode authentication key pair, in the OpenSSH format Flower reads."""
    files = NodeKeyFiles.at(folder, name)
    _refuse_overwrite([files.key, files.pub], force)
    key = ec.generate_private_key(CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(files.key, private, mode=0o600)
    atomic_write_bytes(files.pub, public + f" fedtune-node-{name}\n".encode())
    return files


def load_node_public(path: Path) -> ec.EllipticCurvePublicKey:
    """A hospital's SuperNode public key (OpenSSH format), checked the way Flower checks it."""
    path = Path(path)
    try:
        key = serialization.load_ssh_public_key(path.read_bytes())
    except FileNotFoundError as err:
        raise KeyFileError(
            f"{path}: no such node public key; the hospital creates it with `fedtune pki hospital`"
        ) from err
    except (OSError, ValueError, TypeError) as err:
        raise KeyFileError(f"{path}: not an OpenSSH public key ({err})") from err
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyFileError(f"{path}: a SuperNode key must be EC on a NIST curve, got {type(key).__name__}")
    return key


def load_node_private(path: Path) -> ec.EllipticCurvePrivateKey:
    """A hospital's SuperNode private key (OpenSSH format), refused when others can read it."""
    return _load_ec_private(path, "node key", "OpenSSH", "fedtune pki hospital")


def node_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the OpenSSH public key blob, as ``ssh-keygen -lf`` prints it."""
    import base64

    blob = base64.b64decode(
        key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    )
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
