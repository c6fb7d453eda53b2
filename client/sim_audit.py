"""A simulated hospital's empirical privacy audit of each round's global adapter
(``[privacy_audit]``), run inside the hospital when it evaluates that adapter.

Membership: a seeded subset of its training records (the inserted canaries left out) against
as many held-out ones (the run's extra nonmembers, else its held-out split), scored with the
base model as reference. Canaries: the exposure of those inserted in its training records
and of the fresh ones. The result is appended to ``<run>/privacy-audit/<site>.jsonl`` on the
hospital's side; nothing of it goes into the reply.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import Context

from fedtune.client.site import Site
from fedtune.privacy.audit import from_scores, member_subset, record_scores
from fedtune.privacy.audit_data import SiteAudit, read_audit_data, results_path
from fedtune.privacy.canaries import canary_exposure, exposure_summary
from fedtune.progress import append_record
from fedtune.wire import RoundInstruction


def audit_round(site: Site, context: Context, state: dict[str, torch.Tensor], instruction: RoundInstruction) -> None:
    """Audit ``state`` (the global adapter of ``instruction``'s round as this hospital runs it)
    when the run asks for it (``privacy_audit.every``: this round, or the last).

    Simulated hospitals only: a real hospital runs ``fedtune client privacy-audit`` itself.
    """
    settings, server_round = site.cfg.privacy_audit, instruction.server_round
    if not settings.audits(server_round, instruction.num_rounds) or "hospital-config" in context.node_config:
        return
    run_dir = Path(str(context.run_config["run-dir"]))
    start = time.perf_counter()
    site.runtime.load(state, freeze_a=False)
    audit = read_audit_data(run_dir, site.data.site)
    record: dict[str, Any] = {"round": server_round, "site": site.data.site}
    if settings.membership:
        record["membership"] = _membership(site, audit, seed=site.cfg.run.seed + server_round)
    if audit.inserted:
        record["canaries"] = _canaries(site, audit, seed=site.cfg.run.seed + server_round)
    record["seconds"] = round(time.perf_counter() - start, 3)
    path = results_path(run_dir, site.data.site)
    path.parent.mkdir(parents=True, exist_ok=True)
    append_record(path, record)


def _membership(site: Site, audit: SiteAudit, *, seed: int) -> dict[str, Any]:
    """The audit's numbers, and each record's score (kept here: the run's report pools them)."""
    train = [e for e in site.data.train if not audit.is_canary(e)]
    nonmembers = audit.nonmembers or site.data.eval
    members = [train[i] for i in member_subset(len(nonmembers), len(train), seed=site.cfg.run.seed)]
    runtime, max_length = site.runtime, site.cfg.train.max_length
    kw: dict[str, Any] = {
        "pad_id": int(runtime.base.tokenizer.pad_token_id),
        "batch_size": site.cfg.eval.batch_size,
        "precision": site.cfg.model.precision,
    }
    scores = {
        "members": record_scores(runtime.model, runtime.tokenize(members, max_length), **kw),
        "nonmembers": record_scores(runtime.model, runtime.tokenize(nonmembers, max_length), **kw),
    }
    result = from_scores(scores["members"], scores["nonmembers"], seed=seed)
    return {**result.as_dict(), "scores": {k: [round(v, 6) for v in vs] for k, vs in scores.items()}}


def _canaries(site: Site, audit: SiteAudit, *, seed: int) -> dict[str, Any]:
    runtime, settings = site.runtime, site.cfg.privacy_audit
    kw: dict[str, Any] = {
        "tokenizer": runtime.base.tokenizer,
        "pad_id": int(runtime.base.tokenizer.pad_token_id),
        "max_length": site.cfg.train.max_length,
        "candidates": settings.canary_candidates,
        "precision": site.cfg.model.precision,
        "seed": seed,
    }
    inserted = canary_exposure(runtime.model, audit.inserted, **kw)
    fresh = canary_exposure(runtime.model, audit.fresh, **kw)
    return {
        "inserted": exposure_summary(inserted),
        "fresh": exposure_summary(fresh),
        "repeats": settings.canary_repeats,
        "candidates": settings.canary_candidates,
    }
