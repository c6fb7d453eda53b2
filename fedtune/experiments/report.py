"""Turn a run folder into what a researcher reads: per-round lines, a table, PNG plots."""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedtune.atomic import atomic_write_bytes, atomic_write_json
from fedtune.checkpoint import MetricsLog
from fedtune.runfolder import RunFolder


def round_line(record: dict[str, Any], rounds: int) -> str:
    """One progress line for a finished round."""
    losses = [m["train-loss"] for m in record["train"].values() if "train-loss" in m]
    train_loss = sum(losses) / len(losses) if losses else math.nan
    pooled = record["eval"]["pooled"]
    sites = "  ".join(f"{s} {v['metric']:.3f}" for s, v in record["eval"].items() if s != "pooled")
    rejected = f"  rejected {len(record['rejected'])}" if record.get("rejected") else ""
    refused = f"  refused {len(record['refused'])}" if record.get("refused") else ""
    privacy = ""
    spent = site_epsilons(record)
    if spent:
        privacy += f"  DP eps max {max(spent.values()):.2f}"
    if "client-dp" in record:
        privacy += f"  client-level eps {record['client-dp']['epsilon']:.2f}"
    loss = "" if math.isnan(train_loss) else f"train loss {train_loss:.3f}  "  # DP replies carry no loss
    return (
        f"round {record['round']}/{rounds}  {loss}eval loss {pooled['loss']:.3f}  "
        f"field acc {pooled['metric']:.3f}  [{sites}]{privacy}{rejected}{refused}  {record['seconds']:.0f}s"
    )


def site_epsilons(record: dict[str, Any]) -> dict[str, float]:
    """Each training site's cumulative sample-level epsilon after the round (DP runs only)."""
    return {s: m["dp-epsilon"] for s, m in record.get("train", {}).items() if "dp-epsilon" in m}


def round_records(folder: RunFolder) -> list[dict[str, Any]]:
    return [r for r in MetricsLog(folder.metrics_path).read() if r.get("kind") == "round"]


def round_printer(folder: RunFolder, total: int, say: Callable[[str], None]) -> Callable[[], None]:
    """A poll function that says one line for each round finished since the last call.

    Rounds already in the metrics count as shown, except those after the last checkpoint:
    a resumed run drops and re-runs them, and their new lines are shown.
    """
    from fedtune.checkpoint import latest_round

    latest = latest_round(folder.root)
    done = latest[0] if latest is not None else 0
    shown = {r["round"] for r in round_records(folder) if r["round"] <= done}

    def show_new_rounds() -> None:
        for record in round_records(folder):
            if record["round"] not in shown:
                shown.add(record["round"])
                say(round_line(record, total))

    return show_new_rounds


def summary_rows(
    rounds: list[dict[str, Any]], baselines: dict[str, Any], sites: list[str], *, private: bool = False
) -> list[dict[str, Any]]:
    """One row per model: pooled metric and loss, own-site and unseen-site metric, per site.

    ``private``: the federation ran with DP, the trained baselines did not; their labels say so.
    """

    def row(name: str, per_site: dict[str, Any], own: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "model": name,
            "pooled field acc": per_site["pooled"]["metric"],
            "pooled exact": per_site["pooled"]["exact"],
            "pooled loss": per_site["pooled"]["loss"],
            "unseen sites field acc": math.nan,  # only for a model trained at one site
        }
        if own is not None:
            unseen = [per_site[s] for s in sites if s != own]
            n = sum(u["n"] for u in unseen)
            out["unseen sites field acc"] = sum(u["metric"] * u["n"] for u in unseen) / n if n else math.nan
        out.update({s: per_site[s]["metric"] for s in sites if s in per_site})
        return out

    rows = []
    if "base" in baselines:
        rows.append(row("base model", baselines["base"]))
    for site in sites:
        if f"local:{site}" in baselines:
            rows.append(row(f"local only: {site}", baselines[f"local:{site}"], own=site))
    if rounds:
        n = rounds[-1]["round"]
        label = f"federated ({n} round{'s' if n != 1 else ''}"
        spent = [e for r in rounds for e in site_epsilons(r).values()]
        if spent:
            label += f", DP eps {max(spent):.2f}"
        if "client-dp" in rounds[-1]:
            label += f", client-level eps {rounds[-1]['client-dp']['epsilon']:.2f}"
        rows.append(row(label + ")", rounds[-1]["eval"], own=None))
    if "centralized" in baselines:
        rows.append(row("centralized (pooled data)", baselines["centralized"]))
    if private:
        for r in rows:
            if r["model"].startswith(("local only", "centralized")):
                r["model"] += " (no DP)"
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "(no results)\n"
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.3f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_rounds(folder: RunFolder, rounds: list[dict[str, Any]], baselines: dict[str, Any]) -> list[Path]:
    """metric.png and loss.png: per site and pooled per round, baselines as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    folder.plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    xs = [r["round"] for r in rounds]
    for key, title, name in (("metric", "field accuracy (held-out)", "metric"), ("loss", "eval loss", "loss")):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        if rounds:
            for site in [s for s in rounds[-1]["eval"] if s != "pooled"]:
                ax.plot(
                    xs,
                    [r["eval"].get(site, {}).get(key, math.nan) for r in rounds],
                    marker="o",
                    alpha=0.6,
                    label=f"federated @ {site}",
                )
            ax.plot(
                xs,
                [r["eval"]["pooled"][key] for r in rounds],
                marker="o",
                lw=2.5,
                color="black",
                label="federated (pooled)",
            )
        styles = {"base": ("base model", "tab:red"), "centralized": ("centralized", "tab:green")}
        for b, (label, color) in styles.items():
            if b in baselines:
                ax.axhline(baselines[b]["pooled"][key], ls="--", color=color, label=label)
        locals_ = [v["pooled"][key] for k, v in baselines.items() if k.startswith("local:")]
        if locals_:
            ax.axhline(sum(locals_) / len(locals_), ls=":", color="tab:purple", label="local only (mean)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel(title)
        ax.set_title(f"{folder.root.name}: {title}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
        written.append(save_figure(fig, folder.plots_dir / f"{name}.png"))
    return written


def save_figure(fig: Any, path: Path) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_epsilon(folder: RunFolder, rounds: list[dict[str, Any]]) -> Path | None:
    """epsilon.png: each site's cumulative sample-level epsilon (and the client-level one) per round."""
    per_site: dict[str, list[tuple[int, float]]] = {}
    for r in rounds:
        for site, eps in site_epsilons(r).items():
            per_site.setdefault(site, []).append((r["round"], eps))
    client = [(r["round"], r["client-dp"]["epsilon"]) for r in rounds if "client-dp" in r]
    if not per_site and not client:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    cfg = folder.load_config()
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for site, points in sorted(per_site.items()):
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{site} (per record, delta {cfg.dp.delta:g})")
    if client:
        ax.plot(
            *zip(*client, strict=True), marker="s", color="black", label=f"client-level (delta {cfg.client_dp.delta:g})"
        )
    if per_site:
        ax.axhline(cfg.dp.budget_epsilon, ls="--", color="tab:red", label="hospital budget")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title(f"{folder.root.name}: privacy spent")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return save_figure(fig, folder.plots_dir / "epsilon.png")


def write_table(root: Path, stem: str, title: str, rows: list[dict[str, Any]]) -> str:
    """``<root>/<stem>.json`` (the rows) and ``<stem>.md`` (``# title`` and the table); return the table."""
    table = markdown_table(rows)
    atomic_write_json(root / f"{stem}.json", rows)
    atomic_write_bytes(root / f"{stem}.md", (f"# {title}\n\n" + table).encode())
    return table


def prefixed(say: Callable[[str], None], label: str) -> Callable[[str], None]:
    """``say`` with every line prefixed ``[label]`` (one sub-run's lines among several)."""

    def inner(line: str) -> None:
        say(f"[{label}] {line}")

    return inner


def write_summary(folder: RunFolder) -> str:
    """Write summary.md / summary.json and the plots; return the markdown table."""
    from fedtune.experiments.audit_report import audit_summary

    rounds = round_records(folder)
    baselines = json.loads(folder.baselines_path.read_text()) if folder.baselines_path.is_file() else {}
    cfg = folder.load_config()
    rows = summary_rows(rounds, baselines, folder.sites(), private=cfg.dp.enabled or cfg.client_dp.enabled)
    table = write_table(folder.root, "summary", folder.root.name, rows)
    table += audit_summary(folder)  # [privacy_audit]: the hospitals' local audit files ("" without)
    plot_rounds(folder, rounds, baselines)
    plot_epsilon(folder, rounds)
    return table


def run_status(root: Path) -> dict[str, Any]:
    """One line of `fedtune status` for a run folder: how far it got, what it does now, how it ended."""
    from fedtune.checkpoint import latest_round
    from fedtune.errors import FedTuneError
    from fedtune.live import ENDED, read_status
    from fedtune.process import running

    folder = RunFolder(root)
    try:
        total: int | str = folder.load_config().federation.rounds
    except FedTuneError:
        total = "?"
    latest = latest_round(root)
    done, extra = latest if latest is not None else (0, {})
    records = round_records(folder)
    pooled = records[-1].get("eval", {}).get("pooled", {}) if records else {}
    live = read_status(root) or {}
    phase, rnd = str(live.get("phase", "")), live.get("round", 0)
    if live and phase not in ENDED:
        if running(int(live.get("pid", 0)), "flwr"):
            state = f"running: round {rnd}/{total}, {phase}{_counts(live, phase)}"
        else:
            state = f"interrupted in round {rnd}/{total} ({phase}); resume with `fedtune run --resume`"
    elif extra.get("stopped"):
        state = f"stopped{' (nothing trained)' if not done else ''}: {extra['stopped']}"
    elif folder.adapter_dir.is_dir() and done == total:
        state = "finished"
    elif phase == "failed":
        state = f"failed in round {rnd}/{total}: {live.get('reason', '')}"
    else:
        state = "incomplete (resume with `fedtune run --resume`)" if done else "not started"
    return {
        "run": root.name,
        "rounds": f"{done}/{total}",
        "state": state,
        "flower run": live.get("flower-run-id") or "-",
        "last metric": pooled.get("metric", "-"),
        "hospitals last round": len(records[-1].get("train", {})) if records else 0,
    }


def _counts(live: dict[str, Any], phase: str) -> str:
    """`` (3 sampled, 1 answered)``: how the hospitals' messages of the phase stand."""
    if phase not in ("train", "evaluate"):
        return ""
    states = [h.get(phase) for h in live.get("hospitals", {}).values() if h.get(phase)]
    counted = {s: states.count(s) for s in dict.fromkeys(states)}
    return f" ({', '.join(f'{n} {s}' for s, n in counted.items())})" if counted else ""


def live_rows(live: dict[str, Any], names: dict[int, str]) -> list[dict[str, Any]]:
    """Each hospital of a live run's current round: its train and evaluate state, and why.

    ``names``: hospital names by Flower node id (the coordinator's registry), for a node
    whose reply has not (or could not) prove who it is."""
    rows = []
    for node, entry in sorted(live.get("hospitals", {}).items()):
        why = "; ".join(entry[k] for k in ("train-why", "evaluate-why") if entry.get(k))
        rows.append(
            {
                "hospital": entry.get("hospital") or names.get(int(node), f"node {node}"),
                "train": entry.get("train", "-"),
                "evaluate": entry.get("evaluate", "-"),
                "why": why or "-",
            }
        )
    return rows
