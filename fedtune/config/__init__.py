"""Experiment configuration: frozen dataclasses, validated once, parsed at the edge.

A config comes from a TOML file (``simulations/default.toml`` is the reference),
from command-line overrides (``section.field=value``), or both. Nothing below the
apps reads raw TOML: they receive an :class:`ExperimentConfig`.

``fedtune.config`` is the import path of everything here: ``names`` (the torch-free
name lists), ``sections`` (a site's work), ``federation`` (rounds, DP, security),
``simulation`` (a simulated hospital's CPUs and GPU share, a Ray cluster), ``experiment``
(the whole config and its cross-section checks), ``tracking`` (an MLflow store), ``privacy_audit``
(a simulated hospital's membership and canary audit), ``loading`` (TOML, overrides, copies).
"""

from __future__ import annotations

from fedtune.config.experiment import ExperimentConfig
from fedtune.config.federation import ClientDPSettings, DPSettings, FederationSettings, SecuritySettings
from fedtune.config.loading import _section as _section  # client/hospital.py builds its sections the same way
from fedtune.config.loading import config_from_dict, load_config, parse_config, replace
from fedtune.config.names import (
    ACCOUNTANTS,
    AGGREGATIONS,
    GRAD_SAMPLE_MODES,
    LINEAR_STRATEGIES,
    LR_SCHEDULES,
    OPTIMIZERS,
    PARTITIONS,
    PRECISIONS,
    QUANTIZATIONS,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    WIRE_DTYPES,
)
from fedtune.config.privacy_audit import PrivacyAuditSettings
from fedtune.config.sections import (
    DataSettings,
    EvalSettings,
    LoraSettings,
    ModelSettings,
    RunSettings,
    TrainSettings,
    parse_address,
)
from fedtune.config.sections import _require as _require  # and checks its fields the same way
from fedtune.config.simulation import SimulationSettings
from fedtune.config.tracking import TrackingSettings

__all__ = [
    "parse_address",
    "ACCOUNTANTS",
    "AGGREGATIONS",
    "GRAD_SAMPLE_MODES",
    "LINEAR_STRATEGIES",
    "LR_SCHEDULES",
    "OPTIMIZERS",
    "PARTITIONS",
    "PRECISIONS",
    "QUANTIZATIONS",
    "SERVER_OPTIMIZERS",
    "STRATEGIES",
    "WIRE_DTYPES",
    "ClientDPSettings",
    "DPSettings",
    "DataSettings",
    "EvalSettings",
    "ExperimentConfig",
    "FederationSettings",
    "LoraSettings",
    "ModelSettings",
    "PrivacyAuditSettings",
    "RunSettings",
    "SecuritySettings",
    "SimulationSettings",
    "TrackingSettings",
    "TrainSettings",
    "config_from_dict",
    "load_config",
    "parse_config",
    "replace",
]
