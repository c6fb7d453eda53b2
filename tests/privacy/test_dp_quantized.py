"""DP-SGD over a quantized base and with gradient checkpointing: Opacus's per-sample gradients
are taken on the LoRA layers only, the release is accounted, and checkpointing changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune import wire
from fedtune.client.dp_round import open_ledger, private_train_round
from fedtune.config import DPSettings, LoraSettings, ModelSettings, TrainSettings
from fedtune.data import clinical
from fedtune.data.records import dataset_id, record_digests
from fedtune.lora import adapter
from fedtune.lora.delta import compute_delta, l2_norm
from fedtune.lora.merge import make_rule
from fedtune.privacy.dpsgd import train_local_dp
from fedtune.runtime import SiteRuntime, site_data


def _runtime(**kw: object) -> SiteRuntime:
    settings = ModelSettings(**{"source": "tiny", "precision": "fp32", "threads": 1, **kw})  # type: ignore[arg-type]
    return SiteRuntime(settings, LoraSettings(rank=2))


def test_dp_sgd_over_a_4bit_base_trains_and_accounts(tiny_dir: Path, tmp_path: Path) -> None:
    rt = _runtime(quantization="4bit")
    train, held = clinical.generate(1, n_train=20, n_eval=2, seed=0)["st-elsewhere"]
    data = site_data(rt, "st-elsewhere", train, held, 256)
    nf4 = rt.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    frozen = nf4.detach().clone()
    dp = DPSettings(enabled=True, noise_multiplier=1.0, budget_epsilon=20.0)
    ledger = open_ledger(tmp_path / "ledger.json", dp)
    start = rt.state()
    instruction = wire.RoundInstruction(state=start, server_round=1, num_rounds=2)
    train_settings = TrainSettings(local_steps=2, batch_size=4, lr=1e-2)
    done = private_train_round(
        rt, instruction, data, train_settings, dp, ledger, run_id="run-q", rule=make_rule("fedavg", alpha=16, rank=2)
    )
    assert done.epsilon > 0 and done.epsilon == pytest.approx(ledger.spent(dataset_id(record_digests(data.train))))
    assert (done.mechanism.noise_multiplier, done.mechanism.steps) == (1.0, 2)
    assert set(done.delta) == set(start) and l2_norm(done.delta) > 0
    assert torch.equal(nf4.detach(), frozen)  # the quantized base never moves
    assert not any(getattr(p, "grad_sample", None) is not None for p in rt.model.parameters())  # Opacus unhooked


def _dp_update(rt: SiteRuntime, state: dict[str, torch.Tensor], clip: float) -> dict[str, torch.Tensor]:
    train, _ = clinical.generate(1, n_train=6, n_eval=1, seed=0)["st-elsewhere"]
    tokens = rt.tokenize(train, 256)
    adapter.set_state(rt.model, state)
    settings = TrainSettings(lr=0.5, optimizer="sgd", lr_schedule="constant", batch_size=8)  # q = 1: every record
    train_local_dp(
        rt.model,
        tokens,
        settings,
        noise_multiplier=0.0,
        max_grad_norm=clip,
        steps=2,
        pad_id=int(rt.base.tokenizer.pad_token_id),
        seed=0,
        precision="fp32",
    )
    return compute_delta(adapter.get_state(rt.model), state)


@pytest.mark.parametrize("quantization", ["none", "4bit"])
def test_dp_sgd_with_gradient_checkpointing_equals_without(tiny_dir: Path, quantization: str) -> None:
    plain = _runtime(quantization=quantization)
    checkpointed = _runtime(quantization=quantization, gradient_checkpointing=True)
    gen = torch.Generator().manual_seed(0)
    state = {k: v + 0.01 * torch.randn(v.shape, generator=gen) for k, v in plain.state().items()}
    # clip=1e3: no clipping, so per-sample gradients counted twice would double the step; 0.05: every one clipped
    for clip in (1e3, 0.05):
        want, got = _dp_update(plain, state, clip), _dp_update(checkpointed, state, clip)
        assert l2_norm(want) > 0
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7)
