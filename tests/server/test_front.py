"""The coordinator's front forwards the Fleet API and /health, nothing else."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from fedtune.errors import FedTuneError
from fedtune.launcher import free_port
from fedtune.server.front import FLEET_PATHS, Front, Upstream, allowed


def test_the_fleet_paths_are_flowers_fleet_api() -> None:
    """An upgrade of Flower that adds or renames a Fleet route fails here, not at a hospital."""
    from fastapi.routing import APIRoute
    from flwr.superlink.routers.fleet.router import router

    flower = {r.path for r in router.routes if isinstance(r, APIRoute) and r.methods == {"POST"}}
    assert flower == set(FLEET_PATHS)


@pytest.mark.parametrize(
    ("method", "path", "ok"),
    [
        ("POST", "/v1/fleet/pull-messages", True),
        ("GET", "/health", True),
        ("GET", "/v1/fleet/pull-messages", False),
        ("POST", "/v1/control/register-node", False),
        ("POST", "/v1/control/start-run", False),
        ("POST", "/v1/runtime/acquire-task", False),
        ("POST", "/v1/fleet/../control/list-runs", False),
        ("GET", "/docs", False),
        ("GET", "/openapi.json", False),
        ("POST", "/health", False),
    ],
)
def test_allowed(method: str, path: str, ok: bool) -> None:
    assert allowed(method, path) is ok


class Recorder:
    """A plain HTTP upstream that records what reaches it and echoes the body."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes, dict[str, str]]] = []

        async def handle(request: Request) -> Response:
            body = await request.body()
            self.seen.append((request.method, request.url.path, body, dict(request.headers)))
            return Response(b"echo:" + body, status_code=200, headers={"x-upstream": "yes"})

        app = Starlette(routes=[Route("/{p:path}", handle, methods=["GET", "HEAD", "POST"])])
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def test_the_front_forwards_fleet_calls_and_refuses_the_rest(tmp_path: Path) -> None:
    with Recorder() as upstream:
        port = free_port()
        front = Front(
            Upstream(upstream.port, None), host="127.0.0.1", port=port, certfile=None, keyfile=None,
            refusal_log=tmp_path / "front.log",
        )  # fmt: skip
        front.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}") as c:
                body = bytes(range(256)) * 4096  # 1 MiB, streamed through
                r = c.post("/v1/fleet/push-object", content=body, headers={"x-flwr-signature": "sig"})
                assert r.status_code == 200 and r.content == b"echo:" + body and r.headers["x-upstream"] == "yes"
                assert c.get("/health").status_code == 200
                for method, path in [("POST", "/v1/control/register-node"), ("POST", "/v1/runtime/acquire-task"),
                                     ("GET", "/docs"), ("DELETE", "/v1/fleet/pull-messages")]:  # fmt: skip
                    assert c.request(method, path, content=b"x").status_code == 404
            method, path, received, headers = upstream.seen[0]
            assert (method, path, received) == ("POST", "/v1/fleet/push-object", body)
            assert headers["x-flwr-signature"] == "sig" and headers["x-forwarded-for"] == "127.0.0.1"
            # nothing else got through
            assert [p for _, p, _, _ in upstream.seen] == ["/v1/fleet/push-object", "/health"]
            refused = (tmp_path / "front.log").read_text().splitlines()
            assert len(refused) == 4 and all("REFUSED 127.0.0.1" in line for line in refused)
            assert "'/v1/control/register-node'" in refused[0]
        finally:
            front.stop()
    # the upstream is gone: the front says so instead of hanging
    front = Front(Upstream(free_port(), None), host="127.0.0.1", port=port, certfile=None, keyfile=None,
                  refusal_log=tmp_path / "front.log")  # fmt: skip
    front.start()
    try:
        assert httpx.post(f"http://127.0.0.1:{port}/v1/fleet/get-run", content=b"").status_code == 503
    finally:
        front.stop()


def test_a_taken_port_is_one_clear_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        front = Front(Upstream(free_port(), None), host="127.0.0.1", port=port, certfile=None, keyfile=None,
                      refusal_log=tmp_path / "front.log")  # fmt: skip
        with pytest.raises(FedTuneError, match=f"could not listen on 127.0.0.1:{port}"):
            front.start(timeout=10)
