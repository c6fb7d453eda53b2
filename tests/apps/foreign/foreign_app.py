"""Someone else's Flower app, as an outsider (or a careless insider) would ship it.

Its ServerApp asks every connected hospital to "train" and writes what came back to the
file named by the run config's ``out``. Its ClientApp, if a hospital ever ran it, would
report its uid and folder and whether the hospital's config is within reach, and leave a
marker file: the deployment tests assert that it never runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes = list(grid.get_node_ids())
    asks = [grid.create_message(RecordDict({"config": ConfigRecord({"x": 1})}), "train", n, "1") for n in nodes]
    replies = grid.send_and_receive(asks, timeout=90)
    seen = [{"node": r.metadata.src_node_id, "error": r.error.reason if r.has_error() else None} for r in replies]
    Path(str(context.run_config["out"])).write_text(json.dumps({"nodes": nodes, "replies": seen}))


@client.train()
def train(msg: Message, context: Context) -> Message:
    config = str(context.node_config.get("hospital-config", ""))
    found = {"uid": os.getuid(), "cwd": os.getcwd(), "config": config, "readable": os.access(config, os.R_OK)}
    Path(str(context.run_config["marker"])).write_text(json.dumps(found))
    return Message(RecordDict({"config": ConfigRecord({"pwned": 1})}), reply_to=msg)
