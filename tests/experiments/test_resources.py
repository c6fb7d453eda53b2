"""Simulated hospitals' resources: the [simulation] settings, checked, and the backend config
Flower's simulation engine builds from what the launcher passes it."""

from __future__ import annotations

import pytest

from fedtune.config import SimulationSettings, load_config
from fedtune.errors import ConfigError
from fedtune.launcher import client_resources, federation_config


def _backend_config(federation: str) -> dict[str, object]:
    """What Flower 1.41 makes of ``flwr run --federation-config``: the CLI's parse into its
    SimulationConfig, then flwr-simulation's backend config for Ray (its own functions)."""
    from flwr.common.config import parse_config_args
    from flwr.simulation.app import _run_simulation_settings
    from flwr.supercore.utils import simulation_config_from_json

    parsed = {k.replace("-", "_"): v for k, v in parse_config_args([federation]).items()}
    num_supernodes, backend, config, _, _ = _run_simulation_settings(simulation_config_from_json(parsed))
    assert backend == "ray"
    return {"num_supernodes": num_supernodes, **config}


def test_a_gpu_fraction_reaches_ray_as_each_client_s_resources() -> None:
    cpus, gpus = client_resources(SimulationSettings(client_cpus=2, client_gpus=0.25), cuda=True, cpu_count=16)
    assert (cpus, gpus) == (2, 0.25)
    config = _backend_config(federation_config(num_supernodes=32, cpus_per_client=cpus, gpus_per_client=gpus))
    assert config == {"num_supernodes": 32, "client_resources": {"num_cpus": 2, "num_gpus": 0.25}, "init_args": {}}


def test_defaults_keep_one_hospital_per_machine_and_a_whole_gpu_with_cuda() -> None:
    assert client_resources(SimulationSettings(), cuda=False, cpu_count=2) == (2, 0.0)
    assert client_resources(SimulationSettings(), cuda=True, cpu_count=8) == (8, 1.0)
    assert client_resources(SimulationSettings(client_gpus=2), cuda=True, cpu_count=8) == (8, 2.0)
    config = _backend_config(federation_config(num_supernodes=3, cpus_per_client=2, gpus_per_client=0.0))
    assert config["client_resources"] == {"num_cpus": 2, "num_gpus": 0.0}


def test_on_a_ray_cluster_its_nodes_decide() -> None:
    cluster = SimulationSettings(ray_address="127.0.0.1:6379")
    assert client_resources(cluster, cuda=False, cpu_count=2) == (1, 0.0)
    share = SimulationSettings(client_cpus=4, client_gpus=0.5, ray_address="10.0.0.5:6379")
    assert client_resources(share, cuda=False, cpu_count=2) == (4, 0.5)


def test_what_cannot_be_scheduled_here_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"^`simulation.client_gpus` = 0.25 shares a GPU, but torch sees no CUDA"):
        client_resources(SimulationSettings(client_gpus=0.25), cuda=False, cpu_count=2)
    with pytest.raises(ConfigError, match=r"^`simulation.client_cpus` = 3 is more than this machine's 2 CPUs"):
        client_resources(SimulationSettings(client_cpus=3), cuda=False, cpu_count=2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("client_gpus", 1.5, r"`simulation.client_gpus` must be a fraction in \(0, 1\] or a whole number"),
        ("client_gpus", -0.5, r"`simulation.client_gpus` must be a fraction"),
        ("client_cpus", -1, r"`simulation.client_cpus` must be >= 0"),
        ("ray_address", "ray://head:10001", r"`simulation.ray_address` must be HOST:PORT"),
        ("ray_address", "head", r"`simulation.ray_address` must be HOST:PORT"),
    ],
)
def test_settings_are_checked(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, {f"simulation.{field}": value})
    assert load_config(None, {"simulation.client_gpus": 0.25}).simulation.client_gpus == 0.25
