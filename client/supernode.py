"""The hospital's SuperNode: Flower's own ``flower-supernode``, with its waits paced for rounds.

Flower 1.41's SuperNode asks the coordinator for a message and, when there is none,
sleeps 3 s before asking again; after handing a message to the ClientApp runtime it looks
for the reply every 0.5 s. Each exchange of a round (train, then evaluate) therefore
waited 1.5 s on average (3 s at worst) before the hospital even saw the message, and up
to 0.5 s more before the reply left; the tiny-model deployment round spent most of its
time there (``benchmarks/deploy_round.py``). Flower has no setting for either wait.

``python -m fedtune.client.supernode ARGS`` runs Flower's SuperNode with exactly those
two waits paced: while a run is active (a message arrived in the last ``ACTIVE_FOR``
seconds) it asks every ``ACTIVE_PULL`` seconds and looks for the reply every
``ACTIVE_PUSH`` seconds; idle, Flower's own 3 s. The cost: one extra pull request every
``ACTIVE_PULL`` seconds per hospital while a run is active, and none when idle.

The pacing replaces the ``time`` module seen by ``flwr.supernode.start_client_internal``
(and wraps its message pull to note activity) only when that module is the one this was
written against; otherwise the SuperNode runs unchanged and says so
(tests/test_supernode.py checks the pins).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

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


PARENT_ENV = "FEDTUNE_DAEMON_PID"


def die_with_parent(parent: int) -> None:
    """Linux: get SIGTERM when the daemon that started us dies, however it dies (SIGKILL, OOM).

    A SuperNode that outlives its daemon keeps the hospital "online" at the coordinator
    while nothing serves its messages, and holds the daemon's port against a restart.
    SIGTERM lets Flower's handler leave cleanly (the coordinator sees it go at once).
    """
    import ctypes
    import os
    import signal

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the daemon died before we asked
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    import os

    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli.flower_supernode import flower_supernode

    parent = os.environ.get(PARENT_ENV, "")
    if parent.isdigit() and sys.platform.startswith("linux"):
        die_with_parent(int(parent))

    if not install(loop, Pacer()):
        print("WARNING: this Flower's SuperNode loop is not the one fedtune paces; running it unchanged", flush=True)
    sys.argv[0] = "flower-supernode"
    flower_supernode()


if __name__ == "__main__":
    main()
