"""A site's training runtime: a base model with a LoRA adapter, kept in memory.

The client daemon (``fedtune.client``) and the simulation's baselines both use it, so
local training and evaluation are the same code in every role.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

import torch
from peft import PeftModel

from fedtune.config import EvalSettings, LoraSettings, ModelSettings, TrainSettings
from fedtune.data.records import Example, dataset_hash
from fedtune.data.tokens import TokenizedExample, tokenize
from fedtune.evaluate import EvalResult, evaluate
from fedtune.lora import adapter
from fedtune.lora.merge import MergeRule
from fedtune.models import BaseModel, load_base_model, pick_device
from fedtune.privacy.accounting import Mechanism
from fedtune.privacy.dpsgd import train_local_dp
from fedtune.quantize import prepare_for_training
from fedtune.train import TrainResult, steps_per_round, train_local
from fedtune.wire import Identity, RoundInstruction


@dataclass(frozen=True)
class SiteData:
    """One site's records and their tokenization (computed once per process)."""

    site: str
    train: list[Example]
    eval: list[Example]
    train_tokens: list[TokenizedExample]
    eval_tokens: list[TokenizedExample]
    sha256: str


class SiteRuntime:
    """A base model with a LoRA adapter attached, kept in memory across rounds."""

    def __init__(self, model: ModelSettings, lora: LoraSettings) -> None:
        torch.set_num_threads(model.threads or os.cpu_count() or 1)
        self.settings = model
        self.base: BaseModel = load_base_model(
            model.source, device=pick_device(model.device), quantization=model.quantization, precision=model.precision
        )
        prepare_for_training(
            self.base.model, kbit_prepare=model.kbit_prepare, gradient_checkpointing=model.gradient_checkpointing
        )
        self.model: PeftModel = adapter.attach_lora(self.base.model, lora)
        self.lora = lora
        self.spec_sha256 = adapter.spec_sha256(lora, adapter.get_state(self.model))
        self._run_specs: dict[LoraSettings, str] = {}

    def identity(self, site: str, *, run_lora: LoraSettings | None = None) -> Identity:
        """Who this site is and what it trains; ``run_lora``: the run's adapter, when this
        site trains at another rank (``svd``), whose spec it names so the coordinator can
        check alpha and target modules (the reply's shapes say the site's rank)."""
        spec = self.spec_sha256
        if run_lora is not None and run_lora.rank != self.lora.rank:
            if run_lora not in self._run_specs:  # identity() is asked for every outgoing message
                self._run_specs[run_lora] = adapter.spec_at_rank(run_lora, self.state())
            spec = self._run_specs[run_lora]
        return Identity(site=site, base_sha256=self.base.sha256, spec_sha256=spec)

    def load(self, start: dict[str, torch.Tensor], *, freeze_a: bool) -> None:
        """Load ``start`` into the adapter; train A and B, or only B (``ffa``: A stays the shared one)."""
        adapter.set_state(self.model, start)
        for key, param in adapter.lora_parameters(self.model).items():
            param.requires_grad_(not (freeze_a and ".lora_A." in key))

    def tokenize(self, examples: list[Example], max_length: int) -> list[TokenizedExample]:
        return tokenize(examples, self.base.tokenizer, max_length=max_length)

    def state(self) -> dict[str, torch.Tensor]:
        """A copy of the adapter as it is now."""
        return adapter.get_state(self.model)

    def train_steps(
        self,
        start: dict[str, torch.Tensor],
        data: SiteData,
        settings: TrainSettings,
        *,
        steps: int,
        seed: int,
        step_offset: int = 0,
        total_steps: int | None = None,
        freeze_a: bool = False,
    ) -> TrainResult:
        """Load ``start`` into the adapter and train it (B only with ``freeze_a``) for ``steps`` steps."""
        self.load(start, freeze_a=freeze_a)
        return train_local(
            self.model,
            data.train_tokens,
            dataclasses.replace(settings, local_steps=steps, local_epochs=0.0),
            pad_id=int(self.base.tokenizer.pad_token_id),
            seed=seed,
            precision=self.settings.precision,
            step_offset=step_offset,
            total_steps=total_steps,
        )

    def train_round(
        self, instruction: RoundInstruction, data: SiteData, settings: TrainSettings, *, seed: int, rule: MergeRule
    ) -> tuple[dict[str, torch.Tensor], TrainResult]:
        """Train the received global adapter for one round; return (what to send, what happened).

        ``rule`` says where training starts (``svd``: the global at this site's rank), what
        is trained (``ffa``: B only) and what is sent (a delta, or ``svd``'s factors).
        """
        # The LR schedule spans the whole federation: round r starts at (r-1)*steps.
        steps = steps_per_round(settings, len(data.train_tokens))
        start = rule.local_start(instruction.state, rank=self.lora.rank)
        result = self.train_steps(
            start,
            data,
            settings,
            steps=steps,
            seed=seed,
            step_offset=(instruction.server_round - 1) * steps,
            total_steps=instruction.num_rounds * steps,
            freeze_a=rule.freeze_a,
        )
        return rule.reply(self.state(), start), result

    def train_round_dp(
        self,
        instruction: RoundInstruction,
        data: SiteData,
        settings: TrainSettings,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        grad_sample_mode: str,
        rule: MergeRule,
    ) -> tuple[dict[str, torch.Tensor], TrainResult, Mechanism]:
        """One round of DP-SGD on the received global adapter: (what to send, what happened,
        its mechanism); ``rule`` as in :meth:`train_round`. With ``ffa`` only B is trained, so
        the noise is spread over half the values.

        Sampling and noise are seeded from the OS's CSPRNG, never from the run's seed.
        """
        steps = steps_per_round(settings, len(data.train_tokens))
        start = rule.local_start(instruction.state, rank=self.lora.rank)
        self.load(start, freeze_a=rule.freeze_a)
        result, mechanism = train_local_dp(
            self.model,
            data.train_tokens,
            settings,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            steps=steps,
            pad_id=int(self.base.tokenizer.pad_token_id),
            precision=self.settings.precision,
            grad_sample_mode=grad_sample_mode,
            step_offset=(instruction.server_round - 1) * steps,
            total_steps=instruction.num_rounds * steps,
        )
        if mechanism is None:
            raise ValueError("train_round_dp needs a positive noise_multiplier")
        return rule.reply(self.state(), start), result, mechanism

    def evaluate(self, state: dict[str, torch.Tensor] | None, data: SiteData, settings: EvalSettings) -> EvalResult:
        """Held-out loss and task metric with ``state`` loaded (None: the bare base model)."""
        if state is not None:
            adapter.set_state(self.model, state)
        bare = self.model.disable_adapter() if state is None else contextlib.nullcontext()
        with bare:
            return evaluate(
                self.model,
                self.base.tokenizer,
                data.eval,
                data.eval_tokens,
                settings,
                precision=self.settings.precision,
            )


def site_data(
    runtime: SiteRuntime, site: str, train: list[Example], evaluation: list[Example], max_length: int
) -> SiteData:
    """Tokenize a site's records once for this runtime."""
    return SiteData(
        site=site,
        train=train,
        eval=evaluation,
        train_tokens=runtime.tokenize(train, max_length),
        eval_tokens=runtime.tokenize(evaluation, max_length),
        sha256=dataset_hash(train + evaluation),
    )
