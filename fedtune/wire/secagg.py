"""Secure aggregation's records: Flower's legacy FitIns / FitRes, which SecAgg+ masks."""

from __future__ import annotations

from collections.abc import Mapping

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common import Code, FitRes, Parameters, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays

from fedtune.errors import UpdateRejected
from fedtune.lora.delta import State
from fedtune.wire.messages import Identity, RoundInstruction


def is_secagg_train(content: RecordDict) -> bool:
    """Is this a train request from Flower's SecAgg+ workflow (legacy FitIns records)?"""
    return "fitins.parameters" in content.array_records


def to_parameters(state: Mapping[str, torch.Tensor]) -> Parameters:
    """Adapter tensors -> legacy Parameters, in canonical (sorted) key order: they carry no names."""
    return ndarrays_to_parameters([np.ascontiguousarray(state[k].detach().cpu().numpy()) for k in sorted(state)])


def from_parameters(parameters: Parameters, reference: Mapping[str, torch.Tensor]) -> State:
    """Legacy Parameters -> tensors named and shaped like ``reference``; UpdateRejected if they do not fit."""
    arrays = parameters_to_ndarrays(parameters)
    keys = sorted(reference)
    if len(arrays) != len(keys):
        raise UpdateRejected(f"{len(arrays)} arrays for an adapter of {len(keys)} tensors")
    out = {}
    for key, array in zip(keys, arrays, strict=True):
        if tuple(array.shape) != tuple(reference[key].shape):
            raise UpdateRejected(f"tensor {key} has shape {tuple(array.shape)}, expected {tuple(reference[key].shape)}")
        out[key] = torch.from_numpy(np.array(array, dtype=np.float32, copy=True))
    return out


def secagg_instruction(*, num_rounds: int, run_id: str, server_round: int, challenge: str) -> dict[str, Scalar]:
    """The FitIns config a SecAgg+ round sends (the same fields as the Message API's)."""
    return {"num-rounds": num_rounds, "run-id": run_id, "server-round": server_round, "challenge": challenge}


def unpack_secagg_instruction(content: RecordDict, reference: Mapping[str, torch.Tensor]) -> RoundInstruction:
    fitins = compat.recorddict_to_fitins(content, keep_input=True)
    config = fitins.config
    return RoundInstruction(
        state=from_parameters(fitins.parameters, reference),
        server_round=int(config["server-round"]),
        num_rounds=int(config["num-rounds"]),
        run_id=str(config.get("run-id", "")),
        challenge=str(config.get("challenge", "")),
    )


def pack_secagg_reply(
    identity: Identity, metrics: Mapping[str, float], *, num_examples: int, delta: Mapping[str, torch.Tensor]
) -> RecordDict:
    """A legacy FitRes: SecAgg+ masks its parameters before they leave; the numbers travel as they are."""
    numbers: dict[str, Scalar] = {k: float(v) for k, v in metrics.items()}
    numbers.update({"site": identity.site, "base-sha256": identity.base_sha256, "spec-sha256": identity.spec_sha256})
    fitres = FitRes(Status(Code.OK, ""), to_parameters(delta), int(num_examples), numbers)
    return compat.fitres_to_recorddict(fitres, keep_input=True)
