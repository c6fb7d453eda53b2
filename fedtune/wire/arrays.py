"""The adapter as Flower moves it: one packed float32 Array and its index."""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedtune.lora.delta import State

PACKED = "adapter"  # every tensor of the adapter, float32, one after another in key order
INDEX = "index"  # UTF-8 JSON [[key, shape], ...] as uint8: where each tensor lies in PACKED
_MAX_INDEX_BYTES = 1 << 24


def to_arrays(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """Adapter tensors -> ArrayRecord of two Arrays: the packed float32 values and their index.

    Flower moves every Array of a message as its own object (one HTTP request and several
    SuperLink database queries each, per hospital): SmolLM2's adapter as 240 Arrays took
    480 requests a message. Packed, it is one Array (in 5 MB chunks) and a small index.
    """
    keys = sorted(state)
    parts = [np.ascontiguousarray(state[k].detach().cpu().numpy(), dtype=np.float32).ravel() for k in keys]
    flat = np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)
    index = json.dumps([[k, list(state[k].shape)] for k in keys], separators=(",", ":")).encode()
    return ArrayRecord(
        {
            INDEX: Array.from_numpy_ndarray(np.frombuffer(index, dtype=np.uint8).copy()),
            PACKED: Array.from_numpy_ndarray(flat),
        }
    )


def from_arrays(record: ArrayRecord) -> State:
    """ArrayRecord -> adapter tensors (writable copies); ``ValueError`` naming what is malformed."""
    if set(record) != {INDEX, PACKED}:
        raise ValueError(f"an adapter record holds `{INDEX}` and `{PACKED}`, got {sorted(record)[:4]}")
    raw = record[INDEX].numpy()
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _MAX_INDEX_BYTES:
        raise ValueError("the adapter index is not a byte string of sane size")
    try:
        index = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError("the adapter index is not JSON") from err
    flat = record[PACKED].numpy()
    if flat.dtype != np.float32 or flat.ndim != 1:
        raise ValueError(f"the packed adapter must be a float32 vector, got {flat.dtype} of {flat.ndim} dims")
    if not isinstance(index, list):
        raise ValueError("the adapter index must be a list")
    out: State = {}
    offset = 0
    for entry in index:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
        if not ok or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1]):
            raise ValueError("an adapter index entry must be [key, [non-negative dims]]")
        key, shape = entry[0], tuple(entry[1])
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if key in out or offset + size > flat.size:
            raise ValueError(f"the adapter index does not fit the packed values (at {key!r})")
        out[key] = torch.from_numpy(np.array(flat[offset : offset + size], copy=True).reshape(shape))
        offset += size
    if offset != flat.size:
        raise ValueError(f"{flat.size - offset} packed values are not named by the index")
    return out
