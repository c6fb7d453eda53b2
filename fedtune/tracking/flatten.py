"""A run's config and metrics as MLflow's flat keys and values, within MLflow's limits."""

from __future__ import annotations

import json
import math
import re
from typing import Any

# MLflow's limits (mlflow.utils.validation): a key's length, a parameter value's length
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
_UNSAFE = re.compile(r"[^\w\-. /]")  # MLflow keys: letters, digits, _ - . space /


def key(text: str) -> str:
    """``text`` as an MLflow key: other characters become ``_``, cut to MLflow's length."""
    return _UNSAFE.sub("_", text)[:MAX_KEY]


def params(config: dict[str, dict[str, Any]]) -> dict[str, str]:
    """``section.field`` -> value text, for every field but the tracking section's own
    (its URI may name an internal server); lists as JSON, values cut to MLflow's length."""
    out: dict[str, str] = {}
    for section, fields in config.items():
        if section == "tracking":
            continue
        for name, value in fields.items():
            text = json.dumps(value) if isinstance(value, list) else str(value)
            out[key(f"{section}.{name}")] = text[:MAX_PARAM_VALUE]
    return out


def _walk(prefix: str, value: Any, out: dict[str, float]) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if math.isfinite(value):
            out[key(prefix)] = float(value)
    elif isinstance(value, dict):
        for k, v in value.items():
            _walk(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, list) and prefix:
        out[key(prefix)] = float(len(value))  # rejected / refused replies: how many


def round_metrics(record: dict[str, Any]) -> dict[str, float]:
    """One ``metrics.jsonl`` round as flat metrics: ``eval.<site|pooled>.<metric>``,
    ``train.<site>.<metric>`` (loss, steps, bytes, ``dp-epsilon``...), ``download-bytes``,
    ``seconds``, ``client-dp.epsilon``, and the counts of ``rejected`` / ``refused`` replies.
    Only finite numbers; ``kind`` and ``round`` (the step) are left out."""
    out: dict[str, float] = {}
    _walk("", {k: v for k, v in record.items() if k not in ("kind", "round")}, out)
    return out


def summary_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    """``summary.json``'s rows as ``summary.<model>.<column>`` metrics (numbers only)."""
    out: dict[str, float] = {}
    for row in rows:
        model = str(row.get("model", "?"))
        _walk(f"summary.{model}", {k: v for k, v in row.items() if k != "model"}, out)
    return out
