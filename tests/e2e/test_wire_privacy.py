"""What leaves a hospital: every message a client sends in a real `flwr run` is only a
sealed envelope, its payload holds adapter tensors and the allowed numbers, and no text
from the hospital's records appears in either form; and the coordinator's witness of
each hospital's audit trail, recorded in the same run, vouches for exactly that trail. The
hospitals also run the empirical privacy audit (membership inference, canaries) each round:
its results stay in their local files, and nothing of them (numbers, keys, canary secrets or
text) appears in what they send."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from flwr.common.serde import recorddict_from_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

from fedtune import wire
from fedtune.checkpoint import load_checkpoint
from fedtune.config import replace
from fedtune.experiments.simulate import prepare_run, run_simulation
from fedtune.runfolder import RunFolder
from fedtune.security.envelope import open_envelope
from fedtune.security.keys import AllowList, load_private

pytestmark = [pytest.mark.timeout(600), pytest.mark.flower]
TRAIN_METRICS = {"steps", "train-seconds", "base-model-loads", "dp-epsilon", "dp-budget"}
TRAIN_METRICS |= {"dp-noise-multiplier", "dp-sample-rate", "dp-steps", "lora-rank"}  # lora-rank: the site's setting
EVAL_METRICS = {"loss-sum", "tokens", "metric-sum", "exact-sum"}
AUDIT = {"membership": True, "nonmembers": 8, "canaries": 2, "canary_repeats": 3, "canary_candidates": 20}


def _needles(texts: list[str]) -> set[bytes]:
    """Every 20-character window (step 5) of every text and each text whole, raw and JSON-escaped."""
    out = set()
    for raw in texts:
        for text in (raw, json.dumps(raw, ensure_ascii=False)[1:-1]):
            out.add(text.encode())
            out.update(text[i : i + 20].encode() for i in range(0, max(1, len(text) - 20), 5))
    return {n for n in out if len(n) >= 12}


def test_only_sealed_envelopes_and_no_patient_text_leave(tiny_cfg, tmp_path: Path, client_app_module) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(tiny_cfg, dp={"enabled": True, "noise_multiplier": 1.0, "budget_epsilon": 100.0}, privacy_audit=AUDIT)
    folder = prepare_run(cfg, run_dir=tmp_path / "run")
    client_app_module("recording_app")
    run_simulation(folder, say=lambda _: None)

    texts = []
    for site in folder.sites():
        for example in [e for split in folder.read_site(site) for e in split]:
            texts += [content for _, content in example.messages if len(content) >= 12]
    needles = _needles(texts) | _audit_needles(folder)
    assert len(needles) > 500
    on_disk = b"".join(p.read_bytes() for p in folder.data_dir.rglob("*.jsonl"))
    assert all(json.dumps(t, ensure_ascii=False)[1:-1].encode() in on_disk for t in texts)  # real content
    opener = wire.Opener(load_private(folder.coordinator_key), AllowList.from_folder(folder.allowlist_dir))
    adapter_keys = set(load_checkpoint(folder.root, 0).state)

    sent = sorted((folder.root / "wire").glob("*.bin"))
    kinds = [p.name.split("-")[0] for p in sent]
    assert kinds.count("train") == 4 and kinds.count("evaluate") == 4  # 2 hospitals x 2 rounds each
    for path, kind in zip(sent, kinds, strict=True):
        raw = path.read_bytes()
        content = recorddict_from_proto(ProtoRecordDict.FromString(raw))
        assert list(content.keys()) == [wire.ENVELOPE]  # nothing else travels
        envelope = content.config_records[wire.ENVELOPE]["data"]  # its three parts
        assert isinstance(envelope, list) and len(envelope) == 3
        header, payload = open_envelope(envelope, recipient=opener.keys, senders=opener.senders)
        tensors, num, metrics, refusal = wire.decode_payload(payload)
        assert header.kind == kind and not refusal and num > 0
        if kind == "train":
            assert set(tensors) == adapter_keys and set(metrics) <= TRAIN_METRICS
            assert "train-loss" not in metrics  # DP: nothing computed from records but the noisy update
        else:
            assert tensors == {} and set(metrics) <= EVAL_METRICS
        for blob in (raw, payload):
            leaked = [n for n in needles if n in blob]
            assert not leaked, f"{path.name} carries training text: {leaked[:3]}"

    _the_audit_trails_hold_what_was_sent(folder, sent)
    _the_privacy_audits_stayed_local(folder)
    _the_trails_verify_against_the_witness_and_a_forgery_does_not(folder, tmp_path)


def _audit_needles(folder: RunFolder) -> set[bytes]:
    """What the hospitals' privacy audits hold: their extra held-out records, every canary's text
    and secret, the results' keys, numbers (as repr and JSON text) and whole JSON."""
    from fedtune.experiments.audit_report import audit_records
    from fedtune.privacy.audit_data import read_audit_data

    texts: list[str] = []
    secrets: set[bytes] = set()
    for site in folder.sites():
        audit = read_audit_data(folder.root, site)
        texts += [content for e in audit.nonmembers for _, content in e.messages if len(content) >= 12]
        texts += [c.prompt for c in audit.inserted + audit.fresh]
        secrets |= {c.secret.encode() for c in audit.inserted + audit.fresh}
    out = _needles(texts) | secrets
    for record in audit_records(folder):
        texts = [json.dumps(record["membership"], sort_keys=True), json.dumps(record["canaries"], sort_keys=True)]
        numbers = [v for v in record["membership"].values() if isinstance(v, float)]
        numbers += [v for s in record["membership"]["scores"].values() for v in s]
        numbers += [v for kind in ("inserted", "fresh") for v in record["canaries"][kind].values()]
        shown = {repr(float(v)).encode() for v in numbers if len(repr(float(v))) >= 8}
        assert len(shown) > 10 and all(
            n in (folder.root / "privacy-audit").joinpath(f"{record['site']}.jsonl").read_bytes() for n in shown
        )
        out |= _needles(texts) | shown
        out |= {k.encode() for k in (*record["membership"], *record["canaries"], "membership") if len(k) >= 7}
    return out


def _the_privacy_audits_stayed_local(folder: RunFolder) -> None:
    """Each hospital audited each round's adapter into its own file, with real numbers."""
    from fedtune.experiments.audit_report import audit_records

    records = audit_records(folder)
    assert [(r["round"], r["site"]) for r in records] == [(rnd, s) for rnd in (1, 2) for s in sorted(folder.sites())]
    for r in records:
        m = r["membership"]
        assert (m["members"], m["nonmembers"]) == (8, 8) and 0 <= m["auc_low"] <= m["auc"] <= m["auc_high"] <= 1
        assert r["canaries"]["inserted"]["count"] == r["canaries"]["fresh"]["count"] == 2
        assert 0 <= r["canaries"]["inserted"]["mean"] <= math.log2(21) + 1e-9
    assert "Empirical privacy audit" in (folder.root / "summary.md").read_text()


def _the_audit_trails_hold_what_was_sent(folder: RunFolder, sent: list[Path]) -> None:
    """Each hospital's audit trail holds exactly what it sent, with the privacy spent so far."""
    from fedtune.client.audit import AuditLog
    from fedtune.client.commands import privacy_report

    audited = []
    for site in folder.sites():
        log = AuditLog(folder.root / "audit" / f"{site}.jsonl")
        assert log.verify().ok
        records = log.records()
        assert [r["kind"] for r in records].count("train") == 2 and len(records) == 4
        assert all(r["run"] == folder.root.name and r["round"] in (1, 2) for r in records)
        epsilons = [r["epsilon"] for r in records if r["kind"] == "train"]
        assert 0 < epsilons[0] < epsilons[1] <= 100.0
        report = json.loads(privacy_report(folder.root / "privacy" / f"{site}.json", as_json=True))
        assert epsilons[1] == pytest.approx(next(iter(report.values()))[0]["epsilon"])
        audited += [(r["sha256"], r["bytes"]) for r in records]
    import hashlib

    assert sorted(audited) == sorted((hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_size) for p in sent)


def _the_trails_verify_against_the_witness_and_a_forgery_does_not(folder: RunFolder, tmp_path: Path) -> None:
    """The coordinator witnessed every sealed reply: each trail verifies against its witness ..."""
    from fedtune.cli import main
    from fedtune.client.audit import AuditLog, record_hash
    from fedtune.security.witness import load_witness

    for site in folder.sites():
        trail, out = folder.root / "audit" / f"{site}.jsonl", tmp_path / f"{site}.witness.json"
        assert main(["server", "witness", "--run-dir", str(folder.root), "--hospital", site, "--out", str(out)]) == 0
        witness = load_witness(out)
        records = AuditLog(trail).records()
        assert [(e.audit_seq, e.audit_head, e.sha256, e.bytes) for e in witness.entries] == [
            (r["seq"] - 1, r["prev"], r["sha256"], r["bytes"]) for r in records
        ]  # the head each reply carried is its record's prev; the hash the coordinator computed is the audit's
        assert main(["client", "audit", "verify", str(trail), "--witness", str(out)]) == 0
    # ... and a record forged onto one with a correct chain link and its head file rewritten to match
    # passes the local check (its limit) but not the witness
    log = AuditLog(trail)
    forged = {**records[-1], "seq": len(records) + 1, "sha256": "0" * 64, "prev": records[-1]["hash"]}
    forged["hash"] = record_hash(forged)
    with open(trail, "a") as f:
        f.write(json.dumps(forged, sort_keys=True) + "\n")
    assert not log.verify().ok  # the head file left alone: not anchored
    log.head_path.write_text(json.dumps({"seq": forged["seq"], "hash": forged["hash"]}))
    assert log.verify().ok
    assert main(["client", "audit", "verify", str(trail), "--witness", str(out)]) == 1
