"""The hospital's page, served by the daemon's health server: it shows what the audit trail,
the privacy ledger and the daemon's log hold on this machine, and nothing else; GET only."""

from __future__ import annotations

import hashlib
import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from fedtune.privacy.accounting import Mechanism


def _hospital(tmp_path: Path):  # type: ignore[no-untyped-def]
    from fedtune.cli.loopback import Loopback
    from fedtune.client.hospital import load_hospital_config

    fed = Loopback(tmp_path)
    fed.pki()
    return load_hospital_config(fed.add_hospital("st-elsewhere", 0))


def _fill(cfg):  # type: ignore[no-untyped-def]
    """Three audit records, one DP release in the ledger, an INFO and an ERROR line in the daemon's log."""
    from fedtune.client.audit import AuditLog, Outgoing
    from fedtune.client.ledger import Policy, PrivacyLedger

    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    trail = AuditLog(cfg.audit_path)
    for rnd, kind in ((1, "train"), (1, "evaluate"), (2, "train")):
        payload = f"{rnd}{kind}".encode() * 50
        trail.append(Outgoing(run="run-7", round=rnd, kind=kind, payload=payload, epsilon=0.5 * rnd))
    ledger = PrivacyLedger(cfg.ledger_path, Policy(8.0, 1e-5, "rdp"))
    dataset = ledger.register([hashlib.sha256(b"r%d" % i).digest() for i in range(20)], label="st-elsewhere")
    ledger.record(dataset, Mechanism(1.1, 0.05, 10), release_id="x1", run_id="run-7", server_round=1)
    lines = [{"time": "t1", "level": "INFO", "message": "fine"}, {"time": "t2", "level": "ERROR", "message": "boom"}]
    cfg.log_path.write_text("".join(json.dumps({**r, "source": "fedtune"}) + "\n" for r in lines))
    return trail


def test_the_hospital_page_shows_only_its_trail_ledger_and_log(tmp_path: Path) -> None:
    from fedtune.client.daemon import _health_server, hospital_identity
    from fedtune.client.health_routes import Link
    from fedtune.client.ledger import PrivacyLedger

    cfg = _hospital(tmp_path)
    trail = _fill(cfg)
    link = Link(hospital_identity(cfg, insecure=False))
    link.set("connected", node_id=42)
    health = _health_server(cfg, link)  # the daemon's own wiring: health routes and the page
    health.start()
    base = f"http://{cfg.daemon.health}"
    try:
        with urllib.request.urlopen(base + "/", timeout=5) as answer:
            assert '<body data-page="hospital">' in answer.read().decode()
        with urllib.request.urlopen(base + "/api/state", timeout=5) as answer:
            doc = json.loads(answer.read())
        with urllib.request.urlopen(base + "/health", timeout=5) as answer:
            assert json.loads(answer.read())["state"] == "connected"  # the health routes stay as they were
        request = urllib.request.Request(base + "/api/state", data=b"{}", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(request, timeout=5)
        assert err.value.code == 501  # read-only: GET is all it answers
    finally:
        health.stop()

    assert set(doc) == {"hospital", "link", "runs", "audit", "privacy", "release", "errors"}
    assert doc["release"] == {"adopted": "adopted adapter: none yet (the hospital uses the base model)", "last": []}
    assert doc["hospital"] == cfg.name and doc["link"] == {**link.snapshot(), "node_id": "42"}
    records = trail.records()
    fields = ("seq", "time", "run", "round", "kind", "bytes", "sha256", "epsilon")
    assert doc["audit"]["messages"] == [{k: r[k] for k in fields} for r in reversed(records)]  # newest first
    assert doc["audit"]["ok"] and doc["audit"]["records"] == 3
    assert doc["audit"]["bytes"] == sum(r["bytes"] for r in records)
    assert doc["runs"] == [
        {
            "run": "run-7",
            "rounds": 2,
            "messages": 3,
            "bytes": doc["audit"]["bytes"],
            "epsilon": 1.0,
            "first": records[0]["time"],
            "last": records[-1]["time"],
        }
    ]
    assert doc["privacy"]["datasets"] == json.loads(json.dumps(PrivacyLedger.open(cfg.ledger_path).report()))
    assert doc["errors"] == [{"time": "t2", "level": "ERROR", "message": "boom"}]

    # a broken chain is shown as broken
    text = cfg.audit_path.read_text().replace('"kind": "evaluate"', '"kind": "evaluatE"')
    cfg.audit_path.write_text(text)
    from fedtune.client.page import audit_view

    view = audit_view(cfg.audit_path)
    assert not view["ok"] and view["verdict"].startswith("broken at record 2")
