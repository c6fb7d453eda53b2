"""What federation is compared against, on the same pooled held-out set.

- ``base``: the base model, no adapter;
- ``local:<site>``: each site training alone on its own data, with the same number of
  local steps it did in the federation (rounds x steps per round);
- ``centralized``: one model trained on the pooled data with the federation's total
  compute (sites x rounds x steps per round).

All start from the federation's round-0 adapter and use the same training loop. Each
result is saved as soon as it exists, so an interrupted run does not redo it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from fedtune.atomic import atomic_write_json
from fedtune.checkpoint import load_checkpoint
from fedtune.config import ExperimentConfig
from fedtune.evaluate import EvalResult
from fedtune.runfolder import RunFolder
from fedtune.runtime import SiteData, SiteRuntime, site_data
from fedtune.train import steps_per_round


def _evaluate_all(runtime: SiteRuntime, state: Any, sites: list[SiteData], cfg: ExperimentConfig) -> dict[str, Any]:
    results = {d.site: runtime.evaluate(state, d, cfg.eval) for d in sites}
    out: dict[str, Any] = {site: r.as_metrics() for site, r in results.items()}
    out["pooled"] = sum(results.values(), EvalResult()).as_metrics()
    return out


def run_baselines(
    folder: RunFolder, *, say: Callable[[str], None] = print, only: Sequence[str] | None = None
) -> dict[str, Any]:
    """Compute (or load) the baselines of the run (all, or those named in ``only``).

    Returns name -> per-site and pooled metrics.
    """
    cfg = folder.load_config()
    done: dict[str, Any] = json.loads(folder.baselines_path.read_text()) if folder.baselines_path.is_file() else {}
    wanted = ["base", *(f"local:{s}" for s in folder.sites()), "centralized"]
    if all(name in done for name in wanted if only is None or name in only):
        return done  # nothing to compute: do not load the model
    runtime = SiteRuntime(cfg.model, cfg.lora)
    sites = [site_data(runtime, s, *folder.read_site(s), cfg.train.max_length) for s in folder.sites()]
    initial = load_checkpoint(folder.root, 0).state
    rounds = cfg.federation.rounds

    plan: list[tuple[str, list[SiteData] | None]] = [("base", None)]
    plan += [(f"local:{d.site}", [d]) for d in sites]
    plan.append(("centralized", sites))
    if only is not None:
        plan = [(name, train_on) for name, train_on in plan if name in only]
    for i, (name, train_on) in enumerate(plan, start=1):
        if name in done:
            continue
        start = time.perf_counter()
        if train_on is None:
            state = None
        else:
            pooled = SiteData(
                site=name,
                train=[e for d in train_on for e in d.train],
                eval=[],
                train_tokens=[t for d in train_on for t in d.train_tokens],
                eval_tokens=[],
                sha256="",
            )
            # Same compute as the federation: each site's steps per round, summed over
            # the sites trained on, times the number of rounds.
            steps = rounds * sum(steps_per_round(cfg.train, len(d.train_tokens)) for d in train_on)
            runtime.train_steps(initial, pooled, cfg.train, steps=steps, seed=cfg.run.seed + i)
            state = runtime.state()
        done[name] = _evaluate_all(runtime, state, sites, cfg)
        atomic_write_json(folder.baselines_path, done)
        say(
            f"baseline {i}/{len(plan)} {name}: field acc {done[name]['pooled']['metric']:.3f}  "
            f"eval loss {done[name]['pooled']['loss']:.3f}  {time.perf_counter() - start:.0f}s"
        )
    return done
