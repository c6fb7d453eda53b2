"""The HTTP server behind fedtune's live pages: static files from the package, one JSON route.

Routes: ``/`` (the page), ``/static/NAME`` (its JavaScript and CSS, from
``fedtune/pages/static``), ``/api/state`` (the JSON the page polls; query parameters go to
the state function). Nothing else is served, nothing is written: the pages are read-only.

**Loopback by default.** A page bound to another address serves other machines, so it
must have TLS (a certificate and key) and a token; :func:`check_bind` refuses it
otherwise, in one line naming the setting. With a token every request needs it: as
``Authorization: Bearer TOKEN``, or once as ``?token=TOKEN``, which sets an HttpOnly,
Secure, SameSite=Strict cookie so the page's own requests carry it. The comparison is
constant-time. A page on loopback may have a token too; without one it answers only
requests whose ``Host`` is a loopback name or address (no DNS rebinding).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import math
import socket
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from fedtune.errors import ConfigError

State = Callable[[dict[str, str]], dict[str, Any]]
COOKIE = "fedtune_page_token"
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def page_address(value: str, setting: str) -> tuple[str, int]:
    """HOST:PORT of a page; port 0 takes a free one (the URL is printed)."""
    from fedtune.config import parse_address

    host, sep, port = value.rpartition(":")
    if sep and port == "0":
        return parse_address(f"{host}:1", setting)[0], 0
    return parse_address(value, setting)


def check_bind(host: str, port: int, *, setting: str, tls: bool, token: str, how: str) -> None:
    """Refuse a non-loopback page without TLS and a token: one line naming ``setting`` and what to do."""
    if is_loopback(host) or (tls and token):
        return
    missing = " and ".join(w for w, ok in (("TLS", tls), ("a token", bool(token))) if not ok)
    raise ConfigError(
        f"`{setting}` {host}:{port} is not loopback: a live page for other machines needs TLS and a token, "
        f"and it has no {missing}; {how}, or keep it on 127.0.0.1 and reach it through an SSH tunnel"
    )


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinity as None: JSON has neither."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def static_file(name: str) -> bytes | None:
    """A file of ``fedtune/pages/static`` (no subfolders, no dot files), or None."""
    if not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    entry = resources.files("fedtune.pages").joinpath("static", name)
    return entry.read_bytes() if entry.is_file() else None


class PageServer:
    """One live page (``page``: the HTML file's name) on ``host:port``, in a thread."""

    def __init__(
        self,
        host: str,
        port: int,
        state: State,
        *,
        page: str,
        setting: str,
        token: str = "",
        certfile: Path | None = None,
        keyfile: Path | None = None,
        how: str = "give it a certificate and a token",
    ) -> None:
        check_bind(host, port, setting=setting, tls=certfile is not None and keyfile is not None, token=token, how=how)
        self.tls = certfile is not None and keyfile is not None
        handler = _handler(PageRoutes(state, page=page, token=token, secure=self.tls))
        try:
            self.server = http_server(host, port, handler)
        except OSError as err:
            raise ConfigError(
                f"`{setting}` {host}:{port} cannot be served ({err.strerror}); give another port"
            ) from err
        if self.tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            context.load_cert_chain(str(certfile), str(keyfile))
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.host = host
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="fedtune-page", daemon=True)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def start(self) -> PageServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        stop_server(self.server)


def http_server(host: str, port: int, handler: type[BaseHTTPRequestHandler]) -> ThreadingHTTPServer:
    """A threaded HTTP server on ``host`` (IPv4 or IPv6) whose request threads never hold the process."""

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    return Server((host, port), handler)


def stop_server(server: ThreadingHTTPServer) -> None:
    with contextlib.suppress(OSError):
        server.shutdown()
        server.server_close()


@dataclass(frozen=True)
class Answer:
    code: int
    body: bytes
    kind: str
    headers: dict[str, str]


class PageRoutes:
    """``/``, ``/static/NAME`` and ``/api/state`` of one page, behind its token; used by
    :class:`PageServer` and by any other server that carries a page (the hospital's health routes)."""

    def __init__(self, state: State, *, page: str, token: str = "", secure: bool = False) -> None:
        self.state, self.page, self.token, self.secure = state, page, token, secure

    def answer(self, path: str, headers: Mapping[str, str] | Message) -> Answer:
        url = urlsplit(path)
        query = dict(parse_qsl(url.query))
        given = query.pop("token", "")
        if not self.token and not is_loopback(urlsplit(f"//{headers.get('Host', '')}").hostname or ""):
            # a page without a token answers only to loopback names: a web page elsewhere that
            # re-points its own domain name at 127.0.0.1 (DNS rebinding) gets nothing
            return self._answer(403, b"this page answers to 127.0.0.1 or localhost only\n", "text/plain")
        if self.token and not self._authorized(given, headers):
            return self._answer(401, b"a token is needed: open the page as /?token=TOKEN\n", "text/plain")
        cookie = given if self.token and given else ""
        try:
            if url.path == "/":
                body = static_file(self.page)
                assert body is not None, f"fedtune/pages/static/{self.page} is missing from the package"
                return self._answer(200, body, TYPES[".html"], cookie=cookie)
            if url.path.startswith("/static/"):
                name = url.path.removeprefix("/static/")
                data = static_file(name)
                if data is not None:
                    return self._answer(200, data, TYPES.get(Path(name).suffix, "application/octet-stream"))
            if url.path == "/api/state":
                doc = json.dumps(finite(self.state(query)), default=str, allow_nan=False).encode()
                return self._answer(200, doc, "application/json", cookie=cookie)
        except Exception as err:  # noqa: BLE001 - the page says what broke instead of hanging
            return self._answer(500, json.dumps({"error": f"{type(err).__name__}: {err}"}).encode(), "application/json")
        return self._answer(404, b"not found\n", "text/plain")

    def _authorized(self, given: str, headers: Mapping[str, str] | Message) -> bool:
        cookies = dict(part.strip().split("=", 1) for part in headers.get("Cookie", "").split(";") if "=" in part)
        offered = [given, headers.get("Authorization", "").removeprefix("Bearer ").strip(), cookies.get(COOKIE, "")]
        return any(o and hmac.compare_digest(o.encode(), self.token.encode()) for o in offered)

    def _answer(self, code: int, body: bytes, kind: str, *, cookie: str = "") -> Answer:
        headers = dict(SECURITY_HEADERS)
        if cookie:
            flags = "HttpOnly; SameSite=Strict; Path=/" + ("; Secure" if self.secure else "")
            headers["Set-Cookie"] = f"{COOKIE}={cookie}; {flags}"
        return Answer(code, body, kind, headers)


def send(handler: BaseHTTPRequestHandler, answer: Answer) -> None:
    """Write ``answer`` through an http.server handler."""
    handler.send_response(answer.code)
    handler.send_header("Content-Type", answer.kind)
    handler.send_header("Content-Length", str(len(answer.body)))
    for name, value in answer.headers.items():
        handler.send_header(name, value)
    handler.end_headers()
    handler.wfile.write(answer.body)


def _handler(routes: PageRoutes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            send(self, routes.answer(self.path, self.headers))

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
            return  # a page polled every second is not worth a log line

    return Handler
