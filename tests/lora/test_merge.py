"""LoRA merge rules against the exact weighted mean of the sites' effective updates
(alpha / r) * B·A, through the same reply -> update -> apply path the coordinator runs:
`ffa` and `svd` reproduce it (svd up to its rank), `fedavg` does not, and the test says
by how much."""

from __future__ import annotations

import pytest
import torch

from fedtune.errors import ModelMismatchError, UpdateRejected
from fedtune.lora.merge import effective, effective_mean, factorise, make_rule, merge, rank_of

MODULES = ("layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj")
OUT, IN = 24, 32
ALPHA = 16.0
WEIGHTS = [160.0, 90.0, 40.0]


def _adapter(rank: int, seed: int, *, a: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = a[m].clone() if a else torch.randn(rank, IN, generator=g) / IN**0.5
        state[f"{m}.lora_B.weight"] = torch.randn(OUT, rank, generator=g) * 0.1
    return state


def _rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[m] - want[m]).norm() ** 2) for m in want)
    den = sum(float(want[m].norm() ** 2) for m in want)
    return (num / den) ** 0.5


def test_ffa_is_exact_and_fedavg_is_not() -> None:
    glob = _adapter(8, 0)
    shared = {m: glob[f"{m}.lora_A.weight"] for m in MODULES}
    sites = [_adapter(8, s, a=shared) for s in (1, 2, 3)]  # ffa: only B moved
    target = effective_mean(sites, WEIGHTS, alpha=ALPHA)
    merged = merge(make_rule("ffa", alpha=ALPHA, rank=8), glob, sites, WEIGHTS)
    assert _rel_error(effective(merged, alpha=ALPHA), target) < 1e-6  # float32 tensors
    assert all(torch.equal(merged[f"{m}.lora_A.weight"], glob[f"{m}.lora_A.weight"]) for m in MODULES)
    # sites that trained A too: separate means of A and B are far from the mean of B·A
    free = [_adapter(8, s) for s in (1, 2, 3)]
    fedavg = merge(make_rule("fedavg", alpha=ALPHA, rank=8), glob, free, WEIGHTS)
    gap = _rel_error(effective(fedavg, alpha=ALPHA), effective_mean(free, WEIGHTS, alpha=ALPHA))
    assert gap > 0.5, gap  # on independent random factors: over half the target's norm


def test_ffa_sends_only_b_and_checks_against_b() -> None:
    rule = make_rule("ffa", alpha=ALPHA, rank=8)
    glob = _adapter(8, 0)
    trained = {k: v + 1.0 for k, v in glob.items()}
    sent = rule.reply(trained, glob)
    assert sent and all(".lora_B." in k for k in sent)
    rule.check(sent, glob)
    with pytest.raises(UpdateRejected, match="keys differ"):
        rule.check(make_rule("fedavg", alpha=ALPHA, rank=8).reply(trained, glob), glob)


def test_svd_is_exact_up_to_its_rank_and_optimal_below_it() -> None:
    sites = [_adapter(4, s) for s in (1, 2, 3)]  # the mean of three rank-4 updates has rank <= 12
    target = effective_mean(sites, WEIGHTS, alpha=ALPHA)
    exact = merge(make_rule("svd", alpha=ALPHA, rank=12), _adapter(12, 0), sites, WEIGHTS)
    assert rank_of(exact) == 12
    assert _rel_error(effective(exact, alpha=ALPHA), target) < 1e-6
    low = effective(merge(make_rule("svd", alpha=ALPHA, rank=4), _adapter(4, 0), sites, WEIGHTS), alpha=ALPHA)
    for m in MODULES:  # Eckart-Young: the error is exactly the discarded singular values
        s = torch.linalg.svdvals(target[m])
        assert float((low[m] - target[m]).norm()) == pytest.approx(float(s[4:].norm()), rel=1e-4)
    fedavg = merge(make_rule("fedavg", alpha=ALPHA, rank=4), _adapter(4, 0), sites, WEIGHTS)
    assert _rel_error(low, target) < _rel_error(effective(fedavg, alpha=ALPHA), target)


def test_svd_merges_mixed_ranks_and_hands_each_site_its_own() -> None:
    sites = [_adapter(4, 1), _adapter(8, 2), _adapter(16, 3)]  # different ranks, different scalings
    rule = make_rule("svd", alpha=ALPHA, rank=28)
    merged = merge(rule, _adapter(28, 0), sites, WEIGHTS)
    target = effective_mean(sites, WEIGHTS, alpha=ALPHA)
    assert _rel_error(effective(merged, alpha=ALPHA), target) < 1e-6
    with pytest.raises(ModelMismatchError, match="only `federation.strategy` = 'svd'"):
        make_rule("fedavg", alpha=ALPHA, rank=28).local_start(merged, rank=4)
    for rank in (4, 8, 16):
        own = rule.local_start(merged, rank=rank)
        assert rank_of(own) == rank and set(own) == set(merged)
        got = effective(own, alpha=ALPHA)
        for m in MODULES:  # each site starts from the best rank-r approximation of the global update
            s = torch.linalg.svdvals(target[m])
            assert float((got[m] - target[m]).norm()) == pytest.approx(float(s[rank:].norm()), rel=1e-3, abs=1e-6)


def test_svd_checks_a_reply_of_any_rank_but_not_a_malformed_one() -> None:
    rule = make_rule("svd", alpha=ALPHA, rank=8)
    glob = _adapter(8, 0)
    rule.check(_adapter(4, 1), glob)
    rule.check(_adapter(16, 1), glob)
    mixed = {
        **_adapter(4, 1),
        f"{MODULES[0]}.lora_A.weight": torch.zeros(8, IN),
        f"{MODULES[0]}.lora_B.weight": torch.zeros(OUT, 8),
    }
    with pytest.raises(UpdateRejected, match="different ranks"):
        rule.check(mixed, glob)
    bad = _adapter(4, 1)
    bad[f"{MODULES[1]}.lora_B.weight"][0, 0] = float("nan")
    with pytest.raises(UpdateRejected, match="not finite"):
        rule.check(bad, glob)
    with pytest.raises(UpdateRejected, match="above what"):
        rule.check(_adapter(30, 1), glob)


def test_factorise_fills_unused_directions_so_they_can_learn() -> None:
    g = torch.Generator().manual_seed(5)
    product = torch.randn(OUT, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, IN, generator=g, dtype=torch.float64
    )
    b, a = factorise(product, 6, module="m", seed=1)
    assert b.shape == (OUT, 6) and a.shape == (6, IN)
    assert torch.allclose(b @ a, product, atol=1e-10)
    assert torch.all(b[:, 2:] == 0) and torch.all(a[2:].abs().sum(dim=1) > 0)  # B = 0, A random: trainable
    zero_b, zero_a = factorise(torch.zeros(OUT, IN), 4, module="m", seed=1)  # round 1: nothing learnt yet
    assert torch.all(zero_b == 0) and torch.equal(zero_a, factorise(torch.zeros(OUT, IN), 4, module="m", seed=1)[1])


def test_factorise_of_a_large_matrix_is_exact_within_its_basis_and_near_optimal_beyond() -> None:
    g = torch.Generator().manual_seed(7)
    low = torch.randn(200, 20, generator=g, dtype=torch.float64) @ torch.randn(
        20, 300, generator=g, dtype=torch.float64
    )
    b, a = factorise(low, 4, module="m")  # basis of 4 + 16 columns: the randomized path, rank 20 fits
    s = torch.linalg.svdvals(low)
    assert float((b @ a - low).norm()) == pytest.approx(float(s[4:].norm()), rel=1e-9)
    dense = torch.randn(200, 300, generator=g, dtype=torch.float64)  # full rank: near the best rank-4 error
    b, a = factorise(dense, 4, module="m")
    assert float((b @ a - dense).norm()) <= 1.02 * float(torch.linalg.svdvals(dense)[4:].norm())


def test_fedavg_error_grows_with_how_far_the_sites_drift_apart() -> None:
    """Sites = the global adapter moved by `spread` x random noise in A and B (more non-IID
    data, more DP noise: larger spread). fedavg's relative error against the exact mean of
    the effective updates grows with the spread; svd at the sites' combined rank stays exact."""
    glob = _adapter(4, 0)
    gaps = []
    for spread in (0.01, 0.1, 1.0):
        g = torch.Generator().manual_seed(1)
        sites = [
            {k: v + spread * torch.randn(v.shape, generator=g) * v.std() for k, v in glob.items()} for _ in range(3)
        ]
        target = effective_mean(sites, WEIGHTS, alpha=ALPHA)
        fedavg = effective(merge(make_rule("fedavg", alpha=ALPHA, rank=4), glob, sites, WEIGHTS), alpha=ALPHA)
        svd = effective(merge(make_rule("svd", alpha=ALPHA, rank=12), _adapter(12, 0), sites, WEIGHTS), alpha=ALPHA)
        gaps.append(_rel_error(fedavg, target))
        assert _rel_error(svd, target) < 1e-5
    # measured: 4.6e-5, 4.6e-3, 0.30 of the target's norm: quadratic in the spread
    assert gaps[0] < 1e-4 and 1e-3 < gaps[1] < 1e-2 and gaps[2] > 0.2, gaps
