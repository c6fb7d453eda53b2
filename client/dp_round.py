"""One round of sample-level DP at a hospital: plan, check the budget, train, record.

The order is the guarantee: the ledger is asked before any training (a round that would
pass the budget trains nothing and sends nothing), and the release is written to the
ledger durably after training and *before* the caller may send the update, so a crash
at any point never under-counts. A crash between recording and sending over-counts one
release: the safe side.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from fedtune.client.ledger import Policy, PrivacyLedger
from fedtune.config import DPSettings, TrainSettings
from fedtune.data.records import record_digests
from fedtune.errors import PrivacyError
from fedtune.lora.merge import MergeRule
from fedtune.privacy.accounting import Mechanism, noise_for_target
from fedtune.privacy.dpsgd import sample_rate
from fedtune.runtime import SiteData, SiteRuntime
from fedtune.train import TrainResult, steps_per_round
from fedtune.wire import RoundInstruction


@dataclass(frozen=True)
class DPRound:
    """What a DP round produced: the update, how training went, its mechanism and the new spend."""

    delta: dict[str, torch.Tensor]
    result: TrainResult
    mechanism: Mechanism
    epsilon: float
    budget: float

    def metrics(self) -> dict[str, float]:
        """The numbers the reply may carry: the mechanism and the spend, nothing computed from records."""
        return {
            "steps": self.result.steps,
            "train-seconds": self.result.seconds,
            "dp-epsilon": self.epsilon,
            "dp-budget": self.budget,
            "dp-noise-multiplier": self.mechanism.noise_multiplier,
            "dp-sample-rate": self.mechanism.sample_rate,
            "dp-steps": self.mechanism.steps,
        }


@lru_cache(maxsize=64)
def _planned_noise(target: float, delta: float, q: float, steps: int, accountant: str) -> float:
    return noise_for_target(target_epsilon=target, delta=delta, sample_rate=q, steps=steps, accountant=accountant)


def plan_mechanism(dp: DPSettings, train: TrainSettings, *, num_examples: int, num_rounds: int) -> Mechanism:
    """This site's mechanism for one round: fixed noise, or noise for ``dp.target_epsilon`` over the run.

    With a target, ``num_rounds`` rounds of this mechanism compose to at most the target
    (a site sampled in fewer rounds spends less). The same inputs give the same noise in
    every round and after a restart.
    """
    q = sample_rate(train, num_examples)
    steps = steps_per_round(train, num_examples)
    if dp.noise_multiplier > 0:
        return Mechanism(dp.noise_multiplier, q, steps)
    noise = _planned_noise(dp.target_epsilon, dp.delta, q, steps * num_rounds, dp.accountant)
    return Mechanism(noise, q, steps)


def open_ledger(path: Path, dp: DPSettings) -> PrivacyLedger:
    """The hospital's ledger at ``path`` under the budget, delta and accountant of ``dp``."""
    return PrivacyLedger(path, Policy(dp.budget_epsilon, dp.delta, dp.accountant))


def private_train_round(
    runtime: SiteRuntime,
    instruction: RoundInstruction,
    data: SiteData,
    train: TrainSettings,
    dp: DPSettings,
    ledger: PrivacyLedger,
    *,
    run_id: str,
    rule: MergeRule,
) -> DPRound:
    """Check the budget, run DP-SGD, record the release; raise BudgetExceeded before training if over."""
    dataset = ledger.register(record_digests(data.train), label=data.site)
    planned = plan_mechanism(dp, train, num_examples=len(data.train_tokens), num_rounds=instruction.num_rounds)
    ledger.check(dataset, planned)  # BudgetExceeded: nothing trained, nothing to send
    delta, result, used = runtime.train_round_dp(
        instruction,
        data,
        train,
        noise_multiplier=planned.noise_multiplier,
        max_grad_norm=dp.max_grad_norm,
        grad_sample_mode=dp.grad_sample_mode,
        rule=rule,
    )
    if used != planned:  # the ledger must hold what was actually applied
        raise PrivacyError(f"DP-SGD applied {used}, but {planned} was planned and checked; nothing was sent")
    epsilon = ledger.record(
        dataset, used, release_id=uuid.uuid4().hex, run_id=run_id, server_round=instruction.server_round
    )
    return DPRound(delta=delta, result=result, mechanism=used, epsilon=epsilon, budget=ledger.policy.budget_epsilon)
