"""A tiny byte-level BPE tokenizer with a ChatML template, built in code for tests.

Byte-level, so every string is encodable; trained on a fixed corpus (clinical notes from
:mod:`fedtune.data.clinical`, JSON targets, digits), so the same ids come out in every process.
The chat template has SmolLM2's shape without its default system prompt.
"""

from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")
VOCAB_SIZE = 512
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    from fedtune.data.clinical import DX_LABELS, HOSPITALS, INSTRUCTION, generate_site

    lines = [INSTRUCTION, " ".join(DX_LABELS), '0123456789 {}[]":,/ 100/60 37.5']
    for site_index in range(len(HOSPITALS)):
        for example in generate_site(site_index, 40, seed=12345):
            lines.extend(content for _, content in example.messages)
    return lines


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    """The trained tokenizer as JSON; training is deterministic and takes well under a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return str(tok.to_str())


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh tokenizer: vocabulary of 512, ``<|im_end|>`` ends turns, ``<|pad|>`` pads."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        model_max_length=2048,
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer
