"""The ``fedtune`` command. Every deliberate error is one line on stderr and exit code 2;
a run that stopped early with some rounds trained (its last round exported) exits 3.

One module per command group registers its subcommands: ``simulate`` (simulate, compare,
data), ``server`` (server, run, status), ``client`` (client), ``pki`` (keys, pki), ``plan`` (plan). They
import the work they do (torch, Flower, transformers, cryptography) inside their handlers,
so a command starts in the time its own imports take: ``fedtune --help`` and
``client example-config`` load no model library (``benchmarks/startup.py`` measures it).
A handler's subparser may set ``models=True`` (it loads a model library in this process:
quiet its logging first) and ``again`` (the command that continues it after Ctrl-C).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence

from fedtune import __version__
from fedtune.cli import client, pki, plan, server, simulate
from fedtune.errors import FedTuneError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedtune", description="Federated LoRA fine-tuning for hospitals.")
    parser.add_argument("--version", action="version", version=f"fedtune {__version__}")
    parser.set_defaults(models=False, again=None)  # what a subcommand does not say
    sub = parser.add_subparsers(dest="command", required=True)
    simulate.register(sub)  # simulate, compare, data
    pki.register(sub)  # keys, pki
    server.register(sub)  # server, run, status
    client.register(sub)  # client
    plan.register(sub)  # plan
    return parser


def _quiet_libraries(*, models: bool) -> None:
    """No hub access, no per-load progress bars or deprecation chatter in the user's terminal.

    transformers is imported (0.6 s) only for a command that loads it anyway.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    # bitsandbytes, once imported (peft imports it whenever it is installed), says it could not
    # fetch a faster CPU kernel from the Hugging Face hub: fedtune never downloads at run time
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    if not models:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _ctrl_c_interrupts() -> None:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt in every command, whatever the parent left.

    A process started in the background by a non-interactive shell (``cmd &`` in a script,
    some service wrappers) inherits SIGINT ignored, and Python then keeps it ignored: a
    ``fedtune run`` would train on after a Ctrl-C or ``kill -INT`` without stopping its run
    at the coordinator, and ``fedtune simulate --watch`` would never close its page. Only the
    main thread installs handlers, so this is done once, here; commands that handle SIGINT
    themselves (the client daemon, ``fedtune server start``) replace it later.
    """
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():  # only it may set a handler
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _ctrl_c_interrupts()
    _quiet_libraries(models=args.models)
    try:
        return int(args.func(args))
    except FedTuneError as err:
        print(f"fedtune: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        hint = f"; continue with `{args.again}`" if args.again else ""
        print(f"fedtune: interrupted{hint}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
