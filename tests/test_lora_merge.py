"""LoRA merge rules against the exact weighted mean of the sites' B·A: `ffa` and `svd`
reproduce it (svd up to its rank), `fedavg` does not, and the test says by how much."""

from __future__ import annotations

import pytest
import torch

from fedtune.errors import UpdateRejected
from fedtune.lora_merge import factorise, merge_fedavg, merge_ffa, merge_svd, product_mean, products

MODULES = ("layers.0.q_proj", "layers.0.v_proj", "layers.1.q_proj")
OUT, IN = 24, 32


def _site(rank: int, seed: int, *, a: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = a[m] if a else torch.randn(rank, IN, generator=g, dtype=torch.float64)
        state[f"{m}.lora_B.weight"] = torch.randn(OUT, rank, generator=g, dtype=torch.float64)
    return state


def _rel_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[m] - want[m]).norm() ** 2) for m in want)
    den = sum(float(want[m].norm() ** 2) for m in want)
    return (num / den) ** 0.5


WEIGHTS = [160.0, 90.0, 40.0]


def test_ffa_is_exact_and_fedavg_is_not() -> None:
    g = torch.Generator().manual_seed(99)
    shared = {m: torch.randn(8, IN, generator=g, dtype=torch.float64) for m in MODULES}
    sites = [_site(8, s, a=shared) for s in (1, 2, 3)]
    target = product_mean(sites, WEIGHTS)
    assert _rel_error(products(merge_ffa(sites, WEIGHTS)), target) < 1e-12
    # with A frozen and shared, fedavg is ffa: its error comes from averaging A too
    free = [_site(8, s) for s in (1, 2, 3)]
    gap = _rel_error(products(merge_fedavg(free, WEIGHTS)), product_mean(free, WEIGHTS))
    assert gap > 0.5  # on independent random factors mean(B)·mean(A) is far from mean(B·A)


def test_ffa_refuses_sites_whose_a_differ() -> None:
    with pytest.raises(UpdateRejected, match="needs A frozen and shared"):
        merge_ffa([_site(8, 1), _site(8, 2)], [1.0, 1.0])


def test_svd_is_exact_up_to_its_rank_and_optimal_below_it() -> None:
    sites = [_site(4, s) for s in (1, 2, 3)]  # the mean of three rank-4 products has rank <= 12
    target = product_mean(sites, WEIGHTS)
    exact = merge_svd(sites, WEIGHTS, rank=12)
    assert _rel_error(products(exact), target) < 1e-10
    low = products(merge_svd(sites, WEIGHTS, rank=4))
    for m in MODULES:  # Eckart-Young: the error is exactly the discarded singular values
        s = torch.linalg.svdvals(target[m])
        assert float((low[m] - target[m]).norm()) == pytest.approx(float(s[4:].norm()), rel=1e-9)
    fedavg = _rel_error(products(merge_fedavg(sites, WEIGHTS)), target)
    assert _rel_error(low, target) < fedavg  # even truncated to the sites' rank, svd beats fedavg


def test_svd_merges_mixed_ranks_and_hands_each_site_its_own() -> None:
    sites = [_site(4, 1), _site(8, 2), _site(16, 3)]
    target = product_mean(sites, WEIGHTS)
    merged = merge_svd(sites, WEIGHTS, rank=28, like=sites[2])
    assert _rel_error(products(merged), target) < 1e-10
    with pytest.raises(UpdateRejected):
        merge_fedavg(sites, WEIGHTS)  # separate means cannot even be formed
    for site in sites:
        rank = site[f"{MODULES[0]}.lora_A.weight"].shape[0]
        own = merge_svd(sites, WEIGHTS, rank=rank, like=site)
        assert all(own[k].shape == site[k].shape for k in site)


def test_factorise_pads_a_product_of_lower_rank() -> None:
    g = torch.Generator().manual_seed(5)
    product = torch.randn(OUT, 2, generator=g, dtype=torch.float64) @ torch.randn(
        2, IN, generator=g, dtype=torch.float64
    )
    b, a = factorise(product, 40)  # more than min(OUT, IN): zero directions fill the rest
    assert b.shape == (OUT, 40) and a.shape == (40, IN)
    assert torch.allclose(b @ a, product, atol=1e-10)
