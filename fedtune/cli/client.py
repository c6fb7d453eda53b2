"""The hospital's side: ``fedtune client ...`` (daemon, config, privacy ledger, audit trail, backup,
release gate).

Each handler imports what it needs only when it runs: ``client example-config`` and
``client check`` never load torch, Flower's app runtime or a model library.
"""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_HELP = "the hospital's hospital.toml"
LOG_HELP = "an audit log (*.jsonl), or a folder of them (a simulation's <run>/audit)"


def _start(args: argparse.Namespace) -> int:
    from fedtune.client.daemon import run_daemon

    return run_daemon(Path(args.config), insecure=args.insecure, max_retries=args.max_retries)


def _privacy(args: argparse.Namespace) -> int:
    from fedtune.client.commands import privacy_report

    print(privacy_report(Path(args.ledger), history=args.history, as_json=args.json), end="")
    return 0


def _privacy_audit(args: argparse.Namespace) -> int:
    import json

    from fedtune.client.privacy_audit import format_report, privacy_audit

    report, path = privacy_audit(
        Path(args.config),
        Path(args.adapter),
        members=args.members,
        run_seed=args.run_seed,
        seed=args.seed,
        max_length=args.max_length,
    )
    print(json.dumps({**report, "report": str(path)}, indent=2) if args.json else format_report(report, path), end="")
    return 0


def _register_privacy_audit(client_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = client_sub.add_parser(
        "privacy-audit",
        help="membership inference on the hospital's own records: does this adapter tell training records from "
        "held-out ones? (runs locally, sends nothing)",
    )
    audit.add_argument("--config", required=True, help=CONFIG_HELP)
    audit.add_argument(
        "--adapter", required=True, metavar="DIR", help="a PEFT adapter folder (as the coordinator exports)"
    )
    audit.add_argument(
        "--members",
        type=int,
        default=0,
        metavar="N",
        help="training records scored, a seeded random subset (default 0: as many as the held-out records)",
    )
    audit.add_argument(
        "--run-seed",
        type=int,
        default=0,
        metavar="N",
        help="the run's `run.seed`, for the data.eval_fraction split the daemon made (unused with data.eval files)",
    )
    audit.add_argument("--seed", type=int, default=0, help="seed of the member subset and the bootstrap")
    audit.add_argument("--max-length", type=int, default=256, metavar="N", help="the run's `train.max_length`")
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.set_defaults(func=_privacy_audit, models=True)


def _example_config(args: argparse.Namespace) -> int:
    from fedtune.client.hospital_example import EXAMPLE

    print(EXAMPLE, end="")
    return 0


def _check(args: argparse.Namespace) -> int:
    from fedtune.client.hospital import load_hospital_config
    from fedtune.client.ledger_rollback import check_ledger_current

    cfg = load_hospital_config(args.config)
    releases = check_ledger_current(cfg.ledger_path, cfg.audit_path)
    print(
        f"{cfg.source}: OK, hospital `{cfg.name}` -> {cfg.coordinator.address}; "
        f"privacy ledger current ({releases} releases)",
        flush=True,
    )
    if args.dial:
        from fedtune.client.daemon import hospital_identity
        from fedtune.client.dial import dial

        done = dial(cfg, hospital_identity(cfg, insecure=False))
        print(
            f"dial {done.address}: OK: reached; TLS verified with `coordinator.ca` ({cfg.coordinator.ca}) for "
            f"{done.names}; node key {done.fingerprint} admitted by the coordinator"
        )
    return 0


def _backup(args: argparse.Namespace) -> int:
    from fedtune.client.backup import backup
    from fedtune.client.hospital import load_hospital_config

    print(backup(load_hospital_config(args.config, check_files=False), Path(args.out)))
    return 0


def _release(args: argparse.Namespace) -> int:
    from fedtune.client.hospital import load_hospital_config
    from fedtune.client.release_store import release_report

    cfg = load_hospital_config(args.config, check_files=False)
    print(release_report(cfg.release_dir, history=args.history, as_json=args.json), end="")
    return 0


def _audit_verify(args: argparse.Namespace) -> int:
    from fedtune.client.commands import audit_verify

    ok, text = audit_verify(Path(args.log), witness=Path(args.witness) if args.witness else None)
    print(text, end="")
    return 0 if ok else 1


def _audit_recover(args: argparse.Namespace) -> int:
    from fedtune.client.commands import audit_recover

    print(audit_recover(Path(args.log)), end="")
    return 0


def _audit_show(args: argparse.Namespace) -> int:
    from fedtune.client.commands import audit_show

    print(audit_show(Path(args.log), last=args.last, as_json=args.json), end="")
    return 0


def _register_audit(client_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    audit = client_sub.add_parser("audit", help="the audit trail of every message that left the hospital")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="check the hash chain; name the first altered, deleted or moved record"
    )
    verify.add_argument("log", help=LOG_HELP)
    verify.add_argument(
        "--witness",
        metavar="FILE",
        help="also check the trail against the coordinator's record of it (`fedtune server witness --out FILE`)",
    )
    verify.set_defaults(func=_audit_verify)
    recover = audit_sub.add_parser(
        "recover", help="settle an append a crash interrupted (only the one the head file declared)"
    )
    recover.add_argument("log", help=LOG_HELP)
    recover.set_defaults(func=_audit_recover)
    shown = audit_sub.add_parser("show", help="the records as a table: what left, when, its hash and size, epsilon")
    shown.add_argument("log", help=LOG_HELP)
    shown.add_argument("--last", type=int, default=0, metavar="N", help="only the last N records")
    shown.add_argument("--json", action="store_true", help="print the records as JSON")
    shown.set_defaults(func=_audit_show)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``client`` (start, privacy, privacy-audit, example-config, check, backup, release, audit verify/recover/show)."""
    client = sub.add_parser("client", help="the hospital's side: daemon, config, privacy ledger and audit trail")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    daemon = client_sub.add_parser("start", help="run the hospital's daemon (a SuperNode with TLS and its node key)")
    daemon.add_argument("--config", required=True, help=CONFIG_HELP)
    daemon.add_argument(
        "--insecure", action="store_true", help="NO TLS and NO node authentication (closed test networks only)"
    )
    daemon.add_argument(
        "--max-retries", type=int, default=0, metavar="N", help="give up after N failed connection attempts (0: never)"
    )
    daemon.set_defaults(func=_start, models=True)
    privacy = client_sub.add_parser(
        "privacy", help="what the hospital's privacy ledger says: per dataset, epsilon spent and left"
    )
    privacy.add_argument("ledger", help="a privacy ledger file, or a folder of them (a simulation's <run>/privacy)")
    privacy.add_argument("--history", action="store_true", help="also list every release")
    privacy.add_argument("--json", action="store_true", help="print the report as JSON")
    privacy.set_defaults(func=_privacy)
    example = client_sub.add_parser("example-config", help="print a commented hospital.toml to start from")
    example.set_defaults(func=_example_config)
    check = client_sub.add_parser(
        "check", help="validate hospital.toml and every file it names, the privacy ledger current, then exit"
    )
    check.add_argument("--config", required=True, help=CONFIG_HELP)
    check.add_argument(
        "--dial",
        action="store_true",
        help="also reach the coordinator: TCP, the TLS handshake with `coordinator.ca`, one call signed with the "
        "node key; name the part that fails",
    )
    check.set_defaults(func=_check)
    saved = client_sub.add_parser(
        "backup", help="one consistent archive (0600) of the keys, hospital.toml, privacy ledger and audit trail"
    )
    saved.add_argument("--config", required=True, help=CONFIG_HELP)
    saved.add_argument("--out", required=True, metavar="FILE", help="the archive to write (tar.gz; never overwritten)")
    saved.set_defaults(func=_backup)
    release = client_sub.add_parser(
        "release", help="the release gate: the adapter this hospital adopted, and why it took or refused each one"
    )
    release.add_argument("--config", required=True, help=CONFIG_HELP)
    release.add_argument("--history", action="store_true", help="list every decision, not only the last")
    release.add_argument("--json", action="store_true", help="print the state as JSON")
    release.set_defaults(func=_release)
    _register_audit(client_sub)
    _register_privacy_audit(client_sub)
