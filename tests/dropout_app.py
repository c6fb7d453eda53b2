"""The honest ClientApp (with its SecAgg+ mod), except that one hospital crashes in the
middle of round 1 of secure aggregation: after it has handed out its key shares, while
computing its masked update, so its masks must be recovered from the others' shares.
(It raises rather than kills its process: in Flower's simulation engine a dead worker
process stops the whole engine; killing a real SuperNode is the deployment tests' job.)
Copied into the run's app bundle by the test."""

from __future__ import annotations

from fedtune.client import client_app as honest
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedtune import wire

VICTIM = "riverside-community"
app = ClientApp(mods=[honest.secagg_when_asked])


@app.train()
def train(msg: Message, context: Context) -> Message:
    site = honest._site(context)
    if site.data.site == VICTIM and wire.is_secagg_train(msg.content):
        if wire.unpack_secagg_instruction(msg.content, site.runtime.state()).server_round == 1:
            raise RuntimeError(f"{VICTIM} crashed mid-round")  # no masked vector, no unmask shares
    return honest.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
