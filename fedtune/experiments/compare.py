"""The strategy comparison: each LoRA merge rule (and server optimizer) on the same federations.

```
<compare>/compare.json                  the plan: one sub-run per (config, variant)
<compare>/<config>/<variant>/           ordinary run folders (each resumable on its own)
<compare>/strategies.{md,json,png}      pooled task metric per round, epsilon, upload size
```

A plan file (TOML) names the variants and the experiment configs to run each in::

    strategies = ["fedavg", "ffa", "svd", "fedavg+fedadam@0.001"]   # strategy[+server_optimizer][@server_lr]
    configs = ["default.toml", "dp.toml"]                      # relative to the plan file

Every sub-run is its config with only ``federation.strategy`` and
``federation.server_optimizer`` (and ``server_lr``) changed, so the variants of one config see the same data,
seed and DP settings. No sub-run trains baselines (we compare federations); each config's
base model is evaluated once, in its first variant's folder (round 0 of its plot). DP sub-runs keep their simulated
hospitals' ledgers in their own folders, so the variants do not draw on each other's budget.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fedtune import tracking
from fedtune.atomic import atomic_write_json
from fedtune.config import SERVER_OPTIMIZERS, STRATEGIES, ExperimentConfig, load_config, replace
from fedtune.errors import CheckpointError, ConfigError
from fedtune.experiments.report import prefixed, round_records, save_figure, site_epsilons, write_table
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.runfolder import RunFolder, new_folder

PLAN_FILE = "compare.json"
PLAN_KEYS = ("strategies", "configs")
OPTIMIZERS = tuple(o for o in SERVER_OPTIMIZERS if o != "none")  # "fedavg" alone means no server optimizer
Say = Callable[[str], None]


@dataclass(frozen=True)
class SubRun:
    """One (config, variant) cell of the comparison; ``base``: evaluate the base model in it."""

    config: str
    variant: str
    strategy: str
    optimizer: str
    base: bool = False
    server_lr: float = 0.0  # 0: the config's (or the optimizer's usual value)

    @property
    def folder(self) -> str:
        """Relative run folder: ``<config>/<variant with + as - and @ as -lr>``."""
        return f"{self.config}/{_name(self.variant)}"


def _name(variant: str) -> str:
    return variant.replace("+", "-").replace("@", "-lr")


def parse_variant(text: str, *, source: str) -> tuple[str, str, float]:
    """``"fedavg+fedadam"`` -> ("fedavg", "fedadam", 0.0); ``"ffa"`` -> ("ffa", "none", 0.0);
    ``"fedavg+fedadam@0.001"`` -> ("fedavg", "fedadam", 0.001): a server learning rate."""
    rest, at, lr_text = text.strip().partition("@")
    server_lr = 0.0
    if at:
        try:
            server_lr = float(lr_text)
        except ValueError:
            server_lr = -1.0
        if not server_lr > 0:
            raise ConfigError(
                f"{source}: `strategies` entry {text!r} must give a positive server learning rate after '@', "
                "e.g. 'fedavg+fedadam@0.001'"
            )
    strategy, plus, optimizer = rest.partition("+")
    if strategy not in STRATEGIES:
        raise ConfigError(
            f"{source}: `strategies` entry {text!r} names an unknown strategy {strategy!r}; "
            f"use one of {', '.join(STRATEGIES)}"
        )
    if plus and optimizer not in OPTIMIZERS:
        raise ConfigError(
            f"{source}: `strategies` entry {text!r} names an unknown server optimizer {optimizer!r}; "
            f"use one of {', '.join(OPTIMIZERS)} after '+', or the strategy alone for none"
        )
    return strategy, optimizer if plus else "none", server_lr


def _string_list(data: dict[str, Any], key: str, source: str) -> list[str]:
    value = data.get(key)
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ConfigError(f"{source}: `{key}` must be a non-empty list of names, got {value!r}")
    return [v.strip() for v in value]


def load_plan(plan_path: Path) -> list[tuple[ExperimentConfig, SubRun]]:
    """Read and check a plan file; return every sub-run's config, config-major, in plan order."""
    source = str(plan_path)
    try:
        data = tomllib.loads(plan_path.read_text(encoding="utf-8"))
    except OSError as err:
        raise ConfigError(f"{source}: cannot read plan ({err.strerror}); check the path") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{source}: not valid TOML ({err}); fix the syntax") from err
    unknown = [k for k in data if k not in PLAN_KEYS]
    if unknown:
        raise ConfigError(f"{source}: unknown key `{unknown[0]}`; a plan has only `strategies` and `configs`")
    variants = _string_list(data, "strategies", source)
    parsed = {v: parse_variant(v, source=source) for v in variants}
    duplicates = [v for i, v in enumerate(variants) if v in variants[:i]]
    if duplicates:
        raise ConfigError(f"{source}: `strategies` lists {duplicates[0]!r} twice; drop one")
    configs: dict[str, ExperimentConfig] = {}
    for name in _string_list(data, "configs", source):
        cfg = load_config(plan_path.parent / name)  # its own error names the file
        if cfg.run.name in configs:
            raise ConfigError(
                f"{source}: two `configs` share `run.name` {cfg.run.name!r}; give each config its own `run.name`"
            )
        configs[cfg.run.name] = cfg
    out = []
    for label, cfg in configs.items():
        for i, v in enumerate(variants):
            strategy, optimizer, server_lr = parsed[v]
            sub = SubRun(label, v, strategy, optimizer, base=i == 0, server_lr=server_lr)
            federation: dict[str, Any] = {"strategy": strategy, "server_optimizer": optimizer}
            if server_lr:
                federation["server_lr"] = server_lr
            try:
                sub_cfg = replace(
                    cfg,
                    federation=federation,
                    run={"baselines": False, "name": f"{label}-{_name(v)}"},
                    dp={"ledger_dir": ""},
                )
            except ConfigError as err:
                raise ConfigError(f"{source}: variant {v!r} of config {label!r}: {err}") from err
            out.append((sub_cfg, sub))
    return out


def prepare_compare(plan_path: Path, *, root: Path | None = None) -> Path:
    """Create the comparison folder and every sub-run folder; return the comparison folder."""
    runs = load_plan(plan_path)
    root = new_folder(root, parent=runs[0][0].run.output_dir, stem="compare", what="comparison")
    root = root.resolve()
    for sub_cfg, sub in runs:
        prepare_run(sub_cfg, run_dir=root / sub.folder)
    # written last: a folder with compare.json has all its sub-runs
    atomic_write_json(root / PLAN_FILE, {"plan": str(plan_path.resolve()), "runs": [asdict(s) for _, s in runs]})
    return root


def read_plan(root: Path) -> list[SubRun]:
    """The sub-runs of a comparison folder, in plan order."""
    path = root / PLAN_FILE
    if not path.is_file():
        raise CheckpointError(f"{root}: no {PLAN_FILE}; pass the folder `fedtune compare` printed")
    try:
        return [SubRun(**r) for r in json.loads(path.read_text())["runs"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the comparison folder is damaged") from err


def run_compare(root: Path, *, say: Say = print) -> str:
    """Run or finish every sub-run, then write the comparison table and plot; return the table.

    With ``[tracking]`` the comparison is an MLflow parent run and each sub-run its child."""
    runs = read_plan(root)
    configs = [RunFolder(root / sub.folder).load_config() for sub in runs]
    files = ("strategies.md", "strategies.json", "strategies.png")
    return tracking.run_group(
        root, configs, say=say, kind="comparison", body=lambda parent: _compare(root, runs, say, parent), files=files
    )


def _compare(root: Path, runs: list[SubRun], say: Say, parent: tracking.Parent | None) -> str:
    for i, sub in enumerate(runs, start=1):
        label = f"{sub.config}/{sub.variant}"
        say(f"--- compare run {i}/{len(runs)}: {label} (strategy {sub.strategy}, server optimizer {sub.optimizer})")
        folder = RunFolder(root / sub.folder)
        run_simulation(folder, say=prefixed(say, label), parent=parent)
        if sub.base:  # one evaluation, no training: round 0 of the config's plot
            from fedtune.experiments.baselines import run_baselines

            run_baselines(folder, say=prefixed(say, label), only=["base"])
    base_runs = {s.config: RunFolder(root / s.folder) for s in runs if s.base}
    results = [_result(RunFolder(root / sub.folder), sub, base_runs.get(sub.config)) for sub in runs]
    table = write_table(root, "strategies", f"{root.name}: LoRA merge strategies", comparison_rows(results))
    plot_strategies(root, results)
    say(f"strategy table: {root / 'strategies.md'}, plot: {root / 'strategies.png'}")
    return table


def _result(folder: RunFolder, sub: SubRun, base_run: RunFolder | None) -> dict[str, Any]:
    """What the table and plot need from one sub-run folder (and its config's base-model evaluation)."""
    rounds = round_records(folder)
    spent = [e for r in rounds for e in site_epsilons(r).values()]
    uploads = [m["upload-bytes"] for r in rounds for m in r["train"].values() if "upload-bytes" in m]
    base_path = (base_run or folder).baselines_path
    base = json.loads(base_path.read_text()).get("base") if base_path.is_file() else None
    return {
        "sub": sub,
        "dp": folder.load_config().dp.enabled,
        "spent": max(spent, default=None),
        "curve": [(r["round"], r["eval"]["pooled"]["metric"]) for r in rounds],
        "base": base["pooled"]["metric"] if base else None,
        "last": rounds[-1]["eval"]["pooled"] if rounds else {},
        "upload": sum(uploads) / len(uploads) if uploads else None,
    }


def comparison_rows(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (config, variant): DP, epsilon spent, pooled metric per round, final exact/loss, upload size."""
    last_round = max((r["curve"][-1][0] for r in results if r["curve"]), default=0)
    rows = []
    for res in results:
        per_round = dict(res["curve"])
        row: dict[str, Any] = {
            "config": res["sub"].config,
            "variant": res["sub"].variant,
            "DP-SGD": "on" if res["dp"] else "off",
            "epsilon spent (max site)": res["spent"],
        }
        # every row has every round's column, so a run that stopped early leaves blanks
        row.update({f"round {n}": per_round.get(n) for n in range(1, last_round + 1)})
        row["pooled exact"] = res["last"].get("exact")
        row["pooled loss"] = res["last"].get("loss")
        # mean over site-rounds of the bytes one accepted train reply carried (ffa sends B only)
        row["upload bytes / site / round"] = None if res["upload"] is None else round(res["upload"])
        rows.append(row)
    return rows


def plot_strategies(root: Path, results: list[dict[str, Any]]) -> Path:
    """strategies.png: pooled field accuracy per round, one panel per config, one line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    configs = list(dict.fromkeys(r["sub"].config for r in results))
    fig, axes = plt.subplots(1, len(configs), figsize=(5 * len(configs), 4.2), dpi=110, sharey=True, squeeze=False)
    for ax, config in zip(axes[0], configs, strict=True):
        mine = [r for r in results if r["sub"].config == config]
        for k, res in enumerate(mine):
            points = ([(0, res["base"])] if res["base"] is not None else []) + res["curve"]
            if points:  # a marker of its own per variant: equal curves stay visible
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="os^Dv<>"[k % 7], lw=2, alpha=0.8, label=res["sub"].variant)
        spent = [r["spent"] for r in mine if r["spent"] is not None]
        dp = any(r["dp"] for r in mine)
        ax.set_title(config + (f" (DP-SGD, eps {max(spent):.2f})" if dp and spent else " (DP-SGD)" if dp else ""))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round (0: base model)" if any(r["base"] is not None for r in mine) else "round")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("pooled field accuracy (held-out)")
    return save_figure(fig, root / "strategies.png")
