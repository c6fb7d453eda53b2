"""What the hospital daemon knows about its link to the coordinator, from what its SuperNode prints.

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

The health routes report that state (:mod:`fedtune.client.health_routes`); the one-line
causes are :mod:`fedtune.client.causes`.

A hospital cannot ask the coordinator whether it removed this node key: a removed key
and one never admitted get the same answer. The daemon remembers in
``<state_dir>/connection.json`` which node key it was last connected with (and as which
node), so a refusal of a key that was connected before reads "removed by the
coordinator". Flower counts a node online until two heartbeats (60 s) pass without one,
so a refusal within that window of a key that was connected is retried first: a
SuperNode that died without leaving (a SIGKILLed container) is still online there.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedtune.client.causes import (
    FLEET_NODE_ACTIVATION_FAILED,
    Identity,
    clock_skew,
    is_tls,
    not_registered,
    removed,
    tls_mismatch,
)
from fedtune.client.health_routes import Link, utc_now
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
