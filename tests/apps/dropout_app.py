"""The honest ClientApp (with its SecAgg+ mod), except that one hospital is lost in the
middle of round 1 of secure aggregation: after it has handed out its key shares, while
computing its masked update, so its masks must be recovered from the others' shares.

By default it raises (in Flower's simulation engine a dead worker process stops the whole
engine). When the run folder holds a file ``kill-victim``, it writes ``victim-waiting``
there with its partition id instead and waits, for the deployment test to SIGKILL its
SuperNode. Copied into the run's app bundle by the tests."""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.client import client_app as honest

VICTIM = "riverside-community"
app = ClientApp(mods=[honest.secagg_when_asked])


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = honest._site(context)
    if site.data.site == VICTIM and wire.is_secagg_train(msg.content):
        if wire.unpack_secagg_instruction(msg.content, site.runtime.state()).server_round == 1:
            run_dir = Path(str(context.run_config["run-dir"]))
            if (run_dir / "kill-victim").exists():
                (run_dir / "victim-waiting.tmp").write_text(str(site.seed_index))
                (run_dir / "victim-waiting.tmp").rename(run_dir / "victim-waiting")
                time.sleep(600)  # until the test kills this hospital
            raise RuntimeError(f"{VICTIM} crashed mid-round")  # no masked vector, no unmask shares
    return honest.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
