"""What the hospital daemon knows about its link to the coordinator, and its health routes.

The daemon reads every line its SuperNode prints (Flower's log, and the facts
:mod:`fedtune.supernode` adds about each failed Fleet call) and keeps one state:

- ``starting``: the SuperNode is dialling for the first time;
- ``connected``: since when, as which node id;
- ``retrying``: since when, how many attempts, the last error in one line (the
  coordinator is unreachable, or its front answers 502-504 while its SuperLink is down);
- ``refused``: why: ``not registered`` (the coordinator does not know this node key),
  ``removed by the coordinator`` (it knew it), ``TLS mismatch`` (the certificate does not
  verify with ``coordinator.ca`` or does not name ``coordinator.address``; the daemon
  keeps trying, since the coordinator may fix its side) or ``clock skew``;
- ``stopped``: the daemon is on its way out.

Each cause is said once, in one line that says what to do: ERROR for what needs a person
(a refusal, a TLS mismatch), WARNING for an unreachable coordinator (it keeps retrying).
Flower's own exit blurb, its retry lines, tracebacks and its HTTP servers' start-up
chatter stay in the log file at DEBUG, out of the console.

The health routes (``daemon.health``, loopback only): ``GET /health/live`` answers 200
while the daemon runs; ``GET /health/ready`` answers 200 only while ``connected``, else
503; ``GET /health`` answers 200 with the state as JSON. Both others carry the JSON too.

A hospital cannot ask the coordinator whether it removed this node key: a removed key
and one never admitted get the same answer. The daemon remembers in
``<state_dir>/connection.json`` which node key it was last connected with (and as which
node), so a refusal of a key that was connected before reads "removed by the
coordinator". Flower counts a node online until two heartbeats (60 s) pass without one,
so a refusal within that window of a key that was connected is retried first: a
SuperNode that died without leaving (a SIGKILLed container) is still online there.
"""

from __future__ import annotations

import contextlib
import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from fedtune.supernode import EVENT_PREFIX, EXIT_UNAUTHORIZED

LEVEL = re.compile(r"^(?:\x1b\[[0-9;]*m)?(DEBUG|INFO|WARNING|ERROR|CRITICAL)\s*(?:\x1b\[[0-9;]*m)?\s*:\s*(.*)$")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
NODE_ID = re.compile(r"^SuperNode ID: (\d+)$")
# Flower 1.41: a node is online until HEARTBEAT_PATIENCE (2) x HEARTBEAT_DEFAULT_INTERVAL (30 s)
# pass without a heartbeat; 15 s of slack for the coordinator's clock and the last heartbeat.
STALE_WINDOW = 2 * 30 + 15
STALE_RETRY = 10.0
CLOCK_AHEAD_MAX, CLOCK_BEHIND_MAX = 4.0, 300.0  # Flower refuses > 5 s ahead, > 305 s behind (Date: 1 s steps)
TLS_BACKOFF_MAX = 60.0
FLEET_NODE_ACTIVATION_FAILED = 2004  # flwr.supercore.error.ApiErrorCode (tests check the pin)
FLEET_INVALID_HEARTBEAT_INTERVAL = 2003
RETRY_STATUS = frozenset({502, 503, 504})
# the SuperNode's HTTP servers and Flower's notices, kept out of the operator's console
CHATTER = (
    "Started server process",
    "Waiting for application startup.",
    "Waiting for application shutdown.",
    "FastAPI lifespan:",
    "Application startup complete.",
    "Application shutdown complete.",
    "Uvicorn running on",
    "Shutting down",
    "Finished server process",
    "EXPERIMENTAL: SuperExec authentication",
    "SSL/TLS handshake error detected.",
    "Connection attempt failed, retrying in",
)


def split_level(line: str) -> tuple[str | None, str]:
    """Flower's level prefix (None without one) and the message, colours removed."""
    raw = line.rstrip("\n")
    match = LEVEL.match(raw)
    if match:
        return match.group(1), ANSI.sub("", match.group(2)).strip()
    return None, ANSI.sub("", raw).strip()


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Identity:
    """What the messages name: this hospital as its config writes it."""

    hospital: str
    address: str
    ca: str  # `coordinator.ca` as written
    node_key: str  # `keys.node_key` as written
    fingerprint: str  # of the node key, SHA256:...

    @property
    def node_pub(self) -> str:
        return str(Path(self.node_key).with_suffix(".pub"))

    @property
    def keys_dir(self) -> str:
        return str(Path(self.node_key).parent)


def not_registered(who: Identity) -> str:
    return (
        f"the coordinator at {who.address} does not know this node key ({who.fingerprint}): send "
        f"{who.node_pub} to the coordinator for `fedtune server add-hospital --name {who.hospital}`, then start again"
    )


def removed(who: Identity, node_id: int | None) -> str:
    node = f", node {node_id}" if node_id else ""
    return (
        f"the coordinator at {who.address} no longer accepts this node key ({who.fingerprint}{node}), which it had "
        "admitted; ask the coordinator why. To come back: `fedtune pki hospital --name "
        f"{who.hospital} --out {who.keys_dir} --rotate-node-key`, then send {who.node_pub} to the coordinator for "
        "`fedtune server add-hospital`"
    )


def clock_skew(who: Identity, ahead: float) -> str:
    side = f"{ahead:.0f} s ahead of" if ahead > 0 else f"{-ahead:.0f} s behind"
    return (
        f"this machine's clock is {side} the coordinator's at {who.address}, and the coordinator refuses node "
        "signatures dated more than 5 s ahead or 300 s behind its own time: set the clock (NTP), then start again"
    )


def tls_mismatch(error: str, *, address: str, ca: str) -> str:
    """One line for a certificate the hospital cannot accept, from the TLS error's text."""
    low = error.lower()
    host = address.rpartition(":")[0].strip("[]")
    reason = re.search(r"certificate verify failed: ([^(]+?)\s*(?:\(_ssl|$)", error)
    why = reason.group(1).rstrip(".") if reason else error
    if "hostname mismatch" in low or "ip address mismatch" in low:
        return (
            f"TLS mismatch: the coordinator's certificate does not name {host} ({why}): set `coordinator.address` "
            "to a name or address its certificate lists, or ask the coordinator to add this one "
            "(`fedtune pki server --address`)"
        )
    if "expired" in low or "not yet valid" in low:
        return f"TLS mismatch: the coordinator's certificate at {address} is not valid now ({why}): ask it to renew it"
    if "wrong_version_number" in low or "record layer failure" in low or "packet length too long" in low:
        return f"TLS mismatch: {address} does not speak TLS: check the port in `coordinator.address`"
    return (
        f"TLS mismatch: the coordinator's certificate at {address} does not verify with `coordinator.ca` ({ca}): "
        f"{why}; use the federation's ca.pem from the coordinator (the CA that signed its certificate)"
    )


def is_tls(fact: dict[str, Any]) -> bool:
    low = str(fact.get("error", "")).lower()
    return bool(fact.get("transport")) and any(w in low for w in ("certificate", "ssl", "tls"))


class Memory:
    """``connection.json``: the node key this hospital was last connected with, as which node, and if removed."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def knows(self, fingerprint: str) -> dict[str, Any]:
        """What is remembered about this node key ({} if another key or nothing)."""
        data = self.load()
        return data if data.get("node_key") == fingerprint else {}

    def save(self, **fields: Any) -> None:
        from fedtune.atomic import atomic_write_json

        atomic_write_json(self.path, {**self.load(), **fields})


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


@dataclass(frozen=True)
class Said:
    level: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """What the daemon does when its SuperNode has exited."""

    action: str  # "stop" | "refuse" | "retry" | "fail"
    said: tuple[Said, ...] = ()
    wait: float = 0.0


@dataclass
class Watch:
    """Reads the SuperNode's lines into the daemon's :class:`Link`; decides on each exit."""

    who: Identity
    link: Link
    memory: Memory
    max_retries: int = 0
    clock: Callable[[], float] = time.monotonic
    # per SuperNode process
    node_id: int | None = None
    connected: bool = False
    failure: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    _blurb: bool = False
    _traceback: bool = False
    # across restarts
    restarts: int = 0
    _said_tls: bool = False
    _stale_since: float | None = None

    def begin(self) -> None:
        """A new SuperNode process starts."""
        self.connected, self.failure, self.attempts = False, {}, 0
        self._blurb = self._traceback = False

    def line(self, raw: str) -> tuple[str | None, list[Said]]:
        """The level to log this line at (None: not logged verbatim) and what the daemon says about it."""
        level, text = split_level(raw)
        if level is None and text.startswith(EVENT_PREFIX.strip()):
            try:
                fact = json.loads(text[len(EVENT_PREFIX.strip()) :])
            except ValueError:
                return "DEBUG", []
            return None, self._event(fact) if isinstance(fact, dict) else []
        if self._traceback:
            if level is None and (
                not text or raw[:1].isspace() or text.startswith(("Traceback", "During", "The above"))
            ):
                return "DEBUG", []
            self._traceback = False  # its last line: the exception
            return "DEBUG", []
        if self._blurb and level is None:
            return "DEBUG", []
        self._blurb = False
        if level is None and text.startswith(("Traceback (most recent call last)", "During handling", "The above")):
            self._traceback = True
            return "DEBUG", []
        if text.startswith("Exit Code: "):
            self._blurb = True  # Flower's exit message and help link follow, unprefixed
            return "DEBUG", []
        if text.startswith("Connection attempt failed, retrying in"):
            self.attempts += 1
            self.link.update(attempts=self.attempts)
        if not text or text.startswith(CHATTER):  # Flower logs an empty line before each message
            return "DEBUG", []
        match = NODE_ID.match(text)
        if match:
            return level or "INFO", self._connected(int(match.group(1)))
        if text.startswith("Connection successful after") and self.node_id is not None:
            return level or "INFO", self._connected(self.node_id)
        return level or "INFO", []

    def _connected(self, node_id: int) -> list[Said]:
        was, had = self.link.state, self.node_id is not None
        self.node_id, self.connected, self.failure, self._said_tls = node_id, True, {}, False
        self._stale_since = None
        self.link.set("connected", node_id=node_id)
        self.memory.save(node_key=self.who.fingerprint, node_id=node_id, connected=utc_now(), removed=None)
        if was == "connected":
            return []
        again = "again " if was == "retrying" and had else ""
        return [Said("INFO", f"connected {again}to the coordinator at {self.who.address} as node {node_id}")]

    def _event(self, fact: dict[str, Any]) -> list[Said]:
        if fact.get("event") == "ok":
            if self.link.state == "retrying" and self.node_id is not None:
                return self._connected(self.node_id)
            return []
        if fact.get("event") != "failed":
            return []
        status = fact.get("status")
        if is_tls(fact):
            self.failure = fact
            message = tls_mismatch(str(fact["error"]), address=self.who.address, ca=self.who.ca)
            self.link.set("refused", reason="TLS mismatch", message=message, last_error=fact["error"], retrying=True)
            if self._said_tls:
                return []
            self._said_tls = True
            return [Said("ERROR", message + "; retrying with backoff")]
        if fact.get("transport") or status in RETRY_STATUS:
            self.failure = fact
            error = str(fact["error"]) if fact.get("transport") else f"HTTP {status} from its front (SuperLink down?)"
            was = self.link.state
            self.link.set("retrying", last_error=error, attempts=self.attempts)
            if was == "retrying":
                return []
            lost = "lost the coordinator" if was == "connected" else "cannot reach the coordinator"
            limit = f"at most {self.max_retries} times" if self.max_retries else "until it answers"
            return [Said("WARNING", f"{lost} at {self.who.address} ({error}): retrying with backoff, {limit}")]
        if status == 401 or (status == 412 and fact.get("call") == "ActivateNode"):
            self.failure = fact  # the exit follows; `ended` names the cause
        return []

    # -- the SuperNode exited -------------------------------------------------------------
    def ended(self, code: int) -> Verdict:
        fact, now = self.failure, self.clock()
        known = self.memory.knows(self.who.fingerprint)
        if code == EXIT_UNAUTHORIZED:
            ahead = fact.get("clock_ahead")
            if isinstance(ahead, int | float) and not -CLOCK_BEHIND_MAX < ahead < CLOCK_AHEAD_MAX:
                return self._refuse("clock skew", clock_skew(self.who, float(ahead)))
            return self._removed(self.node_id or known.get("node_id"))
        if fact.get("status") == 412 and fact.get("code") in (FLEET_NODE_ACTIVATION_FAILED, None):
            if not known:
                return self._refuse("not registered", not_registered(self.who))
            if known.get("removed"):
                return self._removed(known.get("node_id"))
            self._stale_since = now if self._stale_since is None else self._stale_since
            if now - self._stale_since < STALE_WINDOW:
                first = now == self._stale_since
                message = (
                    f"the coordinator does not activate this node key ({self.who.fingerprint}, node "
                    f"{known.get('node_id')} before): a SuperNode with it may still count as online there (for up "
                    f"to {STALE_WINDOW - 15} s after its last heartbeat), or the coordinator removed this hospital; "
                    f"trying again every {STALE_RETRY:.0f} s for {STALE_WINDOW} s"
                )
                self.link.set("retrying", last_error="the coordinator does not activate this node key")
                return Verdict("retry", (Said("WARNING", message),) if first else (), STALE_RETRY)
            return self._removed(known.get("node_id"))
        if is_tls(fact):
            self.restarts += 1
            if self.max_retries and self.restarts > self.max_retries:
                return self._give_up("the TLS mismatch above", already_said=True)
            wait = min(TLS_BACKOFF_MAX, 2.0**self.restarts)
            self.link.update(attempts=self.restarts, next_attempt_in_s=wait)
            return Verdict("retry", (Said("DEBUG", f"dialling again in {wait:.0f} s"),), wait)
        if fact.get("transport") or fact.get("status") in RETRY_STATUS:
            error = str(fact["error"]) if fact.get("transport") else f"HTTP {fact.get('status')}"
            return self._give_up(f"the coordinator at {self.who.address} did not answer ({error})")
        last = f": {fact['error']}" if fact.get("error") else ""
        self.link.set("stopped", reason=f"the SuperNode exited with code {code}")
        return Verdict("fail", (Said("ERROR", f"the SuperNode exited with code {code}{last}"),))

    def _refuse(self, reason: str, message: str) -> Verdict:
        self.link.set("refused", reason=reason, message=message, retrying=False)
        return Verdict("refuse", (Said("ERROR", f"refused ({reason}): {message}"),))

    def _removed(self, node_id: Any) -> Verdict:
        node = int(node_id) if isinstance(node_id, int) else None
        self.memory.save(node_key=self.who.fingerprint, node_id=node, removed=utc_now())
        return self._refuse("removed by the coordinator", removed(self.who, node))

    def _give_up(self, what: str, *, already_said: bool = False) -> Verdict:
        tries = f"`--max-retries {self.max_retries}`" if self.max_retries else "Flower's retries"
        self.link.set("stopped", reason=f"gave up ({tries})")
        level = "WARNING" if already_said else "ERROR"
        return Verdict("fail", (Said(level, f"gave up ({tries}): {what}"),))


class HealthServer:
    """``daemon.health``: ``/health``, ``/health/live``, ``/health/ready``, on loopback, in a thread."""

    def __init__(self, host: str, port: int, link: Link) -> None:
        import socket

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                doc = link.snapshot()
                route = self.path.split("?", 1)[0].rstrip("/")
                if route in ("/health", "/health/live"):
                    code = 200
                elif route == "/health/ready":
                    code = 200 if doc["ready"] else 503
                else:
                    code, doc = 404, {"error": "not found; try /health, /health/live or /health/ready"}
                body = (json.dumps(doc) + "\n").encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
                return  # probes every few seconds are not worth a log line

        class Server(ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
            daemon_threads = True

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="fedtune-health", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.server.shutdown()
            self.server.server_close()
