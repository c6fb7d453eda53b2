"""Which records each site holds: the train/eval split and the partitions of a simulation.

The partitions (``data.partition``) are a registry, :data:`PARTITIONS`, name -> function;
``config.PARTITIONS`` is tested equal to its names.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

import numpy as np

from fedtune.data.records import Example
from fedtune.errors import ConfigError


def split_train_eval(
    examples: Sequence[Example], *, eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split deterministically into (train, eval), both in the input's order.

    Eval gets ``round(n * eval_fraction)`` records, at least 1 and at most n - 1 when n >= 2.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"`data.eval_fraction` must be in (0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1) if n >= 2 else 0
    chosen = set(random.Random(seed).sample(range(n), n_eval))
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    return train, [ex for i, ex in enumerate(examples) if i in chosen]


class Scheme(Protocol):
    """A partition: the records per site as collected -> the records per simulated site."""

    def __call__(
        self,
        sites: Mapping[str, Sequence[Example]],
        *,
        num_sites: int,
        seed: int,
        alpha: float,
        label_fn: Callable[[Example], str] | None,
    ) -> dict[str, list[Example]]: ...


def partition(
    sites: Mapping[str, Sequence[Example]],
    *,
    scheme: str,
    num_sites: int,
    seed: int,
    alpha: float = 0.5,
    label_fn: Callable[[Example], str] | None = None,
) -> dict[str, list[Example]]:
    """Assign records to sites; every record goes to exactly one site.

    Parameters
    ----------
    sites : records per site as collected (the natural split).
    scheme : ``natural`` (keep ``sites``), ``iid`` (pool, shuffle, deal) or ``dirichlet``
        (pool; each label's records split by proportions ~ Dir(alpha), skewed for small alpha).
    num_sites : how many sites to produce; named ``site-0`` ... for ``iid`` and ``dirichlet``.
    label_fn : the label of a record, required by ``dirichlet``.

    Returns examples re-tagged with the site id they were assigned to.
    """
    if scheme not in PARTITIONS:
        raise ConfigError(f"`data.partition` must be one of {', '.join(PARTITIONS)}, got {scheme!r}")
    return PARTITIONS[scheme](sites, num_sites=num_sites, seed=seed, alpha=alpha, label_fn=label_fn)


def _natural(
    sites: Mapping[str, Sequence[Example]],
    *,
    num_sites: int,
    seed: int,
    alpha: float,
    label_fn: Callable[[Example], str] | None,
) -> dict[str, list[Example]]:
    """Keep the sites as collected."""
    if num_sites != len(sites):
        raise ConfigError(
            f"`data.hospitals` must equal the number of sites ({len(sites)}) with the "
            f"natural partition, got {num_sites}"
        )
    return {name: [_tag(ex, name) for ex in exs] for name, exs in sites.items()}


def _iid(
    sites: Mapping[str, Sequence[Example]],
    *,
    num_sites: int,
    seed: int,
    alpha: float,
    label_fn: Callable[[Example], str] | None,
) -> dict[str, list[Example]]:
    """Pool, shuffle, deal."""
    pool = _pool(sites, num_sites, "iid")
    order = np.random.default_rng(seed).permutation(len(pool))
    return _deal(pool, [sorted(order[k::num_sites].tolist()) for k in range(num_sites)])


def _dirichlet(
    sites: Mapping[str, Sequence[Example]],
    *,
    num_sites: int,
    seed: int,
    alpha: float,
    label_fn: Callable[[Example], str] | None,
) -> dict[str, list[Example]]:
    """Pool; each label's records split by proportions ~ Dir(alpha), skewed for small alpha."""
    pool = _pool(sites, num_sites, "dirichlet")
    return _deal(pool, _dirichlet_groups(pool, num_sites, seed=seed, alpha=alpha, label_fn=label_fn))


# The registry of partitions (``data.partition``): config.PARTITIONS is tested equal to its names.
PARTITIONS: dict[str, Scheme] = {"natural": _natural, "iid": _iid, "dirichlet": _dirichlet}


def _pool(sites: Mapping[str, Sequence[Example]], num_sites: int, scheme: str) -> list[Example]:
    pool = [ex for exs in sites.values() for ex in exs]
    if num_sites < 1 or num_sites > len(pool):
        raise ConfigError(
            f"`data.hospitals` must be between 1 and the number of records ({len(pool)}) "
            f"with the {scheme} partition, got {num_sites}"
        )
    return pool


def _deal(pool: Sequence[Example], groups: Sequence[Sequence[int]]) -> dict[str, list[Example]]:
    """Group k's records (indices into ``pool``) become site ``site-k``'s."""
    names = [f"site-{k}" for k in range(len(groups))]
    return {n: [_tag(pool[i], n) for i in group] for n, group in zip(names, groups, strict=True)}


def _tag(example: Example, site: str) -> Example:
    return example if example.site == site else dataclasses.replace(example, site=site)


def _dirichlet_groups(
    pool: Sequence[Example],
    num_sites: int,
    *,
    seed: int,
    alpha: float,
    label_fn: Callable[[Example], str] | None,
) -> list[list[int]]:
    if label_fn is None:
        raise ConfigError("`data.partition` 'dirichlet' needs a label function; pass `label_fn`")
    if alpha <= 0:
        raise ConfigError(f"`data.dirichlet_alpha` must be positive, got {alpha}")
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(pool):
        by_label.setdefault(label_fn(ex), []).append(i)
    groups: list[list[int]] = [[] for _ in range(num_sites)]
    for label in sorted(by_label):  # sorted: dict order must not change the draw
        idx = rng.permutation(by_label[label])
        # cut points at the cumulative proportions: n=10, p=(.5,.3,.2) -> cuts at 5 and 8
        cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha)))[:-1] * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            groups[k].extend(part.tolist())
    for k in range(num_sites):  # every site needs a record: take one from the largest site
        if not groups[k]:
            largest = max(range(num_sites), key=lambda j: len(groups[j]))
            groups[k].append(groups[largest].pop())
    return [sorted(g) for g in groups]
