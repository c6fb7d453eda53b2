"""The coordinator's exchange with the hospitals: replies as they come, and who a SuperLink error was for."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID

from fedtune.server.grid import exchange


class TwoNodes:
    """Node 7 answers; node 8 has left, so the SuperLink answers for it from its own node id."""

    def __init__(self) -> None:
        self.pulls = 0
        self.sent: list[Message] = []

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        self.sent = list(messages)
        return [f"id-{m.metadata.dst_node_id}" for m in self.sent]

    def pull_messages(self, ids: Iterable[str]) -> list[Message]:
        self.pulls += 1
        if self.pulls < 2:
            return []
        out = []
        for msg in self.sent:
            msg.metadata.__dict__["_message_id"] = f"id-{msg.metadata.dst_node_id}"
            if msg.metadata.dst_node_id == 7:
                out.append(Message(RecordDict({"ok": ConfigRecord({"a": 1})}), reply_to=msg))
            else:
                failed = Message(Error(code=5, reason="Error: Node Unavailable"), reply_to=msg)
                failed.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID
                out.append(failed)
        return [m for m in out if m.metadata.reply_to_message_id in set(ids)]


def test_replies_are_collected_and_superlink_errors_name_their_node(flower_run_id) -> None:  # type: ignore[no-untyped-def]
    grid = TwoNodes()
    asks = [
        Message(RecordDict({"x": ConfigRecord({"a": 1})}), dst_node_id=n, message_type=MessageType.TRAIN)
        for n in (7, 8)
    ]
    seen: list[int] = []
    replies = exchange(grid, asks, timeout=10, poll=0.01, on_reply=lambda m: seen.append(m.metadata.src_node_id))  # type: ignore[arg-type]
    assert grid.pulls == 2 and len(replies) == 2
    assert sorted(seen) == [7, 8]  # the error came from the SuperLink, but was for node 8
    (failed,) = [m for m in replies if m.has_error()]
    assert failed.metadata.src_node_id == 8 and "Node Unavailable" in failed.error.reason
