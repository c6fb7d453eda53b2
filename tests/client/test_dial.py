"""``client check --dial``: what each answer of the coordinator to the signed probe is called, one line each.

In process, from the HTTP answers Flower 1.41's SuperLink gives (tests/e2e/test_deployment.py
dials a real one).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from fedtune.client.causes import FLEET_INVALID_HEARTBEAT_INTERVAL, FLEET_NODE_ACTIVATION_FAILED, Identity
from fedtune.client.dial import _refusal
from fedtune.client.health import Memory

WHO = Identity("st-elsewhere", "coord.example.org:9092", "keys/ca.pem", "keys/st-elsewhere.node.key", "SHA256:abc")
WHERE = "dial coord.example.org:9092"


def _answer(status: int, **kwargs: Any) -> httpx.Response:
    return httpx.Response(status, request=httpx.Request("POST", "https://coord/v1/fleet/activate-node"), **kwargs)


def _said(tmp_path: Path, response: httpx.Response) -> str | None:
    cfg = SimpleNamespace(state_dir=tmp_path)
    refusal = _refusal(cfg, WHO, WHERE, response)  # type: ignore[arg-type]
    return None if refusal is None else str(refusal)


def test_an_admitted_key_is_told_by_the_refused_interval(tmp_path: Path) -> None:
    answer = _answer(400, json={"code": FLEET_INVALID_HEARTBEAT_INTERVAL, "detail": "Invalid heartbeat interval"})
    assert _said(tmp_path, answer) is None


def test_an_unknown_key_is_not_registered_and_a_known_one_maybe_removed(tmp_path: Path) -> None:
    answer = _answer(412, json={"code": FLEET_NODE_ACTIVATION_FAILED, "detail": "Failed to activate SuperNode."})
    said = _said(tmp_path, answer)
    assert said is not None and said.startswith(f"{WHERE}: node key not registered: the coordinator at")
    assert "before" not in said
    Memory(tmp_path / "connection.json").save(node_key=WHO.fingerprint, node_id=42)
    assert "(it was connected as node 42 before: removed?)" in str(_said(tmp_path, answer))


@pytest.mark.parametrize(
    ("status", "clock_ahead", "expected"),
    [
        (401, -1200.0, "clock skew: "),  # the coordinator's Date is 20 minutes ahead of this machine
        (401, 0.0, "node key refused: "),
        (503, None, "coordinator down: its front answers HTTP 503 (TLS OK)"),
        (404, None, "not a coordinator: TLS OK"),
        (500, None, "Fleet call failed (TLS OK): HTTP 500"),
    ],
)
def test_each_refusal_is_named(tmp_path: Path, status: int, clock_ahead: float | None, expected: str) -> None:
    headers = {}
    if clock_ahead is not None:  # dated now, when the answer comes
        headers["date"] = format_datetime(datetime.now(UTC) - timedelta(seconds=clock_ahead), usegmt=True)
    said = _said(tmp_path, _answer(status, headers=headers, text="oops"))
    assert said is not None and said.startswith(f"{WHERE}: {expected}") and "\n" not in said
