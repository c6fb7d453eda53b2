"""The hospital's resident worker: the base model stays loaded across messages and rounds.

In deployment Flower starts a fresh ClientApp process for every message, which would
load the base model every time (minutes and gigabytes for a large model on a GPU). The
daemon (``fedtune client start``) therefore hosts this worker: a Unix socket in the
hospital's state folder (folder 0700, socket 0600), served by one thread of the daemon's
own long-lived process. The ClientApp process Flower starts is only a relay: its
outermost mod sends the message and its context here, the real ClientApp (audit trail,
SecAgg+ mod, training with the resident runtime) runs in the worker, and the reply and
the updated context (SecAgg+ keeps its state there) come back. One message at a time:
there is one model.

Frames: an 8-byte big-endian length, then the bytes. A request is two frames (Flower's
Message and Context protobufs); a response is one status byte (0: ok, 1: error) and two
frames (reply and context) or one (the error text).
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import context_from_proto, context_to_proto, message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Context as ProtoContext
from flwr.proto.message_pb2 import Message as ProtoMessage

from fedtune.errors import FedTuneError

IN_WORKER = "FEDTUNE_IN_WORKER"
NODE_CONFIG_KEY = "hospital-worker"
_MAX_FRAME = 1 << 34  # 16 GiB: a delta of the largest model this is meant for, with room


def socket_path(state_dir: Path) -> Path:
    """``<state_dir>/worker.sock``, or a short private path when that is too long for a Unix socket."""
    path = Path(state_dir).resolve() / "worker.sock"
    if len(str(path)) <= 100:
        return path
    import hashlib
    import tempfile

    digest = hashlib.sha256(str(path).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"fedtune-{os.getuid()}-{digest}" / "worker.sock"


def _send(sock: socket.socket, *frames: bytes) -> None:
    for frame in frames:
        sock.sendall(struct.pack(">Q", len(frame)) + frame)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = sock.recv(min(n - got, 1 << 20))
        if not chunk:
            raise ConnectionError("the hospital worker closed the connection")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _recv(sock: socket.socket) -> bytes:
    (size,) = struct.unpack(">Q", _recv_exact(sock, 8))
    if size > _MAX_FRAME:
        raise ConnectionError(f"frame of {size} bytes refused")
    return _recv_exact(sock, size)


def encode(message: Message, context: Context) -> tuple[bytes, bytes]:
    return (
        message_to_proto(message).SerializeToString(),
        context_to_proto(context).SerializeToString(),
    )


def decode(message: bytes, context: bytes) -> tuple[Message, Context]:
    return (
        message_from_proto(ProtoMessage.FromString(message)),
        context_from_proto(ProtoContext.FromString(context)),
    )


def call_worker(path: Path, message: Message, context: Context, *, timeout: float | None = None) -> Message:
    """Run ``message`` in the hospital's worker; copy its context changes back into ``context``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except OSError as err:
            raise FedTuneError(
                f"the hospital worker at {path} does not answer ({err}); is the daemon running?"
            ) from err
        _send(sock, *encode(message, context))
        status = _recv_exact(sock, 1)
        if status != b"\x00":
            raise FedTuneError(f"the hospital worker failed: {_recv(sock).decode(errors='replace')}")
        reply, new_context = decode(_recv(sock), _recv(sock))
    context.state = new_context.state
    return reply


class Worker:
    """Serves ClientApp calls on a Unix socket from a thread of the daemon's process."""

    def __init__(self, path: Path, handler: Callable[[Message, Context], Message]) -> None:
        self.path = Path(path)
        self.handler = handler
        self.lock = threading.Lock()  # one model: one message at a time
        self.calls = 0
        self._server: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path.parent, 0o700)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            server.bind(str(self.path))  # created 0600: only this user may connect
        finally:
            os.umask(old)
        server.listen(8)
        self._server = server
        self._thread = threading.Thread(target=self._serve, name="fedtune-worker", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        assert self._server is not None
        while True:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            try:
                message, context = decode(_recv(conn), _recv(conn))
            except (ConnectionError, ValueError, OSError):
                return
            try:
                with self.lock:
                    self.calls += 1
                    reply = self.handler(message, context)
                frames = encode(reply, context)
            except Exception as err:  # noqa: BLE001 - the relay turns it into Flower's error reply
                with contextlib.suppress(OSError):
                    conn.sendall(b"\x01")
                    _send(conn, f"{type(err).__name__}: {err}".encode())
                return
            with contextlib.suppress(OSError):
                conn.sendall(b"\x00")
                _send(conn, *frames)

    def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
