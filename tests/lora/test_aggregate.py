"""The merge rule against a NumPy reference, and validation of updates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedtune.errors import UpdateRejected
from fedtune.lora.aggregate import validate_update, weighted_mean
from fedtune.lora.delta import apply_delta, compute_delta, l2_norm


def _random_states(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "a.lora_A.weight": torch.from_numpy(rng.normal(size=(4, 6)).astype(np.float32)),
            "a.lora_B.weight": torch.from_numpy(rng.normal(size=(6, 4)).astype(np.float32)),
        }
        for _ in range(n)
    ]


@settings(max_examples=40, deadline=None)
@given(
    weights=st.lists(st.integers(min_value=1, max_value=10_000), min_size=1, max_size=6),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_fedavg_matches_numpy(weights: list[int], seed: int) -> None:
    deltas = _random_states(len(weights), seed)
    merged = weighted_mean(deltas, [float(w) for w in weights])
    for key in deltas[0]:
        stack = np.stack([d[key].numpy().astype(np.float64) for d in deltas])
        expected = np.average(stack, axis=0, weights=np.asarray(weights, dtype=np.float64))
        np.testing.assert_allclose(merged[key].numpy(), expected, rtol=1e-6, atol=1e-6)
        assert merged[key].dtype == torch.float32


def test_global_plus_mean_delta_equals_mean_of_trained_states() -> None:
    """With one shared global start, global + mean(delta) == mean(trained) (plain FedAvg)."""
    start = _random_states(1, 0)[0]
    trained = _random_states(3, 1)
    weights = [1.0, 2.0, 5.0]
    merged = apply_delta(start, weighted_mean([compute_delta(t, start) for t in trained], weights))
    direct = weighted_mean(trained, weights)
    for key in start:
        torch.testing.assert_close(merged[key], direct[key], rtol=1e-5, atol=1e-5)


def test_weighted_mean_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="one weight per delta"):
        weighted_mean(_random_states(2, 0), [1.0])
    with pytest.raises(ValueError, match="non-negative"):
        weighted_mean(_random_states(2, 0), [1.0, -1.0])


def test_l2_norm() -> None:
    assert l2_norm({"x": torch.tensor([3.0]), "y": torch.tensor([4.0])}) == pytest.approx(5.0)


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d.pop("a.lora_B.weight"), "keys differ"),
        (lambda d: d.update({"extra": torch.zeros(1)}), "keys differ"),
        (lambda d: d.update({"a.lora_A.weight": torch.zeros(4, 5)}), r"shape \(4, 5\), expected \(4, 6\)"),
        (lambda d: d.update({"a.lora_A.weight": torch.zeros(4, 6, dtype=torch.float64)}), "dtype torch.float64"),
        (lambda d: d["a.lora_A.weight"].__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda d: d["a.lora_B.weight"].__setitem__((1, 1), float("inf")), "NaN or Inf"),
    ],
)
def test_validation_rejects(mutate, pattern: str) -> None:  # type: ignore[no-untyped-def]
    reference = _random_states(1, 0)[0]
    delta = {k: v.clone() for k, v in _random_states(1, 1)[0].items()}
    validate_update(delta, reference)  # fine before the change
    mutate(delta)
    with pytest.raises(UpdateRejected, match=pattern):
        validate_update(delta, reference)
