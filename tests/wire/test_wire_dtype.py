"""Deltas on the wire in bfloat16 / float16: packed and unpacked without Flower's engine, merged
within the dtype's rounding of the float32 merge, and any other dtype than the run's refused."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MessageType

from fedtune import config, wire
from fedtune.errors import ConfigError, UpdateRejected
from fedtune.security.keys import AllowList, KeyPair
from fedtune.security.witness import ChainHead
from fedtune.server.sampling import Sampling
from fedtune.server.strategy import LoraStrategy
from fedtune.wire.arrays import RAW

pytestmark = pytest.mark.usefixtures("flower_run_id")

GLOBAL = {
    "m.lora_A.weight": torch.randn(8, 512, generator=torch.Generator().manual_seed(0)),
    "m.lora_B.weight": torch.zeros(256, 8),
}
COORD = KeyPair.generate("coordinator", "coordinator")
SITES = {name: KeyPair.generate(name, "hospital") for name in ("a", "b", "c")}
HEAD = ChainHead(0, "0" * 64)
# the largest relative rounding of a value: half a unit in the last of 8 (bfloat16) or 11 (float16) bits;
# float16's subnormals (below 6.1e-5) are rounded to a fixed step of 2^-24 instead
ROUNDING = {"float32": 0.0, "bfloat16": 2.0**-8, "float16": 2.0**-11}
SUBNORMAL = {"float32": 0.0, "bfloat16": 0.0, "float16": 2.0**-25}


def _delta(seed: int, scale: float = 1e-3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in GLOBAL.items()}


def test_the_config_names_are_the_wire_dtypes() -> None:
    assert config.WIRE_DTYPES == tuple(wire.WIRE_DTYPES)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_pack_and_unpack_round_trip_to_float32(dtype: str) -> None:
    delta = _delta(1)
    record = wire.to_arrays(delta, dtype)
    assert record[wire.PACKED].dtype == dtype
    back = wire.from_arrays(record, dtype)
    for key, value in delta.items():
        assert back[key].dtype == torch.float32 and back[key].shape == value.shape
        assert torch.equal(back[key], value.to(wire.WIRE_DTYPES[dtype]).float())  # exactly the rounded value
        torch.testing.assert_close(back[key], value, rtol=ROUNDING[dtype], atol=SUBNORMAL[dtype])
    values = sum(v.numel() for v in delta.values())
    assert len(record[wire.PACKED].data) - values * wire.WIRE_DTYPES[dtype].itemsize in range(0, 200)
    a, b = back["m.lora_A.weight"], back["m.lora_B.weight"]
    b[0, 0] = 1.0  # writable, each tensor its own storage (a checkpoint may save them apart)
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def test_a_packed_adapter_in_another_dtype_is_refused_in_one_line() -> None:
    record = wire.to_arrays(_delta(1), "bfloat16")
    with pytest.raises(
        ValueError, match=r"adapter is bfloat16 on the wire, the run's `federation.wire_dtype` is float32"
    ):
        wire.from_arrays(record)
    with pytest.raises(ValueError, match="is float32 on the wire, the run's `federation.wire_dtype` is float16"):
        wire.from_arrays(wire.to_arrays(_delta(1)), "float16")
    # a 16-bit Array whose bytes do not match its shape
    short = ArrayRecord(
        {wire.INDEX: record[wire.INDEX], wire.PACKED: Array("bfloat16", (6144,), RAW, record[wire.PACKED].data[:-2])}
    )
    with pytest.raises(ValueError, match="raw little-endian bytes"):
        wire.from_arrays(short, "bfloat16")
    # a plain reply in the wrong dtype: rejected with the reason
    content = wire.pack_reply(wire.Identity("a", "b", "s"), {}, num_examples=3, delta=_delta(1), wire_dtype="float16")
    with pytest.raises(UpdateRejected, match=r"^delta arrays cannot be decoded \(the adapter is float16 on the wire"):
        wire.unpack_reply(content, expect_delta=True, dtype="bfloat16")
    assert wire.unpack_reply(content, expect_delta=True, dtype="float16").delta is not None


def test_from_wire_accepts_the_runs_dtype_only() -> None:
    sent = wire.to_wire(_delta(2), "bfloat16")
    assert all(v.dtype == torch.bfloat16 for v in sent.values())
    assert all(v.dtype == torch.float32 for v in wire.from_wire(sent, "bfloat16").values())
    with pytest.raises(UpdateRejected, match=r"is bfloat16 on the wire, the run's `federation.wire_dtype` is float32$"):
        wire.from_wire(sent, "float32")
    with pytest.raises(UpdateRejected, match="is float32 on the wire"):
        wire.from_wire(_delta(2), "bfloat16")


def test_float16_overflow_is_refused_before_sending() -> None:
    big = {"m.lora_B.weight": torch.full((2, 2), 131072.0)}  # 2^17: exact in bfloat16, beyond float16
    with pytest.raises(ValueError, match=r"beyond float16's range: set `federation.wire_dtype` = 'bfloat16'"):
        wire.to_arrays(big, "float16")
    assert torch.equal(
        wire.from_arrays(wire.to_arrays(big, "bfloat16"), "bfloat16")["m.lora_B.weight"], big["m.lora_B.weight"]
    )
    nan = {"m.lora_B.weight": torch.full((2, 2), float("nan"))}
    assert (
        wire.to_wire(nan, "float16")["m.lora_B.weight"].isnan().all()
    )  # not finite already: the coordinator rejects it


# -- sealed, through the coordinator's strategy -------------------------------------------------


class Nodes:
    def get_node_ids(self) -> list[int]:
        return [1, 2, 3]


def _round(
    dtype: str, deltas: dict[str, tuple[dict[str, torch.Tensor], str]]
) -> tuple[dict[str, torch.Tensor], LoraStrategy]:
    """One sealed round on a strategy of wire dtype ``dtype``: site -> (delta, the dtype it sends)."""
    opener = wire.Opener(COORD, AllowList([p.public for p in SITES.values()]))
    s = LoraStrategy(
        spec_sha256="spec",
        base_sha256="",
        sampling=Sampling(3, min_updates=1),
        run_id="r",
        opener=opener,
        wire_dtype=dtype,
    )
    config_record = wire.instruction_config(num_rounds=1)
    (msg, *_) = list(s.configure_train(1, wire.to_arrays(GLOBAL), config_record, Nodes()))  # type: ignore[arg-type]
    ins = wire.unpack_instruction(msg.content)
    replies = []
    for n, (site, (delta, sent_as)) in enumerate(deltas.items()):
        content = wire.pack_reply(
            wire.Identity(site, "base", "spec"),
            {"train-loss": 0.5},
            num_examples=10 * (n + 1),
            delta=delta,
            sealer=wire.Sealer(SITES[site], COORD.public),
            instruction=ins,
            audit=HEAD,
            wire_dtype=sent_as,
        )
        replies.append(Message(content=content, dst_node_id=0, message_type=MessageType.TRAIN))
    arrays, _ = s.aggregate_train(1, replies)
    assert arrays is not None
    return wire.from_arrays(arrays), s


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_a_sealed_16_bit_round_merges_like_float32_within_its_rounding(dtype: str) -> None:
    deltas = {site: _delta(seed) for seed, site in enumerate(SITES)}
    exact, _ = _round("float32", {site: (d, "float32") for site, d in deltas.items()})
    merged, s = _round(dtype, {site: (d, dtype) for site, d in deltas.items()})
    assert s.report.counts()["accepted"] == 3
    for key in GLOBAL:
        step, exact_step = merged[key] - GLOBAL[key], exact[key] - GLOBAL[key]
        # a weighted mean of values each rounded by at most ROUNDING of their size: off by at most
        # that much of the largest, and by float32's rounding of global + step (values up to 4: 2.4e-7 each)
        bound = ROUNDING[dtype] * torch.stack([d[key].abs() for d in deltas.values()]).max(dim=0).values
        assert bool(((step - exact_step).abs() <= bound + SUBNORMAL[dtype] + 1e-6).all())
        assert not torch.equal(step, exact_step)  # it did round
    # the upload is about half the bytes of float32's
    half = s.report.accepted["a"]["upload-bytes"]
    _, full = _round("float32", {"a": (deltas["a"], "float32")})
    assert half < 0.6 * full.report.accepted["a"]["upload-bytes"]


def test_a_sealed_update_in_another_dtype_than_the_runs_is_rejected() -> None:
    deltas = {"a": (_delta(0), "bfloat16"), "b": (_delta(1), "float32"), "c": (_delta(2), "float16")}
    merged, s = _round("bfloat16", deltas)
    assert s.report.counts()["accepted"] == 1 and set(s.report.accepted) == {"a"}
    reasons = {r["site"].split("claims ")[-1].rstrip(")"): r["reason"] for r in s.report.rejected}
    assert reasons["b"].endswith("is float32 on the wire, the run's `federation.wire_dtype` is bfloat16"), reasons
    assert "is float16 on the wire" in reasons["c"] and "\n" not in reasons["c"]
    for key in GLOBAL:  # only a's update counted
        rounded = deltas["a"][0][key].to(torch.bfloat16).float()
        torch.testing.assert_close(merged[key], GLOBAL[key] + rounded)


# -- the setting -----------------------------------------------------------------------------------


def test_the_setting_is_validated_and_refused_where_it_cannot_apply() -> None:
    assert config.load_config(None, {}).federation.wire_dtype == "float32"
    assert config.load_config(None, {"federation.wire_dtype": "bfloat16"}).federation.wire_dtype == "bfloat16"
    with pytest.raises(
        ConfigError, match=r"`federation.wire_dtype` must be one of float32, bfloat16, float16, got 'int8'"
    ):
        config.load_config(None, {"federation.wire_dtype": "int8"})
    with pytest.raises(ConfigError, match=r"with `federation.strategy` = 'svd' that is its whole adapter"):
        config.load_config(None, {"federation.wire_dtype": "float16", "federation.strategy": "svd"})
    secure = {"security.secure_aggregation": True, "data.hospitals": 3, "federation.wire_dtype": "bfloat16"}
    with pytest.raises(ConfigError, match=r"does not apply to `security.secure_aggregation`, which quantizes"):
        config.load_config(None, secure)
