"""The daemon's view of its link, from what its SuperNode prints: states, one-line causes,
and the Fleet-call facts the SuperNode wrapper reports.

In process, no Flower processes: the lines fed here are the ones Flower 1.41's SuperNode
and :mod:`fedtune.supernode` print (tests/e2e/test_deployment.py sees the real ones).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from fedtune import supernode
from fedtune.client import causes, health
from fedtune.client.causes import Identity
from fedtune.client.health import STALE_WINDOW, Memory, Watch
from fedtune.client.health_routes import Link
from fedtune.supernode import EVENT_PREFIX, EXIT_UNAUTHORIZED

WHO = Identity("st-elsewhere", "coord.example.org:9092", "keys/ca.pem", "keys/st-elsewhere.node.key", "SHA256:abc")
WRONG_CA = (
    "ConnectError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer "
    "certificate (_ssl.c:1006)"
)


def _event(**fact: Any) -> str:
    return EVENT_PREFIX + json.dumps({"event": "failed", **fact}) + "\n"


def _flower(level: str, message: str) -> str:
    return f"\x1b[92m{level:<8}\x1b[0m: {message}\n"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _watch(tmp_path: Path, max_retries: int = 0) -> tuple[Watch, Clock]:
    clock = Clock()
    watch = Watch(WHO, Link(WHO), Memory(tmp_path / "connection.json"), max_retries=max_retries, clock=clock)
    watch.begin()
    return watch, clock


def _feed(watch: Watch, *lines: str) -> list[tuple[str | None, list[health.Said]]]:
    return [watch.line(line) for line in lines]


def test_unreachable_then_connected_then_lost_and_back(tmp_path: Path) -> None:
    watch, _ = _watch(tmp_path)
    assert watch.link.snapshot()["state"] == "starting"
    heard = _feed(
        watch,
        _event(call="ActivateNode", error="ConnectError: [Errno 111] Connection refused", transport=True),
        _flower("WARNING", "Connection attempt failed, retrying in 0.45 seconds"),
        _event(call="ActivateNode", error="ConnectError: [Errno 111] Connection refused", transport=True),
    )
    assert heard[0] == (None, [health.Said("WARNING", heard[0][1][0].message)])
    assert "cannot reach the coordinator at coord.example.org:9092 (ConnectError: [Errno 111] Connection refused)" in (
        heard[0][1][0].message
    )
    assert heard[1] == ("DEBUG", []) and heard[2] == (
        None,
        [],
    )  # said once, Flower's retry line kept out of the console
    state = watch.link.snapshot()
    assert state["state"] == "retrying" and not state["ready"] and state["attempts"] == 1
    assert state["last_error"] == "ConnectError: [Errno 111] Connection refused"

    level, said = watch.line(_flower("INFO", "SuperNode ID: 42"))
    assert level == "INFO" and said == [
        health.Said("INFO", "connected to the coordinator at coord.example.org:9092 as node 42")
    ]
    state = watch.link.snapshot()
    assert state["state"] == "connected" and state["node_id"] == 42 and state["ready"] and "last_error" not in state
    assert Memory(tmp_path / "connection.json").knows("SHA256:abc")["node_id"] == 42

    _, said = watch.line(
        _event(call="PullMessages", error="ConnectError: [Errno 111] Connection refused", transport=True)
    )
    assert said[0].level == "WARNING" and said[0].message.startswith("lost the coordinator")
    assert watch.link.snapshot()["node_id"] == 42  # retrying keeps who it was
    _, said = watch.line(_event(call="PullMessages", status=503, error="HTTPStatusError: 503"))
    assert said == [] and watch.link.snapshot()["last_error"] == "HTTP 503 from its front (SuperLink down?)"
    _, said = watch.line(EVENT_PREFIX + json.dumps({"event": "ok", "call": "PullMessages"}))
    assert said == [health.Said("INFO", "connected again to the coordinator at coord.example.org:9092 as node 42")]
    assert watch.link.snapshot()["state"] == "connected"


def test_a_tls_mismatch_is_one_error_line_and_the_daemon_keeps_dialling(tmp_path: Path) -> None:
    watch, _ = _watch(tmp_path, max_retries=2)
    heard = _feed(
        watch,
        _event(call="ActivateNode", error=WRONG_CA, transport=True),
        _flower("ERROR", "SSL/TLS handshake error detected."),
        _flower("ERROR", "Exit Code: 305"),
        "Failed to initialize the connection to the SuperLink.\n",
        "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: unable to get local issuer certificate\n",
        "For more information, visit: <https://flower.ai/docs/framework/1.41/en/ref-exit-codes/305.html>\n",
        _flower("INFO", "Shutting down"),
        _flower("INFO", "Run 7 is not in `RUNNING` status. Ignoring message 9."),
    )
    (said,) = heard[0][1]
    assert said.level == "ERROR" and "\n" not in said.message
    assert said.message.startswith(
        "TLS mismatch: the coordinator's certificate at coord.example.org:9092 does not verify with `coordinator.ca` "
        "(keys/ca.pem): unable to get local issuer certificate; use the federation's ca.pem"
    )
    assert [level for level, _ in heard[1:7]] == ["DEBUG"] * 6  # Flower's blurb: in the file, not the console
    assert heard[7] == ("INFO", [])
    state = watch.link.snapshot()
    assert state["state"] == "refused" and state["reason"] == "TLS mismatch" and state["retrying"]
    first = watch.ended(1)
    assert first.action == "retry" and first.wait == 2 and all(s.level == "DEBUG" for s in first.said)
    watch.begin()
    assert watch.line(_event(call="ActivateNode", error=WRONG_CA, transport=True)) == (None, [])  # said once
    assert watch.ended(1).wait == 4
    watch.begin()
    watch.line(_event(call="ActivateNode", error=WRONG_CA, transport=True))
    gave_up = watch.ended(1)
    assert gave_up.action == "fail" and [s.level for s in gave_up.said] == ["WARNING"]  # the ERROR was said
    assert "gave up (`--max-retries 2`)" in gave_up.said[0].message


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: IP address mismatch, certificate is not "
            "valid for '127.0.0.2'. (_ssl.c:1006)",
            "does not name coord.example.org (IP address mismatch, certificate is not valid for '127.0.0.2')",
        ),
        ("[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed: certificate has expired", "is not valid now"),
        ("[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)", "does not speak TLS"),
    ],
)
def test_tls_problems_are_named(error: str, expected: str) -> None:
    message = causes.tls_mismatch(error, address=WHO.address, ca=WHO.ca)
    assert message.startswith("TLS mismatch: ") and expected in message and "\n" not in message


def test_an_unknown_node_key_is_refused_with_what_to_do(tmp_path: Path) -> None:
    watch, _ = _watch(tmp_path)
    watch.line(_event(call="ActivateNode", status=412, code=2004, detail="Failed to activate SuperNode."))
    verdict = watch.ended(1)
    assert verdict.action == "refuse" and len(verdict.said) == 1 and verdict.said[0].level == "ERROR"
    assert verdict.said[0].message == (
        "refused (not registered): the coordinator at coord.example.org:9092 does not know this node key "
        "(SHA256:abc): send keys/st-elsewhere.node.pub to the coordinator for `fedtune server add-hospital --name "
        "st-elsewhere`, then start again"
    )
    state = watch.link.snapshot()
    assert state["state"] == "refused" and state["reason"] == "not registered" and not state["retrying"]


def test_a_removed_hospital_is_told_so_now_and_at_its_next_start(tmp_path: Path) -> None:
    watch, _ = _watch(tmp_path)
    watch.line(_flower("INFO", "SuperNode ID: 42"))
    watch.line(_event(call="SendNodeHeartbeat", status=401, error="HTTPStatusError: 401", clock_ahead=0.4))
    verdict = watch.ended(EXIT_UNAUTHORIZED)
    assert verdict.action == "refuse" and verdict.said[0].message.startswith(
        "refused (removed by the coordinator): the coordinator at coord.example.org:9092 no longer accepts this node "
        "key (SHA256:abc, node 42), which it had admitted; ask the coordinator why. To come back: `fedtune pki "
        "hospital --name st-elsewhere --out keys --rotate-node-key`"
    )
    restarted, _ = _watch(tmp_path)  # a new daemon: what it remembers decides at once
    restarted.line(_event(call="ActivateNode", status=412, code=2004))
    again = restarted.ended(1)
    assert again.action == "refuse" and "(removed by the coordinator)" in again.said[0].message


def test_a_key_connected_before_is_retried_while_its_old_node_may_still_be_online(tmp_path: Path) -> None:
    Memory(tmp_path / "connection.json").save(node_key="SHA256:abc", node_id=42, connected="earlier")
    watch, clock = _watch(tmp_path)
    watch.line(_event(call="ActivateNode", status=412, code=2004))
    first = watch.ended(1)
    assert (
        first.action == "retry"
        and first.said[0].level == "WARNING"
        and "may still count as online" in (first.said[0].message)
    )
    clock.now += STALE_WINDOW / 2
    watch.begin()
    watch.line(_event(call="ActivateNode", status=412, code=2004))
    assert watch.ended(1) == health.Verdict("retry", (), health.STALE_RETRY)  # said once
    clock.now += STALE_WINDOW
    watch.begin()
    watch.line(_event(call="ActivateNode", status=412, code=2004))
    late = watch.ended(1)
    assert (
        late.action == "refuse"
        and "(removed by the coordinator)" in late.said[0].message
        and "node 42" in (late.said[0].message)
    )


def test_a_clock_the_coordinator_cannot_accept_is_named(tmp_path: Path) -> None:
    watch, _ = _watch(tmp_path)
    watch.line(_event(call="PullMessages", status=401, error="HTTPStatusError: 401", clock_ahead=42.0))
    verdict = watch.ended(EXIT_UNAUTHORIZED)
    assert verdict.said[0].message.startswith(
        "refused (clock skew): this machine's clock is 42 s ahead of the coordinator's at coord.example.org:9092"
    )


def test_tracebacks_and_chatter_stay_out_of_the_console(tmp_path: Path) -> None:
    watch, _ = _watch(tmp_path)
    heard = _feed(
        watch,
        "Traceback (most recent call last):\n",
        '  File "x.py", line 1, in <module>\n',
        "    time.sleep(6)\n",
        "KeyboardInterrupt\n",
        _flower("INFO", "Uvicorn running on http://127.0.0.1:5 (Press CTRL+C to quit)"),
        _flower("INFO", ""),
        _flower("INFO", "Received successfully"),
    )
    assert [level for level, _ in heard] == ["DEBUG"] * 6 + ["INFO"]
    code = watch.ended(1)
    assert code.action == "fail" and code.said[0].message == "the SuperNode exited with code 1"


def test_the_supernode_reports_failed_calls_and_recovery(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    request = httpx.Request("POST", "https://coord/v1/fleet/pull-messages")
    outcomes: list[Any] = [
        httpx.ConnectError("[Errno 111] Connection refused", request=request),
        "ok",
        "ok",
        httpx.HTTPStatusError(
            "412",
            request=request,
            response=httpx.Response(
                412,
                request=request,
                json={"code": 2004, "detail": "Failed to activate SuperNode."},
                headers={"date": "Sun, 29 Nov 2026 21:00:00 GMT"},
            ),
        ),
        httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request)),
    ]

    class Base:
        def _unary_unary(self, **kwargs: Any) -> Any:
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

    client = supernode.reporting(Base)()
    call = {"rpc_method": "/flwr.proto.Fleet/PullMessages"}
    with pytest.raises(httpx.ConnectError):
        client._unary_unary(**call)
    assert client._unary_unary(**call) == "ok" and client._unary_unary(**call) == "ok"
    with pytest.raises(httpx.HTTPStatusError):
        client._unary_unary(rpc_method="/flwr.proto.Fleet/ActivateNode")
    monkeypatch.setattr(supernode.os, "_exit", lambda code: (_ for _ in ()).throw(SystemExit(code)))
    with pytest.raises(SystemExit) as ended:
        client._unary_unary(**call)
    assert ended.value.code == EXIT_UNAUTHORIZED  # at once: nothing it sends would be accepted
    lines = capsys.readouterr().out.splitlines()
    facts = [json.loads(line[len(EVENT_PREFIX) :]) for line in lines]
    assert [f["event"] for f in facts] == ["failed", "ok", "failed", "failed"]  # one "ok", after the failure
    assert facts[0] == {
        "event": "failed",
        "call": "PullMessages",
        "error": "ConnectError: [Errno 111] Connection refused",
        "transport": True,
    }
    assert facts[2]["status"] == 412 and facts[2]["code"] == 2004 and facts[2]["call"] == "ActivateNode"
    assert isinstance(facts[2]["clock_ahead"], float)
    assert facts[3]["status"] == 401


def test_the_flower_behaviour_the_daemon_relies_on_is_pinned() -> None:
    """A Flower upgrade that changes any of this fails here, not at a hospital."""
    import flwr.supernode.fleet_http_connection as fleet
    from flwr.common import constant
    from flwr.supercore.error import ApiErrorCode
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.supernode.fleet_http_client import FleetHttpClient

    assert fleet.FleetHttpClient is FleetHttpClient and callable(FleetHttpClient._unary_unary)
    assert "FleetHttpClient.from_server_address(" in inspect.getsource(fleet.http_request_response)
    assert ApiErrorCode.FLEET_NODE_ACTIVATION_FAILED == causes.FLEET_NODE_ACTIVATION_FAILED
    assert ApiErrorCode.FLEET_INVALID_HEARTBEAT_INTERVAL == causes.FLEET_INVALID_HEARTBEAT_INTERVAL
    assert STALE_WINDOW == constant.HEARTBEAT_PATIENCE * constant.HEARTBEAT_DEFAULT_INTERVAL + 15
    assert (constant.SYSTEM_TIME_TOLERANCE, constant.TIMESTAMP_TOLERANCE) == (5, 300)
    # `client check --dial` relies on the key being looked up before the interval is checked
    source = inspect.getsource(fleet_handlers.activate_node)
    assert source.index("get_node_id_by_public_key") < source.index("_validate_heartbeat_interval")
    assert constant.HEARTBEAT_MIN_INTERVAL > 0
