"""Admitting hospitals: ``fedtune server add-hospital``, ``remove-hospital`` and ``invite``.

A hospital is admitted in both places at once: Flower's node registry (its SuperNode
key) and fedtune's allow-list (its envelope key), both recorded in the home's
``hospitals/registry.json``; ``fedtune server invite`` writes the startup kit a new
hospital begins from (never a private key).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_json
from fedtune.config import parse_address
from fedtune.errors import ConfigError, FedTuneError
from fedtune.security import pki
from fedtune.security.keys import load_public
from fedtune.server.home import CoordinatorHome, flwr_cli


def add_hospital(home: CoordinatorHome, name: str, node_pub: Path, envelope_pub: Path) -> dict[str, Any]:
    """Admit a hospital: register its SuperNode key with Flower and its envelope key in the allow-list."""
    identity = load_public(envelope_pub)
    if identity.role != "hospital" or identity.name != name:
        raise ConfigError(
            f"{envelope_pub} is the envelope key of {identity.role} {identity.name!r}, not of hospital {name!r}"
        )
    node_key = pki.load_node_public(node_pub)
    registry = home.registry()
    if name in registry:
        raise ConfigError(f"hospital {name!r} is already registered; remove it first to replace its keys")
    try:
        result = flwr_cli(home, "supernode", "register", str(Path(node_pub).resolve()), "--name", name)
    except FedTuneError as err:
        if "already in use" not in str(err):
            raise
        owner = next((n for n, e in registry.items() if e.get("node-key") == pki.node_fingerprint(node_key)), "")
        if owner:
            raise ConfigError(f"{node_pub} is already the node key of hospital {owner!r}") from None
        raise ConfigError(
            f"{node_pub}: the SuperLink has seen this node key before (revoked by remove-hospital, or registered "
            f"outside fedtune) and never admits it again; the hospital makes a new one with `fedtune pki hospital "
            f"--name {name} --out keys --rotate-node-key` and sends its {name}.node.pub"
        ) from None
    home.hospitals_dir.mkdir(parents=True, exist_ok=True)
    (home.hospitals_dir / f"{name}.pub").write_bytes(Path(envelope_pub).read_bytes())
    (home.hospitals_dir / f"{name}.node.pub").write_bytes(Path(node_pub).read_bytes())
    entry = {
        "node-id": int(result["node-id"]),
        "node-key": pki.node_fingerprint(node_key),
        "envelope-key": identity.fingerprint,
        "added": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    registry[name] = entry
    atomic_write_json(home.registry_path, registry)
    return entry


def remove_hospital(home: CoordinatorHome, name: str) -> None:
    """Unregister a hospital's SuperNode and drop its envelope key from the allow-list."""
    registry = home.registry()
    if name not in registry:
        known = ", ".join(sorted(registry)) or "none"
        raise ConfigError(f"hospital {name!r} is not registered (registered: {known})")
    flwr_cli(home, "supernode", "unregister", str(registry[name]["node-id"]))
    for suffix in (".pub", ".node.pub"):
        with contextlib.suppress(FileNotFoundError):
            (home.hospitals_dir / f"{name}{suffix}").unlink()
    del registry[name]
    atomic_write_json(home.registry_path, registry)


KIT_INSTRUCTIONS = """\
fedtune startup kit for hospital `{name}`, coordinator {address}

This folder holds what the coordinator gives you, and nothing secret:
  keys/ca.pem           the federation's CA certificate: it verifies the coordinator
  keys/coordinator.pub  the coordinator's public envelope key: only runs it signed are served
  hospital.toml         this hospital's daemon configuration, filled in for you

Compare these fingerprints with the coordinator by phone or in person before step 2:
  keys/ca.pem           SHA-256 {ca_fingerprint}
  keys/coordinator.pub  {coordinator_fingerprint}

1. Make this hospital's keys, in this folder (the private keys never leave this machine):
     fedtune pki hospital --name {name} --out keys
2. Send keys/{name}.node.pub and keys/{name}.pub to the coordinator. It admits them with
   `fedtune server add-hospital` and reads both fingerprints back to you: compare them with
   the ones step 1 printed.
3. Edit hospital.toml: [data] (your training and held-out record files), [model] (the
   model folder, device, precision) and [privacy] (require_dp, min_noise_multiplier,
   budget_epsilon). The rest is filled in.
4. Check the file and everything it names:
     fedtune client check --config hospital.toml
5. Start the daemon (as a service: deploy/systemd/fedtune-client.service):
     fedtune client start --config hospital.toml
"""


def _kit_address(home: CoordinatorHome, address: str | None) -> str:
    """The HOST:PORT the kit dials: given, or the running coordinator's; checked against the PKI."""
    if address is None:
        info = home.server()
        if info is None:
            raise ConfigError(
                f"`--address` is needed: no SuperLink of {home.root} is running to take it from; give the "
                "HOST:PORT hospitals dial, e.g. `--address coord.example.org:9092`"
            )
        address = f"{info['address']}:{info['port']}"
    host, _ = parse_address(address, "--address")
    for needed in (home.ca_cert, home.pki_dir / "coordinator.pub"):
        if not needed.is_file():
            raise ConfigError(
                f"{needed} is missing; create the PKI first: `fedtune pki ca --out {home.pki_dir}` and "
                f"`fedtune pki server --ca {home.pki_dir} --out {home.pki_dir} --address {host}`"
            )
    if home.tls.cert.is_file():  # a kit for an address the certificate does not name would fail TLS
        try:
            pki.check_server_cert(home.tls, home.ca_cert, address=host)
        except FedTuneError as err:
            raise ConfigError(f"`--address` {address!r}: {err}") from None
    return address


def invite(
    home: CoordinatorHome,
    name: str,
    out: Path,
    *,
    hospital_toml: Callable[[str, str], str],
    address: str | None = None,
) -> list[Path]:
    """``fedtune server invite``: a hospital's startup kit in ``out`` (never a private key).

    ``hospital_toml(name, address)`` writes the hospital's config: the client's format
    (:func:`fedtune.client.hospital_example.kit_toml`), handed in by the CLI, since the coordinator's
    role does not import the hospital's.
    """
    from fedtune.security.keys import check_name, load_identity

    try:
        check_name(name)
    except ConfigError as err:
        raise ConfigError(f"`--name`: {err}") from None
    address = _kit_address(home, address)
    coordinator_pub = home.pki_dir / "coordinator.pub"
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"`--out` {out} already exists and is not empty; give a new folder for the kit")
    identity = load_identity(coordinator_pub)
    if identity.role != "coordinator":
        raise ConfigError(f"{coordinator_pub} is the key of {identity.role} {identity.name!r}, not the coordinator's")
    ca_cert = pki.load_cert(home.ca_cert, "CA certificate")
    (out / "keys").mkdir(parents=True, exist_ok=True)
    written = [out / "keys" / "ca.pem", out / "keys" / "coordinator.pub", out / "hospital.toml"]
    written[0].write_bytes(home.ca_cert.read_bytes())
    written[1].write_bytes(coordinator_pub.read_bytes())
    written[2].write_text(hospital_toml(name, address))
    instructions = KIT_INSTRUCTIONS.format(
        name=name,
        address=address,
        ca_fingerprint=pki.fingerprint(ca_cert),
        coordinator_fingerprint=identity.fingerprint,
    )
    written.append(out / "INSTRUCTIONS.txt")
    written[-1].write_text(instructions)
    return written
