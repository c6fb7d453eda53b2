"""Held-out evaluation: answer-token loss and an exact task metric from greedy generation.

The task metric is *field accuracy*: when the reference answer is a JSON object (the
embedded clinical task), the fraction of its fields the prediction reproduces
exactly; otherwise 1 for an exact (whitespace-normalised) match, else 0. Results are
sums, so sites pool exactly: the pooled metric equals the metric on the pooled set.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from transformers import PreTrainedTokenizerBase

from fedtune.config import EvalSettings
from fedtune.data.records import Example
from fedtune.data.tokens import TokenizedExample, collate, prompt_ids
from fedtune.train import answer_nll, autocast_dtype


@dataclass(frozen=True)
class EvalResult:
    """Sums over a set of examples; add two results to pool them."""

    loss_sum: float = 0.0
    tokens: int = 0
    metric_sum: float = 0.0
    exact_sum: float = 0.0
    n: int = 0

    @property
    def loss(self) -> float:
        """Mean negative log-likelihood per answer token."""
        return self.loss_sum / self.tokens if self.tokens else float("nan")

    @property
    def metric(self) -> float:
        """Mean field accuracy per example."""
        return self.metric_sum / self.n if self.n else float("nan")

    @property
    def exact(self) -> float:
        """Fraction of examples with every field right."""
        return self.exact_sum / self.n if self.n else float("nan")

    def __add__(self, other: EvalResult) -> EvalResult:
        return EvalResult(
            self.loss_sum + other.loss_sum,
            self.tokens + other.tokens,
            self.metric_sum + other.metric_sum,
            self.exact_sum + other.exact_sum,
            self.n + other.n,
        )

    def as_metrics(self) -> dict[str, float]:
        return {"loss": self.loss, "metric": self.metric, "exact": self.exact, "n": self.n}


def _norm(value: Any) -> str:
    return re.sub(r"\s+", " ", str(value)).strip().lower()


def _json_object(text: str) -> dict[str, Any] | None:
    match = re.search(r"\{.*?\}", text, flags=re.DOTALL)
    if match is None:
        return None
    try:
        obj = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


def field_accuracy(prediction: str, reference: str) -> tuple[float, bool]:
    """(fraction of reference fields reproduced exactly, all of them right)."""
    ref = _json_object(reference) if reference.lstrip().startswith("{") else None
    if not ref:
        ok = _norm(prediction) == _norm(reference)
        return float(ok), ok
    pred = _json_object(prediction) or {}
    right = sum(1 for k, v in ref.items() if k in pred and _norm(pred[k]) == _norm(v))
    return right / len(ref), right == len(ref)


@torch.no_grad()
def answer_loss(
    model: torch.nn.Module, tokenized: Sequence[TokenizedExample], *, pad_id: int, batch_size: int, precision: str
) -> tuple[float, int]:
    """(sum of answer-token NLL, number of answer tokens)."""
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    total, count = 0.0, 0
    for i in range(0, len(tokenized), batch_size):
        batch = {k: v.to(device) for k, v in collate(tokenized[i : i + batch_size], pad_id=pad_id).items()}
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            nll, n = answer_nll(model, batch)
        total += float(nll)
        count += n
    return total, count


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    batch_size: int,
    max_new_tokens: int,
    precision: str,
) -> list[str]:
    """Greedy answers, batched with left padding (prompts sorted by length)."""
    device = next(model.parameters()).device
    dtype = autocast_dtype(precision, device)
    prompts = [prompt_ids(e, tokenizer) for e in examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    pad = int(tokenizer.pad_token_id)
    stop = [t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")} if isinstance(t, int)]
    answers: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        ids = torch.full((len(idx), width), pad, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = cast(Any, model).generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=stop,
            )
        for row, i in enumerate(idx):
            answers[i] = str(tokenizer.decode(out[row, width:], skip_special_tokens=True))
    return [answers[i] for i in range(len(examples))]


def evaluate(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    tokenized: Sequence[TokenizedExample],
    settings: EvalSettings,
    *,
    precision: str = "auto",
) -> EvalResult:
    """Loss and task metric of ``model`` on held-out ``examples`` (and their tokenization)."""
    model.eval()
    pad = int(tokenizer.pad_token_id)
    loss_sum, tokens = answer_loss(model, tokenized, pad_id=pad, batch_size=settings.batch_size, precision=precision)
    predictions = generate_answers(
        model,
        tokenizer,
        examples,
        batch_size=settings.batch_size,
        max_new_tokens=settings.max_new_tokens,
        precision=precision,
    )
    scores = [field_accuracy(p, e.target) for p, e in zip(predictions, examples, strict=True)]
    return EvalResult(
        loss_sum=loss_sum,
        tokens=tokens,
        metric_sum=sum(s for s, _ in scores),
        exact_sum=float(sum(1 for _, ok in scores if ok)),
        n=len(examples),
    )
