"""The rollback check: a privacy ledger older than what the audit trail shows was sent is refused,
and the trail's largest count is read incrementally."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from fedtune.client.audit import AuditLog, Outgoing
from fedtune.client.dp_round import open_ledger
from fedtune.client.ledger import PrivacyLedger
from fedtune.client.ledger_rollback import LedgerRolledBack, check_ledger_current, releases_sent
from fedtune.config import DPSettings
from fedtune.privacy.accounting import Mechanism


def _ledger_with(path: Path, releases: int) -> PrivacyLedger:
    ledger = open_ledger(path, DPSettings(enabled=True, noise_multiplier=1.0))
    dataset = ledger.register([bytes([i]) * 32 for i in range(4)], label="st-elsewhere")
    for n in range(releases):
        ledger.record(dataset, Mechanism(1.0, 0.25, 2), release_id=f"r{n}", run_id="run-a", server_round=n + 1)
    return ledger


def _send(log: AuditLog, n: int, **extra: Any) -> None:
    for i in range(n):
        log.append(Outgoing(run="run-a", round=i + 1, kind="train", payload=b"sealed", epsilon=0.1, **extra))


def test_a_current_ledger_and_a_trail_without_the_count_are_accepted(tmp_path: Path) -> None:
    ledger, log = tmp_path / "privacy.json", AuditLog(tmp_path / "audit.jsonl")
    assert check_ledger_current(ledger, log.path) == 0  # a new hospital: neither exists yet
    _send(log, 3)  # an older trail: records from before the count existed
    assert all("ledger_releases" not in r for r in log.records()) and log.verify().ok
    assert check_ledger_current(ledger, log.path) == 0
    _ledger_with(ledger, 2)
    assert check_ledger_current(ledger, log.path) == 2
    _send(log, 1, ledger_releases=2)
    assert log.verify().ok and log.records()[-1]["ledger_releases"] == 2
    assert check_ledger_current(ledger, log.path) == 2  # equal is current
    _send(log, 1, ledger_releases=1)  # a slower process read the ledger earlier: the largest count counts
    assert releases_sent(log.path) == (2, 4)


def test_a_deleted_ledger_is_refused(tmp_path: Path) -> None:
    ledger, log = tmp_path / "privacy.json", AuditLog(tmp_path / "audit.jsonl")
    _ledger_with(ledger, 1)
    _send(log, 1, ledger_releases=1)
    ledger.unlink()
    with pytest.raises(LedgerRolledBack, match=r"holds 0 releases, but record 1 of the audit trail .* held 1"):
        check_ledger_current(ledger, log.path)


def test_the_count_is_read_incrementally_and_again_when_the_log_is_replaced(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit.jsonl")
    _send(log, 2, ledger_releases=1)
    assert releases_sent(log.path) == (1, 1)
    _send(log, 1, ledger_releases=5)
    assert releases_sent(log.path) == (5, 3)  # appended since the last call
    with open(log.path, "ab") as f:
        f.write(b'{"seq": 4, "ledger_releases": 9')  # an append in progress: not counted yet
    assert releases_sent(log.path) == (5, 3)
    with open(log.path, "ab") as f:
        f.write(b"}\n")
    assert releases_sent(log.path) == (9, 4)
    # replaced by another log (a new file) or rewritten in place: read from the start again
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"seq": 1, "ledger_releases": 2}) + "\n")
    os.replace(other, log.path)
    assert releases_sent(log.path) == (2, 1)
    lines = [json.dumps({"seq": n, "ledger_releases": 3}) + "\n" for n in (1, 2)]
    log.path.write_text("".join(lines))  # same file, other content, longer
    assert releases_sent(log.path) == (3, 1)
