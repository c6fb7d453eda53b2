"""The coordinator's view of Flower's Grid, with replies collected as soon as they arrive.

Flower 1.41's deployment Grid (``HttpGrid.send_and_receive``) looks for replies every
3 seconds, so each exchange with the hospitals (train, then evaluate, in every round)
waited 1.5 s on average and up to 3 s after the last reply had arrived. Asking the
SuperLink on loopback is cheap, so this wrapper asks every ``poll`` seconds (0.1 by
default, the interval Flower's own in-memory Grid uses in simulation) and forwards
everything else unchanged. Flower's SecAgg+ workflow calls ``send_and_receive`` too, so
it gains the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

POLL_SECONDS = 0.1


class PromptGrid(Grid):
    """Delegates to ``grid``; ``send_and_receive`` polls every ``poll`` seconds."""

    def __init__(self, grid: Grid, *, poll: float = POLL_SECONDS) -> None:
        self.grid = grid
        self.poll = poll

    def set_run(self, run: Run) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        return self.grid.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``; collect their replies until all came or ``timeout`` seconds passed."""
        return exchange(self.grid, messages, timeout=timeout, poll=self.poll)


def exchange(
    grid: Grid,
    messages: Iterable[Message],
    *,
    timeout: float | None,
    poll: float = POLL_SECONDS,
    on_reply: Callable[[Message], None] | None = None,
) -> list[Message]:
    """Push ``messages`` through ``grid``; collect their replies until all came or ``timeout``
    seconds passed, telling ``on_reply`` about each as it arrives (the run's live status).

    When a hospital's node has left, the SuperLink answers in its place with an error reply
    from the SuperLink's own node id ("Node Unavailable"); such a reply is given the node
    id the message was sent to, so that the coordinator can say which hospital it was.
    """
    sent = list(messages)
    ids = list(grid.push_messages(sent))
    node_of = {mid: m.metadata.dst_node_id for mid, m in zip(ids, sent, strict=False)}
    waiting = set(ids)
    deadline = None if timeout is None else time.monotonic() + timeout
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        for msg in got:
            meta = msg.metadata
            if msg.has_error() and meta.src_node_id == SUPERLINK_NODE_ID and meta.reply_to_message_id in node_of:
                meta.__dict__["_src_node_id"] = node_of[meta.reply_to_message_id]
        replies.extend(got)
        if on_reply is not None:
            for msg in got:
                on_reply(msg)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting or (deadline is not None and time.monotonic() >= deadline):
            break
        time.sleep(poll)
    return replies
