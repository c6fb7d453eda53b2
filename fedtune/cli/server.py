"""The coordinator's side: ``fedtune server ...``, ``run`` and ``status``.

Each handler imports the coordinator's modules (``fedtune.server.*``) (and through it Flower's launcher code)
only when it runs, so ``fedtune status`` answers without loading a model library.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.server.home import CoordinatorHome

HOME_HELP = "the coordinator's folder (default: ./coordinator)"


def _home(args: argparse.Namespace) -> CoordinatorHome:
    from fedtune.server.home import CoordinatorHome

    return CoordinatorHome(Path(args.home))


def _start(args: argparse.Namespace) -> int:
    from fedtune.server.serving import serve

    return serve(
        _home(args),
        address=args.address,
        host=args.host,
        port=args.port,
        insecure=args.insecure,
        page=args.page,
        page_token_file=args.page_token_file,
    )


def _invite(args: argparse.Namespace) -> int:
    from fedtune.client.hospital_example import kit_toml
    from fedtune.server.admission import invite

    written = invite(_home(args), args.name, Path(args.out), address=args.address, hospital_toml=kit_toml)
    print(f"wrote the startup kit of hospital `{args.name}` to {args.out}:")
    for path in written:
        print(f"  {path}")
    print("it holds no secret: send the folder to the hospital's IT; INSTRUCTIONS.txt says what to do")
    return 0


def _add_hospital(args: argparse.Namespace) -> int:
    from fedtune.server.admission import add_hospital

    entry = add_hospital(_home(args), args.name, Path(args.node_key), Path(args.envelope_key))
    print(f"hospital `{args.name}` registered as SuperNode {entry['node-id']}")
    print(f"  node key {entry['node-key']}; envelope key {entry['envelope-key']}")
    print("  compare both fingerprints with the hospital's IT before its first round")
    return 0


def _remove_hospital(args: argparse.Namespace) -> int:
    from fedtune.server.admission import remove_hospital

    remove_hospital(_home(args), args.name)
    print(f"hospital `{args.name}` removed: its SuperNode can no longer connect and its updates are refused")
    return 0


def _witness(args: argparse.Namespace) -> int:
    import json

    from fedtune.server.home import CoordinatorHome
    from fedtune.server.runs import gather_witness

    if args.run_dir and (args.home or args.run):
        raise ConfigError("`--run-dir` names one run folder; give it without `--home` or `--run`")
    home = CoordinatorHome(Path(args.home or "coordinator"))
    witness, skipped = gather_witness(
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
    from fedtune.server.runs import launch, prepare_deployment_run

    home = _home(args)
    if args.resume:
        folder = RunFolder(Path(args.resume).resolve())
        folder.load_config()  # a clear error when it is not a run folder
    elif args.config:
        folder = prepare_deployment_run(home, load_config(args.config))
    else:
        raise ConfigError("give a run config (`fedtune run CONFIG`) or a run to continue (`--resume RUN`)")
    try:
        print(launch(home, folder, say=lambda line: print(line, flush=True)))
    except KeyboardInterrupt:
        print(
            f"fedtune: interrupted; the run is stopped at the coordinator and its completed rounds are kept; "
            f"continue with `fedtune run --resume {folder.root} --home {home.root}`",
            file=sys.stderr,
        )
        return 130
    return 0


def _status(args: argparse.Namespace) -> int:
    from fedtune.server.status import main_status, watch_status

    home = _home(args)
    if args.watch is not None:
        if args.watch <= 0:
            raise ConfigError(f"`--watch` must be a positive number of seconds, got {args.watch:g}")
        return watch_status(
            home,
            every=args.watch,
            as_json=args.json,
            out=lambda text: print(text, end="", flush=True),
            clear=sys.stdout.isatty() and not args.json,
        )
    print(main_status(home, as_json=args.json), end="")
    return 0


def _register_server(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    server_cmd = sub.add_parser("server", help="the coordinator's SuperLink and the hospitals it admits")
    server_sub = server_cmd.add_subparsers(dest="server_command", required=True)
    start = server_sub.add_parser("start", help="run the SuperLink (TLS, SuperNode authentication, persistent state)")
    start.add_argument("--address", required=True, help="the name or IP hospitals dial (must be in the certificate)")
    start.add_argument("--host", default="0.0.0.0", help="interface to listen on (default: all)")
    start.add_argument("--port", type=int, default=9092, help="port for hospitals and the `flwr` CLI")
    start.add_argument(
        "--insecure", action="store_true", help="NO TLS and NO node authentication (closed test networks only)"
    )
    start.add_argument(
        "--page",
        default="127.0.0.1:9095",
        metavar="HOST:PORT",
        help="the live page (default 127.0.0.1:9095; `off`: none); not loopback: TLS and --page-token-file",
    )
    start.add_argument("--page-token-file", metavar="FILE", help="a secret the page asks for (its own line)")
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
    for p, func in ((start, _start), (add, _add_hospital), (remove, _remove_hospital), (invite, _invite)):
        p.add_argument("--home", default="coordinator", help=HOME_HELP)
        p.set_defaults(func=func)
    witness = server_sub.add_parser(
        "witness", help="what the coordinator received from a hospital: its audit heads, for `client audit verify`"
    )
    witness.add_argument("--hospital", required=True, help="the hospital's (or simulated site's) name")
    witness.add_argument("--home", help="the coordinator's folder (default: ./coordinator); every run of it")
    witness.add_argument("--run", help="only this run of the home (a folder name under runs/)")
    witness.add_argument("--run-dir", help="one run folder instead of a home (a simulation's)")
    witness.add_argument("--out", help="write the witness file here (JSON; default: print it)")
    witness.set_defaults(func=_witness)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``server`` (start, add-hospital, remove-hospital, invite, witness), ``run`` and ``status``."""
    _register_server(sub)
    run = sub.add_parser("run", help="launch a federation run on the coordinator's SuperLink, or resume one")
    run.add_argument("config", nargs="?", help="the run config (TOML: rounds, strategy, dp, security, timeouts)")
    run.add_argument("--resume", metavar="RUN", help="continue this run folder from its last completed round")
    run.add_argument("--home", default="coordinator", help=HOME_HELP)
    run.set_defaults(func=_run, models=True, again="fedtune run --resume RUN --home HOME")
    status = sub.add_parser(
        "status", help="the coordinator's SuperLink, hospitals and runs; a live run's round and each hospital in it"
    )
    status.add_argument("--home", default="coordinator", help=HOME_HELP)
    status.add_argument("--watch", type=float, metavar="SECONDS", help="show it again every SECONDS until Ctrl-C")
    status.add_argument("--json", action="store_true", help="print it as JSON (one object per refresh)")
    status.set_defaults(func=_status)
