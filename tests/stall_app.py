"""The honest ClientApp, except that one real hospital stalls in round 1 of training
(after writing ``state/stalled`` beside its hospital.toml), for the fault tests to kill
it there. Copied into the run's app bundle by the tests."""

from __future__ import annotations

import time
from pathlib import Path

from fedtune.client import client_app as honest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune.hospital import load_hospital_config

VICTIM = "riverside-community"
app = ClientApp(mods=[honest.audited, honest.secagg_when_asked])


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = Path(str(context.node_config["hospital-config"]))
    if load_hospital_config(config, check_files=False).name == VICTIM and msg.metadata.group_id == "1":
        marker = config.parent / "state" / "stalled"
        marker.write_text("1")
        time.sleep(600)  # until the test kills this hospital
    return honest.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
