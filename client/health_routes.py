"""The daemon's health routes and the state they report.

``daemon.health`` (loopback only): ``GET /health/live`` answers 200 while the daemon runs;
``GET /health/ready`` answers 200 only while ``connected``, else 503; ``GET /health``
answers 200 with the state as JSON. Both others carry the JSON too. Every other path is
the hospital's own page (``/``, :mod:`fedtune.client.page`), read-only. The state is a
:class:`Link`, which :class:`fedtune.client.health.Watch` keeps from what the SuperNode prints.
"""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from typing import Any

from fedtune.client.causes import Identity
from fedtune.pages.serve import Answer, PageRoutes, http_server, send, stop_server


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class Link:
    """The state the health routes report; thread-safe."""

    def __init__(self, who: Identity) -> None:
        self.who = who
        self._lock = threading.Lock()
        self._doc: dict[str, Any] = {"state": "starting", "since": utc_now()}

    def set(self, state: str, **fields: Any) -> None:
        with self._lock:
            same = self._doc["state"] == state
            keep: dict[str, Any] = {k: self._doc[k] for k in ("since", "node_id") if k in self._doc and same}
            if state == "retrying" and "node_id" in self._doc:
                keep["node_id"] = self._doc["node_id"]
            self._doc = {"state": state, "since": utc_now(), **keep, **fields}

    def update(self, **fields: Any) -> None:
        with self._lock:
            self._doc.update(fields)

    @property
    def state(self) -> str:
        with self._lock:
            return str(self._doc["state"])

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            doc = dict(self._doc)
        ready = doc["state"] == "connected"
        return {"hospital": self.who.hospital, "coordinator": self.who.address, **doc, "live": True, "ready": ready}


class HealthServer:
    """``daemon.health``: ``/health``, ``/health/live``, ``/health/ready``, on loopback, in a thread."""

    def __init__(self, host: str, port: int, link: Link, page: PageRoutes | None = None) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                route = self.path.split("?", 1)[0].rstrip("/")
                if page is not None and not route.startswith("/health"):
                    return send(self, page.answer(self.path, self.headers))  # the hospital's page
                doc = link.snapshot()
                if route in ("/health", "/health/live"):
                    code = 200
                elif route == "/health/ready":
                    code = 200 if doc["ready"] else 503
                else:
                    code, doc = 404, {"error": "not found; try /health, /health/live or /health/ready"}
                send(self, Answer(code, (json.dumps(doc) + "\n").encode(), "application/json", {}))

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                return  # probes every few seconds are not worth a log line

        self.server = http_server(host, port, Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fedtune-health", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        stop_server(self.server)
