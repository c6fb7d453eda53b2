"""The daemon as its SuperNode's ClientApp runtime: a stopping runtime does not wait out its retries."""

from __future__ import annotations

import httpx
import pytest


def test_a_stopping_runtime_gives_up_its_retries_at_once() -> None:
    """A task whose input never comes must not hold the daemon's exit (Flower's pull threads are joined at exit)."""
    import threading

    from fedtune.client.appio import local_retry

    calls: list[int] = []

    def gone() -> None:
        calls.append(1)
        raise httpx.ConnectError("[Errno 111] Connection refused")

    stop = threading.Event()
    retry = local_retry(max_time=3600, stop=stop)
    stopper = threading.Timer(0.3, stop.set)  # the daemon is asked to stop while the task retries
    stopper.start()
    with pytest.raises(httpx.ConnectError):
        retry.invoke(gone)
    stopper.join()
    assert stop.is_set() and 0 < len(calls) < 10  # retried until the stop, then gave up: not an hour of retries
