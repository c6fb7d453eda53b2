"""Supervising the processes fedtune starts, so none outlives the command that started it.

The one place for it, used by the coordinator (SuperLink, front, ServerApps), the
hospital daemon (its SuperNode), the launcher (simulations, loopback Flower processes)
and the loopback federation of the tests and benchmarks:

- :func:`await_ready`: wait until a started process answers (or say in one line that it
  died or hung), and :func:`answers_http` for a health route;
- :func:`stop` / :func:`stop_group`: SIGINT (twice for Flower's uvicorn servers), then
  SIGKILL after a grace period, of one process or its whole group;
- :func:`alive` / :func:`running`: a process's state from ``/proc`` (a zombie is dead);

and three tools for what must not outlive us, all Linux (``/proc`` and ``prctl``);
elsewhere they do nothing:

- :func:`dies_with_us`: a ``preexec_fn`` after which a child gets SIGTERM when this
  process dies, however it dies (SIGKILL, the OOM killer): ``prctl(PR_SET_PDEATHSIG)``.
  It reaches only the direct child; what that child starts in turn is not covered.
- :class:`Markers` and :func:`find`/:func:`kill`: the processes of one run, found by
  what they carry: an exact ``NAME=VALUE`` in their environment (``FLWR_HOME``,
  ``RAY_TMPDIR``), or a path in their command line (Ray's agents are started without
  ``RAY_TMPDIR``, but name the session folder under it).
- :func:`guarded`: while a block runs, a small watcher process (``python -m
  fedtune.process``) holds the read end of a pipe whose write end only this process
  holds. When this process ends, however it ends, the pipe closes and the watcher kills
  every process the markers find, removes the temporary links it was given, and exits.
  Flower's simulation starts its ServerApp and Ray detached (new sessions, re-parented
  to init when their parent dies), so a death signal on the direct children is not
  enough: without the watcher a SIGKILLed ``fedtune simulate`` left them training
  rounds into the run folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

GUARD_ENV = "FEDTUNE_GUARD"
PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, sig: int = signal.SIGTERM) -> None:
    """Linux: get ``sig`` when ``parent`` (our parent now) dies; if it already has, get it now."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # the parent died before we asked
        os.kill(os.getpid(), sig)


def dies_with_us(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for ``subprocess.Popen``: the child gets ``sig`` when this process dies.

    None off Linux. libc is looked up here, in the parent, so that the child runs only
    the system calls between fork and exec. The death signal follows the *thread* that
    forks: call Popen from a thread that lives as long as the child should.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), sig)

    return preexec


@dataclass(frozen=True)
class Markers:
    """What the processes of one run carry: exact ``NAME=VALUE`` environment entries,
    or any of ``cmdline`` as a substring of their command line."""

    environ: tuple[str, ...] = ()
    cmdline: tuple[str, ...] = ()

    def matches(self, pid: int) -> bool:
        proc = Path(f"/proc/{pid}")
        try:
            if self.cmdline:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
                if any(c.encode() in cmd for c in self.cmdline):
                    return True
            if self.environ:
                entries = set((proc / "environ").read_bytes().split(b"\0"))
                return any(e.encode() in entries for e in self.environ)
        except OSError:
            return False
        return False

    def to_json(self) -> dict[str, list[str]]:
        return {"environ": list(self.environ), "cmdline": list(self.cmdline)}


def find(markers: Markers, *, exclude: Iterable[int] = ()) -> list[int]:
    """Live processes (not zombies) the markers find, never this one or ``exclude``."""
    skip = {os.getpid(), *exclude}
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            pid = int(entry.name)
        except ValueError:
            continue
        if pid not in skip and markers.matches(pid) and alive(pid):
            found.append(pid)
    return sorted(found)


def await_ready(
    proc: subprocess.Popen[bytes],
    ready: Callable[[], bool],
    *,
    what: str,
    log: Path,
    limit: float = 60.0,
    step: float = 0.3,
    stop: Callable[[float], bool] | None = None,
) -> bool:
    """Wait until ``ready()``; True. False when ``stop(step)`` (e.g. an Event's ``wait``) says
    to give up first. A one-line error naming ``log`` when the process dies or ``limit`` passes."""
    from fedtune.errors import FedTuneError

    deadline = time.monotonic() + limit
    while not ready():
        if proc.poll() is not None:
            raise FedTuneError(f"{what} exited with code {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise FedTuneError(f"{what} did not become ready within {limit:.0f} s; see {log}")
        if stop is not None and stop(step):
            return False
        if stop is None:
            time.sleep(step)
    return True


def answers_http(url: str, *, timeout: float = 1.0, context: ssl.SSLContext | None = None) -> bool:
    """Whether ``url`` answers a GET with a success status (``context``: an SSL context for https)."""
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context):
            return True
    except (OSError, ValueError, ssl.SSLError):
        return False


def stop(proc: subprocess.Popen[bytes], *, grace: float = 20.0, nudge: float = 0.0, group: bool = False) -> int:
    """Stop ``proc``: SIGINT; with ``nudge``, a second SIGINT after that many seconds; SIGKILL
    (of its whole process group with ``group``) after ``grace`` more. Its exit code.

    Flower's processes shut down cleanly on SIGINT, but uvicorn then waits for open
    connections to close, and over TLS each idle one holds it for asyncio's 30-second
    SSL shutdown timeout; a second SIGINT is uvicorn's "force quit": it stops waiting and
    still runs the clean shutdown (SuperExec stopped, state closed).
    """
    if proc.poll() is None:
        for wait in (nudge, grace) if nudge else (grace,):
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL) if group else proc.kill()
            proc.wait()
    return int(proc.returncode)


def stop_group(pgid: int, *, grace: float = 10.0) -> None:
    """SIGINT a process group, SIGKILL whatever of it is left after ``grace`` seconds."""
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie does not)."""
    if pid <= 0:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def running(pid: int, name: str) -> bool:
    """Whether ``pid`` is alive and its command line contains ``name`` (not a reused pid)."""
    if not alive(pid):
        return False
    try:
        return name.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def kill(pids: Iterable[int], *, graceful: bool = True, timeout: float = 10.0, first: int = signal.SIGINT) -> int:
    """Stop ``pids``; return how many would not die.

    ``graceful``: ``first`` (SIGINT), then SIGKILL to those left after ``timeout``
    seconds; otherwise SIGKILL at once.
    """
    left = list(pids)
    for sig in (first, signal.SIGKILL) if graceful else (signal.SIGKILL,):
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            left = [p for p in left if alive(p)]
            if left:
                time.sleep(0.05)
        if not left:
            break
    return len(left)


def sweep(markers: Markers, *, exclude: Iterable[int] = (), limit: float = 8.0) -> int:
    """SIGKILL what the markers find until two looks in a row find nothing (a dying parent
    may start a child between a look and a kill); return how many were killed."""
    killed: set[int] = set()
    quiet = 0
    deadline = time.monotonic() + limit
    while quiet < 2 and time.monotonic() < deadline:
        pids = find(markers, exclude=exclude)
        if pids:
            quiet = 0
            killed.update(pids)
            kill(pids, graceful=False, timeout=2.0)
        else:
            quiet += 1
            time.sleep(0.1)
    return len(killed)


@contextlib.contextmanager
def guarded(markers: Markers, *, unlink: Iterable[Path] = ()) -> Iterator[int]:
    """Run the block with a watcher that, once this process ends or the block is left,
    kills what ``markers`` find and removes the symlinks ``unlink``; yields its pid.

    The caller stops its processes gracefully in the block as usual; the watcher's sweep
    on a normal exit finds nothing. Off Linux the block runs unwatched (yields 0).
    """
    if not sys.platform.startswith("linux"):
        yield 0
        return
    read, write = os.pipe()  # both ends non-inheritable: no other child holds the pipe open
    spec = {**markers.to_json(), "unlink": [str(p) for p in unlink]}
    env = {k: v for k, v in os.environ.items() if k not in ("FLWR_HOME", "RAY_TMPDIR")}
    env[GUARD_ENV] = json.dumps(spec)
    try:
        watcher = subprocess.Popen(
            [sys.executable, "-m", "fedtune.process", str(read)],
            pass_fds=(read,),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the terminal's process group does not reach it
        )
    finally:
        os.close(read)
    try:
        yield watcher.pid
    finally:
        os.close(write)
        try:
            watcher.wait(timeout=15)
        except subprocess.TimeoutExpired:
            watcher.kill()
            watcher.wait()


def _watch(fd: int) -> None:
    """The watcher: wait for the pipe to close, then sweep and clean up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    spec = json.loads(os.environ[GUARD_ENV])
    while os.read(fd, 4096):
        pass
    sweep(Markers(tuple(spec["environ"]), tuple(spec["cmdline"])))
    for link in spec["unlink"]:
        path = Path(link)
        if path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()


if __name__ == "__main__":
    _watch(int(sys.argv[1]))
