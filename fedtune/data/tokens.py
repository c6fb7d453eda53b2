"""Records as token ids for causal-LM SFT: the chat template, the answer-only labels, batches."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch

from fedtune.data.records import Example
from fedtune.errors import DataError, ModelError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels; labels are -100 on the prompt, ids on the answer."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


def _chat_text(tokenizer: PreTrainedTokenizerBase, messages: Sequence[tuple[str, str]], *, generation: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the tokenizer has no chat template; use an instruct model's tokenizer or set one")
    turns = [{"role": role, "content": content} for role, content in messages]
    text = tokenizer.apply_chat_template(turns, add_generation_prompt=generation, tokenize=False)
    return cast(str, text)


def _ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _prompt_and_answer(example: Example, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The prompt (through the assistant header) and the answer text (through end-of-turn)."""
    prompt = _chat_text(tokenizer, example.prompt_messages, generation=True)
    full = _chat_text(tokenizer, example.messages, generation=False)
    if full.startswith(prompt) and full[len(prompt) :].strip():
        # ChatML: "{target}<|im_end|>\n"; the newline after the end-of-turn token is dropped
        # so the sequence ends where generation stops.
        return prompt, full[len(prompt) :].rstrip()
    return prompt, example.target + (tokenizer.eos_token or "")


def prompt_ids(example: Example, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids of the prompt, ending with the assistant header, for generation."""
    return _ids(tokenizer, _chat_text(tokenizer, example.prompt_messages, generation=True))


def tokenize(
    examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, *, max_length: int
) -> list[TokenizedExample]:
    """Tokenize for causal-LM SFT: the loss covers the answer and its end-of-turn token only.

    A sequence over ``max_length`` loses prompt tokens from the left; the answer is kept whole.

    Raises
    ------
    DataError
        When an answer alone leaves no room for a prompt token.
    """
    out = []
    for index, example in enumerate(examples):
        prompt_text, answer_text = _prompt_and_answer(example, tokenizer)
        prompt, answer = _ids(tokenizer, prompt_text), _ids(tokenizer, answer_text)
        if len(answer) >= max_length:
            raise DataError(
                f"site {example.site or '<unnamed>'} example {index}: the answer is {len(answer)} "
                f"tokens, not under `train.max_length` ({max_length}); raise it or shorten the output"
            )
        prompt = prompt[max(0, len(prompt) + len(answer) - max_length) :]
        out.append(
            TokenizedExample(
                input_ids=tuple(prompt + answer),
                labels=(IGNORE_INDEX,) * len(prompt) + tuple(answer),
            )
        )
    return out


def collate(batch: Sequence[TokenizedExample], *, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask`` and ``labels`` (-100 on padding)."""
    if not batch:
        raise DataError("cannot collate an empty batch; check the site has training records")
    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids, dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels, dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
