"""The coordinator's public front: hospitals reach the Fleet API and nothing else.

Flower 1.41's SuperLink serves three APIs over HTTP on one port: the Fleet API (what
SuperNodes dial), the Control API (``flwr``: start and stop runs, register and
unregister nodes, read logs) and the runtime API (what the ServerApp process uses to
send messages to hospitals). Open-source Flower has no login for the Control API, and
the runtime API hands out task tokens to whoever asks first. Exposed on the address
hospitals dial, anyone on their network could admit nodes, remove hospitals and ship
code to them.

So ``fedtune server start`` runs the SuperLink on loopback only and puts this front on
the public address. The front terminates TLS with the coordinator's certificate and
forwards exactly the Fleet API's routes (``POST /v1/fleet/...``, each of which the
SuperLink authenticates with the node's signature) and ``GET /health``. Every other
request is answered 404 by the front, never reaches the SuperLink, and is logged with
the caller's address. The coordinator's own tools (``fedtune server add-hospital``,
``fedtune run``, ``fedtune status``, ``flwr`` with the coordinator's ``FLWR_HOME``) talk
to the SuperLink on loopback, with TLS from a certificate made for 127.0.0.1 at every
start by a CA whose key is discarded once it has signed.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from fedtune.errors import FedTuneError
from fedtune.logfile import MAX_BYTES, RotatingFile

# The Fleet API of Flower 1.41, route by route (tests/server/test_front.py checks it against
# Flower's own router, so an upgrade that adds or renames one is noticed).
FLEET_PATHS = frozenset(
    f"/v1/fleet/{name}"
    for name in (
        "register-node",
        "activate-node",
        "deactivate-node",
        "unregister-node",
        "send-node-heartbeat",
        "pull-messages",
        "push-messages",
        "get-run",
        "get-fab",
        "push-object",
        "pull-object",
        "confirm-message-received",
    )
)
HEALTH_PATH = "/health"
# hop-by-hop headers (RFC 9110 7.6.1) and the ones the client recomputes
_DROP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def allowed(method: str, path: str) -> bool:
    """Whether the front forwards this request to the SuperLink."""
    if path == HEALTH_PATH:
        return method in ("GET", "HEAD")
    return method == "POST" and path in FLEET_PATHS


@dataclass(frozen=True)
class Upstream:
    """The loopback SuperLink the front forwards to."""

    port: int
    ca: Path | None  # None: the SuperLink runs without TLS (--insecure)

    @property
    def url(self) -> str:
        return f"{'http' if self.ca is None else 'https'}://127.0.0.1:{self.port}"

    def verify(self) -> ssl.SSLContext | bool:
        if self.ca is None:
            return False
        return ssl.create_default_context(cafile=str(self.ca))


class RefusalLog:
    """One line per refused request (time, caller, method, path), appended to a size-rotated file."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.file = RotatingFile(path, max_bytes=max_bytes)
        self.lock = threading.Lock()
        self.count = 0

    def __call__(self, caller: str, method: str, path: str) -> None:
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds")
        with self.lock:
            self.count += 1
        line = f"{stamp} REFUSED {caller} {method} {path[:200]!r}: not a Fleet API route\n"
        self.file.write(line.encode("utf-8", errors="replace"))

    def close(self) -> None:
        self.file.close()


def build_app(upstream: Upstream, refused: Callable[[str, str, str], None]) -> Starlette:
    """The front as an ASGI app: forward the Fleet API and /health, refuse the rest."""
    state: dict[str, httpx.AsyncClient] = {}

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        timeout = httpx.Timeout(connect=10.0, read=600.0, write=600.0, pool=60.0)
        async with httpx.AsyncClient(base_url=upstream.url, verify=upstream.verify(), timeout=timeout) as client:
            state["client"] = client
            yield

    async def forward(request: Request) -> Response:
        path, method = request.url.path, request.method
        caller = request.client.host if request.client else "?"
        if not allowed(method, path):
            refused(caller, method, path)
            return PlainTextResponse("Not Found\n", status_code=404)
        client = state["client"]
        headers = [(k, v) for k, v in request.headers.raw if k.decode("latin-1").lower() not in _DROP]
        headers.append((b"x-forwarded-for", caller.encode("latin-1")))
        outgoing = client.build_request(method, path, headers=headers, content=request.stream())
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.HTTPError:
            return PlainTextResponse("the coordinator's SuperLink is not answering\n", status_code=503)
        reply_headers = {k: v for k, v in answer.headers.items() if k.lower() not in _DROP}
        return StreamingResponse(
            answer.aiter_raw(),
            status_code=answer.status_code,
            headers=reply_headers,
            background=BackgroundTask(answer.aclose),
        )

    methods = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
    routes = [Route("/{path:path}", forward, methods=methods)]
    return Starlette(routes=routes, lifespan=lifespan)


class Front:
    """The front, served by uvicorn from a thread of the coordinator's process."""

    def __init__(
        self,
        upstream: Upstream,
        *,
        host: str,
        port: int,
        certfile: Path | None,
        keyfile: Path | None,
        refusal_log: Path,
    ) -> None:
        self.refused = RefusalLog(refusal_log)
        config = uvicorn.Config(
            build_app(upstream, self.refused),
            host=host,
            port=port,
            ssl_certfile=str(certfile) if certfile else None,
            ssl_keyfile=str(keyfile) if keyfile else None,
            log_level=logging.WARNING,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def start(self, *, timeout: float = 30.0) -> None:
        def run() -> None:
            try:
                self.server.run()
            except BaseException as err:  # noqa: BLE001 - reported by start()/the caller
                self.error = err

        self.thread = threading.Thread(target=run, name="fedtune-front", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                cause = f": {self.error}" if self.error else ""
                raise FedTuneError(
                    f"the coordinator's front could not listen on {self.server.config.host}:"
                    f"{self.server.config.port}{cause} (is the port taken?)"
                )
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        if self.thread is None:
            return
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout=5)
        self.refused.close()


def describe(info: dict[str, Any]) -> str:
    """What the coordinator's port exposes, for `fedtune status` and the start line."""
    scheme = "http" if info.get("insecure") else "https"
    return (
        f"public {scheme}://{info.get('host')}:{info.get('port')} (Fleet API only); "
        f"SuperLink control on 127.0.0.1:{info.get('control-port')} (this machine only)"
    )
