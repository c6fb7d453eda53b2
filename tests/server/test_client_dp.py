"""Client-level DP at the coordinator: Flower's fixed-clipping mechanism over validated deltas."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from opacus.accountants import RDPAccountant

from fedtune import wire
from fedtune.config import ClientDPSettings
from fedtune.errors import CheckpointError
from fedtune.lora.delta import l2_norm
from fedtune.privacy.accounting import BudgetExceeded, gaussian_noise, secure_generator
from fedtune.server.client_dp import ClientLevelDP, clip

S = 0.5
CURRENT = {"a.lora_A.weight": torch.full((2, 3), 0.1), "a.lora_B.weight": torch.zeros(3, 2)}


@pytest.fixture(autouse=True)
def _flower_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)


def _deltas() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    scales = (0.1, 1.0, 5.0)  # one under the clipping norm, two over it
    return [{k: s * torch.randn(v.shape, generator=g) for k, v in CURRENT.items()} for s in scales]


def _named(state: dict[str, torch.Tensor]) -> ArrayRecord:
    """One Array per tensor: the record layout Flower's own strategies work on (fedtune packs)."""
    return ArrayRecord({k: Array.from_numpy_ndarray(v.numpy()) for k, v in sorted(state.items())})


def _flower_clipped_mean(deltas: list[dict[str, torch.Tensor]], num_sampled: int) -> dict[str, torch.Tensor]:
    """Flower's own wrapper on the equivalent full-model replies, with zero noise."""
    inner = FedAvg(weighted_by_key=wire.NUM_EXAMPLES, arrayrecord_key=wire.GLOBAL)
    dp = DifferentialPrivacyServerSideFixedClipping(inner, 0.0, S, num_sampled)
    dp.current_arrays = _named(CURRENT)
    replies = [
        Message(
            RecordDict(
                {
                    wire.GLOBAL: _named({k: CURRENT[k] + d[k] for k in CURRENT}),
                    wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1}),
                }
            ),
            dst_node_id=0,
            message_type=MessageType.TRAIN,
        )
        for d in deltas
    ]
    arrays, _ = dp.aggregate_train(1, replies)
    assert arrays is not None
    return {k: torch.from_numpy(a.numpy().copy()) - CURRENT[k] for k, a in arrays.items()}


def _our_mean_and_noise(
    deltas: list[dict[str, torch.Tensor]], num_sampled: int, sigma: float
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, float], ClientLevelDP]:
    dp = ClientLevelDP(
        ClientDPSettings(enabled=True, noise_multiplier=sigma, clipping_norm=S), num_sampled=num_sampled, seed=5
    )
    out, info = dp.release(deltas)
    # the same seeded generator replays the noise, key by key in the merge's (sorted) order
    gen = secure_generator(seed=5)
    noise = {k: gaussian_noise(out[k], dp.noise_std, gen) for k in sorted(out)}
    return out, noise, info, dp


def test_clipped_mean_equals_flowers_wrapper() -> None:
    deltas = _deltas()
    flower = _flower_clipped_mean(deltas, 3)
    ours, noise, info, dp = _our_mean_and_noise(deltas, 3, sigma=1.0)
    for k in CURRENT:
        torch.testing.assert_close(ours[k] - noise[k], flower[k], rtol=1e-5, atol=1e-7)
    assert dp.noise_std == pytest.approx(1.0 * S / 3)
    assert info["clipped"] == 2 and info["noise-std"] == pytest.approx(S / 3)
    assert all(l2_norm(clip(d, S)[0]) <= S * (1 + 1e-6) for d in deltas)


def test_a_missing_hospital_still_divides_by_the_sampled_count() -> None:
    deltas = _deltas()[:2]  # 3 sampled, 2 arrived
    ours, noise, _, _ = _our_mean_and_noise(deltas, 3, sigma=1.0)
    clipped = [clip(d, S)[0] for d in deltas]
    for k in CURRENT:
        expected = (clipped[0][k] + clipped[1][k]) / 3  # one hospital moves the mean by at most S / 3
        torch.testing.assert_close(ours[k] - noise[k], expected, rtol=1e-5, atol=1e-7)


def test_noise_std_is_sigma_s_over_m() -> None:
    big = {"w": torch.zeros(400_000)}
    dp = ClientLevelDP(ClientDPSettings(enabled=True, noise_multiplier=2.0, clipping_norm=S), num_sampled=4)
    out, _ = dp.release([big])  # a zero delta: the output is pure noise
    assert float(out["w"].std()) == pytest.approx(2.0 * S / 4, rel=0.01)


def test_accounting_composes_like_opacus_and_survives_a_restart() -> None:
    settings = ClientDPSettings(enabled=True, noise_multiplier=1.5, clipping_norm=S, max_epsilon=0.0)
    dp = ClientLevelDP(settings, num_sampled=3)
    for _ in range(4):
        dp.release(_deltas())
    acc = RDPAccountant()
    for _ in range(4):
        acc.step(noise_multiplier=1.5, sample_rate=1.0)
    assert dp.epsilon() == pytest.approx(acc.get_epsilon(delta=settings.delta), rel=1e-9)
    resumed = ClientLevelDP(settings, num_sampled=3)
    resumed.load_state_dict(dp.state_dict())
    assert resumed.epsilon() == pytest.approx(dp.epsilon())
    with pytest.raises(CheckpointError, match="malformed"):
        resumed.load_state_dict({"releases": [-1]})


def test_max_epsilon_stops_before_the_round_that_would_pass_it() -> None:
    probe = ClientLevelDP(ClientDPSettings(enabled=True, noise_multiplier=2.0), num_sampled=3)
    two = probe.epsilon(extra_rounds=2)
    limit = (two + probe.epsilon(extra_rounds=3)) / 2  # two rounds fit, the third does not
    dp = ClientLevelDP(ClientDPSettings(enabled=True, noise_multiplier=2.0, max_epsilon=limit), num_sampled=3)
    for rnd in (1, 2):
        dp.check_next(rnd)
        dp.release(_deltas())
    with pytest.raises(BudgetExceeded, match=r"round 3 .*`client_dp.max_epsilon`"):
        dp.check_next(3)
    assert dp.epsilon() == pytest.approx(two) and dp.epsilon() <= limit
