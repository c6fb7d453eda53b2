"""Crash-safe round state on disk: per-round checkpoints, the metrics log, resume.

A round is *complete* when its checkpoint exists. The metrics line of a round is
written just before its checkpoint; on resume, lines of rounds after the last
checkpoint are dropped, so every round appears in ``metrics.jsonl`` exactly once.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedtune.atomic import atomic_write_bytes, atomic_write_json
from fedtune.errors import CheckpointError

if TYPE_CHECKING:  # torch and safetensors load where tensors are saved or read, not for `fedtune status`
    import torch

AUX = "fedtune.aux/"  # prefix of tensors that are round state, not adapter (e.g. server optimizer moments)
CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
METRICS = "metrics.jsonl"


@dataclass(frozen=True)
class Checkpoint:
    """The global adapter after ``server_round``, what it belongs to, and the tensors of the
    coordinator's round state (``aux``: e.g. server optimizer moments), saved in the same file."""

    server_round: int
    state: dict[str, torch.Tensor]
    meta: dict[str, str]
    aux: dict[str, torch.Tensor] = field(default_factory=dict)


def checkpoint_path(run_dir: Path, server_round: int) -> Path:
    return run_dir / CHECKPOINTS / f"round-{server_round:04d}.safetensors"


def save_checkpoint(run_dir: Path, ckpt: Checkpoint, *, extra: Mapping[str, Any] | None = None) -> None:
    """Write the round's tensors, then point ``latest.json`` at them (both atomic).

    ``extra`` (JSON-able, e.g. strategy state) is stored in ``latest.json``.
    """
    from safetensors.torch import save_file

    path = checkpoint_path(run_dir, ckpt.server_round)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in ckpt.state.items()}
        tensors.update({AUX + k: v.detach().to("cpu").contiguous() for k, v in ckpt.aux.items()})
        meta = {**ckpt.meta, "server_round": str(ckpt.server_round)}
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    atomic_write_json(
        run_dir / CHECKPOINTS / LATEST,
        {"server_round": ckpt.server_round, "file": path.name, "extra": dict(extra or {})},
    )


def load_checkpoint(run_dir: Path, server_round: int) -> Checkpoint:
    from safetensors import SafetensorError, safe_open

    path = checkpoint_path(run_dir, server_round)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, SafetensorError) as err:
        raise CheckpointError(f"{path}: cannot read checkpoint ({err}); the run folder is damaged") from err
    state = {k: v for k, v in tensors.items() if not k.startswith(AUX)}
    aux = {k[len(AUX) :]: v for k, v in tensors.items() if k.startswith(AUX)}
    if meta.get("server_round") != str(server_round):
        raise CheckpointError(f"{path}: checkpoint says round {meta.get('server_round')}, expected {server_round}")
    meta.pop("server_round")
    return Checkpoint(server_round=server_round, state=state, meta=meta, aux=aux)


def latest_round(run_dir: Path) -> tuple[int, dict[str, Any]] | None:
    """The last completed round and its extra state, or None for a fresh run."""
    path = run_dir / CHECKPOINTS / LATEST
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        return int(info["server_round"]), dict(info.get("extra", {}))
    except (ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: unreadable ({err}); the run folder is damaged") from err


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, each with a ``kind`` and ``round``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, record: Mapping[str, Any]) -> None:
        """Append one line durably (flush + fsync) before anything depends on it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        records = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a torn last line from a crash: everything after it is void
        return records

    def keep_rounds_up_to(self, server_round: int) -> None:
        """Drop round records after ``server_round`` (those rounds will run again)."""
        kept = [r for r in self.read() if int(r.get("round", 0)) <= server_round]
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        atomic_write_bytes(self.path, text.encode())
