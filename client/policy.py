"""A real hospital's own settings over the run's, and whether its policy lets it train in the run.

The coordinator's run settings say what to train; the hospital's ``hospital.toml`` says
with which model folder, device, precision and quantization, under which privacy budget and delta, and
what it refuses: another rank than the run's (unless the run merges mixed ranks), rounds
without DP-SGD (``privacy.require_dp``), less noise than its floor
(``privacy.min_noise_multiplier``).
"""

from __future__ import annotations

from fedtune.client.dp_round import plan_mechanism
from fedtune.client.hospital import HospitalConfig
from fedtune.config import ExperimentConfig, parse_config, replace
from fedtune.errors import ConfigError, PrivacyError


def hospital_run(hospital: HospitalConfig, experiment: str) -> tuple[ExperimentConfig, str]:
    """The run whose settings are ``experiment`` as ``hospital`` applies it, and why it does not fit ("": it does).

    The hospital's model folder, device and precision replace the run's, and so does its
    quantization when it sets one (how it holds its base in memory is its own choice; the run's
    is a request); gradient checkpointing is on when either asks (it changes memory, not
    results); its privacy budget and delta replace the run's (the ledger is the hospital's,
    across all runs).
    """
    run_cfg = parse_config(experiment, source="the coordinator's run settings")
    model = hospital.model
    source = model.path if model.path in ("smollm2", "tiny") else str(hospital.path(model.path))
    loading = {
        "source": source,
        "device": model.device,
        "precision": model.precision,
        "threads": model.threads,
        "quantization": model.quantization or run_cfg.model.quantization,
        "gradient_checkpointing": model.gradient_checkpointing or run_cfg.model.gradient_checkpointing,
    }
    try:
        cfg = replace(
            run_cfg,
            model=loading,
            dp={"budget_epsilon": hospital.privacy.budget_epsilon, "delta": hospital.privacy.delta, "ledger_dir": ""},
        )
    except ConfigError as err:
        cfg = replace(run_cfg, model=loading)
        return cfg, f"the run's DP settings do not fit this hospital's policy: {err}"
    return cfg, ""


def policy_refusal(hospital: HospitalConfig, cfg: ExperimentConfig, *, num_examples: int) -> str:
    """Why this hospital's privacy policy refuses the run's rounds ("" when it does not).

    ``cfg`` is the run as this hospital applies it (its delta and budget) and
    ``num_examples`` its number of training examples: with ``dp.target_epsilon`` the noise
    is this hospital's own plan (:func:`plan_mechanism`: its examples, the run's rounds,
    steps and batch size), and the floor holds for that noise just as for a fixed
    ``dp.noise_multiplier``.
    """
    policy = hospital.privacy
    rank = hospital.model.lora_rank
    if rank and rank != cfg.lora.rank and cfg.federation.strategy != "svd":
        return (
            f"this hospital trains at rank {rank} (`model.lora_rank`) but the run's strategy "
            f"{cfg.federation.strategy!r} needs rank {cfg.lora.rank}; only 'svd' merges mixed ranks"
        )
    if policy.require_dp and not cfg.dp.enabled:
        return "this hospital trains only with DP-SGD (`privacy.require_dp`) and the run has `dp.enabled = false`"
    if not cfg.dp.enabled:
        return ""
    try:
        planned = plan_mechanism(cfg.dp, cfg.train, num_examples=num_examples, num_rounds=cfg.federation.rounds)
    except (ConfigError, PrivacyError) as err:
        return f"this hospital cannot plan the run's DP-SGD noise: {err}"
    if planned.noise_multiplier >= policy.min_noise_multiplier:
        return ""
    if cfg.dp.noise_multiplier > 0:
        noise = f"the run's noise multiplier {planned.noise_multiplier:g}"
    else:
        noise = (
            f"the noise multiplier {planned.noise_multiplier:.4g} this hospital plans for the run's "
            f"`dp.target_epsilon` = {cfg.dp.target_epsilon:g} over {cfg.federation.rounds} rounds "
            f"({num_examples} training examples)"
        )
    return (
        f"{noise} is below this hospital's floor {policy.min_noise_multiplier:g} "
        "(`privacy.min_noise_multiplier`); it trains only with at least that much noise"
    )
