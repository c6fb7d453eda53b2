"""fedtune.data.partition: the deterministic train/eval split and the partitions of a simulation."""

from __future__ import annotations

import collections

import pytest

from fedtune.data.partition import partition, split_train_eval
from fedtune.data.records import Example
from fedtune.errors import ConfigError


def _examples(n: int, labels: str = "abcd") -> list[Example]:
    return [
        Example.from_instruction("Label it.", f"note {i}", labels[i % len(labels)], site=f"s{i % 3}") for i in range(n)
    ]


def test_split_train_eval() -> None:
    examples = _examples(20)
    train, held = split_train_eval(examples, eval_fraction=0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(train + held, key=examples.index) == examples
    assert (train, held) == split_train_eval(examples, eval_fraction=0.25, seed=3)
    assert held != split_train_eval(examples, eval_fraction=0.25, seed=4)[1]
    assert [len(p) for p in split_train_eval(examples[:2], eval_fraction=0.01, seed=0)] == [1, 1]
    assert [len(p) for p in split_train_eval(examples[:3], eval_fraction=0.99, seed=0)] == [1, 2]
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ConfigError, match=r"`data.eval_fraction` must be in \(0, 1\)"):
            split_train_eval(examples, eval_fraction=bad, seed=0)


def _sites() -> dict[str, list[Example]]:
    examples = _examples(120)
    return {s: [e for e in examples if e.site == s] for s in ("s0", "s1", "s2")}


def _assert_covers(out: dict[str, list[Example]], sites: dict[str, list[Example]]) -> None:
    assigned = [e.messages for exs in out.values() for e in exs]
    assert collections.Counter(assigned) == collections.Counter(e.messages for v in sites.values() for e in v)
    assert all(exs for exs in out.values())
    assert all(e.site == name for name, exs in out.items() for e in exs)


def test_partition_natural_and_iid() -> None:
    sites = _sites()
    assert partition(sites, scheme="natural", num_sites=3, seed=0) == sites
    with pytest.raises(ConfigError, match=r"`data.hospitals` must equal the number of sites \(3\)"):
        partition(sites, scheme="natural", num_sites=4, seed=0)
    out = partition(sites, scheme="iid", num_sites=7, seed=1)
    assert list(out) == [f"site-{k}" for k in range(7)]
    _assert_covers(out, sites)
    assert {len(v) for v in out.values()} <= {17, 18}
    assert out == partition(sites, scheme="iid", num_sites=7, seed=1)
    assert out != partition(sites, scheme="iid", num_sites=7, seed=2)
    with pytest.raises(ConfigError, match=r"`data.hospitals` must be between 1 and the number of records"):
        partition(sites, scheme="iid", num_sites=121, seed=0)


def test_partition_dirichlet_is_skewed_and_complete() -> None:
    sites = _sites()
    label = lambda e: e.target  # noqa: E731
    out = partition(sites, scheme="dirichlet", num_sites=4, seed=0, alpha=0.1, label_fn=label)
    _assert_covers(out, sites)
    assert out == partition(sites, scheme="dirichlet", num_sites=4, seed=0, alpha=0.1, label_fn=label)
    mixes = [collections.Counter(label(e) for e in exs) for exs in out.values()]
    top_shares = [max(m.values()) / sum(m.values()) for m in mixes]
    assert max(top_shares) > 0.6  # pooled data is 25% per label; small alpha concentrates it
    assert len({m.most_common(1)[0][0] for m in mixes}) > 1
    many = partition(sites, scheme="dirichlet", num_sites=40, seed=5, alpha=0.01, label_fn=label)
    _assert_covers(many, sites)  # every one of 40 sites still gets a record
    with pytest.raises(ConfigError, match=r"`data.partition` 'dirichlet' needs a label function"):
        partition(sites, scheme="dirichlet", num_sites=3, seed=0)
    with pytest.raises(ConfigError, match=r"`data.partition` must be one of natural, iid, dirichlet, got 'zipf'"):
        partition(sites, scheme="zipf", num_sites=3, seed=0)
