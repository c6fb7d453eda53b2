"""fedtune.data.records: loading and validation, round trips, splits, partitions, tokenization."""

from __future__ import annotations

import collections
import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.data.records import (
    IGNORE_INDEX,
    Example,
    TokenizedExample,
    collate,
    dataset_hash,
    load_records,
    partition,
    prompt_ids,
    split_train_eval,
    tokenize,
    write_records,
)
from fedtune.data.tiny import CHATML_TEMPLATE, build_tiny_tokenizer
from fedtune.errors import ConfigError, DataError, ModelError

GOOD = {"instruction": "Extract the age.", "input": "A 67-year-old woman.", "output": "67"}


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


def _jsonl(tmp_path: Path, *records: object, name: str = "a.jsonl") -> Path:
    path = tmp_path / name
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _examples(n: int, labels: str = "abcd") -> list[Example]:
    return [
        Example.from_instruction("Label it.", f"note {i}", labels[i % len(labels)], site=f"s{i % 3}") for i in range(n)
    ]


# --------------------------------------------------------------------------- loading


def test_example_helpers() -> None:
    ex = Example.from_instruction("Do it.", "the note", "done", site="x")
    assert ex.messages == (("user", "Do it.\n\nthe note"), ("assistant", "done"))
    assert ex.prompt_messages == (("user", "Do it.\n\nthe note"),)
    assert ex.target == "done"
    assert Example.from_instruction("Do it.", "", "done").messages[0] == ("user", "Do it.")
    listed = Example(messages=[["user", "q"], ["assistant", "a"]])  # type: ignore[arg-type]
    assert hash(listed) == hash(Example(messages=(("user", "q"), ("assistant", "a"))))
    with pytest.raises(DataError, match=r"`messages` must end with an assistant turn"):
        Example(messages=(("user", "q"),))


def test_load_jsonl_instruction_and_messages(tmp_path: Path) -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Age?"},
            {"role": "assistant", "content": "67"},
        ]
    }
    path = _jsonl(tmp_path, GOOD, "", {"instruction": "Say hi.", "output": "hi"}, chat)
    records = load_records(path, site="h1")
    assert [r.target for r in records] == ["67", "hi", "67"]
    assert records[0].messages[0] == ("user", "Extract the age.\n\nA 67-year-old woman.")
    assert records[1].messages[0] == ("user", "Say hi.")
    assert records[2].messages[0] == ("system", "Be terse.")
    assert {r.site for r in records} == {"h1"}


@pytest.mark.parametrize(
    ("line", "pattern"),
    [
        ("{not json", r"a\.jsonl:2: not valid JSON"),
        ("[1, 2]", r"a\.jsonl:2: record must be a JSON object, got list"),
        ({"instruction": "x"}, r"a\.jsonl:2: field `output` is missing"),
        ({"input": "x", "output": "y"}, r"a\.jsonl:2: field `instruction` is missing"),
        ({**GOOD, "output": 3}, r"a\.jsonl:2: field `output` must be a non-empty string, got 3; fix or remove"),
        ({**GOOD, "output": "  "}, r"a\.jsonl:2: field `output` must be a non-empty string"),
        ({**GOOD, "instruction": ""}, r"a\.jsonl:2: field `instruction` must be a non-empty string"),
        ({**GOOD, "input": 5}, r"a\.jsonl:2: field `input` must be a string, got 5"),
        ({**GOOD, "site": 1}, r"a\.jsonl:2: field `site` must be a string"),
        ({"messages": []}, r"a\.jsonl:2: field `messages` must be a non-empty list"),
        ({"messages": "[oops"}, r"a\.jsonl:2: field `messages` is not valid JSON"),
        ({"messages": ["hi"]}, r"a\.jsonl:2: field `messages\[0\]` must be a \{role, content\} object"),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]},
            r"a\.jsonl:2: field `messages\[1\]\.role` must be one of system, user, assistant, got 'bot'",
        ),
        (
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            r"a\.jsonl:2: field `messages\[1\]\.content` must be a non-empty string",
        ),
        (
            {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
            r"a\.jsonl:2: field `messages` must end with an assistant turn, got 'user' last",
        ),
        (
            {"messages": [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
            r"a\.jsonl:2: field `messages` must contain at least one user turn",
        ),
        (
            {**GOOD, "messages": [{"role": "user", "content": "q"}]},
            r"a\.jsonl:2: record has both `messages` and `instruction`",
        ),
    ],
)
def test_malformed_jsonl_names_line_and_field(tmp_path: Path, line: object, pattern: str) -> None:
    path = _jsonl(tmp_path, GOOD, line)
    with pytest.raises(DataError, match=pattern):
        load_records(path)


def test_jsonl_line_numbers_count_blank_lines(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, GOOD, "", "   ", {"instruction": "x", "output": 7})
    with pytest.raises(DataError, match=r"a\.jsonl:4: field `output`"):
        load_records(path)


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"missing\.jsonl: cannot read data file .*check the path"):
        load_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"missing\.parquet: cannot read data file"):
        load_records(tmp_path / "missing.parquet")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a\.txt: unknown data file type '\.txt'; use \.jsonl"):
        load_records(tmp_path / "a.txt")
    for name, text in [("e.jsonl", ""), ("b.jsonl", "\n \n"), ("e.csv", ""), ("h.csv", "instruction,output\n")]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}: no records found"):
            load_records(tmp_path / name)
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(DataError, match=r"bin\.jsonl:1: not UTF-8 text \(byte 0xff at byte offset 0"):
        load_records(tmp_path / "bin.jsonl")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable Parquet file"):
        load_records(tmp_path / "bad.parquet")


def _write_csv(path: Path, rows: list[list[str]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)


@pytest.mark.parametrize(("name", "bom"), [("latin1.jsonl", b""), ("latin1.csv", b""), ("bom.jsonl", b"\xef\xbb\xbf")])
def test_non_utf8_file_names_line_and_byte_offset(tmp_path: Path, name: str, bom: bytes) -> None:
    """A Latin-1 export (e.g. from a hospital's Windows tool): line 3 holds 'é' as the byte 0xe9."""
    if name.endswith(".csv"):
        lines = ["instruction,output", "Summarise,ok", "Caf\u00e9 du patient,ok"]
    else:
        good = json.dumps({"instruction": "Summarise", "output": "ok"})
        lines = [good, good, '{"instruction": "Caf\u00e9 du patient", "output": "ok"}']
    data = bom + "\n".join(lines).encode("latin-1") + b"\n"
    (tmp_path / name).write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError) as caught:
        load_records(tmp_path / name)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / name}:3: not UTF-8 text (byte 0xe9 at byte offset {offset}: ")
    assert message.endswith("re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`")
    # the same file re-saved as UTF-8 loads (the BOM, if any, is dropped)
    (tmp_path / name).write_bytes(bom + "\n".join(lines).encode("utf-8") + b"\n")
    assert load_records(tmp_path / name)[-1].messages[0][1].startswith("Caf\u00e9")


def test_csv_loads_and_counts_header_as_line_1(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text(
        'instruction,input,output\nAge?,"A note\nover two lines",67\nSay hi.,,hi\n\nChat?,,\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"a\.csv:6: field `output` must be a non-empty string, got ''"):
        load_records(path)
    path.write_text('instruction,input,output\nAge?,"A note\nover two lines",67\nSay hi.,,hi\n')
    records = load_records(path)
    assert records[0].messages[0][1] == "Age?\n\nA note\nover two lines"
    assert records[1].messages == (("user", "Say hi."), ("assistant", "hi"))
    path.write_text("instruction,input,output\nAge?,x\n")
    with pytest.raises(DataError, match=r"a\.csv:2: expected 3 fields as in the header, got 2"):
        load_records(path)
    _write_csv(path, [["messages"], [json.dumps([{"role": "user", "content": "q"}])]])
    with pytest.raises(DataError, match=r"a\.csv:2: field `messages` must end with an assistant turn"):
        load_records(path)


def test_csv_messages_column(tmp_path: Path) -> None:
    turns = [{"role": "user", "content": "q, with comma"}, {"role": "assistant", "content": "a"}]
    path = tmp_path / "m.csv"
    _write_csv(path, [["messages", "site"], [json.dumps(turns), "north"]])
    assert load_records(path) == [Example((("user", "q, with comma"), ("assistant", "a")), site="north")]


def test_parquet_loads_and_names_rows(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist([GOOD, {**GOOD, "input": None}]), path)
    records = load_records(path, site="p")
    assert records[1].messages[0] == ("user", "Extract the age.") and records[1].site == "p"
    pq.write_table(pa.Table.from_pylist([GOOD, GOOD, {**GOOD, "output": None}]), path)
    with pytest.raises(DataError, match=r"a\.parquet: row 3: field `output` must be a non-empty string, got None"):
        load_records(path)
    chat = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    pq.write_table(pa.Table.from_pylist([{"messages": chat}]), path)
    assert load_records(path)[0].messages == (("user", "q"), ("assistant", "a"))


# --------------------------------------------------------------------------- writing


_text = st.text(min_size=1, max_size=30).filter(lambda s: s.strip() != "")
_example = st.builds(
    lambda sys_, turns, answer, site: Example(
        messages=((("system", sys_),) if sys_ else ()) + tuple(turns) + (("assistant", answer),),
        site=site,
    ),
    st.one_of(st.just(""), _text),
    st.lists(st.tuples(st.sampled_from(["user", "assistant"]), _text), min_size=0, max_size=3).map(
        lambda turns: [("user", "first")] + turns
    ),
    _text,
    st.sampled_from(["", "north", "st-elsewhere"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(examples=st.lists(_example, min_size=1, max_size=5))
def test_write_load_round_trip(tmp_path: Path, examples: list[Example]) -> None:
    path = tmp_path / "rt.jsonl"
    write_records(path, examples)
    assert load_records(path) == examples
    pairs = [ex for ex in examples if [r for r, _ in ex.messages] == ["user", "assistant"]]
    if pairs:
        write_records(path, pairs, style="instruction")
        assert load_records(path) == pairs
    assert [p.name for p in tmp_path.iterdir()] == ["rt.jsonl"]  # no temp file left


def test_instruction_style_splits_user_turn(tmp_path: Path) -> None:
    path = tmp_path / "i.jsonl"
    examples = [Example.from_instruction("Do it.", "the note", "done"), Example.from_instruction("x\n\n", "", "y")]
    write_records(path, examples, style="instruction")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"instruction": "Do it.", "input": "the note", "output": "done"}
    assert lines[1] == {"instruction": "x\n\n", "input": "", "output": "y"}
    assert load_records(path) == examples
    chat = Example((("system", "s"), ("user", "q"), ("assistant", "a")))
    with pytest.raises(DataError, match=r"`style` 'instruction' needs a user \+ assistant pair"):
        write_records(path, [chat], style="instruction")
    assert load_records(path) == examples  # a failed write leaves the old file whole


def test_dataset_hash_is_content_only_and_stable() -> None:
    examples = _examples(5)
    assert dataset_hash(examples) == dataset_hash(list(examples))
    assert dataset_hash(examples) != dataset_hash(examples[::-1])
    assert dataset_hash([Example(e.messages, site="elsewhere") for e in examples]) == dataset_hash(examples)
    code = (
        "from fedtune.data.records import Example, dataset_hash;"
        "print(dataset_hash([Example.from_instruction('Label it.', 'note é', 'a')]))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == dataset_hash([Example.from_instruction("Label it.", "note é", "a")])


# --------------------------------------------------------------------------- splits


def test_split_train_eval() -> None:
    examples = _examples(20)
    train, held = split_train_eval(examples, eval_fraction=0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    assert sorted(train + held, key=examples.index) == examples
    assert (train, held) == split_train_eval(examples, eval_fraction=0.25, seed=3)
    assert held != split_train_eval(examples, eval_fraction=0.25, seed=4)[1]
    assert [len(p) for p in split_train_eval(examples[:2], eval_fraction=0.01, seed=0)] == [1, 1]
    assert [len(p) for p in split_train_eval(examples[:3], eval_fraction=0.99, seed=0)] == [1, 2]
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(ConfigError, match=r"`data.eval_fraction` must be in \(0, 1\)"):
            split_train_eval(examples, eval_fraction=bad, seed=0)


def _sites() -> dict[str, list[Example]]:
    examples = _examples(120)
    return {s: [e for e in examples if e.site == s] for s in ("s0", "s1", "s2")}


def _assert_covers(out: dict[str, list[Example]], sites: dict[str, list[Example]]) -> None:
    assigned = [e.messages for exs in out.values() for e in exs]
    assert collections.Counter(assigned) == collections.Counter(e.messages for v in sites.values() for e in v)
    assert all(exs for exs in out.values())
    assert all(e.site == name for name, exs in out.items() for e in exs)


def test_partition_natural_and_iid() -> None:
    sites = _sites()
    assert partition(sites, scheme="natural", num_sites=3, seed=0) == sites
    with pytest.raises(ConfigError, match=r"`data.hospitals` must equal the number of sites \(3\)"):
        partition(sites, scheme="natural", num_sites=4, seed=0)
    out = partition(sites, scheme="iid", num_sites=7, seed=1)
    assert list(out) == [f"site-{k}" for k in range(7)]
    _assert_covers(out, sites)
    assert {len(v) for v in out.values()} <= {17, 18}
    assert out == partition(sites, scheme="iid", num_sites=7, seed=1)
    assert out != partition(sites, scheme="iid", num_sites=7, seed=2)
    with pytest.raises(ConfigError, match=r"`data.hospitals` must be between 1 and the number of records"):
        partition(sites, scheme="iid", num_sites=121, seed=0)


def test_partition_dirichlet_is_skewed_and_complete() -> None:
    sites = _sites()
    label = lambda e: e.target  # noqa: E731
    out = partition(sites, scheme="dirichlet", num_sites=4, seed=0, alpha=0.1, label_fn=label)
    _assert_covers(out, sites)
    assert out == partition(sites, scheme="dirichlet", num_sites=4, seed=0, alpha=0.1, label_fn=label)
    mixes = [collections.Counter(label(e) for e in exs) for exs in out.values()]
    top_shares = [max(m.values()) / sum(m.values()) for m in mixes]
    assert max(top_shares) > 0.6  # pooled data is 25% per label; small alpha concentrates it
    assert len({m.most_common(1)[0][0] for m in mixes}) > 1
    many = partition(sites, scheme="dirichlet", num_sites=40, seed=5, alpha=0.01, label_fn=label)
    _assert_covers(many, sites)  # every one of 40 sites still gets a record
    with pytest.raises(ConfigError, match=r"`data.partition` 'dirichlet' needs a label function"):
        partition(sites, scheme="dirichlet", num_sites=3, seed=0)
    with pytest.raises(ConfigError, match=r"`data.partition` must be one of natural, iid, dirichlet, got 'zipf'"):
        partition(sites, scheme="zipf", num_sites=3, seed=0)


# --------------------------------------------------------------------------- tokens


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
