"""The honest ClientApp (with its audit trail) and, outermost, a Flower mod that records
every message it sends, serialized as it travels, into <run>/wire/. Copied into the run's
app bundle by the test."""

from __future__ import annotations

from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.serde import recorddict_to_proto

from fedtune.client import client_app as honest


def record_outgoing(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    out = call_next(msg, context)
    folder = Path(str(context.run_config["run-dir"])) / "wire"
    folder.mkdir(exist_ok=True)
    data = recorddict_to_proto(out.content).SerializeToString(deterministic=True) if out.has_content() else b""
    (folder / f"{msg.metadata.message_type}-{uuid4().hex}.bin").write_bytes(data)
    return out


app = ClientApp(mods=[record_outgoing, honest.audited])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return honest.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
