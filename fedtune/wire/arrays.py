"""The adapter as Flower moves it: one packed Array and its index; and the dtype a delta travels in.

A delta goes on the wire in the run's ``federation.wire_dtype``: ``float32`` (exact, the
default), ``bfloat16`` (float32's range, 8 bits of precision: half the bytes) or
``float16`` (11 bits of precision, values up to 65504: half the bytes). The coordinator
accepts only the run's dtype and decodes every update to float32 before it is validated
and merged. The global adapter always goes out as float32.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from fedtune.errors import UpdateRejected
from fedtune.lora.delta import State

PACKED = "adapter"  # every tensor of the adapter, one after another in key order, in the wire dtype
INDEX = "index"  # UTF-8 JSON [[key, shape], ...] as uint8: where each tensor lies in PACKED
RAW = "fedtune.raw-le"  # Array.stype of a 16-bit PACKED: the values' little-endian bytes (NumPy has no bfloat16)
_MAX_INDEX_BYTES = 1 << 24
# ``federation.wire_dtype``'s names (config.WIRE_DTYPES is tested equal to them, in order)
WIRE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_wire(state: Mapping[str, torch.Tensor], dtype: str) -> State:
    """``state`` cast to the wire dtype ``dtype`` (no copy for float32); ``ValueError`` when a
    finite value does not fit float16 (above 65504; bfloat16 has float32's range)."""
    target = WIRE_DTYPES[dtype]
    out: State = {}
    for key, value in state.items():
        cast = value.detach().cpu().to(target).contiguous()
        if target == torch.float16 and not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(value).all()):
            raise ValueError(
                f"tensor {key} holds values beyond {dtype}'s range: set `federation.wire_dtype` = 'bfloat16' "
                "(float32's range) or 'float32'"
            )
        out[key] = cast
    return out


def from_wire(state: Mapping[str, torch.Tensor], dtype: str) -> State:
    """A received update in float32; ``UpdateRejected`` unless every tensor is in the run's wire dtype."""
    target = WIRE_DTYPES[dtype]
    for key, value in state.items():
        if value.dtype != target:
            got = str(value.dtype).removeprefix("torch.")
            raise UpdateRejected(f"tensor {key} is {got} on the wire, the run's `federation.wire_dtype` is {dtype}")
    return {k: v.to(torch.float32) for k, v in state.items()}  # no copy when already float32


def to_arrays(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    """Adapter tensors -> ArrayRecord of two Arrays: the packed values in ``dtype`` and their index.

    Flower moves every Array of a message as its own object (one HTTP request and several
    SuperLink database queries each, per hospital): SmolLM2's adapter as 240 Arrays took
    480 requests a message. Packed, it is one Array (in 5 MB chunks) and a small index.
    """
    keys = sorted(state)
    index = json.dumps([[k, list(state[k].shape)] for k in keys], separators=(",", ":")).encode()
    if dtype == "float32":
        parts = [np.ascontiguousarray(state[k].detach().cpu().numpy(), dtype=np.float32).ravel() for k in keys]
        packed = Array.from_numpy_ndarray(np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32))
    else:
        cast = to_wire(state, dtype)
        flat = torch.cat([cast[k].reshape(-1) for k in keys]) if keys else torch.zeros(0, dtype=WIRE_DTYPES[dtype])
        packed = Array(dtype=dtype, shape=(flat.numel(),), stype=RAW, data=flat.view(torch.uint8).numpy().tobytes())
    return ArrayRecord({INDEX: Array.from_numpy_ndarray(np.frombuffer(index, dtype=np.uint8).copy()), PACKED: packed})


def _index(record: ArrayRecord) -> list[tuple[str, tuple[int, ...]]]:
    if set(record) != {INDEX, PACKED}:
        raise ValueError(f"an adapter record holds `{INDEX}` and `{PACKED}`, got {sorted(record)[:4]}")
    raw = record[INDEX].numpy()
    if raw.dtype != np.uint8 or raw.ndim != 1 or raw.size > _MAX_INDEX_BYTES:
        raise ValueError("the adapter index is not a byte string of sane size")
    try:
        index = json.loads(raw.tobytes().decode())
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError("the adapter index is not JSON") from err
    if not isinstance(index, list):
        raise ValueError("the adapter index must be a list")
    out = []
    for entry in index:
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and isinstance(entry[1], list)
        if not ok or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1]):
            raise ValueError("an adapter index entry must be [key, [non-negative dims]]")
        out.append((entry[0], tuple(entry[1])))
    return out


def _packed(array: Array, dtype: str) -> torch.Tensor:
    """The packed values as a flat tensor in ``dtype``."""
    if array.dtype != dtype:
        raise ValueError(f"the adapter is {array.dtype} on the wire, the run's `federation.wire_dtype` is {dtype}")
    if dtype == "float32":
        flat = array.numpy()
        if flat.dtype != np.float32 or flat.ndim != 1:
            raise ValueError(f"the packed adapter must be a float32 vector, got {flat.dtype} of {flat.ndim} dims")
        return torch.from_numpy(flat)  # np.load's own array: writable
    size = WIRE_DTYPES[dtype].itemsize
    if array.stype != RAW or len(array.shape) != 1 or len(array.data) != array.shape[0] * size:
        raise ValueError(f"the packed adapter must be {array.shape} {dtype} values as raw little-endian bytes")
    return torch.frombuffer(bytearray(array.data), dtype=WIRE_DTYPES[dtype])


def from_arrays(record: ArrayRecord, dtype: str = "float32") -> State:
    """ArrayRecord packed in ``dtype`` -> float32 adapter tensors (writable copies); ``ValueError``
    naming what is malformed, or the dtype when it is not ``dtype``."""
    index = _index(record)
    flat = _packed(record[PACKED], dtype)
    out: State = {}
    offset = 0
    for key, shape in index:
        size = int(np.prod(shape, dtype=np.int64)) if shape else 1
        if key in out or offset + size > flat.numel():
            raise ValueError(f"the adapter index does not fit the packed values (at {key!r})")
        out[key] = flat[offset : offset + size].to(torch.float32, copy=True).reshape(shape)  # each its own
        offset += size
    if offset != flat.numel():
        raise ValueError(f"{flat.numel() - offset} packed values are not named by the index")
    return out
