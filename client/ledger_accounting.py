"""The privacy ledger's questions, answered from its content: epsilon per record, per dataset.

Epsilon is per record, over everything ever released: a record's spend composes every
release of every dataset that contains it, and a dataset's epsilon is that of its worst
record. Records that sit in the same datasets share one history, so a dataset has as many
distinct histories as overlap patterns, and each is composed again on every question
(Opacus's accountants).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedtune.client.ledger_format import release_mechanism
from fedtune.privacy.accounting import Mechanism, epsilon_spent

Datasets = dict[str, dict[str, Any]]  # dataset id -> label, records, registered, releases


def record_histories(
    datasets: Datasets, dataset: str, digests: Callable[[str], frozenset[bytes]]
) -> list[list[Mechanism]]:
    """The distinct release histories the records of ``dataset`` have (one per overlap pattern)."""
    own = [release_mechanism(r) for r in datasets[dataset]["releases"]]
    others = [(d, info) for d, info in datasets.items() if d != dataset and info["releases"]]
    if not others:
        return [own]
    sets = [(d, digests(d)) for d, _ in others]
    patterns = {frozenset(d for d, s in sets if r in s) for r in digests(dataset)}
    return [own + [release_mechanism(r) for d in sorted(p) for r in datasets[d]["releases"]] for p in patterns]


def worst_epsilon(
    histories: list[list[Mechanism]], *, delta: float, accountant: str, extra: Mechanism | None = None
) -> float:
    """Epsilon at ``delta`` of the worst of ``histories``, each followed by ``extra`` when given."""
    added = [extra] if extra is not None else []
    return max(epsilon_spent(h + added, delta=delta, accountant=accountant) for h in histories)


def report_rows(
    datasets: Datasets, worst: Callable[[str], float], *, budget_epsilon: float, delta: float, accountant: str
) -> list[dict[str, Any]]:
    """One row per dataset, oldest first: label, records, releases, rounds, runs, own and per-record epsilon,
    remaining; ``worst`` gives a dataset's per-record epsilon."""
    rows = []
    for ds, info in sorted(datasets.items(), key=lambda kv: kv[1]["registered"]):
        releases = info["releases"]
        own = epsilon_spent([release_mechanism(r) for r in releases], delta=delta, accountant=accountant)
        eps = worst(ds)
        rows.append(
            {
                "dataset": ds,
                "label": info["label"],
                "records": info["records"],
                "releases": len(releases),
                "rounds": len({(r["run_id"], r["server_round"]) for r in releases}),
                "runs": len({r["run_id"] for r in releases}),
                "own epsilon": own,
                "epsilon": eps,
                "delta": delta,
                "budget": budget_epsilon,
                "remaining": max(budget_epsilon - eps, 0.0),
                "last release": releases[-1]["time"] if releases else "",
            }
        )
    return rows
