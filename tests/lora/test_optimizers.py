"""Server optimizers against straightforward NumPy references, over several rounds; resume
from ``state_dict`` continues identically; bad configuration and mismatched updates raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from fedtune.config import SERVER_OPTIMIZERS
from fedtune.errors import CheckpointError, ConfigError
from fedtune.lora.optimizers import DEFAULT_LR, ServerOptimizer, make_server_optimizer

SHAPES = {"a.lora_A.weight": (4, 6), "a.lora_B.weight": (6, 4), "b.bias": (5,)}
HYPER = {"momentum": 0.8, "beta1": 0.85, "beta2": 0.97, "tau": 1e-2}
ROUNDS = 6


def _updates(rounds: int, seed: int, dtype: torch.dtype = torch.float32) -> list[dict[str, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    return [
        {k: torch.from_numpy(rng.normal(scale=0.1, size=s)).to(dtype) for k, s in SHAPES.items()} for _ in range(rounds)
    ]


def _reference(name: str, lr: float, updates: list[dict[str, torch.Tensor]]) -> list[dict[str, np.ndarray]]:
    """The update rules written out in NumPy float64, one dict of steps per round."""
    b1, b2, tau, mom = HYPER["beta1"], HYPER["beta2"], HYPER["tau"], HYPER["momentum"]
    m = {k: np.zeros(s) for k, s in SHAPES.items()}
    v = {k: np.zeros(s) for k, s in SHAPES.items()}
    steps = []
    for t, update in enumerate(updates, start=1):
        step = {}
        for k in SHAPES:
            u = update[k].numpy().astype(np.float64)
            if name == "none":
                step[k] = lr * u
            elif name == "fedavgm":
                v[k] = mom * v[k] + u
                step[k] = lr * v[k]
            else:
                m[k] = b1 * m[k] + (1 - b1) * u
                if name == "fedadam":
                    v[k] = b2 * v[k] + (1 - b2) * u**2
                else:
                    v[k] = v[k] - (1 - b2) * u**2 * np.sign(v[k] - u**2)
                m_hat, v_hat = m[k] / (1 - b1**t), v[k] / (1 - b2**t)
                step[k] = lr * m_hat / (np.sqrt(v_hat) + tau)
        steps.append(step)
    return steps


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_matches_numpy_reference(name: str) -> None:
    updates = _updates(ROUNDS, seed=1, dtype=torch.float64)
    opt = make_server_optimizer(name, lr=0.3, **HYPER)
    assert opt.name == name
    for got, want in zip((opt.step(u) for u in updates), _reference(name, 0.3, updates), strict=True):
        assert list(got) == sorted(SHAPES)
        for k in SHAPES:
            assert got[k].dtype == torch.float64 and tuple(got[k].shape) == SHAPES[k]
            np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_returns_the_update_dtype(name: str) -> None:
    updates = _updates(3, seed=2, dtype=torch.bfloat16)
    opt = make_server_optimizer(name, lr=DEFAULT_LR[name])
    for u in updates:
        step = opt.step(u)
        assert {k: t.dtype for k, t in step.items()} == dict.fromkeys(SHAPES, torch.bfloat16)


def test_none_with_lr_one_is_plain_fedavg() -> None:
    u = _updates(1, seed=3)[0]
    step = make_server_optimizer("none", lr=DEFAULT_LR["none"]).step(u)
    for k in SHAPES:
        torch.testing.assert_close(step[k], u[k], rtol=0, atol=0)


def test_adam_first_step_is_sign_like() -> None:
    """With bias correction the first Adam/Yogi step is lr·u / (|u| + τ), about lr per coordinate."""
    u = _updates(1, seed=4, dtype=torch.float64)[0]
    for name in ("fedadam", "fedyogi"):
        step = make_server_optimizer(name, lr=0.01, tau=1e-9).step(u)
        for k in SHAPES:
            torch.testing.assert_close(step[k], 0.01 * u[k] / (u[k].abs() + 1e-9), rtol=1e-12, atol=0)
            assert float((step[k].abs() - 0.01).abs().max()) < 1e-5


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_resume_from_state_dict_continues_identically(name: str) -> None:
    updates = _updates(ROUNDS, seed=5)
    straight = make_server_optimizer(name, lr=0.5, **HYPER)
    want = [straight.step(u) for u in updates]
    first = make_server_optimizer(name, lr=0.5, **HYPER)
    for u in updates[:3]:
        first.step(u)
    state = load(save(first.state_dict()))  # through safetensors, as a checkpoint would
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    if name in ("fedadam", "fedyogi"):
        assert state["t"].dim() == 0 and int(state["t"]) == 3
    resumed = make_server_optimizer(name, lr=0.5, **HYPER)
    resumed.load_state_dict(state)
    for u, expected in zip(updates[3:], want[3:], strict=True):
        got = resumed.step(u)
        for k in SHAPES:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=0)


def test_state_dict_keys() -> None:
    u = _updates(1, seed=6)[0]
    opts = {name: make_server_optimizer(name, lr=DEFAULT_LR[name]) for name in SERVER_OPTIMIZERS}
    for opt in opts.values():
        opt.step(u)
    assert opts["none"].state_dict() == {}
    assert sorted(opts["fedavgm"].state_dict()) == [f"v/{k}" for k in sorted(SHAPES)]
    want = sorted([f"m/{k}" for k in SHAPES] + [f"v/{k}" for k in SHAPES] + ["t"])
    assert sorted(opts["fedadam"].state_dict()) == want == sorted(opts["fedyogi"].state_dict())
    assert opts["fedadam"].state_dict()["v/b.bias"].dtype == torch.float64


def _stepped(name: str) -> ServerOptimizer:
    opt = make_server_optimizer(name, lr=0.1)
    opt.step(_updates(1, seed=7)[0])
    return opt


def test_load_state_dict_rejects_states_that_do_not_fit() -> None:
    adam = _stepped("fedadam").state_dict()
    with pytest.raises(CheckpointError, match="unexpected entry 'm/"):
        make_server_optimizer("fedavgm", lr=1.0).load_state_dict(adam)
    with pytest.raises(CheckpointError, match="missing the step count"):
        make_server_optimizer("fedadam", lr=0.1).load_state_dict(_stepped("fedavgm").state_dict())
    with pytest.raises(CheckpointError, match="'m' and 'v' moments differ"):
        make_server_optimizer("fedyogi", lr=0.1).load_state_dict({k: v for k, v in adam.items() if k != "v/b.bias"})
    bad_shape = dict(adam, **{"m/b.bias": torch.zeros(7, dtype=torch.float64)})
    with pytest.raises(CheckpointError, match="b.bias"):
        make_server_optimizer("fedadam", lr=0.1).load_state_dict(bad_shape)
    with pytest.raises(CheckpointError, match="does not fit"):
        make_server_optimizer("fedadam", lr=0.1).load_state_dict(dict(adam, t=torch.tensor(0)))
    other = {f"{s}/{k}": torch.zeros(3, dtype=torch.float64) for s in "mv" for k in ("x", "y")}
    with pytest.raises(CheckpointError, match="does not fit the adapter"):
        _stepped("fedadam").load_state_dict(dict(other, t=torch.tensor(1)))
    with pytest.raises(CheckpointError, match="unexpected entry 't'"):
        make_server_optimizer("none", lr=1.0).load_state_dict({"t": torch.tensor(1)})


@pytest.mark.parametrize("name", ("fedavgm", "fedadam", "fedyogi"))
def test_mismatched_update_raises(name: str) -> None:
    opt = _stepped(name)
    u = _updates(1, seed=8)[0]
    with pytest.raises(ValueError, match="keys or shapes differ"):
        opt.step({k: v for k, v in u.items() if k != "b.bias"})
    with pytest.raises(ValueError, match="keys or shapes differ"):
        opt.step(dict(u, **{"b.bias": torch.zeros(6)}))


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "sgd"}, "server_optimizer"),
        ({"lr": 0.0}, "server_lr"),
        ({"lr": -1.0}, "server_lr"),
        ({"lr": float("nan")}, "server_lr"),
        ({"momentum": 1.0}, "server_momentum"),
        ({"momentum": -0.1}, "server_momentum"),
        ({"beta1": 1.0}, "server_beta1"),
        ({"beta2": -0.5}, "server_beta2"),
        ({"tau": 0.0}, "server_tau"),
    ],
)
def test_bad_config_raises(kwargs: dict[str, float | str], field: str) -> None:
    args: dict = {"name": "fedadam", "lr": 0.01} | kwargs
    with pytest.raises(ConfigError, match=f"`federation.{field}`") as info:
        make_server_optimizer(args.pop("name"), **args)
    assert str(next(iter(kwargs.values()))) in str(info.value)  # echoes the value


def test_unknown_name_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="must be one of none, fedavgm, fedadam, fedyogi, got 'x'"):
        make_server_optimizer("x", lr=1.0)
