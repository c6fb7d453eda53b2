"""fedtune.process: what fedtune starts does not outlive it, however it dies.

Each test plays an "owner" (a stand-in for ``fedtune simulate`` or ``fedtune server
start``) in its own process, SIGKILLs it as the OOM killer would, and waits (bounded)
for its children to be gone; whatever is left is killed by pid at the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune import process
from fedtune.cli.loopback import until

pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's"),
]
SLEEPER = "import time; time.sleep(120)"


@pytest.fixture()
def spawned() -> Iterator[list[int]]:
    """Pids a test started; any still alive at the end is SIGKILLed by pid."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if process.alive(pid):
            os.kill(pid, signal.SIGKILL)


def _owner(code: str, env: dict[str, str], spawned: list[int]) -> tuple[subprocess.Popen[str], list[int]]:
    """Start an owner process running ``code``; return it and the pids it prints on its first line."""
    owner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    spawned.append(owner.pid)
    assert owner.stdout is not None
    line = owner.stdout.readline().split()
    assert line[:1] == ["ready"], line
    children = [int(p) for p in line[1:]]
    spawned.extend(children)
    return owner, children


def test_a_detached_process_tree_is_killed_when_its_owner_is_sigkilled(tmp_path: Path, spawned: list[int]) -> None:
    (tmp_path / "ray").mkdir()
    link = tmp_path / "short-link"
    link.symlink_to(tmp_path / "ray", target_is_directory=True)
    code = """
        import os, subprocess, sys, time
        from fedtune.process import Markers, guarded

        mark, ray = os.environ["T_MARK"], os.environ["T_RAY"]
        markers = Markers(environ=(f"T_RUN={mark}",), cmdline=(f"{ray}/",))
        sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
        with guarded(markers, unlink=[os.environ["T_LINK"]]):
            # like Flower's helpers: new sessions, so neither a group signal nor a death signal reaches them
            by_env = subprocess.Popen(sleeper, env={**os.environ, "T_RUN": mark}, start_new_session=True)
            by_cmdline = subprocess.Popen([*sleeper, f"{ray}/session/sockets"], start_new_session=True)
            other = subprocess.Popen(sleeper, env={**os.environ, "T_RUN": "another run"}, start_new_session=True)
            print("ready", by_env.pid, by_cmdline.pid, other.pid, flush=True)
            time.sleep(120)
    """
    env = {"T_MARK": str(tmp_path), "T_RAY": str(tmp_path / "ray"), "T_LINK": str(link)}
    owner, (by_env, by_cmdline, other) = _owner(code, env, spawned)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    until(lambda: not process.alive(by_env) and not process.alive(by_cmdline), "the owner's processes to die", 10)
    until(lambda: not link.is_symlink(), "the owner's temp link to go", 10)
    assert process.alive(other)  # another run's process is left alone
    assert (tmp_path / "ray").is_dir()  # the link went, not what it pointed to


def test_a_child_gets_sigterm_when_its_parent_dies(spawned: list[int]) -> None:
    code = """
        import subprocess, sys, time
        from fedtune.process import dies_with_us

        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], preexec_fn=dies_with_us())
        print("ready", child.pid, flush=True)
        time.sleep(120)
    """
    owner, (child,) = _owner(code, {}, spawned)
    assert process.alive(child)
    os.kill(owner.pid, signal.SIGKILL)
    owner.wait()
    until(lambda: not process.alive(child), "the child to die with its parent", 10)


def test_the_watcher_leaves_when_the_block_ends_and_kills_only_leftovers(tmp_path: Path, spawned: list[int]) -> None:
    leftover = subprocess.Popen(
        [sys.executable, "-c", SLEEPER], env={**os.environ, "T_RUN": str(tmp_path)}, start_new_session=True
    )
    spawned.append(leftover.pid)
    with process.guarded(process.Markers(environ=(f"T_RUN={tmp_path}",))) as watcher:
        until(lambda: process.running(watcher, "fedtune.process"), "the watcher to start", 10)
        assert process.find(process.Markers(environ=(f"T_RUN={tmp_path}",))) == [leftover.pid]
    assert not process.alive(watcher)  # the block waited for it
    leftover.wait(timeout=10)  # swept on the way out
    assert process.find(process.Markers(environ=(f"T_RUN={tmp_path}",))) == []
    assert not process.running(os.getpid(), "no such program")
