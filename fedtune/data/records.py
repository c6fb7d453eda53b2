"""A site's records: load and validate files, split, partition, tokenize for SFT.

Records are chat turns ending with the assistant's answer (the training target).
Files hold one of two shapes per record: ``instruction``/``input``/``output`` or
``messages`` (a list of ``{"role", "content"}``). Every malformed record raises a
:class:`~fedtune.errors.DataError` naming file, line (or Parquet row) and field.
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import hashlib
import io
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from fedtune.errors import ConfigError, DataError, ModelError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

ROLES = ("system", "user", "assistant")
SCHEMES = ("natural", "iid", "dirichlet")
IGNORE_INDEX = -100  # the label value torch's cross-entropy skips


@dataclass(frozen=True)
class Example:
    """One training record: chat turns ending with the assistant's answer.

    Attributes
    ----------
    messages : (role, content) pairs; the last is the ``assistant`` target.
    site : the site the record belongs to ("" when unknown).
    """

    messages: tuple[tuple[str, str], ...]
    site: str = ""

    def __post_init__(self) -> None:
        # lists from callers become tuples, so examples stay hashable
        object.__setattr__(self, "messages", tuple((r, c) for r, c in self.messages))
        _check_turns(self.messages)

    @classmethod
    def from_instruction(cls, instruction: str, input: str, output: str, site: str = "") -> Example:
        """Build a user + assistant pair; the user turn is ``instruction`` + blank line + ``input``."""
        user = f"{instruction}\n\n{input}" if input else instruction
        return cls(messages=(("user", user), ("assistant", output)), site=site)

    @property
    def prompt_messages(self) -> tuple[tuple[str, str], ...]:
        """All turns but the target."""
        return self.messages[:-1]

    @property
    def target(self) -> str:
        """The assistant answer the model learns to produce."""
        return self.messages[-1][1]


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids and labels; labels are -100 on the prompt, ids on the answer."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]


# --------------------------------------------------------------------------- files


def _rows(path: Path) -> list[tuple[str, Any]]:
    """(where, raw record) pairs: where is the 1-based line (JSONL, CSV) or ``row N`` (Parquet)."""
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".parquet"):
        raise DataError(f"{path}: unknown data file type {suffix!r}; use .jsonl, .csv or .parquet")
    try:
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return [(f"row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
        # bytes, not read_text: no newline translation inside quoted CSV fields
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read data file ({err.strerror or err}); check the path") from err
    except Exception as err:  # pyarrow's own error types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({err}); re-export it") from err
    text = _utf8(path, data)
    if suffix == ".csv":
        return _csv_rows(path, text)
    rows: list[tuple[str, Any]] = []
    # split on "\n" only: str.splitlines would also split at U+2028 inside a JSON string
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((str(number), json.loads(line)))
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno}); fix or remove the record"
            ) from err
    return rows


def _utf8(path: Path, data: bytes) -> str:
    """The file's text; a byte that is not UTF-8 is reported with its line and byte offset."""
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # a BOM is dropped
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        offset = bom + err.start  # in the file, BOM included, as `xxd` or `od` show it
        line = data.count(b"\n", 0, offset) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[offset]:02x} at byte offset {offset}: {err.reason}); "
            f"re-save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8`"
        ) from err


def _csv_rows(path: Path, text: str) -> list[tuple[str, Any]]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    rows: list[tuple[str, Any]] = []
    while header is not None:
        start = reader.line_num + 1  # a quoted field may span lines: report where it starts
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as err:
            raise DataError(f"{path}:{start}: not valid CSV ({err}); fix or remove the record") from err
        if values and len(values) != len(header):
            raise DataError(
                f"{path}:{start}: expected {len(header)} fields as in the header, "
                f"got {len(values)}; fix or remove the record"
            )
        if values:
            rows.append((str(start), dict(zip(header, values, strict=True))))
    return rows


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _text(raw: Mapping[str, Any], key: str, *, optional: bool = False) -> str:
    value = raw.get(key)
    if optional and value is None:
        return ""
    if key not in raw:
        raise DataError(
            f"field `{key}` is missing; a record needs `instruction` and `output` (`input` optional) or `messages`"
        )
    if not isinstance(value, str) or not (optional or value.strip()):
        kind = "a string" if optional else "a non-empty string"
        raise DataError(f"field `{key}` must be {kind}, got {_show(value)}")
    return value


def _check_turns(turns: Sequence[tuple[Any, Any]]) -> None:
    """Raise DataError naming the first bad part of a `messages` list."""
    if not turns:
        raise DataError("field `messages` must be a non-empty list of turns, got []")
    for k, (role, content) in enumerate(turns):
        if role not in ROLES:
            roles = ", ".join(ROLES)
            raise DataError(f"field `messages[{k}].role` must be one of {roles}, got {_show(role)}")
        if not isinstance(content, str) or not content.strip():
            raise DataError(f"field `messages[{k}].content` must be a non-empty string, got {_show(content)}")
    if turns[-1][0] != "assistant":
        last = turns[-1][0]
        raise DataError(f"field `messages` must end with an assistant turn, got {last!r} last")
    if not any(role == "user" for role, _ in turns):
        raise DataError("field `messages` must contain at least one user turn")


def _parse_messages(value: Any) -> tuple[tuple[str, str], ...]:
    if isinstance(value, str):  # CSV cells (and some Parquet exports) hold the list as JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError as err:
            raise DataError(f"field `messages` is not valid JSON ({err.msg})") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"field `messages` must be a non-empty list of turns, got {_show(value)}")
    for k, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise DataError(f"field `messages[{k}]` must be a {{role, content}} object, got {_show(turn)}")
    turns = [(turn.get("role"), turn.get("content")) for turn in value]
    _check_turns(turns)
    return tuple((str(r), str(c)) for r, c in turns)


def _parse_record(raw: Any) -> tuple[tuple[tuple[str, str], ...], str]:
    """(messages, site) of one raw record; DataError text names the field, not the place."""
    if not isinstance(raw, Mapping):
        raise DataError(f"record must be a JSON object, got {type(raw).__name__}")
    site = raw.get("site") or ""
    if not isinstance(site, str):
        raise DataError(f"field `site` must be a string, got {_show(site)}")
    if raw.get("messages") not in (None, ""):
        if raw.get("instruction") not in (None, ""):
            raise DataError("record has both `messages` and `instruction`; keep one form")
        return _parse_messages(raw["messages"]), site
    instruction = _text(raw, "instruction")
    input_text = _text(raw, "input", optional=True)
    output = _text(raw, "output")
    return Example.from_instruction(instruction, input_text, output).messages, site


def load_records(path: Path, *, site: str = "") -> list[Example]:
    """Load and validate a ``.jsonl``, ``.csv`` (header row) or ``.parquet`` file.

    Parameters
    ----------
    path : the data file.
    site : site id given to every record; when empty, a record's own ``site`` field is kept.

    Raises
    ------
    DataError
        One line naming the file, line (or Parquet row) and field of the first bad record.
    """
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise DataError(f"{path}: no records found; a site file needs at least one record")
    examples = []
    for where, raw in rows:
        sep = ":" if where[0].isdigit() else ": "
        try:
            messages, own_site = _parse_record(raw)
        except DataError as err:
            raise DataError(f"{path}{sep}{where}: {err}; fix or remove the record") from None
        examples.append(Example(messages=messages, site=site or own_site))
    return examples


def _record(example: Example, style: Literal["messages", "instruction"]) -> dict[str, Any]:
    record: dict[str, Any]
    if style == "instruction":
        roles = [role for role, _ in example.messages]
        if roles != ["user", "assistant"]:
            raise DataError(
                f"`style` 'instruction' needs a user + assistant pair, got roles {roles}; write with style='messages'"
            )
        # split the user turn at its first blank line, as from_instruction joined it; the
        # split is kept only where joining it back gives the very same text
        instruction, _, input_text = example.messages[0][1].partition("\n\n")
        if not (instruction.strip() and input_text):
            instruction, input_text = example.messages[0][1], ""
        record = {"instruction": instruction, "input": input_text, "output": example.target}
    else:
        record = {"messages": [{"role": r, "content": c} for r, c in example.messages]}
    if example.site:
        record["site"] = example.site
    return record


def write_records(
    path: Path,
    examples: Sequence[Example],
    *,
    style: Literal["messages", "instruction"] = "messages",
) -> None:
    """Write examples as JSONL atomically (parent folders made); :func:`load_records` reads them back equal.

    ``style="instruction"`` writes ``instruction``/``input``/``output``, splitting the user
    turn at its first blank line; it needs user + assistant pairs.
    """
    from fedtune.atomic import atomic_write_bytes

    lines = [json.dumps(_record(ex, style), ensure_ascii=False) + "\n" for ex in examples]
    # Patient records: readable by the owner only.
    atomic_write_bytes(Path(path), "".join(lines).encode("utf-8"), mode=0o600)


def dataset_hash(examples: Sequence[Example]) -> str:
    """SHA-256 hex of the records' canonical JSON (content and order; site ids excluded)."""
    canonical = json.dumps(
        [[list(turn) for turn in ex.messages] for ex in examples],
        ensure_ascii=False,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def record_digests(examples: Sequence[Example]) -> list[bytes]:
    """SHA-256 of each record's canonical JSON, deduplicated and sorted.

    The privacy ledger accounts per record: a record's digest is the same in every file
    and order it appears in, so a dataset that grows keeps its old records' spend.
    """
    out = set()
    for ex in examples:
        canonical = json.dumps([list(turn) for turn in ex.messages], ensure_ascii=False, separators=(",", ":"))
        out.add(hashlib.sha256(canonical.encode("utf-8")).digest())
    return sorted(out)


def dataset_id(digests: Sequence[bytes]) -> str:
    """Content id of a set of records (order-insensitive): SHA-256 hex of the sorted digests."""
    return hashlib.sha256(b"".join(sorted(set(digests)))).hexdigest()


# --------------------------------------------------------------------------- splits


def split_train_eval(
    examples: Sequence[Example], *, eval_fraction: float, seed: int
) -> tuple[list[Example], list[Example]]:
    """Split deterministically into (train, eval), both in the input's order.

    Eval gets ``round(n * eval_fraction)`` records, at least 1 and at most n - 1 when n >= 2.
    """
    if not 0.0 < eval_fraction < 1.0:
        raise ConfigError(f"`data.eval_fraction` must be in (0, 1), got {eval_fraction}")
    n = len(examples)
    n_eval = min(max(1, round(n * eval_fraction)), n - 1) if n >= 2 else 0
    chosen = set(random.Random(seed).sample(range(n), n_eval))
    train = [ex for i, ex in enumerate(examples) if i not in chosen]
    return train, [ex for i, ex in enumerate(examples) if i in chosen]


def partition(
    sites: Mapping[str, Sequence[Example]],
    *,
    scheme: str,
    num_sites: int,
    seed: int,
    alpha: float = 0.5,
    label_fn: Callable[[Example], str] | None = None,
) -> dict[str, list[Example]]:
    """Assign records to sites; every record goes to exactly one site.

    Parameters
    ----------
    sites : records per site as collected (the natural split).
    scheme : ``natural`` (keep ``sites``), ``iid`` (pool, shuffle, deal) or ``dirichlet``
        (pool; each label's records split by proportions ~ Dir(alpha), skewed for small alpha).
    num_sites : how many sites to produce; named ``site-0`` ... for ``iid`` and ``dirichlet``.
    label_fn : the label of a record, required by ``dirichlet``.

    Returns examples re-tagged with the site id they were assigned to.
    """
    if scheme not in SCHEMES:
        raise ConfigError(f"`data.partition` must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    if scheme == "natural":
        if num_sites != len(sites):
            raise ConfigError(
                f"`data.hospitals` must equal the number of sites ({len(sites)}) with the "
                f"natural partition, got {num_sites}"
            )
        return {name: [_tag(ex, name) for ex in exs] for name, exs in sites.items()}
    pool = [ex for exs in sites.values() for ex in exs]
    if num_sites < 1 or num_sites > len(pool):
        raise ConfigError(
            f"`data.hospitals` must be between 1 and the number of records ({len(pool)}) "
            f"with the {scheme} partition, got {num_sites}"
        )
    if scheme == "iid":
        import numpy as np  # here, like torch in collate(): numpy takes 0.1-0.2 s to load

        order = np.random.default_rng(seed).permutation(len(pool))
        groups = [sorted(order[k::num_sites].tolist()) for k in range(num_sites)]
    else:
        groups = _dirichlet_groups(pool, num_sites, seed=seed, alpha=alpha, label_fn=label_fn)
    names = [f"site-{k}" for k in range(num_sites)]
    return {n: [_tag(pool[i], n) for i in group] for n, group in zip(names, groups, strict=True)}


def _tag(example: Example, site: str) -> Example:
    return example if example.site == site else dataclasses.replace(example, site=site)


def _dirichlet_groups(
    pool: Sequence[Example],
    num_sites: int,
    *,
    seed: int,
    alpha: float,
    label_fn: Callable[[Example], str] | None,
) -> list[list[int]]:
    if label_fn is None:
        raise ConfigError("`data.partition` 'dirichlet' needs a label function; pass `label_fn`")
    if alpha <= 0:
        raise ConfigError(f"`data.dirichlet_alpha` must be positive, got {alpha}")
    import numpy as np

    rng = np.random.default_rng(seed)
    by_label: dict[str, list[int]] = {}
    for i, ex in enumerate(pool):
        by_label.setdefault(label_fn(ex), []).append(i)
    groups: list[list[int]] = [[] for _ in range(num_sites)]
    for label in sorted(by_label):  # sorted: dict order must not change the draw
        idx = rng.permutation(by_label[label])
        # cut points at the cumulative proportions: n=10, p=(.5,.3,.2) -> cuts at 5 and 8
        cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha)))[:-1] * len(idx)).astype(int)
        for k, part in enumerate(np.split(idx, cuts)):
            groups[k].extend(part.tolist())
    for k in range(num_sites):  # every site needs a record: take one from the largest site
        if not groups[k]:
            largest = max(range(num_sites), key=lambda j: len(groups[j]))
            groups[k].append(groups[largest].pop())
    return [sorted(g) for g in groups]


# --------------------------------------------------------------------------- tokens


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
    import torch  # here: reading and writing records (runfolder, the ledger, `fedtune status`) needs no torch

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
