"""How a simulation splits records between sites, and what a new run folder holds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from fedtune.config import load_config
from fedtune.data import clinical
from fedtune.data.records import write_records
from fedtune.errors import ConfigError, DataError
from fedtune.experiments.simulate import prepare_run, site_splits
from fedtune.runfolder import RunFolder

SMALL = {"data.train_per_hospital": 30, "data.eval_per_hospital": 5, "model.source": "tiny"}


def _all(splits: dict) -> tuple[list, list]:  # type: ignore[type-arg]
    return [e for t, _ in splits.values() for e in t], [e for _, h in splits.values() for e in h]


def test_natural_split_keeps_each_hospital_its_own_records() -> None:
    splits = site_splits(load_config(None, {**SMALL, "data.hospitals": 3}))
    assert list(splits) == list(clinical.HOSPITALS[:3])
    for site, (train, held) in splits.items():
        assert len(train) == 30 and len(held) == 5
        assert {e.site for e in train + held} == {site}


@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_pooled_partitions_deal_every_record_once(scheme: str) -> None:
    cfg = load_config(None, {**SMALL, "data.hospitals": 4, "data.partition": scheme, "data.dirichlet_alpha": 0.1})
    splits = site_splits(cfg)
    assert list(splits) == ["site-0", "site-1", "site-2", "site-3"]
    train, held = _all(splits)
    pooled = clinical.generate(5, n_train=30, n_eval=5, seed=0)  # every style is pooled
    assert Counter(e.messages for e in train) == Counter(e.messages for t, _ in pooled.values() for e in t)
    assert Counter(e.messages for e in held) == Counter(e.messages for _, h in pooled.values() for e in h)
    assert all(t and h for t, h in splits.values())
    if scheme == "dirichlet":  # alpha 0.1: each site's diagnosis mix is far from uniform
        shares = [Counter(clinical.label_of(e) for e in t).most_common(1)[0][1] / len(t) for t, _ in splits.values()]
        assert max(shares) > 0.4


def test_files_source_one_file_per_hospital(tmp_path: Path) -> None:
    paths = []
    for site, (train, _) in clinical.generate(2, n_train=20, n_eval=1, seed=0).items():
        paths.append(tmp_path / f"{site}.jsonl")
        write_records(paths[-1], train)
    cfg = load_config(
        None,
        {
            **SMALL,
            "data.source": "files",
            "data.files": [str(p) for p in paths],
            "data.hospitals": 2,
            "data.eval_fraction": 0.25,
        },
    )
    splits = site_splits(cfg)
    assert list(splits) == [p.stem for p in paths]
    assert all((len(t), len(h)) == (15, 5) for t, h in splits.values())


def test_malformed_file_stops_before_a_run_folder_is_made(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "output": "y"}\n{"instruction": "x"}\n')
    cfg = load_config(None, {**SMALL, "data.source": "files", "data.files": [str(bad)], "data.hospitals": 1})
    with pytest.raises(DataError, match=r"bad.jsonl:2: .*`output`"):
        prepare_run(cfg, run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_prepare_run_writes_config_and_sites(tmp_path: Path) -> None:
    cfg = load_config(None, {**SMALL, "data.hospitals": 2})
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    assert RunFolder(folder.root).load_config() == cfg
    assert folder.sites() == list(clinical.HOSPITALS[:2])
    train, held = folder.read_site(folder.sites()[0])
    assert (len(train), len(held)) == (30, 5)
    assert json.loads((folder.data_dir / "sites.json").read_text())["sites"] == folder.sites()
    with pytest.raises(ConfigError, match="already exists and is not empty"):
        prepare_run(cfg, run_dir=folder.root)


def test_a_relative_ledger_dir_is_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Flower's workers do not run in the user's directory: the run must name the ledgers absolutely
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, {**SMALL, "dp.enabled": True, "dp.noise_multiplier": 1.0, "dp.ledger_dir": "ledgers"})
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    assert folder.load_config().dp.ledger_dir == str(tmp_path / "ledgers")
