"""The privacy ledger's file format, validated strictly: a malformed ledger must never under-count.

One JSON object: ``version``, ``policy`` (budget, delta, accountant) and ``datasets``, each
with its label, record count, registration time and every release (its id, time, run,
round, and mechanism: noise multiplier, sample rate, steps). Each dataset's record
digests are ``DIGEST_BYTES``-byte SHA-256 values in a file of their own.
"""

from __future__ import annotations

from typing import Any

from fedtune.errors import ConfigError, PrivacyError
from fedtune.privacy.accounting import Mechanism

LEDGER_VERSION = 1
DIGEST_BYTES = 32
_RELEASE_FIELDS: dict[str, type] = {"release": str, "time": str, "run_id": str, "server_round": int, "steps": int}
_RELEASE_FLOATS = ("noise_multiplier", "sample_rate")


def release_mechanism(release: dict[str, Any]) -> Mechanism:
    """What one recorded release did to its records."""
    return Mechanism(release["noise_multiplier"], release["sample_rate"], release["steps"])


def split_digests(raw: bytes) -> list[bytes]:
    """A digests file's content, one digest each."""
    return [raw[i : i + DIGEST_BYTES] for i in range(0, len(raw), DIGEST_BYTES)]


def parse_ledger(state: Any, where: str) -> dict[str, dict[str, Any]]:
    """Validate a ledger's content strictly: a malformed ledger must never under-count."""
    if not isinstance(state, dict) or state.get("version") != LEDGER_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise PrivacyError(f"{where}: `version` must be {LEDGER_VERSION}, got {got!r}; restore it from backup")
    datasets = state.get("datasets")
    if not isinstance(datasets, dict):
        raise PrivacyError(f"{where}: `datasets` must be an object; restore it from backup")
    out: dict[str, dict[str, Any]] = {}
    for ds, info in datasets.items():
        ok = isinstance(info, dict) and isinstance(info.get("releases"), list)
        ok = ok and isinstance(info.get("records"), int) and isinstance(info.get("registered"), str)
        if not ok or not isinstance(info.get("label", ""), str):
            raise PrivacyError(f"{where}: dataset `{ds}` is malformed; restore it from backup")
        for r in info["releases"]:
            _check_release(r, ds, where)
        out[ds] = {
            "label": info.get("label", ""),
            "records": info["records"],
            "registered": info["registered"],
            "releases": [dict(r) for r in info["releases"]],
        }
    return out


def _check_release(r: Any, ds: str, where: str) -> None:
    ok = isinstance(r, dict) and all(
        isinstance(r.get(k), t) and not isinstance(r.get(k), bool) for k, t in _RELEASE_FIELDS.items()
    )
    ok = ok and all(isinstance(r.get(k), int | float) for k in _RELEASE_FLOATS)
    if not ok:
        raise PrivacyError(f"{where}: malformed release {r!r} of dataset `{ds}`; restore it from backup")
    try:
        release_mechanism(r)
    except ConfigError as err:
        raise PrivacyError(f"{where}: bad release of dataset `{ds}`: {err}") from err
