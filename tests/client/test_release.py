"""The hospital's release gate: it adopts a global adapter only by its own rule, keeps the
previous one when it rejects, says why, survives a failed write, and sends nothing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from fedtune.client import release
from fedtune.client.release_store import ADOPTED, DECISIONS, ReleaseStore
from fedtune.client.site import Site
from fedtune.config import LoraSettings, ModelSettings
from fedtune.data import clinical
from fedtune.runtime import SiteData, SiteRuntime, site_data
from tests.client.release_common import (
    LOSS_RULE,
    files,
    make_site,
    offer,
    plain_peft_logits,
    runtime_logits,
    trained,
)

START: dict[str, torch.Tensor] = {}  # the coordinator's round-0 adapter: every test trains from here


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> tuple[SiteRuntime, SiteData]:
    from fedtune.lora.adapter import initial_state
    from fedtune.models import load_model_config

    rt = SiteRuntime(ModelSettings(source="tiny", precision="fp32", threads=1), LoraSettings(rank=2))
    START.update(initial_state(load_model_config("tiny"), LoraSettings(rank=2)))  # seeded: the same in every run
    train, held = clinical.generate(1, n_train=16, n_eval=4, seed=0)["st-elsewhere"]
    return rt, site_data(rt, "st-elsewhere", train, held, 256)


IDS = torch.tensor([[1, 5, 9, 13, 17, 21, 3]])


def _adopt_first(
    tiny: tuple[SiteRuntime, SiteData], tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> tuple[Site, ReleaseStore, dict[str, torch.Tensor]]:
    """Round 1: trained a little, judged against the base model (training lowered the held-out loss): adopted."""
    rt, data = tiny
    site = make_site(tiny, tmp_path, LOSS_RULE)
    store = ReleaseStore(site.hospital.release_dir)  # type: ignore[union-attr]
    first = trained(rt, data, START, seed=0)
    with caplog.at_level("INFO"):
        offer(site, 1, first)
    adopted = store.adopted()
    assert adopted is not None and (adopted["run"], adopted["round"]) == ("run-x", 1)
    assert adopted["sha256"] == release.adapter_sha256(first)
    assert any(
        r.levelname == "INFO" and "release gate adopted run run-x round 1" in r.getMessage() for r in caplog.records
    )
    (accepted,) = store.decisions()
    assert accepted["decision"] == "accepted" and "against the base model's" in accepted["reason"]
    assert accepted["candidate"]["loss"] < accepted["current"]["loss"]
    loaded = plain_peft_logits(tiny_dir, store.adapter_dir(adopted), IDS)  # plain peft loads it onto the base
    torch.testing.assert_close(loaded, runtime_logits(rt, first, IDS), rtol=1e-5, atol=1e-5)
    caplog.clear()
    return site, store, first


def test_a_degraded_adapter_is_rejected_and_the_previous_one_kept(
    tiny: tuple[SiteRuntime, SiteData], tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site, store, first = _adopt_first(tiny, tiny_dir, tmp_path, caplog)
    folder, adopted = store.folder, store.adopted()
    assert adopted is not None
    before = files(folder / "adapters") | {ADOPTED: (folder / ADOPTED).read_bytes()}
    degraded = {k: v * 30 if ".lora_B." in k else v for k, v in first.items()}
    with caplog.at_level("INFO"):
        offer(site, 2, degraded)
    assert files(folder / "adapters") | {ADOPTED: (folder / ADOPTED).read_bytes()} == before  # kept, untouched
    last = store.decisions()[-1]
    assert (last["round"], last["decision"], last["rule"]) == (2, "rejected", "release.max_drop")
    assert last["sha256"] == release.adapter_sha256(degraded) and last["audit"] is None
    rise = last["candidate"]["loss"] - last["current"]["loss"]
    assert rise > 0.05 and last["current"]["loss"] == pytest.approx(adopted["metrics"]["loss"])
    (warning,) = [r for r in caplog.records if r.levelname == "WARNING"]
    said = warning.getMessage()
    assert said.startswith("release gate rejected run run-x round 2: held-out loss ")
    assert f"is {rise:.3f} above the adopted adapter's {last['current']['loss']:.3f} (release.max_drop = 0.05)" in said
    assert said.endswith("; keeping run run-x round 1") and "\n" not in said


def test_an_improvement_replaces_the_adopted_adapter_and_is_backed_up(
    tiny: tuple[SiteRuntime, SiteData], tiny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import tarfile

    from fedtune.client.backup import backup

    site, store, first = _adopt_first(tiny, tiny_dir, tmp_path, caplog)
    rt, data = tiny
    better = trained(rt, data, first, seed=1)  # more training: the held-out loss goes down again
    offer(site, 2, better)
    now = store.adopted()
    assert now is not None and now["round"] == 2 and now["sha256"] == release.adapter_sha256(better)
    assert [p.name for p in (store.folder / "adapters").iterdir()] == [now["sha256"][:16]]  # the old folder is gone
    loaded = plain_peft_logits(tiny_dir, store.adapter_dir(now), IDS)
    torch.testing.assert_close(loaded, runtime_logits(rt, better, IDS), rtol=1e-5, atol=1e-5)
    assert [d["decision"] for d in store.decisions()] == ["accepted", "accepted"]
    offer(site, 3, better)  # the same adapter again (a re-run round): nothing to decide
    assert len(store.decisions()) == 2

    backup(site.hospital, tmp_path / "backup.tar.gz")  # type: ignore[arg-type]
    with tarfile.open(tmp_path / "backup.tar.gz") as tar:
        names = {n for n in tar.getnames() if n.startswith("state/release/")}
    held = f"state/release/adapters/{now['sha256'][:16]}"
    assert names == {
        "state/release/adopted.json",
        "state/release/baseline.json",
        "state/release/decisions.jsonl",
        f"{held}/adapter_config.json",
        f"{held}/adapter_model.safetensors",
    }


def test_a_failed_write_keeps_the_previous_state_and_the_error_is_one_line(
    tiny: tuple[SiteRuntime, SiteData],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    from fedtune.client import release_store

    rt, data = tiny
    site = make_site(tiny, tmp_path, LOSS_RULE, run="run-y")
    folder = site.hospital.release_dir  # type: ignore[union-attr]
    first = trained(rt, data, START, seed=2)
    offer(site, 1, first)
    before = files(folder)
    honest = release_store.atomic_write_json

    def dies(path: Path, obj: Any) -> None:  # the process dies at the commit: adopted.json is not replaced
        if path.name == ADOPTED:
            raise OSError(28, "No space left on device")
        honest(path, obj)

    monkeypatch.setattr(release_store, "atomic_write_json", dies)
    with caplog.at_level("INFO"):
        offer(site, 2, trained(rt, data, first, seed=3))  # an improvement: it would be adopted
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert error.getMessage() == (
        "release gate failed on run run-y round 2 (the adopted adapter is unchanged): "
        "[Errno 28] No space left on device"
    )
    store = ReleaseStore(folder)
    adopted = store.adopted()
    assert adopted is not None and adopted["round"] == 1  # the previous adopted adapter, whole
    assert files(store.adapter_dir(adopted)) == {
        k.split("/", 2)[2]: v for k, v in before.items() if k.startswith(f"adapters/{adopted['sha256'][:16]}/")
    }
    assert (folder / ADOPTED).read_bytes() == before[ADOPTED]
    assert (folder / DECISIONS).read_bytes() == before[DECISIONS]  # no decision recorded for it
    monkeypatch.setattr(release_store, "atomic_write_json", honest)
    third = trained(rt, data, first, seed=4)
    offer(site, 3, third)  # the next round adopts normally and clears the half-written folder
    now = store.adopted()
    assert now is not None and now["round"] == 3
    assert [p.name for p in (folder / "adapters").iterdir()] == [now["sha256"][:16]]

    def no_history(self: ReleaseStore, decision: dict[str, Any]) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(ReleaseStore, "record", no_history)  # the commit went through, the history line did not
    caplog.clear()
    with caplog.at_level("ERROR"):
        offer(site, 4, trained(rt, data, third, seed=6))
    (error,) = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert "round 4 (it was adopted, but its decision is not in the history): [Errno 5]" in error
    assert store.adopted()["round"] == 4  # type: ignore[index]


def test_a_simulated_site_or_a_gate_turned_off_decides_nothing(
    tiny: tuple[SiteRuntime, SiteData], tmp_path: Path
) -> None:
    site = make_site(tiny, tmp_path, dataclasses.replace(LOSS_RULE, enabled=False))
    state = tiny[0].state()
    offer(site, 1, state)
    offer(dataclasses.replace(site, hospital=None), 1, state)
    assert not (tmp_path / "state").exists()


def test_new_held_out_records_score_the_adopted_adapter_again(
    tiny: tuple[SiteRuntime, SiteData], tmp_path: Path
) -> None:
    rt, data = tiny
    site = make_site(tiny, tmp_path, LOSS_RULE, run="run-z")
    store = ReleaseStore(site.hospital.release_dir)  # type: ignore[union-attr]
    first = trained(rt, data, START, seed=5)
    offer(site, 1, first)
    adopted = store.adopted()
    assert adopted is not None
    other = clinical.generate(1, n_train=16, n_eval=4, seed=9)["st-elsewhere"][1]  # the hospital's new eval file
    moved = dataclasses.replace(site, data=site_data(rt, "st-elsewhere", data.train, other, 256))
    expected = rt.evaluate(first, moved.data, site.cfg.eval)
    current = release.current_scores(moved, store, adopted)
    assert current.loss == pytest.approx(expected.loss) and current.label == "the adopted adapter's"
    assert abs(expected.loss - adopted["metrics"]["loss"]) > 1e-6  # other records, another score
    again = store.adopted()
    assert again is not None and again["heldout"] == release.heldout_key(moved) != adopted["heldout"]
    assert again["metrics"]["loss"] == pytest.approx(expected.loss) and again["sha256"] == adopted["sha256"]
