"""A ClientApp for the misbehaving-hospital test, copied into the run's Flower app bundle
by the test (not part of fedtune). It is honest except for one hospital, which in round 1
sends NaN, in round 2 a huge update, in round 3 a replay of its round-2 envelope, and in
round 4 an envelope signed with a key that is not its own. All are properly sealed where
the attack allows, so each must be caught by the coordinator's checks, not by luck."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from fedtune import wire
from fedtune.client import client_app as honest
from fedtune.client.site import Site
from fedtune.lora.delta import compute_delta
from fedtune.security.keys import KeyPair

MISBEHAVING = "riverside-community"
app = ClientApp()


def _sealed(site: Site, instruction: wire.RoundInstruction, delta: dict[str, torch.Tensor], key: KeyPair) -> RecordDict:
    assert site.sealer is not None
    sealer = wire.Sealer(key, site.sealer.coordinator)
    identity = site.identity()
    return wire.pack_reply(
        identity,
        {"train-loss": 0.1},
        num_examples=len(site.data.train),
        delta=delta,
        sealer=sealer,
        instruction=instruction,
        audit=site.audit.head(),
    )


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = honest.train(msg, context)
    site = honest._site(context)
    if site.data.site != MISBEHAVING or site.sealer is None:
        return reply
    instruction = wire.unpack_instruction(msg.content)
    stash = Path(str(context.run_config["run-dir"])) / "adversary"
    stash.mkdir(exist_ok=True)
    envelope = reply.content.config_records[wire.ENVELOPE]["data"]  # its three parts
    assert isinstance(envelope, list) and all(isinstance(part, bytes) for part in envelope)
    (stash / f"round-{instruction.server_round}.bin").write_bytes(b"".join(envelope))  # type: ignore[arg-type]
    delta = compute_delta(site.runtime.state(), instruction.state)  # what honest.train just computed
    own = site.sealer.keys
    if instruction.server_round == 1:
        first = sorted(delta)[0]
        delta[first].view(-1)[0] = float("nan")
        content = _sealed(site, instruction, delta, own)
    elif instruction.server_round == 2:
        content = _sealed(site, instruction, {k: v * 1e6 for k, v in delta.items()}, own)
    elif instruction.server_round == 3:
        content = RecordDict({wire.ENVELOPE: ConfigRecord({"data": (stash / "round-2.bin").read_bytes()})})
    else:
        content = _sealed(site, instruction, delta, KeyPair.generate(MISBEHAVING, "hospital"))
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
