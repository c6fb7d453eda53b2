"""The ``fedtune`` command. Every deliberate error is one line on stderr and exit code 2;
a run that stopped early with some rounds trained (its last round exported) exits 3."""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedtune import __version__
from fedtune.errors import ConfigError, FedTuneError


def _value(text: str) -> Any:
    """A --set value as TOML would read it (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    flags = {
        "hospitals": "data.hospitals",
        "rounds": "federation.rounds",
        "local_steps": "train.local_steps",
        "partition": "data.partition",
        "dirichlet_alpha": "data.dirichlet_alpha",
        "model": "model.source",
        "lora_rank": "lora.rank",
        "lora_alpha": "lora.alpha",
        "batch_size": "train.batch_size",
        "lr": "train.lr",
        "seed": "run.seed",
        "name": "run.name",
    }
    out = {key: getattr(args, flag) for flag, key in flags.items() if getattr(args, flag) is not None}
    if args.no_baselines:
        out["run.baselines"] = False
    for flag, key in (("target_epsilon", "dp.target_epsilon"), ("noise_multiplier", "dp.noise_multiplier")):
        if getattr(args, flag, None) is not None:
            out["dp.enabled"] = True
            out[key] = getattr(args, flag)
    for item in args.set or []:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like section.field=value")
        out[key.strip()] = _value(raw.strip())
    return out


def _simulate(args: argparse.Namespace) -> int:
    from fedtune.config import load_config
    from fedtune.experiments.simulate import ended_early, prepare_run, resume_folder, run_simulation
    from fedtune.experiments.sweep import is_sweep, parse_epsilons, prepare_sweep, run_sweep

    if args.resume:
        if args.config or _overrides(args) or args.epsilons:
            raise ConfigError("--resume continues a run with its own config.toml; drop CONFIG and the other flags")
        if is_sweep(Path(args.resume)):
            table = run_sweep(Path(args.resume).resolve(), say=lambda line: print(line, flush=True))
            print("\n" + table, flush=True)
            return 0
        folder = resume_folder(Path(args.resume))
    elif args.epsilons:
        if args.target_epsilon is not None or args.noise_multiplier is not None:
            raise ConfigError("--epsilons sets each sweep run's DP noise; drop --target-epsilon and --noise-multiplier")
        cfg = load_config(Path(args.config) if args.config else None, _overrides(args))
        root = prepare_sweep(cfg, parse_epsilons(args.epsilons), root=Path(args.out) if args.out else None)
        table = run_sweep(root, say=lambda line: print(line, flush=True))
        print("\n" + table, flush=True)
        return 0
    else:
        # No CONFIG: the embedded defaults (simulations/default.toml spells them out).
        cfg = load_config(Path(args.config) if args.config else None, _overrides(args))
        folder = prepare_run(cfg, run_dir=Path(args.out) if args.out else None)
    table = run_simulation(folder, say=lambda line: print(line, flush=True))
    print("\n" + table, flush=True)
    early = ended_early(folder, folder.load_config())
    if early is not None:
        raise early
    return 0


def _compare(args: argparse.Namespace) -> int:
    from fedtune.experiments.compare import prepare_compare, run_compare

    if args.resume:
        if args.plan or args.out:
            raise ConfigError("--resume continues a comparison with its own compare.json; drop PLAN and --out")
        root = Path(args.resume).resolve()
    elif args.plan:
        root = prepare_compare(Path(args.plan), root=Path(args.out) if args.out else None)
    else:
        raise ConfigError("give a plan (`fedtune compare PLAN`) or a comparison to continue (`--resume DIR`)")
    table = run_compare(root, say=lambda line: print(line, flush=True))
    print("\n" + table, flush=True)
    return 0


def _data(args: argparse.Namespace) -> int:
    from fedtune.data import clinical
    from fedtune.data.records import write_records

    out = Path(args.out)
    sites = clinical.generate(args.hospitals, n_train=args.train, n_eval=args.eval, seed=args.seed)
    for site, (train, held_out) in sites.items():
        write_records(out / f"{site}.train.jsonl", train)
        write_records(out / f"{site}.eval.jsonl", held_out)
        print(f"{site}: {len(train)} train + {len(held_out)} held-out records -> {out / site}.*.jsonl")
    return 0


def _client_privacy(args: argparse.Namespace) -> int:
    from fedtune.client.commands import privacy_report

    print(privacy_report(Path(args.ledger), history=args.history, as_json=args.json), end="")
    return 0


def _server(args: argparse.Namespace) -> int:
    from fedtune.server import coordinator

    if args.server_command == "witness":
        return _server_witness(args)
    home = coordinator.CoordinatorHome(Path(args.home))
    if args.server_command == "invite":
        written = coordinator.invite(home, args.name, Path(args.out), address=args.address)
        print(f"wrote the startup kit of hospital `{args.name}` to {args.out}:")
        for path in written:
            print(f"  {path}")
        print("it holds no secret: send the folder to the hospital's IT; INSTRUCTIONS.txt says what to do")
        return 0
    if args.server_command == "start":
        return coordinator.serve(home, address=args.address, host=args.host, port=args.port, insecure=args.insecure)
    if args.server_command == "add-hospital":
        entry = coordinator.add_hospital(home, args.name, Path(args.node_key), Path(args.envelope_key))
        print(f"hospital `{args.name}` registered as SuperNode {entry['node-id']}")
        print(f"  node key {entry['node-key']}; envelope key {entry['envelope-key']}")
        print("  compare both fingerprints with the hospital's IT before its first round")
        return 0
    coordinator.remove_hospital(home, args.name)
    print(f"hospital `{args.name}` removed: its SuperNode can no longer connect and its updates are refused")
    return 0


def _server_witness(args: argparse.Namespace) -> int:
    import json

    from fedtune.server import coordinator

    if args.run_dir and (args.home or args.run):
        raise ConfigError("`--run-dir` names one run folder; give it without `--home` or `--run`")
    home = coordinator.CoordinatorHome(Path(args.home or "coordinator"))
    witness, skipped = coordinator.gather_witness(
        args.hospital, home=home, run=args.run, run_dir=Path(args.run_dir) if args.run_dir else None
    )
    if skipped:
        print(f"fedtune: warning: {skipped} torn or unreadable witness line(s) skipped", file=sys.stderr)
    if not args.out:
        print(json.dumps(witness.to_json(), indent=1))
        return 0
    witness.write(Path(args.out))
    last = witness.entries[-1]
    print(
        f"wrote {args.out}: {len(witness.entries)} sealed replies from `{witness.hospital}` over "
        f"{len(witness.runs)} run(s), the last built on its audit record {last.audit_seq} "
        f"(run {last.run}, round {last.round}, {last.kind})"
    )
    print(f"the hospital checks its trail with `fedtune client audit verify LOG --witness {Path(args.out).name}`")
    return 0


def _run(args: argparse.Namespace) -> int:
    from fedtune.config import load_config
    from fedtune.runfolder import RunFolder
    from fedtune.server import coordinator

    home = coordinator.CoordinatorHome(Path(args.home))
    if args.resume:
        folder = RunFolder(Path(args.resume).resolve())
        folder.load_config()  # a clear error when it is not a run folder
    elif args.config:
        folder = coordinator.prepare_deployment_run(home, load_config(args.config))
    else:
        raise ConfigError("give a run config (`fedtune run CONFIG`) or a run to continue (`--resume RUN`)")
    try:
        print(coordinator.launch(home, folder, say=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print(
            f"fedtune: interrupted; the run is stopped at the coordinator and its completed rounds are kept; "
            f"continue with `fedtune run --resume {folder.root} --home {home.root}`",
            file=sys.stderr,
        )
        return 130
    return 0


def _status(args: argparse.Namespace) -> int:
    from fedtune.server import coordinator

    home = coordinator.CoordinatorHome(Path(args.home))
    if args.watch is not None:
        if args.watch <= 0:
            raise ConfigError(f"`--watch` must be a positive number of seconds, got {args.watch:g}")
        return coordinator.watch_status(
            home,
            every=args.watch,
            as_json=args.json,
            out=lambda text: print(text, end="", flush=True),
            clear=sys.stdout.isatty() and not args.json,
        )
    print(coordinator.main_status(home, as_json=args.json), end="")
    return 0


def _client_start(args: argparse.Namespace) -> int:
    from fedtune.client.daemon import run_daemon

    return run_daemon(Path(args.config), insecure=args.insecure, max_retries=args.max_retries)


def _client_example_config(args: argparse.Namespace) -> int:
    from fedtune.client.hospital import EXAMPLE

    print(EXAMPLE, end="")
    return 0


def _client_check(args: argparse.Namespace) -> int:
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


def _client_backup(args: argparse.Namespace) -> int:
    from fedtune.client.backup import backup
    from fedtune.client.hospital import load_hospital_config

    print(backup(load_hospital_config(args.config, check_files=False), Path(args.out)))
    return 0


def _client_audit(args: argparse.Namespace) -> int:
    from fedtune.client.commands import audit_recover, audit_show, audit_verify

    if args.audit_command == "show":
        print(audit_show(Path(args.log), last=args.last, as_json=args.json), end="")
        return 0
    if args.audit_command == "recover":
        print(audit_recover(Path(args.log)), end="")
        return 0
    ok, text = audit_verify(Path(args.log), witness=Path(args.witness) if args.witness else None)
    print(text, end="")
    return 0 if ok else 1


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


def _pki(args: argparse.Namespace) -> int:
    from fedtune.security import pki
    from fedtune.security.keys import KeyPair, load_identity, save_keys

    out = Path(args.out) if getattr(args, "out", None) else None
    if args.pki_command == "ca":
        assert out is not None
        ca = pki.create_ca(out, name=args.name, days=args.days, force=args.force)
        cert = pki.load_cert(ca.cert, "CA certificate")
        print(
            f"wrote {ca.key} (the CA's private key, mode 0600: keep it offline, it signs the coordinator's certificate)"
        )
        print(f"wrote {ca.cert} (give it to every hospital: it verifies the coordinator)")
        print(f"CA fingerprint (SHA-256): {pki.fingerprint(cert)}")
    elif args.pki_command == "server":
        assert out is not None
        tls = pki.issue_server_cert(Path(args.ca), out, args.address, days=args.days, force=args.force)
        cert = pki.check_server_cert(tls, pki.CAFiles.at(Path(args.ca)).cert)
        print(f"wrote {tls.key} (TLS key, mode 0600) and {tls.cert} for {', '.join(pki.cert_addresses(cert))}")
        private, public = save_keys(KeyPair.generate("coordinator", "coordinator"), out, overwrite=args.force)
        print(f"wrote {private} (envelope key, mode 0600) and {public} (give it to every hospital)")
        print(f"certificate fingerprint (SHA-256): {pki.fingerprint(cert)}")
    elif args.pki_command == "hospital":
        assert out is not None
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
    else:
        _pki_show(args.files)
    return 0


def _pki_show(files: list[str]) -> None:
    from fedtune.security import pki
    from fedtune.security.keys import load_identity

    for name in files:
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated LoRA fine-tuning for hospitals.")
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="run a local multi-hospital federation with baselines, table and plots")
    sim.add_argument(
        "config", nargs="?", help="experiment TOML (default: the embedded defaults = simulations/default.toml)"
    )
    sim.add_argument("--hospitals", type=int, help="number of simulated hospitals")
    sim.add_argument("--rounds", type=int, help="federated rounds")
    sim.add_argument("--local-steps", type=int, help="optimizer steps per site per round")
    sim.add_argument("--partition", choices=["natural", "iid", "dirichlet"], help="how records are split")
    sim.add_argument("--dirichlet-alpha", type=float, help="label skew of the dirichlet partition")
    sim.add_argument("--model", help="'smollm2', 'tiny', a local HF model folder or a .gguf file")
    sim.add_argument("--lora-rank", type=int)
    sim.add_argument("--lora-alpha", type=int)
    sim.add_argument("--batch-size", type=int)
    sim.add_argument("--lr", type=float)
    sim.add_argument("--seed", type=int)
    sim.add_argument("--name", help="run name (prefix of the run folder)")
    sim.add_argument("--out", help="run folder to create (default: <run.output_dir>/<name>-<time>)")
    sim.add_argument("--no-baselines", action="store_true", help="skip base / local-only / centralized")
    sim.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE", help="any other config field")
    sim.add_argument(
        "--epsilons",
        metavar="E1,E2,...",
        help="privacy-utility sweep: the federation without DP and with DP-SGD at each target epsilon",
    )
    sim.add_argument("--target-epsilon", type=float, help="DP-SGD with noise so the run spends at most this epsilon")
    sim.add_argument("--noise-multiplier", type=float, help="DP-SGD with this fixed noise multiplier")
    sim.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run (or sweep) from its last round")
    sim.set_defaults(func=_simulate)

    cmp = sub.add_parser("compare", help="LoRA merge strategies and server optimizers side by side, one table and plot")
    cmp.add_argument("plan", nargs="?", help="plan TOML: `strategies` and `configs` (e.g. simulations/strategies.toml)")
    cmp.add_argument("--out", help="comparison folder to create (default: <run.output_dir>/compare-<time>)")
    cmp.add_argument("--resume", metavar="DIR", help="finish an interrupted comparison and redo its table")
    cmp.set_defaults(func=_compare)

    data = sub.add_parser("data", help="write the embedded clinical dataset to disk (JSONL) to see the format")
    data.add_argument("--out", default="fedtune-data", help="folder to write (default: fedtune-data)")
    data.add_argument("--hospitals", type=int, default=3)
    data.add_argument("--train", type=int, default=160, help="training records per hospital")
    data.add_argument("--eval", type=int, default=16, help="held-out records per hospital")
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=_data)

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
    for p in (ca, server, hospital):
        p.add_argument("--force", action="store_true", help="replace existing files")
        p.set_defaults(func=_pki)
    pki_show = pki_sub.add_parser("show", help="what a certificate or key file is, and its fingerprint")
    pki_show.add_argument("files", nargs="+")
    pki_show.set_defaults(func=_pki)

    server_cmd = sub.add_parser("server", help="the coordinator's SuperLink and the hospitals it admits")
    server_sub = server_cmd.add_subparsers(dest="server_command", required=True)
    start = server_sub.add_parser("start", help="run the SuperLink (TLS, SuperNode authentication, persistent state)")
    start.add_argument("--address", required=True, help="the name or IP hospitals dial (must be in the certificate)")
    start.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: all)")
    start.add_argument("--port", type=int, default=9092, help="port for hospitals and the `flwr` CLI")
    start.add_argument(
        "--insecure", action="store_true", help="NO TLS and NO node authentication (closed test networks only)"
    )
    add = server_sub.add_parser("add-hospital", help="admit a hospital: its SuperNode key and envelope key")
    add.add_argument("--name", required=True)
    add.add_argument("--node-key", required=True, help="the hospital's NAME.node.pub")
    add.add_argument("--envelope-key", required=True, help="the hospital's NAME.pub")
    remove = server_sub.add_parser("remove-hospital", help="unregister a hospital and drop it from the allow-list")
    remove.add_argument("--name", required=True)
    invite = server_sub.add_parser(
        "invite", help="a new hospital's startup kit: ca.pem, coordinator.pub, a filled-in hospital.toml, instructions"
    )
    invite.add_argument("--name", required=True, help="the hospital's name in the federation")
    invite.add_argument("--out", required=True, help="the kit's folder (new or empty)")
    invite.add_argument(
        "--address", help="HOST:PORT hospitals dial (default: the running coordinator's, from server.json)"
    )
    for p in (start, add, remove, invite):
        p.add_argument("--home", default="coordinator", help="the coordinator's folder (default: ./coordinator)")
        p.set_defaults(func=_server)
    witness = server_sub.add_parser(
        "witness", help="what the coordinator received from a hospital: its audit heads, for `client audit verify`"
    )
    witness.add_argument("--hospital", required=True, help="the hospital's (or simulated site's) name")
    witness.add_argument("--home", help="the coordinator's folder (default: ./coordinator); every run of it")
    witness.add_argument("--run", help="only this run of the home (a folder name under runs/)")
    witness.add_argument("--run-dir", help="one run folder instead of a home (a simulation's)")
    witness.add_argument("--out", help="write the witness file here (JSON; default: print it)")
    witness.set_defaults(func=_server)
    run = sub.add_parser("run", help="launch a federation run on the coordinator's SuperLink, or resume one")
    run.add_argument("config", nargs="?", help="the run config (TOML: rounds, strategy, dp, security, timeouts)")
    run.add_argument("--resume", metavar="RUN", help="continue this run folder from its last completed round")
    run.add_argument("--home", default="coordinator", help="the coordinator's folder (default: ./coordinator)")
    run.set_defaults(func=_run)
    status = sub.add_parser(
        "status", help="the coordinator's SuperLink, hospitals and runs; a live run's round and each hospital in it"
    )
    status.add_argument("--home", default="coordinator", help="the coordinator's folder (default: ./coordinator)")
    status.add_argument("--watch", type=float, metavar="SECONDS", help="show it again every SECONDS until Ctrl-C")
    status.add_argument("--json", action="store_true", help="print it as JSON (one object per refresh)")
    status.set_defaults(func=_status)

    client = sub.add_parser("client", help="the hospital's side: daemon, config, privacy ledger and audit trail")
    client_sub = client.add_subparsers(dest="client_command", required=True)
    daemon = client_sub.add_parser("start", help="run the hospital's daemon (a SuperNode with TLS and its node key)")
    daemon.add_argument("--config", required=True, help="the hospital's hospital.toml")
    daemon.add_argument(
        "--insecure", action="store_true", help="NO TLS and NO node authentication (closed test networks only)"
    )
    daemon.add_argument(
        "--max-retries", type=int, default=0, metavar="N", help="give up after N failed connection attempts (0: never)"
    )
    daemon.set_defaults(func=_client_start)
    privacy = client_sub.add_parser(
        "privacy", help="what the hospital's privacy ledger says: per dataset, epsilon spent and left"
    )
    privacy.add_argument("ledger", help="a privacy ledger file, or a folder of them (a simulation's <run>/privacy)")
    privacy.add_argument("--history", action="store_true", help="also list every release")
    privacy.add_argument("--json", action="store_true", help="print the report as JSON")
    privacy.set_defaults(func=_client_privacy)
    example = client_sub.add_parser("example-config", help="print a commented hospital.toml to start from")
    example.set_defaults(func=_client_example_config)
    check = client_sub.add_parser(
        "check", help="validate hospital.toml and every file it names, the privacy ledger current, then exit"
    )
    check.add_argument("--config", required=True, help="the hospital's hospital.toml")
    check.add_argument(
        "--dial",
        action="store_true",
        help="also reach the coordinator: TCP, the TLS handshake with `coordinator.ca`, one call signed with the "
        "node key; name the part that fails",
    )
    check.set_defaults(func=_client_check)
    saved = client_sub.add_parser(
        "backup", help="one consistent archive (0600) of the keys, hospital.toml, privacy ledger and audit trail"
    )
    saved.add_argument("--config", required=True, help="the hospital's hospital.toml")
    saved.add_argument("--out", required=True, metavar="FILE", help="the archive to write (tar.gz; never overwritten)")
    saved.set_defaults(func=_client_backup)
    audit = client_sub.add_parser("audit", help="the audit trail of every message that left the hospital")
    audit_sub = audit.add_subparsers(dest="audit_command", required=True)
    verify = audit_sub.add_parser(
        "verify", help="check the hash chain; name the first altered, deleted or moved record"
    )
    verify.add_argument("log", help="an audit log (*.jsonl), or a folder of them (a simulation's <run>/audit)")
    verify.add_argument(
        "--witness",
        metavar="FILE",
        help="also check the trail against the coordinator's record of it (`fedtune server witness --out FILE`)",
    )
    verify.set_defaults(func=_client_audit)
    recover = audit_sub.add_parser(
        "recover", help="settle an append a crash interrupted (only the one the head file declared)"
    )
    recover.add_argument("log", help="an audit log (*.jsonl), or a folder of them (a simulation's <run>/audit)")
    recover.set_defaults(func=_client_audit)
    shown = audit_sub.add_parser("show", help="the records as a table: what left, when, its hash and size, epsilon")
    shown.add_argument("log", help="an audit log (*.jsonl), or a folder of them (a simulation's <run>/audit)")
    shown.add_argument("--last", type=int, default=0, metavar="N", help="only the last N records")
    shown.add_argument("--json", action="store_true", help="print the records as JSON")
    shown.set_defaults(func=_client_audit)
    return parser


def _quiet_libraries() -> None:
    """No hub access, no per-load progress bars or deprecation chatter in the user's terminal."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return int(args.func(args))
    except FedTuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        again = {
            _compare: "fedtune compare --resume DIR",
            _simulate: "fedtune simulate --resume RUN_DIR",
            _run: "fedtune run --resume RUN --home HOME",
        }.get(args.func)
        print(f"fedtune: interrupted{f'; continue with `{again}`' if again else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
