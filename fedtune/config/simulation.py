"""How a simulated federation uses the machine (or a Ray cluster): what each hospital gets."""

from __future__ import annotations

from dataclasses import dataclass

from fedtune.config.sections import _require, parse_address


@dataclass(frozen=True)
class SimulationSettings:
    """Resources of each simulated hospital on Flower's simulation engine (Ray).

    ``client_cpus``: CPUs per hospital (0: all of this machine's, so hospitals train one at
    a time, or 1 on a Ray cluster). ``client_gpus``: share of a GPU per hospital, a fraction
    in (0, 1] (0.25: four hospitals train side by side on one GPU) or a whole number; 0
    means a whole GPU when CUDA is present and none otherwise. ``ray_address``: HOST:PORT
    of a running Ray cluster's head (``ray start --head``) to run the hospitals on instead
    of a private Ray started for the run; every node must see the run folder at the same
    path and have fedtune installed.
    """

    client_cpus: int = 0
    client_gpus: float = 0.0
    ray_address: str = ""

    def __post_init__(self) -> None:
        _require(self.client_cpus >= 0, f"`simulation.client_cpus` must be >= 0 (0: all CPUs), got {self.client_cpus}")
        gpus = self.client_gpus
        _require(
            gpus >= 0 and (gpus <= 1 or float(gpus).is_integer()),
            f"`simulation.client_gpus` must be a fraction in (0, 1] or a whole number of GPUs (0: a whole GPU "
            f"when CUDA is present), got {gpus}",
        )
        if self.ray_address:
            parse_address(self.ray_address, "simulation.ray_address")
