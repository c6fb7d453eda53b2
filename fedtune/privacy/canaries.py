"""Canary exposure (Carlini et al., "The Secret Sharer", 2019). No Flower, nothing sent.

A canary is a synthetic secret-like record: the prompt ``Record {i} of canary set {tag}: the
patient's MRN is`` and, as the answer, a random 9-digit number. A simulation inserts some
canaries into a hospital's training records (each repeated ``canary_repeats`` times) and
keeps fresh ones of the same format that are never trained. After training, the exposure of
a canary is

    log2(candidates + 1) - log2(rank)

where ``rank`` is 1 + the number of ``candidates`` random secrets of the same format whose
loss (minus the log-probability of the whole answer under the adapted model, given the
canary's prompt) is below the true secret's. It is an estimate from a random sample of the
10^9 possible secrets, not the full enumeration: it ranges from 0 (the true secret is the
least likely) to log2(candidates + 1) (the most likely of all sampled); a model that learnt
nothing about a canary gives about log2(e) = 1.44 bits on average (a uniform rank).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from fedtune.data.records import Example
from fedtune.data.tokens import tokenize
from fedtune.privacy.audit import record_losses

DIGITS = 9
PROMPT = "Record {index} of canary set {tag}: the patient's MRN is"


@dataclass(frozen=True)
class Canary:
    """One canary: its prompt and its secret (a string of ``DIGITS`` digits)."""

    prompt: str
    secret: str

    def example(self, secret: str | None = None, *, site: str = "") -> Example:
        """The canary as a record (``secret`` in place of its own, for a candidate)."""
        answer = self.secret if secret is None else secret
        return Example(messages=(("user", self.prompt), ("assistant", answer)), site=site)


def random_secret(rng: random.Random, digits: int = DIGITS) -> str:
    return "".join(rng.choice("0123456789") for _ in range(digits))


def make_canaries(count: int, *, tag: str, seed: int, start: int = 0) -> list[Canary]:
    """``count`` canaries of set ``tag`` numbered from ``start``, their secrets drawn from ``seed``."""
    rng = random.Random(f"canaries/{tag}/{seed}/{start}")
    return [Canary(PROMPT.format(index=start + i, tag=tag), random_secret(rng)) for i in range(count)]


def inserted_records(canaries: Sequence[Canary], repeats: int, *, site: str = "") -> list[Example]:
    """The training records that insert ``canaries``: each one ``repeats`` times."""
    return [canary.example(site=site) for canary in canaries for _ in range(repeats)]


def canary_exposure(
    model: PeftModel,
    canaries: Sequence[Canary],
    *,
    tokenizer: PreTrainedTokenizerBase,
    pad_id: int,
    max_length: int = 256,
    candidates: int = 200,
    batch_size: int = 32,
    precision: str = "auto",
    seed: int = 0,
) -> list[float]:
    """The exposure, in bits, of each canary under ``model`` (estimated from ``candidates``
    random secrets of the same format per canary, drawn from ``seed``)."""
    if candidates < 1:
        raise ValueError("canary exposure needs at least one candidate secret")
    rng = random.Random(f"candidates/{seed}")
    examples: list[Example] = []
    for canary in canaries:
        pool: set[str] = set()
        while len(pool) < candidates:
            secret = random_secret(rng, len(canary.secret))
            if secret != canary.secret:
                pool.add(secret)
        examples.append(canary.example())
        examples.extend(canary.example(s) for s in sorted(pool))
    tokens = tokenize(examples, tokenizer, max_length=max_length)
    losses = record_losses(model, tokens, pad_id=pad_id, batch_size=batch_size, precision=precision, total=True)
    out = []
    for i in range(len(canaries)):
        block = losses[i * (candidates + 1) : (i + 1) * (candidates + 1)]
        rank = 1 + sum(1 for loss in block[1:] if loss < block[0])
        out.append(math.log2(candidates + 1) - math.log2(rank))
    return out


def exposure_summary(values: Sequence[float]) -> dict[str, float | int]:
    """Count, mean and median of exposures (NaN for none)."""
    if not values:
        return {"count": 0, "mean": math.nan, "median": math.nan}
    return {"count": len(values), "mean": statistics.fmean(values), "median": statistics.median(values)}
