"""fedtune.data.tokens: the tiny tokenizer, answer-only labels, truncation, batches."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedtune.data.records import Example
from fedtune.data.tiny import CHATML_TEMPLATE, build_tiny_tokenizer
from fedtune.data.tokens import IGNORE_INDEX, TokenizedExample, collate, prompt_ids, tokenize
from fedtune.errors import DataError, ModelError


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def test_tiny_tokenizer_is_chatml_and_deterministic(tok) -> None:
    for token in ("<|im_start|>", "<|im_end|>", "<|pad|>"):
        assert len(tok(token, add_special_tokens=False)["input_ids"]) == 1
    text = 'Ünïcode ✓ 😀 {"bp": "142/88"}\n\tend'
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], tokenize=False
    )
    assert rendered == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n"
    code = (
        "from fedtune.data.tiny import build_tiny_tokenizer;"
        "t = build_tiny_tokenizer(); print(t('bp 142/88, hr 96', add_special_tokens=False)['input_ids'])"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == str(tok("bp 142/88, hr 96", add_special_tokens=False)["input_ids"])
    assert len(tok) == 512 and tok.pad_token_id != tok.eos_token_id


def test_labels_mask_exactly_the_prompt(tok) -> None:
    chat = Example(
        (
            ("system", "Be terse."),
            ("user", "Age?"),
            ("assistant", "67"),
            ("user", "Sex?"),
            ("assistant", '{"sex": "F"}'),
        )
    )
    for ex in [Example.from_instruction("Extract the age.", "A 67-year-old woman.", '{"age": 67}'), chat]:
        (t,) = tokenize([ex], tok, max_length=512)
        assert len(t.input_ids) == len(t.labels)
        n_prompt = sum(1 for label in t.labels if label == IGNORE_INDEX)
        assert all(label == IGNORE_INDEX for label in t.labels[:n_prompt])
        assert list(t.labels[n_prompt:]) == list(t.input_ids[n_prompt:])
        assert tok.decode(t.labels[n_prompt:]) == ex.target + "<|im_end|>"
        assert list(t.input_ids[:n_prompt]) == prompt_ids(ex, tok)
        assert tok.decode(prompt_ids(ex, tok)).endswith("<|im_start|>assistant\n")


def test_template_without_prefix_falls_back_to_target_plus_eos(tok) -> None:
    odd = build_tiny_tokenizer()  # generation prompt differs from how a stored answer renders
    odd.chat_template = CHATML_TEMPLATE.replace("'<|im_start|>assistant\\n'", "'<|im_start|>model\\n'")
    ex = Example.from_instruction("Age?", "", "67")
    (t,) = tokenize([ex], odd, max_length=64)
    answer = [i for i, label in zip(t.input_ids, t.labels, strict=True) if label != IGNORE_INDEX]
    assert odd.decode(answer) == "67<|im_end|>"


def test_tokenizer_without_chat_template_is_refused() -> None:
    bare = build_tiny_tokenizer()
    bare.chat_template = None
    with pytest.raises(ModelError, match="no chat template"):
        tokenize([Example.from_instruction("Age?", "", "67")], bare, max_length=64)


def test_truncation_keeps_the_answer(tok) -> None:
    ex = Example.from_instruction("Extract the age. " * 20, "A 67-year-old woman.", '{"age": 67}', site="north")
    (full,) = tokenize([ex], tok, max_length=4096)
    (cut,) = tokenize([ex], tok, max_length=24)
    assert len(cut.input_ids) == 24
    assert cut.input_ids == full.input_ids[-24:] and cut.labels == full.labels[-24:]
    assert tok.decode([i for i in cut.labels if i != IGNORE_INDEX]) == '{"age": 67}<|im_end|>'
    long_answer = Example.from_instruction("q", "", "x y z " * 40, site="north")
    with pytest.raises(DataError, match=r"site north example 1: the answer is \d+ tokens"):
        tokenize([ex, long_answer], tok, max_length=24)


def test_collate_pads_right() -> None:
    batch = [TokenizedExample((5, 6, 7), (-100, 6, 7)), TokenizedExample((8,), (8,))]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(v.dtype == torch.long for v in out.values())
    with pytest.raises(DataError, match="empty batch"):
        collate([], pad_id=0)
