"""The factored `svd` merge against the dense computation it replaces: on random factors of
mixed ranks (4, 8, 16) the next global adapter is the same (with and without the server
step that stays factored), the update's norm is the dense norm, the received tensors are
referenced and not copied, and the paths that need dense matrices get them or are refused
above `federation.svd_dense_limit_mb`."""

from __future__ import annotations

import pytest
import torch

from fedtune.config import load_config
from fedtune.errors import ConfigError
from fedtune.lora.aggregate import coordinate_median, weighted_mean
from fedtune.lora.delta import l2_norm
from fedtune.lora.factored import Factored, mean, update_norm
from fedtune.lora.merge import effective, make_rule
from fedtune.lora.optimizers import make_server_optimizer
from fedtune.server.merging import Combine, Merge

MODULES = ("layers.0.q_proj", "layers.0.down_proj", "layers.1.q_proj")
SHAPES = {"layers.0.q_proj": (40, 56), "layers.0.down_proj": (56, 40), "layers.1.q_proj": (40, 56)}
ALPHA = 16.0
WEIGHTS = [160.0, 90.0, 40.0]
RANKS = (4, 8, 16)


def _adapter(rank: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in MODULES:
        out, inp = SHAPES[m]
        state[f"{m}.lora_A.weight"] = torch.randn(rank, inp, generator=g) / inp**0.5
        state[f"{m}.lora_B.weight"] = torch.randn(out, rank, generator=g) * 0.1
    return state


def _dense_updates(
    glob: dict[str, torch.Tensor], sites: list[dict[str, torch.Tensor]]
) -> list[dict[str, torch.Tensor]]:
    """What the dense code computed: each site's effective update minus the global's, out x in."""
    now = effective(glob, alpha=ALPHA)
    return [{m: v - now[m] for m, v in effective(s, alpha=ALPHA).items()} for s in sites]


def _best(target: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(target, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _rel(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[m] - want[m]).norm() ** 2) for m in want)
    return (num / sum(float(want[m].norm() ** 2) for m in want)) ** 0.5


@pytest.mark.parametrize(("rank", "lr"), [(16, 1.0), (32, 1.0), (16, 0.5), (32, 0.5)])
def test_factored_svd_equals_the_dense_computation_on_mixed_ranks(rank: int, lr: float) -> None:
    """rank 16: below the target's rank 28 (Eckart-Young truncation); 32: above it (exact,
    with 4 unused directions); lr 0.5: the plain server step, which stays factored (the
    target then keeps half the global's update too: rank up to 28 + rank)."""
    glob = _adapter(rank, 0)
    sites = [_adapter(r, 10 + r) for r in RANKS]
    merge = Merge(rule=make_rule("svd", alpha=ALPHA, rank=rank, seed=3), optimizer=make_server_optimizer("none", lr=lr))
    combined, _ = merge.combined(merge.rule.updates(glob, sites), WEIGHTS)
    assert isinstance(combined, Factored)
    factored = merge.step(glob, combined)
    # the dense computation, independently: the global's effective update plus lr x the mean change
    now = effective(glob, alpha=ALPHA)
    step = weighted_mean(_dense_updates(glob, sites), WEIGHTS)
    want = {m: _best(now[m] + lr * step[m], rank) for m in MODULES}
    assert _rel(effective(factored, alpha=ALPHA), want) < 1e-5
    dense = merge.rule.apply(glob, {m: lr * v for m, v in step.items()})  # the dense path, kept for dense steps
    assert _rel(effective(dense, alpha=ALPHA), want) < 1e-5
    if rank == 32 and lr == 1.0:  # target rank 28: the other 4 directions get B = 0 and the dense path's A rows
        for m in MODULES:
            a, b = f"{m}.lora_A.weight", f"{m}.lora_B.weight"
            assert torch.all(factored[b][:, 28:] == 0) and torch.equal(factored[a][28:], dense[a][28:])
            assert torch.all(factored[b][:, :28].norm(dim=0) > 0)


def test_an_update_refers_to_the_received_factors_and_the_mean_counts_the_global_once() -> None:
    glob = _adapter(16, 0)
    sites = [_adapter(r, 10 + r) for r in RANKS]
    rule = make_rule("svd", alpha=ALPHA, rank=16)
    updates = rule.updates(glob, sites)
    m = MODULES[0]
    first = updates[0]
    assert isinstance(first, Factored)
    terms = first.parts[m].terms
    assert terms[0].b is sites[0][f"{m}.lora_B.weight"] and terms[1].a is glob[f"{m}.lora_A.weight"]
    assert (terms[0].coef, terms[1].coef) == (ALPHA / 4, -ALPHA / 16)
    combined = mean(updates, WEIGHTS)
    assert isinstance(combined, Factored)
    b, a = combined.parts[m].stacked()
    assert b.shape == (40, 4 + 8 + 16 + 16) and a.shape == (4 + 8 + 16 + 16, 56)  # sum of ranks + the global's
    (glob_term,) = [t for t in combined.parts[m].terms if t.b is glob[f"{m}.lora_B.weight"]]
    assert glob_term.coef == pytest.approx(-ALPHA / 16)  # sum of the weights (1) x alpha / r
    assert combined.dense_bytes() == 8 * (40 * 56 * 2 + 56 * 40)


def test_the_factored_norm_is_the_dense_norm() -> None:
    glob = _adapter(8, 0)
    sites = [_adapter(r, 10 + r) for r in RANKS]
    for factored, dense in zip(
        make_rule("svd", alpha=ALPHA, rank=8).updates(glob, sites), _dense_updates(glob, sites), strict=True
    ):
        assert update_norm(factored) == pytest.approx(l2_norm(dense), rel=1e-9)
    same = make_rule("svd", alpha=ALPHA, rank=8).updates(glob, [glob])[0]  # the global sent back: no change
    assert update_norm(same) == pytest.approx(0.0, abs=1e-12)


def test_robust_combines_and_adam_moments_get_dense_updates() -> None:
    glob = _adapter(8, 0)
    sites = [_adapter(r, 10 + r) for r in RANKS]
    rule = make_rule("svd", alpha=ALPHA, rank=8)
    median = Merge(rule=rule, combine=Combine("median"))
    combined, _ = median.combined(rule.updates(glob, sites), WEIGHTS)
    want = coordinate_median(_dense_updates(glob, sites))
    assert not isinstance(combined, Factored)
    assert all(torch.allclose(combined[m], want[m], atol=1e-12) for m in MODULES)
    adam = Merge(rule=rule, optimizer=make_server_optimizer("fedadam", lr=0.01))
    mean_update, _ = adam.combined(rule.updates(glob, sites), WEIGHTS)
    assert isinstance(mean_update, Factored)  # the mean itself stays factored
    stepped = adam.step(glob, mean_update)  # densified for the moments
    assert set(stepped) == set(glob)
    assert {k: tuple(v.shape) for k, v in adam.optimizer.state_dict().items() if k.startswith("m/")} == {
        f"m/{m}": SHAPES[m] for m in MODULES
    }


def test_a_dense_path_over_the_limit_is_refused_in_one_line_and_a_factored_one_is_not() -> None:
    glob = _adapter(8, 0)
    sites = [_adapter(r, 10 + r) for r in RANKS]
    rule = make_rule("svd", alpha=ALPHA, rank=8)
    tiny = 0.001  # MiB: below this adapter's 52.5 KiB of dense float64
    for merge, why in [
        (
            Merge(rule=rule, combine=Combine("trimmed_mean"), dense_limit_mb=tiny),
            "`federation.aggregation` = 'trimmed_mean'",
        ),
        (Merge(rule=rule, optimizer=make_server_optimizer("fedavgm", lr=1.0), dense_limit_mb=tiny), "'fedavgm'"),
    ]:
        with pytest.raises(ConfigError) as err:
            merge.require_fits(glob)
        message = str(err.value)
        assert "\n" not in message and why in message and "`federation.svd_dense_limit_mb` = 0.001" in message
        assert "server_optimizer 'none'" in message
        with pytest.raises(ConfigError, match="svd_dense_limit_mb"):  # and where it would densify
            merge.step(glob, merge.combined(rule.updates(glob, sites), WEIGHTS)[0])
    factored = Merge(rule=rule, dense_limit_mb=tiny)
    factored.require_fits(glob)  # mean + plain step: nothing dense, nothing to refuse
    assert set(factored.step(glob, factored.combined(rule.updates(glob, sites), WEIGHTS)[0])) == set(glob)
    Merge(rule=make_rule("fedavg", alpha=ALPHA, rank=8), combine=Combine("median"), dense_limit_mb=tiny).require_fits(
        glob
    )
    with pytest.raises(ConfigError, match=r"`federation.svd_dense_limit_mb` must be positive \(MiB\), got 0"):
        load_config(None, {"federation.svd_dense_limit_mb": 0})
    assert Merge.from_config(load_config(None, {"federation.svd_dense_limit_mb": 3.5})).dense_limit_mb == 3.5


def test_factored_updates_go_only_where_they_are_understood() -> None:
    glob = _adapter(8, 0)
    update = make_rule("svd", alpha=ALPHA, rank=8).updates(glob, [_adapter(4, 1)])[0]
    with pytest.raises(TypeError, match="plain deltas"):
        make_rule("fedavg", alpha=ALPHA, rank=8).apply(glob, update)
    with pytest.raises(TypeError, match="densify"):
        make_server_optimizer("fedyogi", lr=0.01).step(update)
    with pytest.raises(TypeError, match="mixed"):
        mean([update, {"x": torch.zeros(1)}], [1.0, 1.0])
    scaled = make_server_optimizer("none", lr=0.25).step(update)
    assert isinstance(scaled, Factored) and update_norm(scaled) == pytest.approx(0.25 * update_norm(update))
