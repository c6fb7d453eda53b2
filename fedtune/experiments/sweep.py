"""The privacy-utility sweep: one federation without DP and one per target epsilon.

```
<sweep>/sweep.json                  the sweep's plan: sub-runs and their target epsilons
<sweep>/no-dp/, eps-<E>/            ordinary run folders (each resumable on its own)
<sweep>/privacy_utility.{md,json}   the task metric against the epsilon each run spent
<sweep>/privacy_utility.png
```

Every DP sub-run keeps its simulated hospitals' ledgers in its own folder, so the runs
do not draw on each other's budget. The baselines (base model, local only,
centralized) run once, in the non-private sub-run, if ``run.baselines`` is set; the base
model is evaluated in any case.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedtune import tracking
from fedtune.atomic import atomic_write_json
from fedtune.config import ExperimentConfig, replace
from fedtune.errors import CheckpointError, ConfigError
from fedtune.experiments.audit_report import final_audit
from fedtune.experiments.report import prefixed, round_records, save_figure, site_epsilons, write_table
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.runfolder import RunFolder, new_folder

SWEEP_FILE = "sweep.json"
NO_DP = "no-dp"
Say = Callable[[str], None]


def parse_epsilons(text: str) -> list[float]:
    """``"1,4,16"`` -> [1.0, 4.0, 16.0]; each must be a positive number."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ConfigError(f"--epsilons must be comma-separated numbers like 1,8; got {text!r}") from err
    if not values or any(not (v > 0 and math.isfinite(v)) for v in values):
        raise ConfigError(f"--epsilons must list positive numbers like 1,8; got {text!r}")
    return sorted(set(values))


def is_sweep(path: Path) -> bool:
    return (path / SWEEP_FILE).is_file()


def prepare_sweep(cfg: ExperimentConfig, epsilons: Sequence[float], *, root: Path | None = None) -> Path:
    """Create the sweep folder and every sub-run folder; return the sweep folder."""
    root = new_folder(root, parent=cfg.run.output_dir, stem=f"{cfg.run.name}-privacy", what="sweep")
    plan: dict[str, float | None] = {NO_DP: None}
    plan.update({f"eps-{e:g}": e for e in epsilons})
    configs = {NO_DP: replace(cfg, dp={"enabled": False})}
    for name, eps in plan.items():
        if eps is not None:
            dp = {
                "enabled": True,
                "target_epsilon": eps,
                "noise_multiplier": 0.0,
                "budget_epsilon": max(cfg.dp.budget_epsilon, eps),
                "ledger_dir": "",
            }
            configs[name] = replace(cfg, dp=dp, run={"baselines": False, "name": f"{cfg.run.name}-{name}"})
    root = root.resolve()
    for name, sub in configs.items():
        prepare_run(sub, run_dir=root / name)
    # a list, not an object: the order (no DP first, then rising epsilon) is the plan
    atomic_write_json(root / SWEEP_FILE, {"runs": [{"name": n, "target_epsilon": e} for n, e in plan.items()]})
    return root


def _plan(root: Path) -> dict[str, float | None]:
    try:
        runs = json.loads((root / SWEEP_FILE).read_text())["runs"]
        return {str(r["name"]): (None if r["target_epsilon"] is None else float(r["target_epsilon"])) for r in runs}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{root / SWEEP_FILE}: unreadable ({err}); the sweep folder is damaged") from err


def run_sweep(root: Path, *, say: Say = print) -> str:
    """Run or finish every sub-run, then write the privacy-utility table and plot; return the table.

    With ``[tracking]`` the sweep is an MLflow parent run and each sub-run its child."""
    plan = _plan(root)
    configs = [RunFolder(root / name).load_config() for name in plan]
    files = ("privacy_utility.md", "privacy_utility.json", "privacy_utility.png")
    return tracking.run_group(
        root, configs, say=say, kind="sweep", body=lambda parent: _sweep(root, plan, say, parent), files=files
    )


def _sweep(root: Path, plan: dict[str, float | None], say: Say, parent: tracking.Parent | None) -> str:
    for i, name in enumerate(plan, start=1):
        label = "without DP" if plan[name] is None else f"DP, target epsilon {plan[name]:g}"
        say(f"--- sweep run {i}/{len(plan)}: {name} ({label})")
        run_simulation(RunFolder(root / name), say=prefixed(say, name), parent=parent)
    no_dp = RunFolder(root / NO_DP)
    if not no_dp.load_config().run.baselines:  # the base model's row costs one evaluation
        from fedtune.experiments.baselines import run_baselines

        run_baselines(no_dp, say=prefixed(say, NO_DP), only=["base"])
    rows = privacy_utility_rows(root, plan)
    table = write_table(root, "privacy_utility", f"{root.name}: privacy and utility", rows)
    plot_privacy_utility(root, rows)
    say(f"privacy-utility table: {root / 'privacy_utility.md'}, plot: {root / 'privacy_utility.png'}")
    return table


def privacy_utility_rows(root: Path, plan: dict[str, float | None]) -> list[dict[str, Any]]:
    """Base model, the non-private federation, and each DP federation, on the same pooled held-out set."""
    rows: list[dict[str, Any]] = []
    baselines_path = RunFolder(root / NO_DP).baselines_path
    baselines = json.loads(baselines_path.read_text()) if baselines_path.is_file() else {}
    sites = RunFolder(root / NO_DP).sites()

    def row(name: str, target: float | None, spent: float | None, noise: float | None, ev: dict[str, Any]) -> None:
        r: dict[str, Any] = {
            "model": name,
            "target epsilon": target,
            "epsilon spent (max site)": spent,
            "noise multiplier (mean)": noise,
            "pooled field acc": ev["pooled"]["metric"],
            "pooled exact": ev["pooled"]["exact"],
            "pooled loss": ev["pooled"]["loss"],
        }
        r.update({s: ev[s]["metric"] for s in sites if s in ev})
        rows.append(r)

    if "base" in baselines:
        row("base model", None, None, None, baselines["base"])
    for name, target in plan.items():
        rounds = round_records(RunFolder(root / name))
        if not rounds:
            continue
        n = rounds[-1]["round"]
        if target is None:
            row(f"federated, no DP ({n} rounds)", None, None, None, rounds[-1]["eval"])
            rows[-1].update(final_audit(root / name))  # [privacy_audit]: the final round, pooled over hospitals
            continue
        spent = [e for r in rounds for e in site_epsilons(r).values()]
        noises = [m["dp-noise-multiplier"] for m in rounds[-1]["train"].values() if "dp-noise-multiplier" in m]
        mean_noise = sum(noises) / len(noises) if noises else None
        row(f"federated, DP ({n} rounds)", target, max(spent, default=None), mean_noise, rounds[-1]["eval"])
        rows[-1].update(final_audit(root / name))
    return rows


def plot_privacy_utility(root: Path, rows: list[dict[str, Any]]) -> Path:
    """privacy_utility.png: pooled field accuracy against the epsilon spent, with the no-DP and base lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    private = [r for r in rows if r["target epsilon"] is not None and r["epsilon spent (max site)"] is not None]
    if private:
        xs = [r["epsilon spent (max site)"] for r in private]
        ys = [r["pooled field acc"] for r in private]
        ax.plot(xs, ys, marker="o", lw=2, color="tab:blue", label="federated with DP-SGD")
        for x, y in zip(xs, ys, strict=True):
            ax.annotate(f"{y:.2f}", (x, y), textcoords="offset points", xytext=(4, 6), fontsize=7)
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:.2g}" for x in xs])
        ax.minorticks_off()
    for r in rows:
        if r["model"].startswith("federated, no DP"):
            ax.axhline(r["pooled field acc"], ls="--", color="tab:green", label="federated, no DP")
        if r["model"] == "base model":
            ax.axhline(r["pooled field acc"], ls="--", color="tab:red", label="base model")
    ax.set_xlabel("epsilon spent per record (max over hospitals, delta as configured)")
    ax.set_ylabel("pooled field accuracy (held-out)")
    ax.set_title(f"{root.name}: privacy against utility")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")
    return save_figure(fig, root / "privacy_utility.png")
