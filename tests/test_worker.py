"""The hospital's resident worker: messages relayed over a private Unix socket run in
the daemon's process, context changes come back, failures become one clear error."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from fedtune.client.worker import Worker, call_worker, socket_path
from flwr.app import ConfigRecord, Context, Message, RecordDict

from fedtune.errors import FedTuneError

pytestmark = pytest.mark.usefixtures("flower_run_id")


def _message() -> Message:
    return Message(RecordDict({"config": ConfigRecord({"x": 2})}), dst_node_id=7, message_type="train", group_id="3")


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={"k": "v"}, state=RecordDict(), run_config={"r": 1})


def test_a_relayed_message_runs_in_the_worker_and_its_state_comes_back(tmp_path: Path) -> None:
    seen = []

    def handler(message: Message, context: Context) -> Message:
        seen.append((message.metadata.group_id, dict(context.node_config)))
        context.state.config_records["secagg"] = ConfigRecord({"stage": "share-keys"})
        x = message.content.config_records["config"]["x"]
        return Message(RecordDict({"out": ConfigRecord({"y": int(x) * 10})}), reply_to=message)  # type: ignore[call-overload]

    worker = Worker(socket_path(tmp_path / "state"), handler)
    worker.start()
    try:
        assert stat.S_IMODE(worker.path.stat().st_mode) == 0o600
        assert stat.S_IMODE(worker.path.parent.stat().st_mode) == 0o700
        context = _context()
        for _ in range(3):
            reply = call_worker(worker.path, _message(), context, timeout=30)
            assert reply.content.config_records["out"]["y"] == 20
        assert context.state.config_records["secagg"]["stage"] == "share-keys"
        assert worker.calls == 3 and seen[0] == ("3", {"k": "v"})
    finally:
        worker.stop()
    assert not worker.path.exists()
    with pytest.raises(FedTuneError, match="does not answer.*is the daemon running"):
        call_worker(worker.path, _message(), _context(), timeout=5)


def test_a_failure_in_the_worker_is_one_clear_error(tmp_path: Path) -> None:
    def handler(message: Message, context: Context) -> Message:
        raise ValueError("the model folder vanished")

    worker = Worker(socket_path(tmp_path), handler)
    worker.start()
    try:
        with pytest.raises(FedTuneError, match="the hospital worker failed: ValueError: the model folder vanished"):
            call_worker(worker.path, _message(), _context(), timeout=30)
    finally:
        worker.stop()


def test_long_state_folders_get_a_short_private_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120)
    path = socket_path(deep)
    assert len(str(path)) <= 100 and path.name == "worker.sock"
    assert socket_path(deep) == path  # stable for the same folder
