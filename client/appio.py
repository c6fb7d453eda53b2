"""The hospital daemon as its SuperNode's ClientApp runtime (``--isolation process``).

By default a Flower SuperNode starts a SuperExec, which starts a fresh ``flwr-clientapp``
process for every message; that process installs the run's app bundle and executes
whatever ClientApp it names, as the daemon's user, next to the hospital's keys and data.
The daemon instead starts its SuperNode with ``--isolation process`` and serves the
SuperNode's runtime API itself, from one thread of its own long-lived process:

- It takes each task with the SuperExec secret (random bytes in the state folder, 0600,
  handed to the SuperNode with ``--superexec-auth-secret-file``): no other local process
  can take the hospital's tasks. The runtime API listens on loopback only.
- Before anything touches the hospital's data it checks the run
  (:func:`fedtune.security.authorization.check_run`): fedtune's own app, signed by the coordinator
  whose key the hospital holds, not a replay of an earlier run's authorization. A refused
  run gets an error reply that says why, one ERROR line in the daemon's log, and a record
  in the audit trail.
- It runs fedtune's installed ClientApp in this process, where the base model, the
  tokenized data, the keys, the ledger and the audit trail stay resident across messages
  and rounds (no process start and no model load per message).

Each task is taken in a thread of its own, since its input may still be on its way
(a large adapter over a slow link) or never come (a task left behind by a run that
stopped): the next task is never held up by it. The app itself runs one message at a
time: there is one model.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from flwr.app import Context, Error, Message
from flwr.common.constant import ErrorCode, SubStatus
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import AcquireTaskRequest, PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.fab import Fab
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectPullError, pull_and_inflate_object_from_tree
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.run import Run
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from fedtune.client.audit import AuditLog, Outgoing
from fedtune.security.authorization import AuthorizedRun, RunRefused, SeenRuns, check_run
from fedtune.security.keys import PublicIdentity

# The daemon wakes the runtime as soon as its SuperNode logs that a message arrived
# (wake()); asking the SuperNode once a second besides costs nothing noticeable and
# covers a missed line.
POLL = 1.0
OBJECT_RETRY = 0.05  # seconds before asking the SuperNode again for an object not stored yet
MAX_TASKS = 16  # tasks being pulled or served at once; more wait for one to finish

Say = Callable[[str, str], None]  # (level, message)
_RETRY_STATUS = frozenset({502, 503, 504})


def local_retry(max_time: float = 30.0, stop: threading.Event | None = None) -> RetryInvoker:
    """Retries for calls to the SuperNode on loopback: transport errors and 502-504, for at most ``max_time`` s.

    Not Flower's ``make_simple_http_retry_invoker``: it retries for ever, and answers a 401
    by sending SIGINT to its own process, which suits a throwaway ``flwr-clientapp`` but
    would stop the daemon; a task stuck in it would also stop every task after it.
    ``stop`` (the runtime stopping) ends the waits and gives up at once: a task whose input
    never comes (a run that stopped) must not hold the daemon's exit, whose interpreter
    waits for Flower's object-pull threads.
    """
    stopping = stop or threading.Event()

    def wait(seconds: float) -> None:
        stopping.wait(seconds)

    return RetryInvoker(
        wait_gen_factory=lambda: exponential(max_delay=2),
        recoverable_exceptions=(httpx.TransportError, httpx.HTTPStatusError),
        max_tries=None,
        max_time=max_time,
        should_giveup=lambda e: (
            stopping.is_set() or (isinstance(e, httpx.HTTPStatusError) and e.response.status_code not in _RETRY_STATUS)
        ),
        wait_function=wait,
    )


@dataclass
class RuntimeStats:
    """What the runtime did, for logs and tests."""

    served: int = 0
    refused: int = 0
    failed: int = 0
    runs: dict[int, str] = field(default_factory=dict)  # Flower run id -> the fedtune run it serves


class AppRuntime:
    """Takes the SuperNode's ClientApp tasks, checks their run, runs fedtune's ClientApp."""

    def __init__(
        self,
        *,
        address: str,
        secret: bytes,
        hospital: str,
        hospital_config: Path,
        coordinator: PublicIdentity,
        seen: SeenRuns,
        audit: AuditLog,
        say: Say,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.address = address
        self.secret = secret
        self.hospital = hospital
        self.hospital_config = hospital_config
        self.coordinator = coordinator
        self.seen = seen
        self.audit = audit
        self.say = say
        self.progress = progress
        self.stats = RuntimeStats()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._authorized: dict[int, AuthorizedRun] = {}
        self._model = threading.Lock()  # one model: one message at a time
        self._slots = threading.BoundedSemaphore(MAX_TASKS)

    # -- the loop ------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="fedtune-appio", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """A message is waiting at the SuperNode: take it now."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=timeout)

    def _loop(self) -> None:
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,  # loopback only
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="SuperExec"),
                SuperExecAuthHttpInterceptor(
                    master_secret=self.secret, protected_methods={"/flwr.proto.Runtime/AcquireTask"}
                ),
            ],
        )
        request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP])
        try:
            while not self._stop.is_set():
                self._wake.clear()
                try:
                    res = client.AcquireTask(request)
                except httpx.HTTPError:
                    self._stop.wait(POLL)  # the SuperNode is starting or gone; the daemon watches it
                    continue
                if res.HasField("task") and res.token:
                    self._slots.acquire()
                    threading.Thread(target=self._serve_slot, args=(res.token,), daemon=True).start()
                    continue  # the next message may already be waiting
                self._wake.wait(POLL)
        finally:
            client.close()

    # -- one task ------------------------------------------------------------------------
    @staticmethod
    def _pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab]:
        """Flower's ``pull_task_input`` (flwr 1.41's run_clientapp), retrying a missing object after
        50 ms instead of 1 s: the SuperNode stores a message's objects as it announces the task."""
        res = client.PullTaskInput(PullTaskInputRequest())
        TaskIdentity.task_id = res.task_id
        TaskIdentity.run_id = res.run.run_id
        TaskIdentity.node_id = res.context.node_id
        context = context_from_proto(res.context)
        run, fab = run_from_proto(res.run), fab_from_proto(res.fab)
        pulled = client.PullMessages(PullAppMessagesRequest())
        if not pulled.messages_list:
            raise RuntimeError("No messages received from Runtime API")
        node = Node(node_id=context.node_id)
        tree = pulled.message_object_trees[0]
        message = pull_and_inflate_object_from_tree(
            tree,
            make_pull_object_fn_protobuf(client.PullObject, node, context.run_id),
            make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
            return_type=Message,
            initial_backoff=OBJECT_RETRY,
        )
        message.metadata.__dict__["_message_id"] = tree.object_id  # a deflated message lacks its own id
        return message, context, run, fab

    def _serve_slot(self, token: str) -> None:
        try:
            self.serve(token)
        finally:
            self._slots.release()

    def serve(self, token: str) -> None:
        """Pull one task's input, check its run, run the app (or refuse), push the reply."""
        retry = local_retry(stop=self._stop)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address,
            insecure=True,
            root_certificates=None,
            interceptors=[
                RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                RuntimeTokenHttpInterceptor(token),
            ],
            retry_invoker=retry,
        )
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        context: Context | None = None
        status, details = SubStatus.FAILED, "the hospital could not serve this message"
        try:
            message, context, run, fab = self._pull_task_input(client)
            with self._model:
                reply = self._answer(message, context, run.run_id, fab.content)
            push_message(client, reply, context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as err:  # noqa: BLE001 - one line; the coordinator's round goes on
            self.stats.failed += 1
            if context is None and isinstance(err, RuntimeError | ObjectPullError):  # its run stopped before it came
                self.say("WARNING", f"skipped a task whose message never arrived whole (its run stopped?): {err}")
            else:
                self.say("ERROR", f"a message could not be served: {type(err).__name__}: {err}")
        finally:
            retry.max_tries = 1
            push_task_output(client=client, context=context, sub_status=status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()

    def _answer(self, message: Message, context: Context, flower_run: int, fab: bytes) -> Message:
        kind = message.metadata.message_type
        group = message.metadata.group_id
        try:
            authorized = self._authorize(flower_run, fab, dict(context.run_config))
        except RunRefused as err:
            self.stats.refused += 1
            reason = f"hospital {self.hospital} refuses this run: {err}"
            self.say("ERROR", f"refused {kind} message of Flower run {flower_run}: {err}")
            reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=reason), reply_to=message)
            self._record(f"{kind}/refused-run", f"flower-{flower_run}", group, reason)
            return reply
        app_context = Context(
            run_id=context.run_id,
            node_id=context.node_id,
            node_config={"hospital-config": str(self.hospital_config)},
            state=context.state,  # SecAgg+ keeps its per-run state here; it goes back to the SuperNode
            run_config=context.run_config,
        )
        from fedtune.client.client_app import SITES, app

        SITES.progress_log = self.progress  # training steps into the daemon's log
        SITES.event_log = self.say  # the release gate's decisions too
        started = time.perf_counter()
        try:
            reply = app(message, app_context)
        except Exception as err:  # noqa: BLE001 - the coordinator gets a reason without local details
            self.stats.failed += 1
            where = f"{kind} (round {group or '?'}) of run {authorized.run}"
            self.say("ERROR", f"{where} failed: {type(err).__name__}: {err}")
            reason = f"hospital {self.hospital} could not serve this {kind} message ({type(err).__name__}); see its log"
            self._record(f"{kind}/error", authorized.run, group, reason)
            return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        self.stats.served += 1
        self.say(
            "ERROR" if reply.has_error() else "INFO",
            f"{kind} (round {group or '?'}) of run {authorized.run} served in {time.perf_counter() - started:.3f} s "
            "in the daemon's process; "
            f"base model loads in this process: {SITES.base_model_loads}",
        )
        return reply

    def _authorize(self, flower_run: int, fab: bytes, run_config: dict[str, object]) -> AuthorizedRun:
        known = self._authorized.get(flower_run)
        if known is not None:
            return known
        authorized = check_run(fab, run_config, self.coordinator)
        self.seen.claim(authorized, flower_run)
        self._authorized[flower_run] = authorized
        self.stats.runs[flower_run] = authorized.run
        self.say("INFO", f"serving run {authorized.run} (Flower run {flower_run}): signed by the coordinator")
        return authorized

    def _record(self, kind: str, run: str, group: str, reason: str) -> None:
        """What left for a message the app did not answer: the reason text, in the audit trail."""
        self.audit.append(
            Outgoing(run=run, round=int(group) if group.isdigit() else 0, kind=kind, payload=reason.encode())
        )
