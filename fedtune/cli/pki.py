"""Keys and certificates: ``fedtune keys create/show`` and ``fedtune pki ca/server/hospital/show``.

Each handler imports ``fedtune.security`` (and through it ``cryptography``) only when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedtune.errors import ConfigError


def _keys_create(args: argparse.Namespace) -> int:
    from fedtune.security.keys import KeyPair, save_keys

    pair = KeyPair.generate(args.name, args.role)
    private, public = save_keys(pair, Path(args.out), overwrite=args.force)
    print(f"wrote {private} (private: keep it on this machine, mode 0600)")
    print(f"wrote {public} (public: give it to the {'hospitals' if args.role == 'coordinator' else 'coordinator'})")
    print(f"fingerprint of {pair.name}: {pair.public.fingerprint}")
    print("compare the fingerprint out of band (phone, paper) with the one the other side sees")
    return 0


def _keys_show(args: argparse.Namespace) -> int:
    from fedtune.security.keys import load_identity

    for name in args.files:
        path = Path(name)
        ident = load_identity(path)
        print(f"{path}: {ident.role} `{ident.name}`")
        print(f"  fingerprint {ident.fingerprint}")
    return 0


def _ca(args: argparse.Namespace) -> int:
    from fedtune.security import pki

    ca = pki.create_ca(Path(args.out), name=args.name, days=args.days, force=args.force)
    cert = pki.load_cert(ca.cert, "CA certificate")
    print(f"wrote {ca.key} (the CA's private key, mode 0600: keep it offline, it signs the coordinator's certificate)")
    print(f"wrote {ca.cert} (give it to every hospital: it verifies the coordinator)")
    print(f"CA fingerprint (SHA-256): {pki.fingerprint(cert)}")
    return 0


def _server(args: argparse.Namespace) -> int:
    from fedtune.security import pki
    from fedtune.security.keys import KeyPair, save_keys

    out = Path(args.out)
    tls = pki.issue_server_cert(Path(args.ca), out, args.address, days=args.days, force=args.force)
    cert = pki.check_server_cert(tls, pki.CAFiles.at(Path(args.ca)).cert)
    print(f"wrote {tls.key} (TLS key, mode 0600) and {tls.cert} for {', '.join(pki.cert_addresses(cert))}")
    private, public = save_keys(KeyPair.generate("coordinator", "coordinator"), out, overwrite=args.force)
    print(f"wrote {private} (envelope key, mode 0600) and {public} (give it to every hospital)")
    print(f"certificate fingerprint (SHA-256): {pki.fingerprint(cert)}")
    return 0


def _hospital(args: argparse.Namespace) -> int:
    from fedtune.security import pki
    from fedtune.security.keys import KeyPair, load_identity, save_keys

    out = Path(args.out)
    if args.rotate_node_key:  # a new SuperNode key; the envelope key stays
        if not (out / f"{args.name}.key").is_file():
            missing = out / f"{args.name}.key"
            raise ConfigError(f"{missing} is missing: create the keys first, without --rotate-node-key")
        node = pki.create_node_key(out, args.name, force=True)
        print(f"wrote a new {node.key} (SuperNode key, mode 0600) and {node.pub}; the old node key is void")
        print(f"send {node.pub} to the coordinator, who admits it with `fedtune server add-hospital`")
        public = out / f"{args.name}.pub"
    else:
        node = pki.create_node_key(out, args.name, force=args.force)
        private, public = save_keys(KeyPair.generate(args.name, "hospital"), out, overwrite=args.force)
        print(f"wrote {node.key} (SuperNode key, mode 0600) and {node.pub}")
        print(f"wrote {private} (envelope key, mode 0600) and {public}")
        print(f"send {node.pub} and {public} to the coordinator; the private keys never leave this machine")
    print("the coordinator will read these fingerprints back to you; compare them:")
    print(f"  node key     {pki.node_fingerprint(pki.load_node_public(node.pub))}")
    print(f"  envelope key {load_identity(public).fingerprint}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from fedtune.security import pki
    from fedtune.security.keys import load_identity

    for name in args.files:
        path = Path(name)
        if path.name.endswith(".node.pub"):
            print(f"{path}: SuperNode public key, {pki.node_fingerprint(pki.load_node_public(path))}")
        elif path.name.endswith(".node.key"):
            key = pki.load_node_private(path).public_key()
            print(f"{path}: SuperNode private key, {pki.node_fingerprint(key)}")
        elif path.suffix == ".pem":
            cert = pki.load_cert(path, "certificate")
            print(f"{path}: certificate for {cert.subject.rfc4514_string()}, issued by {cert.issuer.rfc4514_string()}")
            print(f"  names {', '.join(pki.cert_addresses(cert)) or '(none)'}")
            print(f"  valid {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d}")
            print(f"  fingerprint (SHA-256) {pki.fingerprint(cert)}")
        else:
            ident = load_identity(path)
            print(f"{path}: envelope key of {ident.role} `{ident.name}`, fingerprint {ident.fingerprint}")
    return 0


def _register_keys(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="key pairs that seal updates: create them, show their fingerprints")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="a new key pair: NAME.key (private, 0600) and NAME.pub")
    create.add_argument("--role", choices=["hospital", "coordinator"], required=True)
    create.add_argument("--name", required=True, help="the hospital's site name, or 'coordinator'")
    create.add_argument("--out", default="keys", help="folder to write to (default: keys)")
    create.add_argument("--force", action="store_true", help="replace existing keys of that name")
    create.set_defaults(func=_keys_create)
    show = keys_sub.add_parser("show", help="name, role and fingerprint of key files (.key or .pub)")
    show.add_argument("files", nargs="+")
    show.set_defaults(func=_keys_show)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``keys`` (create, show) and ``pki`` (ca, server, hospital, show)."""
    _register_keys(sub)
    pki_cmd = sub.add_parser("pki", help="the federation's CA, the coordinator's TLS certificate, hospitals' node keys")
    pki_sub = pki_cmd.add_subparsers(dest="pki_command", required=True)
    ca = pki_sub.add_parser("ca", help="a new certificate authority: ca.key (0600) and ca.pem")
    ca.add_argument("--out", required=True, help="folder to write into")
    ca.add_argument("--name", default="fedtune federation CA", help="the CA's common name")
    ca.add_argument("--days", type=int, default=3650, help="validity in days")
    server = pki_sub.add_parser("server", help="the coordinator's TLS certificate (signed by the CA) and envelope keys")
    server.add_argument("--ca", required=True, help="the folder with ca.key and ca.pem")
    server.add_argument("--out", required=True, help="folder to write into")
    server.add_argument(
        "--address", action="append", required=True, help="a DNS name or IP hospitals dial (repeat for each)"
    )
    server.add_argument("--days", type=int, default=825, help="validity in days")
    hospital = pki_sub.add_parser("hospital", help="a hospital's SuperNode key and envelope keys (run at the hospital)")
    hospital.add_argument("--name", required=True, help="the hospital's name in the federation")
    hospital.add_argument("--out", required=True, help="folder to write into")
    hospital.add_argument(
        "--rotate-node-key",
        action="store_true",
        help="replace only the SuperNode key (a revoked one is never admitted again); the envelope key stays",
    )
    for p, func in ((ca, _ca), (server, _server), (hospital, _hospital)):
        p.add_argument("--force", action="store_true", help="replace existing files")
        p.set_defaults(func=func)
    pki_show = pki_sub.add_parser("show", help="what a certificate or key file is, and its fingerprint")
    pki_show.add_argument("files", nargs="+")
    pki_show.set_defaults(func=_show)
