"""The daemon's health routes: live while it runs, ready only while connected, the state as JSON."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import pytest

from fedtune.client.causes import Identity
from fedtune.client.health_routes import HealthServer, Link

WHO = Identity("st-elsewhere", "coord.example.org:9092", "keys/ca.pem", "keys/st-elsewhere.node.key", "SHA256:abc")


def test_the_health_routes() -> None:
    from fedtune.launcher import free_port

    link = Link(WHO)
    port = free_port()
    server = HealthServer("127.0.0.1", port, link)
    server.start()

    def get(route: str) -> tuple[int, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{route}", timeout=5) as answer:
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    try:
        assert get("/health/live")[0] == 200
        code, doc = get("/health/ready")
        assert code == 503 and doc["state"] == "starting" and doc["live"] and not doc["ready"]
        link.set("connected", node_id=7)
        assert get("/health/ready")[0] == 200
        code, doc = get("/health")
        assert code == 200 and doc["state"] == "connected" and doc["node_id"] == 7 and doc["hospital"] == "st-elsewhere"
        link.set("refused", reason="not registered")
        assert get("/health/ready")[0] == 503 and get("/health")[1]["reason"] == "not registered"
        assert get("/metrics")[0] == 404
        with pytest.raises(OSError):
            HealthServer("127.0.0.1", port, link)  # a second daemon of the hospital: the port is taken
    finally:
        server.stop()
