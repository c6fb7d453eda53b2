"""The hospital's SuperNode is Flower's, with its two polling waits paced while a run is active."""

from __future__ import annotations

import inspect
import time
import types
from pathlib import Path

import flwr
import flwr.supernode.start_client_internal as flower_loop

from fedtune import supernode
from fedtune.supernode import ACTIVE_FOR, ACTIVE_PULL, ACTIVE_PUSH, Pacer, install


def test_the_pinned_flower_loop_is_the_one_paced() -> None:
    """The literals and names the pacing relies on; a Flower upgrade that moves them fails here."""
    assert flwr.__version__ == "1.41.0"
    source = inspect.getsource(flower_loop)
    assert f"time.sleep({supernode.FLOWER_PULL_WAIT})" in source
    assert f"time.sleep({supernode.FLOWER_PUSH_WAIT})" in source
    assert "run_id = _pull_and_store_message(" in source and "obj_contents = pull_objects(" in source
    assert flower_loop.time is time


def test_waits_are_short_only_while_a_run_is_active() -> None:
    now = [1000.0]
    slept: list[float] = []
    pacer = Pacer(clock=lambda: now[0], sleep=slept.append)
    pacer.sleep(3)
    pacer.sleep(0.5)
    assert slept == [3, 0.5]  # idle: Flower's own waits
    pacer.last_message = now[0]
    pacer.sleep(3)
    pacer.sleep(0.5)
    pacer.sleep(7)
    assert slept[2:] == [ACTIVE_PULL, ACTIVE_PUSH, 7]
    now[0] += ACTIVE_FOR + 1
    pacer.sleep(3)
    assert slept[-1] == 3
    assert pacer.monotonic is time.monotonic  # everything else is the real `time`


def test_install_notes_messages_and_refuses_an_unknown_loop() -> None:
    calls: list[dict[str, object]] = []

    def pull(**kwargs: object) -> int | None:
        calls.append(kwargs)
        return 7 if kwargs.get("has") else None

    def pull_objects(ids: list[str], pull_object_fn: object, *, initial_backoff: float = 1.0) -> float:
        return initial_backoff

    fake = types.ModuleType("fake_loop")
    fake.time = time  # type: ignore[attr-defined]
    fake._pull_and_store_message = pull  # type: ignore[attr-defined]
    fake.pull_objects = pull_objects  # type: ignore[attr-defined]
    now = [50.0]
    pacer = Pacer(clock=lambda: now[0], sleep=lambda s: None)
    assert install(fake, pacer)
    assert fake.time is pacer  # type: ignore[attr-defined]
    assert fake._pull_and_store_message(has=False) is None and not pacer.active()  # type: ignore[attr-defined]
    assert fake._pull_and_store_message(has=True) == 7 and pacer.active()  # type: ignore[attr-defined]
    assert fake.pull_objects([], None) == supernode.OBJECT_RETRY  # type: ignore[attr-defined]
    other = types.ModuleType("other")
    other.time = types.SimpleNamespace()  # type: ignore[attr-defined]
    assert not install(other, Pacer())


def test_the_supernode_dies_with_its_daemon_however_the_daemon_dies(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """And leaves cleanly: its graceful exit (Flower's SIGTERM handler, which deactivates the
    node at the coordinator) runs to the end although the daemon's end of its output pipe is gone."""
    import os
    import signal
    import subprocess
    import sys

    ready, left = tmp_path / "child.pid", tmp_path / "left"
    child = (
        "import os, signal, sys, time; from fedtune.supernode import leave_with_parent\n"
        "def graceful(*_):\n"
        "    print('SuperNode terminated gracefully.' * 200, flush=True)  # Flower logs first, then leaves\n"
        f"    open({str(left)!r}, 'w').write('deactivated'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, graceful)\n"
        f"leave_with_parent(os.getppid()); open({str(ready)!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    )
    daemon = (
        "import subprocess, sys, time; "
        f"subprocess.Popen([sys.executable, '-c', {child!r}], stdout=subprocess.PIPE); time.sleep(120)"
    )
    parent = subprocess.Popen([sys.executable, "-c", daemon])
    try:
        deadline = time.monotonic() + 60
        while not (ready.exists() and ready.read_text()):
            assert time.monotonic() < deadline, "the child never started"
            time.sleep(0.05)
        pid = int(ready.read_text())
        os.kill(parent.pid, signal.SIGKILL)  # the daemon dies the hard way
        parent.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]:
            assert time.monotonic() < deadline, "the SuperNode outlived its daemon"
            time.sleep(0.05)
        assert left.read_text() == "deactivated"  # its goodbye went to /dev/null, not into a broken pipe
    finally:
        if parent.poll() is None:
            parent.kill()
