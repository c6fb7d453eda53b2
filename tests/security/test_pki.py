"""The PKI: a CA whose server certificate passes a real TLS handshake for the addresses it
names (and fails for others and for another CA), node keys Flower accepts, and private
files refused when others can read them."""

from __future__ import annotations

import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.errors import ConfigError, KeyFileError
from fedtune.security import pki


@pytest.fixture()
def issued(tmp_path: Path) -> tuple[pki.CAFiles, pki.ServerFiles]:
    ca = pki.create_ca(tmp_path / "ca")
    return ca, pki.issue_server_cert(tmp_path / "ca", tmp_path / "server", ["localhost", "127.0.0.1"])


def _handshake(server: pki.ServerFiles, ca_pem: Path, host: str) -> str:
    """A TLS 1.2+ handshake on loopback; return the negotiated version or raise the client's error."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(server.cert, server.key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client = ssl.create_default_context(cafile=str(ca_pem))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            with client.wrap_socket(raw, server_hostname=host) as tls:
                version = tls.version() or ""
                tls.sendall(b"x")
                return version
    finally:
        thread.join(timeout=10)
        listener.close()


def test_the_server_certificate_passes_tls_for_its_addresses_only(issued, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, server = issued
    assert _handshake(server, ca.cert, "localhost").startswith("TLSv1.")
    assert _handshake(server, ca.cert, "127.0.0.1").startswith("TLSv1.")
    with pytest.raises(ssl.SSLCertVerificationError, match="match|mismatch"):
        _handshake(server, ca.cert, "coordinator.example.org")
    other = pki.create_ca(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer|self.signed"):
        _handshake(server, other.cert, "localhost")


def test_check_server_cert_names_what_is_wrong(issued, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, server = issued
    cert = pki.check_server_cert(server, ca.cert, address="127.0.0.1")
    assert pki.cert_addresses(cert) == ["localhost", "127.0.0.1"]
    with pytest.raises(KeyFileError, match="does not name 'coordinator.example.org'"):
        pki.check_server_cert(server, ca.cert, address="coordinator.example.org")
    other = pki.create_ca(tmp_path / "other")
    with pytest.raises(KeyFileError, match="was not issued by the CA"):
        pki.check_server_cert(server, other.cert)
    second = pki.issue_server_cert(tmp_path / "ca", tmp_path / "second", ["localhost"])
    with pytest.raises(KeyFileError, match="does not belong to"):
        pki.check_server_cert(pki.ServerFiles(second.key, server.cert), ca.cert)
    os.chmod(server.key, 0o644)
    with pytest.raises(KeyFileError, match="readable by others; run `chmod 600"):
        pki.check_server_cert(server, ca.cert)


def test_files_are_private_and_never_overwritten_by_accident(issued, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ca, server = issued
    assert oct(ca.key.stat().st_mode & 0o777) == "0o600" and oct(server.key.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ConfigError, match="already exists; pass --force"):
        pki.create_ca(tmp_path / "ca")
    with pytest.raises(ConfigError, match="address"):
        pki.issue_server_cert(tmp_path / "ca", tmp_path / "x", ["https://coordinator:9092"])


def test_node_keys_are_what_flower_accepts(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
    from flwr.supercore.primitives.asymmetric import uses_nist_ec_curve

    files = pki.create_node_key(tmp_path, "st-elsewhere")
    private = load_ssh_private_key(files.key.read_bytes(), None)  # as flower-supernode loads it
    public = load_ssh_public_key(files.pub.read_bytes())  # as `flwr supernode register` loads it
    assert uses_nist_ec_curve(public)  # type: ignore[arg-type]
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert pki.node_fingerprint(pki.load_node_private(files.key).public_key()) == pki.node_fingerprint(
        pki.load_node_public(files.pub)
    )
    os.chmod(files.key, 0o640)
    with pytest.raises(KeyFileError, match="readable by others"):
        pki.load_node_private(files.key)
    (tmp_path / "rsa.pub").write_text("ssh-rsa AAAA nonsense\n")
    with pytest.raises(KeyFileError, match="not an OpenSSH public key"):
        pki.load_node_public(tmp_path / "rsa.pub")


def test_the_commands_write_and_show_the_whole_set(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["pki", "ca", "--out", str(tmp_path / "ca")]) == 0
    assert main(["pki", "server", "--ca", str(tmp_path / "ca"), "--out", str(tmp_path / "coord"),
                 "--address", "localhost", "--address", "10.1.2.3"]) == 0  # fmt: skip
    assert main(["pki", "hospital", "--name", "st-elsewhere", "--out", str(tmp_path / "h")]) == 0
    out = capsys.readouterr().out
    assert "CA fingerprint (SHA-256)" in out and "for localhost, 10.1.2.3" in out
    assert "  node key     SHA256:" in out and "  envelope key " in out  # both, for the coordinator to read back
    names = sorted(p.name for p in tmp_path.rglob("*") if p.is_file())
    coordinator = ["ca.key", "ca.pem", "server.key", "server.pem", "coordinator.key", "coordinator.pub"]
    hospital = ["st-elsewhere.node.key", "st-elsewhere.node.pub", "st-elsewhere.key", "st-elsewhere.pub"]
    assert names == sorted(coordinator + hospital)
    shown = [
        tmp_path / "coord" / "server.pem",
        tmp_path / "h" / "st-elsewhere.node.pub",
        tmp_path / "h" / "st-elsewhere.pub",
    ]
    assert main(["pki", "show", *map(str, shown)]) == 0
    out = capsys.readouterr().out
    assert (
        "names localhost, 10.1.2.3" in out
        and "SuperNode public key, SHA256:" in out
        and "hospital `st-elsewhere`" in out
    )
    assert main(["pki", "ca", "--out", str(tmp_path / "ca")]) == 2
    assert "already exists" in capsys.readouterr().err
