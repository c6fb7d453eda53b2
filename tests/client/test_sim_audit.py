"""The privacy audit in simulation, without Flower: the run's data gets canaries and extra
nonmembers when it is prepared; a simulated hospital audits the adapter it evaluates into its
own file; the run's report and the sweep's row read those files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from fedtune.client.sim_audit import audit_round
from fedtune.client.site import Sites
from fedtune.config import ExperimentConfig, TrainSettings, replace
from fedtune.errors import ConfigError
from fedtune.experiments.audit_report import audit_records, audit_summary, final_audit
from fedtune.experiments.report import write_summary
from fedtune.experiments.simulate import prepare_run
from fedtune.privacy.audit_data import read_audit_data, results_path
from fedtune.runfolder import RunFolder
from fedtune.wire import RoundInstruction

AUDIT = {"membership": True, "nonmembers": 6, "canaries": 2, "canary_repeats": 3, "canary_candidates": 20}


@pytest.fixture()
def cfg(tiny_cfg: ExperimentConfig) -> ExperimentConfig:
    return replace(tiny_cfg, privacy_audit=AUDIT, security={"seal": False})


def _context(run_dir: Path, partition: int) -> Context:
    return Context(
        run_id=1,
        node_id=partition + 1,
        node_config={"partition-id": partition},
        state=RecordDict(),
        run_config={"run-dir": str(run_dir)},
    )


def test_canaries_and_nonmembers_are_prepared_with_the_run(cfg: ExperimentConfig, tmp_path: Path) -> None:
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    for site in folder.sites():
        train, held = folder.read_site(site)
        audit = read_audit_data(folder.root, site)
        assert len(audit.inserted) == len(audit.fresh) == 2
        assert {c.secret for c in audit.inserted}.isdisjoint({c.secret for c in audit.fresh})
        canaries = [e for e in train if audit.is_canary(e)]
        assert len(train) == cfg.data.train_per_hospital + 2 * 3 and len(canaries) == 2 * 3
        assert sorted(e.target for e in canaries) == sorted([c.secret for c in audit.inserted] * 3)
        trained_text = {e.messages for e in train}
        assert all(c.example(site=site).messages not in trained_text for c in audit.fresh)  # fresh: never trained
        assert len(audit.nonmembers) == 6
        assert not {e.messages for e in audit.nonmembers} & (trained_text | {e.messages for e in held})
    other = read_audit_data(folder.root, folder.sites()[1])
    assert other.inserted != read_audit_data(folder.root, folder.sites()[0]).inserted  # each hospital its own


def test_without_the_audit_the_data_is_untouched(tiny_cfg: ExperimentConfig, tmp_path: Path) -> None:
    folder = prepare_run(tiny_cfg, run_dir=tmp_path / "run")
    site = folder.sites()[0]
    assert len(folder.read_site(site)[0]) == tiny_cfg.data.train_per_hospital
    assert not list((folder.data_dir / site).glob("canaries.json"))
    audit = read_audit_data(folder.root, site)
    assert not audit.inserted and not audit.nonmembers


def test_a_simulated_hospital_audits_into_its_own_file(cfg: ExperimentConfig, tmp_path: Path) -> None:
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    sites = Sites()
    for partition, name in enumerate(folder.sites()):
        site = sites.simulated(folder.root, partition)
        start = site.runtime.state()
        site.runtime.train_steps(start, site.data, TrainSettings(lr=1e-2, batch_size=6), steps=10, seed=0)
        trained = site.runtime.state()
        for rnd in (1, 2):
            audit_round(site, _context(folder.root, partition), trained, RoundInstruction(trained, rnd, 2))
        lines = [json.loads(line) for line in results_path(folder.root, name).read_text().splitlines()]
        assert [(r["round"], r["site"]) for r in lines] == [(1, name), (2, name)]
        membership = lines[0]["membership"]
        assert (membership["members"], membership["nonmembers"]) == (6, 6)
        assert 0.0 <= membership["auc_low"] <= membership["auc"] <= membership["auc_high"] <= 1.0
        assert len(membership["scores"]["members"]) == 6 and any(s != 0 for s in membership["scores"]["members"])
        canaries = lines[0]["canaries"]
        assert canaries["inserted"]["count"] == canaries["fresh"]["count"] == 2
        assert all(0 <= canaries[k]["mean"] <= math.log2(21) + 1e-9 for k in ("inserted", "fresh"))
    # a real hospital's daemon does not audit here (it runs `fedtune client privacy-audit` itself)
    hospital = Context(1, 9, {"hospital-config": "x"}, RecordDict(), {"run-dir": str(tmp_path / "elsewhere")})
    audit_round(site, hospital, trained, RoundInstruction(trained, 2, 2))
    assert not (tmp_path / "elsewhere").exists() and len(audit_records(folder)) == 4

    # the researcher's report: a row per round and hospital, and the final round pooled for a sweep
    (folder.root / "baselines.json").write_text("{}")
    write_summary(folder)
    summary = (folder.root / "summary.md").read_text()
    assert "Empirical privacy audit" in summary and summary.count("| 2 | ") == 2
    assert len(json.loads((folder.root / "privacy_audit.json").read_text())) == 4
    final = final_audit(folder.root)
    assert final["audit round"] == 2 and final["audit AUC [95% CI]"].count("[") == 1
    assert " / " in final["canary exposure inserted / fresh (bits)"]


def test_which_rounds_are_audited() -> None:
    from fedtune.config import PrivacyAuditSettings

    assert [r for r in range(1, 6) if PrivacyAuditSettings(membership=True).audits(r, 5)] == [1, 2, 3, 4, 5]
    assert [r for r in range(1, 6) if PrivacyAuditSettings(canaries=1, every=2).audits(r, 5)] == [2, 4, 5]
    assert [r for r in range(1, 6) if PrivacyAuditSettings(membership=True, every=0).audits(r, 5)] == [5]
    assert not PrivacyAuditSettings().audits(5, 5)  # off by default
    with pytest.raises(ConfigError, match="privacy_audit.every"):
        PrivacyAuditSettings(every=-1)
    with pytest.raises(ConfigError, match="privacy_audit.nonmembers"):
        PrivacyAuditSettings(nonmembers=1)


def test_a_run_without_audits_reports_none(tiny_cfg: ExperimentConfig, tmp_path: Path) -> None:
    folder = RunFolder(tmp_path)
    assert audit_summary(folder) == "" and final_audit(tmp_path) == {}
    results_path(tmp_path, "a").parent.mkdir()
    results_path(tmp_path, "a").write_text('{"round": 1, "site": "a"}\n{"round": 2, "si')  # a line cut by a crash
    assert [r["round"] for r in audit_records(folder)] == [1]
