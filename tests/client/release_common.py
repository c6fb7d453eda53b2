"""What the release gate's tests share: a tiny hospital site with its `[release]` rule, training,
and offering a candidate the way ``client_app.evaluate`` does."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from fedtune.client import release
from fedtune.client.hospital import CoordinatorSection, HospitalConfig, HospitalData, HospitalSection, ReleasePolicy
from fedtune.client.site import Site
from fedtune.config import TrainSettings, load_config
from fedtune.runtime import SiteData, SiteRuntime

TRAIN = TrainSettings(local_steps=4, batch_size=4, lr=1e-2)
LOSS_RULE = ReleasePolicy(metric="loss", max_drop=0.05)


def make_site(tiny: tuple[SiteRuntime, SiteData], tmp_path: Path, policy: ReleasePolicy, run: str = "run-x") -> Site:
    rt, data = tiny
    hospital = HospitalConfig(
        hospital=HospitalSection("st-elsewhere"),
        coordinator=CoordinatorSection("coordinator.example.org:9092"),
        data=HospitalData(train=("train.jsonl",)),
        release=policy,
        source=tmp_path / "hospital.toml",
    )
    cfg = load_config(None, {"model.source": "tiny", "eval.max_new_tokens": 4, "train.max_length": 256})
    return Site(cfg, 0, rt, data, run, None, tmp_path / "ledger.json", tmp_path / "audit.jsonl", hospital=hospital)


def trained(rt: SiteRuntime, data: SiteData, start: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    rt.train_steps(start, data, TRAIN, steps=4, seed=seed)
    return rt.state()


def offer(site: Site, rnd: int, state: dict[str, torch.Tensor]) -> None:
    """What client_app.evaluate does: evaluate the candidate, then the gate decides."""
    result = site.runtime.evaluate(state, site.data, site.cfg.eval)
    release.consider(site, rnd, state, result)


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def plain_peft_logits(tiny_dir: Path, folder: Path, ids: torch.Tensor) -> torch.Tensor:
    fresh = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    with torch.no_grad():
        return PeftModel.from_pretrained(fresh, str(folder)).eval()(input_ids=ids).logits


def runtime_logits(rt: SiteRuntime, state: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    from fedtune.lora import adapter

    adapter.set_state(rt.model, state)
    with torch.no_grad():
        return rt.model.eval()(input_ids=ids).logits
