"""Research runs on one machine: ``fedtune simulate`` (and its sweeps), ``compare``, ``data``.

Each handler imports the experiment code (torch, Flower, transformers) only when it runs.
"""

from __future__ import annotations

import argparse
import time
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.errors import ConfigError

if TYPE_CHECKING:
    from fedtune.runfolder import RunFolder

_FLAGS = {
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
    "ray_address": "simulation.ray_address",
}


def _value(text: str) -> Any:
    """A --set value as TOML would read it (numbers, booleans, lists), else a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    out = {key: getattr(args, flag) for flag, key in _FLAGS.items() if getattr(args, flag) is not None}
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


def _say(line: str) -> None:
    print(line, flush=True)


def _watched(folder: RunFolder, args: argparse.Namespace) -> int:
    """The run, with its live page on loopback while it goes (``--watch``) and after, until Ctrl-C."""
    from fedtune.experiments.simulate import ended_early, run_simulation
    from fedtune.pages.runview import simulation_state
    from fedtune.pages.serve import PageServer, page_address

    page = None
    if args.watch:
        host, port = page_address(args.watch_address, "--watch-address")
        state = lambda _query: simulation_state(folder.root)  # noqa: E731
        page = PageServer(host, port, state, page="coordinator.html", setting="--watch-address", how=WATCH_HOW).start()
        print(f"live page: {page.url} (rounds and baselines as they arrive)", flush=True)
    try:
        print("\n" + run_simulation(folder, say=_say), flush=True)
        early = ended_early(folder, folder.load_config())
        if page is not None:
            print(f"run done; the live page stays at {page.url} until Ctrl-C", flush=True)
            _until_interrupted()
        if early is not None:
            raise early
        return 0
    finally:
        if page is not None:
            page.stop()


def _check_watch(args: argparse.Namespace) -> None:
    """``--watch`` refused before anything is prepared: a sweep, or a page off loopback."""
    from fedtune.pages.serve import check_bind, page_address

    if args.epsilons:
        raise ConfigError("`--watch` shows one run; drop it for a sweep (`--epsilons`)")
    host, port = page_address(args.watch_address, "--watch-address")
    check_bind(host, port, setting="--watch-address", tls=False, token="", how=WATCH_HOW)


WATCH_HOW = "a simulation's page serves this machine only"


def _until_interrupted() -> None:
    """Wait for Ctrl-C. A short sleep, not one blocking wait: Python runs a signal's handler
    in the main thread, and a wait on a lock is cut short only when the kernel hands the
    signal to the main thread itself (it may pick the page's thread instead)."""
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return


def _simulate(args: argparse.Namespace) -> int:
    from fedtune.config import load_config
    from fedtune.experiments.simulate import prepare_run, resume_folder
    from fedtune.experiments.sweep import is_sweep, parse_epsilons, prepare_sweep, run_sweep

    if args.watch:
        _check_watch(args)
    if args.resume:
        if args.config or _overrides(args) or args.epsilons:
            raise ConfigError("--resume continues a run with its own config.toml; drop CONFIG and the other flags")
        if is_sweep(Path(args.resume)):
            if args.watch:
                raise ConfigError("`--watch` shows one run; drop it to resume a sweep")
            print("\n" + run_sweep(Path(args.resume).resolve(), say=_say), flush=True)
            return 0
        folder = resume_folder(Path(args.resume))
    elif args.epsilons:
        if args.target_epsilon is not None or args.noise_multiplier is not None:
            raise ConfigError("--epsilons sets each sweep run's DP noise; drop --target-epsilon and --noise-multiplier")
        cfg = load_config(Path(args.config) if args.config else None, _overrides(args))
        root = prepare_sweep(cfg, parse_epsilons(args.epsilons), root=Path(args.out) if args.out else None)
        print("\n" + run_sweep(root, say=_say), flush=True)
        return 0
    else:
        # No CONFIG: the embedded defaults (simulations/default.toml spells them out).
        cfg = load_config(Path(args.config) if args.config else None, _overrides(args))
        folder = prepare_run(cfg, run_dir=Path(args.out) if args.out else None)
    return _watched(folder, args)


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
    print("\n" + run_compare(root, say=_say), flush=True)
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``simulate``, ``compare`` and ``data``."""
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
    sim.add_argument("--ray-address", metavar="HOST:PORT", help="run the hospitals on this running Ray cluster")
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
    sim.add_argument(
        "--watch", action="store_true", help="serve the run's live page on loopback (its URL is printed); Ctrl-C ends"
    )
    sim.add_argument(
        "--watch-address",
        default="127.0.0.1:0",
        metavar="HOST:PORT",
        help="the page's loopback address (default: a free port)",
    )
    sim.set_defaults(func=_simulate, models=True, again="fedtune simulate --resume RUN_DIR")

    cmp = sub.add_parser("compare", help="LoRA merge strategies and server optimizers side by side, one table and plot")
    cmp.add_argument("plan", nargs="?", help="plan TOML: `strategies` and `configs` (e.g. simulations/strategies.toml)")
    cmp.add_argument("--out", help="comparison folder to create (default: <run.output_dir>/compare-<time>)")
    cmp.add_argument("--resume", metavar="DIR", help="finish an interrupted comparison and redo its table")
    cmp.set_defaults(func=_compare, models=True, again="fedtune compare --resume DIR")

    data = sub.add_parser("data", help="write the embedded clinical dataset to disk (JSONL) to see the format")
    data.add_argument("--out", default="fedtune-data", help="folder to write (default: fedtune-data)")
    data.add_argument("--hospitals", type=int, default=3)
    data.add_argument("--train", type=int, default=160, help="training records per hospital")
    data.add_argument("--eval", type=int, default=16, help="held-out records per hospital")
    data.add_argument("--seed", type=int, default=0)
    data.set_defaults(func=_data)
