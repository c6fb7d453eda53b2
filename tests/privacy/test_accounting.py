"""Privacy accounting against Opacus's own accountants; noise planning; secure noise."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import PRVAccountant, RDPAccountant

from fedtune.errors import ConfigError, PrivacyError
from fedtune.privacy.accounting import Mechanism, epsilon_spent, gaussian_noise, noise_for_target, secure_generator

DELTA = 1e-5
# Two runs; the second reuses the first's mechanism, so non-adjacent entries get merged.
HISTORY = [
    Mechanism(1.1, 0.02, 20),
    Mechanism(1.1, 0.02, 20),
    Mechanism(0.9, 0.05, 10),
    Mechanism(1.3, 0.01, 30),
    Mechanism(1.1, 0.02, 20),
]


@pytest.mark.parametrize(
    ("name", "cls", "rtol"),
    # RDP: same closed form, only float summation order differs (seen: exact equality).
    # PRV: merging (1.1, 0.02) entries changes the FFT domain slightly (seen: ~5e-13 relative);
    # 1e-6 leaves room for numerical noise across numpy/scipy builds.
    [("rdp", RDPAccountant, 1e-6), ("prv", PRVAccountant, 1e-6)],
)
def test_epsilon_matches_opacus_stepped_manually(name: str, cls: type, rtol: float) -> None:
    acc = cls()
    for m in HISTORY:
        for _ in range(m.steps):
            acc.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    expected = acc.get_epsilon(delta=DELTA)
    assert expected > 0
    assert epsilon_spent(HISTORY, delta=DELTA, accountant=name) == pytest.approx(expected, rel=rtol)
    # order does not matter, and more spend never lowers epsilon
    assert epsilon_spent(HISTORY[::-1], delta=DELTA, accountant=name) == pytest.approx(expected, rel=rtol)
    assert epsilon_spent(HISTORY[:-1], delta=DELTA, accountant=name) < expected


def test_empty_history_is_zero() -> None:
    assert epsilon_spent([], delta=DELTA) == 0.0


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    target=st.floats(0.5, 10.0),
    delta=st.floats(1e-6, 1e-4),
    q=st.floats(0.001, 0.2),
    steps=st.integers(1, 200),
)
def test_noise_for_target_never_overshoots(target: float, delta: float, q: float, steps: int) -> None:
    noise = noise_for_target(target_epsilon=target, delta=delta, sample_rate=q, steps=steps)
    assert epsilon_spent([Mechanism(noise, q, steps)], delta=delta) <= target + 1e-9


def test_noise_for_target_is_tight_and_respects_prior() -> None:
    noise = noise_for_target(target_epsilon=2.0, delta=DELTA, sample_rate=0.02, steps=100)
    # Within the 1 % search tolerance, less noise would overshoot.
    assert epsilon_spent([Mechanism(noise / 1.02, 0.02, 100)], delta=DELTA) > 2.0
    prior = [Mechanism(1.0, 0.02, 100)]
    more = noise_for_target(target_epsilon=2.0, delta=DELTA, sample_rate=0.02, steps=100, prior=prior)
    assert more > noise
    assert epsilon_spent([*prior, Mechanism(more, 0.02, 100)], delta=DELTA) <= 2.0
    with pytest.raises(PrivacyError, match="already spent"):
        noise_for_target(target_epsilon=0.5, delta=DELTA, sample_rate=0.02, steps=10, prior=prior)


def test_gaussian_noise_has_the_asked_std_and_is_unpredictable() -> None:
    ref = torch.zeros(200_000)
    draw = gaussian_noise(ref, 0.3, secure_generator(seed=1))
    assert draw.dtype == ref.dtype and draw.shape == ref.shape
    assert float(draw.mean()) == pytest.approx(0.0, abs=0.003)  # 4 sigma of the mean's std 0.3/sqrt(2e5)
    assert float(draw.std()) == pytest.approx(0.3, rel=0.01)
    # same test seed, same noise; no seed: fresh OS randomness every time
    assert torch.equal(draw, gaussian_noise(ref, 0.3, secure_generator(seed=1)))
    assert not torch.equal(gaussian_noise(ref, 0.3, secure_generator()), gaussian_noise(ref, 0.3, secure_generator()))


def test_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="`noise_multiplier`.*-1"):
        Mechanism(-1.0, 0.1, 1)
    with pytest.raises(ConfigError, match="`noise_multiplier`"):
        Mechanism(math.nan, 0.1, 1)
    with pytest.raises(ConfigError, match="`sample_rate`"):
        Mechanism(1.0, 1.5, 1)
    with pytest.raises(ConfigError, match="`steps`"):
        Mechanism(1.0, 0.5, 0)
    with pytest.raises(ConfigError, match="`accountant`"):
        epsilon_spent([], delta=DELTA, accountant="gdp")
    with pytest.raises(ConfigError, match="`delta`"):
        epsilon_spent(HISTORY, delta=1.0)
