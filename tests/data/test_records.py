"""fedtune.data.records: loading and validation, round trips, content digests."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedtune.data.records import Example, dataset_hash, load_records, write_records
from fedtune.errors import DataError

GOOD = {"instruction": "Extract the age.", "input": "A 67-year-old woman.", "output": "67"}


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
