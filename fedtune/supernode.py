"""The hospital's SuperNode: Flower's own ``flower-supernode``, with its waits paced for rounds.

Flower 1.41's SuperNode asks the coordinator for a message and, when there is none,
sleeps 3 s before asking again; after handing a message to the ClientApp runtime it looks
for the reply every 0.5 s. Each exchange of a round (train, then evaluate) therefore
waited 1.5 s on average (3 s at worst) before the hospital even saw the message, and up
to 0.5 s more before the reply left; the tiny-model deployment round spent most of its
time there (``benchmarks/deploy_round.py``). Flower has no setting for either wait.

``python -m fedtune.supernode ARGS`` runs Flower's SuperNode with exactly those
two waits paced: while a run is active (a message arrived in the last ``ACTIVE_FOR``
seconds) it asks every ``ACTIVE_PULL`` seconds and looks for the reply every
``ACTIVE_PUSH`` seconds; idle, Flower's own 3 s. The cost: one extra pull request every
``ACTIVE_PULL`` seconds per hospital while a run is active, and none when idle.

The pacing replaces the ``time`` module seen by ``flwr.supernode.start_client_internal``
(and wraps its message pull to note activity) only when that module is the one this was
written against; otherwise the SuperNode runs unchanged and says so
(tests/test_supernode.py checks the pins).

It also reports every failed Fleet call to the daemon as one line,
``fedtune-supernode-event {...}`` (the call, the error, the HTTP status, Flower's error
code, how far this machine's clock is from the coordinator's), and the first success
after a failure. Flower logs why a connection attempt failed only at DEBUG, turns a
certificate error into a generic exit and answers a 401 (this node key removed) with
SIGINT to itself, sometimes twice (a KeyboardInterrupt traceback); the daemon
(:mod:`fedtune.client.health`) names the cause from these facts instead. A 401 ends the
SuperNode at once with ``EXIT_UNAUTHORIZED``: nothing it could send would be accepted.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from types import ModuleType
from typing import Any

EVENT_PREFIX = "fedtune-supernode-event "
EXIT_UNAUTHORIZED = 77  # the coordinator answered 401: this node key is not accepted (any more)

FLOWER_PULL_WAIT = 3  # the literals in flwr/supernode/start_client_internal.py (flwr 1.41)
FLOWER_PUSH_WAIT = 0.5
ACTIVE_PULL = 0.5
ACTIVE_PUSH = 0.05
ACTIVE_FOR = 60.0
OBJECT_RETRY = 0.05


class Pacer:
    """Stands in for ``time`` in Flower's SuperNode loop: shorter waits while a run is active."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.last_message = float("-inf")
        self._clock = clock
        self._sleep = sleep

    def active(self) -> bool:
        return self._clock() - self.last_message < ACTIVE_FOR

    def paced(self, seconds: float) -> float:
        if not self.active():
            return seconds
        if seconds == FLOWER_PULL_WAIT:
            return ACTIVE_PULL
        if seconds == FLOWER_PUSH_WAIT:
            return ACTIVE_PUSH
        return seconds

    def sleep(self, seconds: float) -> None:
        self._sleep(self.paced(seconds))

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def install(module: ModuleType, pacer: Pacer) -> bool:
    """Pace ``module`` (Flower's start_client_internal); False, changing nothing, if it is not the expected one."""
    pull = getattr(module, "_pull_and_store_message", None)
    if getattr(module, "time", None) is not time or not callable(pull):
        return False

    def noted(*args: Any, **kwargs: Any) -> Any:
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            pacer.last_message = pacer._clock()
        return run_id

    module._pull_and_store_message = noted  # type: ignore[attr-defined]
    module.time = pacer  # type: ignore[attr-defined]
    objects = getattr(module, "pull_objects", None)
    if callable(objects):
        # A message is announced before all its objects have reached the coordinator; Flower
        # then retries each missing object after 1 s, doubling. Retry after 50 ms instead.
        module.pull_objects = functools.partial(objects, initial_backoff=OBJECT_RETRY)  # type: ignore[attr-defined]
    return True


def call_failure(call: str, err: BaseException, *, now: Callable[[], float] = time.time) -> dict[str, Any]:
    """What a failed Fleet call tells the daemon: facts only, the daemon names the cause."""
    import httpx
    from flwr.supercore.error import FlowerError

    fact: dict[str, Any] = {"event": "failed", "call": call, "error": f"{type(err).__name__}: {err}"[:400]}
    fact["error"] = " ".join(fact["error"].split())
    if isinstance(err, httpx.HTTPStatusError):
        response = err.response
        fact["status"] = response.status_code
        try:
            flower = FlowerError.from_json(response.text)
        except Exception:  # noqa: BLE001 - an unreadable body is just not Flower's
            flower = None
        if flower is not None:
            fact["code"], fact["detail"] = flower.code, flower.message[:200]
        with contextlib.suppress(KeyError, TypeError, ValueError, IndexError):
            # the coordinator refuses signatures dated more than 5 s ahead of its clock or 300 s behind it
            fact["clock_ahead"] = round(now() - parsedate_to_datetime(response.headers["date"]).timestamp(), 1)
    else:
        fact["transport"] = True
    return fact


def emit(fact: dict[str, Any]) -> None:
    with _EMIT:
        print(EVENT_PREFIX + json.dumps(fact), flush=True)


_EMIT = threading.Lock()


def reporting(base: type) -> type:
    """``base`` (Flower's Fleet HTTP client) that reports failed calls, and the first success after one."""
    import httpx

    class Reporting(base):  # type: ignore[valid-type,misc]
        _failing = False

        def _unary_unary(self, **kwargs: Any) -> Any:
            call = str(kwargs.get("rpc_method", "?")).rsplit("/", 1)[-1]
            try:
                result = super()._unary_unary(**kwargs)
            except httpx.HTTPError as err:
                fact = call_failure(call, err)
                self._failing = True
                emit(fact)
                if fact.get("status") == 401:
                    os._exit(EXIT_UNAUTHORIZED)  # not Flower's SIGINT to itself: nothing more to send
                raise
            if self._failing:
                self._failing = False
                emit({"event": "ok", "call": call})
            return result

    Reporting.__name__ = Reporting.__qualname__ = f"Reporting{base.__name__}"
    return Reporting


def install_reporting(module: ModuleType) -> bool:
    """Report the Fleet calls of ``module`` (Flower's fleet_http_connection); False if it is not the expected one."""
    client = getattr(module, "FleetHttpClient", None)
    if not isinstance(client, type) or not callable(getattr(client, "_unary_unary", None)):
        return False
    module.FleetHttpClient = reporting(client)  # type: ignore[attr-defined]
    return True


PARENT_ENV = "FEDTUNE_DAEMON_PID"


ORPHAN_SIGNAL = "SIGUSR2"  # what the kernel sends when the daemon dies (prctl), handled here


def leave_with_parent(parent: int) -> None:
    """Linux: leave cleanly when the daemon that started us dies, however it dies (SIGKILL, OOM).

    A SuperNode that outlives its daemon keeps the hospital "online" at the coordinator
    while nothing serves its messages, and holds the daemon's port against a restart.
    The kernel signals us (``PR_SET_PDEATHSIG``); we point stdout and stderr at
    /dev/null and hand Flower a SIGTERM, whose handler leaves the coordinator (it
    deactivates the node: the coordinator sees it go at once, a restarted daemon is
    admitted at once). Without the redirect, that handler's first log line went to the
    dead daemon's pipe (BrokenPipeError). The signal is handled once: it can come twice, and
    a second SIGTERM finds the default action Flower's handler restores. Either way the
    SuperNode died without leaving, the coordinator counted it online for another 60 s and
    refused the restarted daemon.
    """
    import signal

    from fedtune.process import die_with_parent

    def orphaned(_signum: int, _frame: object) -> None:
        # once: the kernel may signal again (seen: twice within 50 ms as the daemon's threads die),
        # and a second SIGTERM would meet the default action Flower's handler restores: death
        # before the node has left
        signal.signal(orphan, signal.SIG_IGN)
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        signal.raise_signal(signal.SIGTERM)  # Flower's graceful exit (or the default: terminate)

    orphan = getattr(signal, ORPHAN_SIGNAL)
    signal.signal(orphan, orphaned)
    die_with_parent(parent, orphan)


def main() -> None:
    import flwr.supernode.fleet_http_connection as fleet
    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit() and sys.platform.startswith("linux"):
        leave_with_parent(int(parent))

    if not install(loop, Pacer()):
        print("WARNING: this Flower's SuperNode loop is not the one fedtune paces; running it unchanged", flush=True)
    if not install_reporting(fleet):
        print("WARNING: this Flower's Fleet client is not the one fedtune watches; causes go unnamed", flush=True)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
