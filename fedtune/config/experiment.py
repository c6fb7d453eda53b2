"""The whole experiment: one section per concern, and the checks across sections."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import tomli_w

from fedtune.config.federation import ClientDPSettings, DPSettings, FederationSettings, SecuritySettings
from fedtune.config.names import LINEAR_STRATEGIES
from fedtune.config.privacy_audit import PrivacyAuditSettings
from fedtune.config.sections import (
    DataSettings,
    EvalSettings,
    LoraSettings,
    ModelSettings,
    RunSettings,
    TrainSettings,
    _require,
)
from fedtune.config.simulation import SimulationSettings
from fedtune.config.tracking import TrackingSettings


@dataclass(frozen=True)
class ExperimentConfig:
    """Everything a simulated federation needs; one section per concern."""

    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    data: DataSettings = field(default_factory=DataSettings)
    federation: FederationSettings = field(default_factory=FederationSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)
    dp: DPSettings = field(default_factory=DPSettings)
    client_dp: ClientDPSettings = field(default_factory=ClientDPSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    simulation: SimulationSettings = field(default_factory=SimulationSettings)
    tracking: TrackingSettings = field(default_factory=TrackingSettings)
    privacy_audit: PrivacyAuditSettings = field(default_factory=PrivacyAuditSettings)

    def __post_init__(self) -> None:
        if self.data.source == "files" and self.data.partition == "natural":
            _require(
                self.data.hospitals == len(self.data.files),
                f"`data.hospitals` must equal the number of `data.files` ({len(self.data.files)}) "
                f"with the natural partition, got {self.data.hospitals}",
            )
        _require(
            not (self.security.secure_aggregation and self.client_dp.enabled),
            "`client_dp.enabled` needs the coordinator to clip each update, which `security.secure_aggregation` "
            "hides from it; turn one off (sample-level `dp` works with secure aggregation)",
        )
        fed = self.federation
        if self.security.secure_aggregation:
            _require(
                fed.strategy in LINEAR_STRATEGIES,
                f"`federation.strategy` = {fed.strategy!r} is not a linear merge, and with "
                "`security.secure_aggregation` the coordinator sees only the sum of the updates; "
                f"choose one of {', '.join(LINEAR_STRATEGIES)} or turn secure aggregation off",
            )
            _require(
                fed.aggregation == "mean",
                f"`federation.aggregation` = {fed.aggregation!r} needs each hospital's update, which "
                "`security.secure_aggregation` hides; use 'mean' or turn secure aggregation off",
            )
            _require(
                fed.wire_dtype == "float32",
                f"`federation.wire_dtype` = {fed.wire_dtype!r} does not apply to `security.secure_aggregation`, "
                "which quantizes each delta itself (`security.secagg_quantization_bits`); set it to 'float32'",
            )
        _require(
            not (self.client_dp.enabled and fed.aggregation != "mean"),
            f"`federation.aggregation` = {fed.aggregation!r} does not fit `client_dp` (its noise is calibrated "
            "to the mean of clipped updates); use 'mean' or turn client_dp off",
        )
        if self.lora.site_ranks:
            _require(
                fed.strategy == "svd",
                f"`lora.site_ranks` trains hospitals at different ranks, which only `federation.strategy` = 'svd' "
                f"can merge, got {fed.strategy!r}",
            )
            _require(
                len(self.lora.site_ranks) == self.data.hospitals,
                f"`lora.site_ranks` must give one rank per hospital ({self.data.hospitals}), "
                f"got {list(self.lora.site_ranks)}",
            )
        sampled = self.sampled_per_round()
        _require(
            not self.security.secure_aggregation or sampled >= 3,
            f"`security.secure_aggregation` needs at least 3 hospitals sampled per round, got {sampled}",
        )
        _require(
            self.federation.min_clients <= sampled,
            f"`federation.min_clients` ({self.federation.min_clients}) cannot exceed the hospitals sampled per "
            f"round ({sampled} = `federation.fraction_train` {self.federation.fraction_train} x `data.hospitals` "
            f"{self.data.hospitals}, at least 1); lower it or sample more",
        )

    def sampled_per_round(self) -> int:
        """Hospitals asked to train each round: int(hospitals x fraction_train), at least 1 (Flower's rule)."""
        return max(1, int(self.data.hospitals * self.federation.fraction_train))

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Plain TOML-ready dict (tuples become lists)."""
        out: dict[str, dict[str, Any]] = {}
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            out[f.name] = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(section).items()}
        return out

    def to_toml(self) -> str:
        """Serialize to TOML text that :func:`parse_config` reads back to an equal config."""
        return tomli_w.dumps(self.to_dict())
