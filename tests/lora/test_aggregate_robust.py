"""Coordinate-wise robust merges (trimmed mean, median) against NumPy references by
sorting, and their point: one wildly scaled update does not drag them away."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedtune.lora.aggregate import coordinate_median, trimmed_mean, weighted_mean

SHAPES = {"a.lora_A.weight": (4, 6), "a.lora_B.weight": (6, 4), "b.bias": (5,)}


def _updates(n: int, seed: int, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [{k: torch.from_numpy(rng.normal(size=s)).to(dtype) for k, s in SHAPES.items()} for _ in range(n)]


def _stack(updates: list[dict[str, torch.Tensor]], key: str) -> np.ndarray:
    return np.stack([u[key].numpy().astype(np.float64) for u in updates])


@pytest.mark.parametrize(("n", "fraction"), [(1, 0.0), (3, 0.2), (5, 0.2), (6, 0.34), (7, 0.3), (10, 0.45)])
def test_trimmed_mean_matches_numpy(n: int, fraction: float) -> None:
    updates = _updates(n, seed=n)
    merged = trimmed_mean(updates, trim_fraction=fraction)
    assert list(merged) == sorted(SHAPES)
    k = math.floor(fraction * n)
    for key in SHAPES:
        want = np.sort(_stack(updates, key), axis=0)[k : n - k].mean(axis=0)
        assert merged[key].dtype == torch.float32
        np.testing.assert_allclose(merged[key].numpy(), want, rtol=1e-6, atol=1e-6)


def test_trimmed_mean_with_fraction_zero_is_the_plain_mean() -> None:
    updates = _updates(4, seed=11, dtype=torch.float64)
    plain = weighted_mean(updates, [1.0] * 4)
    merged = trimmed_mean(updates, trim_fraction=0.0)
    for key in SHAPES:
        torch.testing.assert_close(merged[key], plain[key], rtol=1e-12, atol=1e-12)


def test_trim_count_is_not_lost_to_rounding() -> None:
    """0.29 * 100 is 28.999999999999996 in floating point; 29 values are trimmed at each end."""
    values = [{"x": torch.tensor([float(i)], dtype=torch.float64)} for i in range(100)]
    assert float(trimmed_mean(values, trim_fraction=0.29)["x"]) == pytest.approx(np.mean(np.arange(29, 71)))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8])
def test_median_matches_numpy(n: int) -> None:
    updates = _updates(n, seed=20 + n)
    merged = coordinate_median(updates)
    assert list(merged) == sorted(SHAPES)
    for key in SHAPES:
        assert merged[key].dtype == torch.float32
        np.testing.assert_allclose(merged[key].numpy(), np.median(_stack(updates, key), axis=0), rtol=1e-6, atol=1e-6)


def test_median_of_even_count_is_the_true_median_not_the_lower() -> None:
    values = [{"x": torch.tensor([v])} for v in (4.0, 1.0, 3.0, 2.0)]
    assert float(coordinate_median(values)["x"]) == 2.5  # torch.median would give 2.0


def test_one_huge_update_does_not_move_the_robust_rules() -> None:
    honest = _updates(4, seed=30, dtype=torch.float64)
    attacker = {k: v * 1e6 for k, v in _updates(1, seed=31, dtype=torch.float64)[0].items()}
    updates = [*honest[:2], attacker, *honest[2:]]
    mean = weighted_mean(updates, [1.0] * 5)
    for merged in (trimmed_mean(updates, trim_fraction=0.2), coordinate_median(updates)):
        for key in SHAPES:
            low, high = _stack(honest, key).min(axis=0), _stack(honest, key).max(axis=0)
            assert np.all(merged[key].numpy() >= low) and np.all(merged[key].numpy() <= high)
    outside = [
        np.any((mean[k].numpy() < _stack(honest, k).min(axis=0)) | (mean[k].numpy() > _stack(honest, k).max(axis=0)))
        for k in SHAPES
    ]
    assert all(outside)


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7, float("nan")])
def test_trimmed_mean_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError, match="trim_fraction"):
        trimmed_mean(_updates(5, seed=0), trim_fraction=fraction)


def test_empty_and_mismatched_inputs_raise() -> None:
    with pytest.raises(ValueError, match="at least one update"):
        trimmed_mean([], trim_fraction=0.1)
    with pytest.raises(ValueError, match="at least one update"):
        coordinate_median([])
    updates = _updates(3, seed=40)
    missing = [*updates[:2], {k: v for k, v in updates[2].items() if k != "b.bias"}]
    reshaped = [*updates[:2], dict(updates[2], **{"b.bias": torch.zeros(6)})]
    for rule in (coordinate_median, lambda u: trimmed_mean(u, trim_fraction=0.0)):
        with pytest.raises(ValueError, match="keys"):
            rule(missing)
        with pytest.raises(ValueError, match="different shapes"):
            rule(reshaped)
