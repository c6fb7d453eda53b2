"""The hospital's privacy ledger: durable, per record, never resets, refuses overspend."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import stat
from datetime import UTC, datetime
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from fedtune.client.ledger import Policy, PrivacyLedger
from fedtune.data.records import Example, dataset_id, record_digests
from fedtune.errors import ConfigError, PrivacyError
from fedtune.privacy.accounting import BudgetExceeded, Mechanism, epsilon_spent

DELTA = 1e-5
M1, M2, M3 = Mechanism(1.1, 0.02, 20), Mechanism(0.9, 0.05, 10), Mechanism(1.3, 0.01, 30)


def digests(*names: str) -> list[bytes]:
    return [hashlib.sha256(n.encode()).digest() for n in names]


A = digests(*(f"r{i}" for i in range(10)))


def clock() -> datetime:
    return datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def ledger(path: Path, budget: float = 10.0, accountant: str = "rdp") -> PrivacyLedger:
    return PrivacyLedger(path, Policy(budget, DELTA, accountant), clock=clock)


def record(led: PrivacyLedger, ds: str, m: Mechanism, release: str, *, run: str = "run-a", rnd: int = 1) -> float:
    return led.record(ds, m, release_id=release, run_id=run, server_round=rnd)


def test_epsilon_of_a_recorded_history_equals_opacus(tmp_path: Path) -> None:
    led = ledger(tmp_path / "ledger.json")
    ds = led.register(A)
    for i, m in enumerate([M1, M2, M3, M1]):
        record(led, ds, m, f"rel-{i}", rnd=i + 1)
    acc = RDPAccountant()
    for m in [M1, M2, M3, M1]:
        for _ in range(m.steps):
            acc.step(noise_multiplier=m.noise_multiplier, sample_rate=m.sample_rate)
    assert ledger(tmp_path / "ledger.json").spent(ds) == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-9)


def test_restarts_and_new_runs_never_reset_the_spend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = ledger(path)
    ds = led.register(A, label="st-elsewhere")
    first = record(led, ds, M1, "a1")
    restarted = ledger(path)  # the client process restarted
    assert restarted.spent(ds) == pytest.approx(first)
    second = record(restarted, ds, M1, "b1", run="run-b")  # a new run on the same data
    assert second > first
    assert led.spent(ds) == pytest.approx(second)  # the old object sees the other's write
    other = restarted.register(digests("x", "y"))
    record(restarted, other, M2, "b2", run="run-b")
    rows = {r["dataset"]: r for r in PrivacyLedger.open(path).report()}
    assert set(rows) == {ds, other}
    assert rows[ds]["runs"] == 2 and rows[ds]["releases"] == 2 and rows[ds]["label"] == "st-elsewhere"
    assert rows[ds]["epsilon"] == pytest.approx(second)
    assert rows[other]["remaining"] == pytest.approx(10.0 - rows[other]["epsilon"])
    assert ledger(path).history(ds)[0]["time"] == clock().isoformat()


def test_every_release_counts_even_a_rerun_round(tmp_path: Path) -> None:
    led = ledger(tmp_path / "ledger.json")
    ds = led.register(A)
    first = record(led, ds, M1, "rel-1", rnd=3)
    # the coordinator crashed and re-ran round 3: new noise on the same records, counted again
    rerun = record(led, ds, M1, "rel-2", rnd=3)
    assert rerun > first and len(led.history(ds)) == 2
    # the same release written twice (a retried write) counts once
    assert record(led, ds, M1, "rel-2", rnd=3) == pytest.approx(rerun) and len(led.history(ds)) == 2
    with pytest.raises(PrivacyError, match="different mechanism"):
        record(led, ds, M2, "rel-2", rnd=3)


def test_budget_enforced_and_a_refused_round_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = ledger(path, budget=3.0)
    ds = led.register(A, label="northgate")
    m = Mechanism(1.0, 0.02, 50)
    rnd = 0
    with pytest.raises(BudgetExceeded) as info:
        while True:
            rnd += 1
            before = path.read_bytes()
            record(led, ds, m, f"rel-{rnd}", rnd=rnd)
    assert rnd > 1  # some rounds fit before the budget ran out
    msg = str(info.value)
    assert "\n" not in msg and ds[:12] in msg and "northgate" in msg and "`budget_epsilon` = 3" in msg
    assert "nothing was sent" in msg
    assert path.read_bytes() == before
    assert led.spent(ds) <= 3.0
    with pytest.raises(BudgetExceeded):
        ledger(path, budget=3.0).check(ds, m)  # and after a restart too
    assert len(ledger(path, budget=3.0).history(ds)) == rnd - 1


def test_a_grown_dataset_keeps_its_old_records_spend(tmp_path: Path) -> None:
    led = ledger(tmp_path / "ledger.json")
    old = led.register(A)
    spent = record(led, old, M1, "rel-1")
    grown = led.register(A + digests("new patient"))
    assert grown != old
    assert led.spent(grown) == pytest.approx(spent)  # its worst record is an old one
    disjoint = led.register(digests("elsewhere"))
    assert led.spent(disjoint) == 0.0
    both = record(led, grown, M2, "rel-2")
    assert both == pytest.approx(epsilon_spent([M1, M2], delta=DELTA))
    assert led.spent(old) == pytest.approx(both)  # the old dataset's records were in the new release


def test_worst_record_is_exact_not_the_union_of_everything(tmp_path: Path) -> None:
    led = ledger(tmp_path / "ledger.json")
    a = led.register(digests("r1", "r2"))
    b = led.register(digests("r2", "r3"))
    c = led.register(digests("r1", "r3"))
    record(led, a, M1, "a")
    record(led, b, M3, "b")
    after = led.check(c, M2)
    # r1 saw A and C, r3 saw B and C; no record of C saw both A and B
    expected = max(epsilon_spent([M1, M2], delta=DELTA), epsilon_spent([M3, M2], delta=DELTA))
    assert after == pytest.approx(expected)
    assert after < epsilon_spent([M1, M3, M2], delta=DELTA)
    assert led.spent(b) == pytest.approx(epsilon_spent([M1, M3], delta=DELTA))  # r2 is in A and B


def test_crash_after_record_and_during_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger.json"
    led = ledger(path)
    ds = led.register(A)
    spent = record(led, ds, M1, "rel-1")
    del led  # the process dies right after record() returned
    led = ledger(path)
    assert led.spent(ds) == pytest.approx(spent)
    before = path.read_bytes()

    def boom(*args: object) -> None:
        raise OSError("disk pulled")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk pulled"):
        record(led, ds, M2, "rel-2", rnd=2)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old ledger, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock", "ledger.json.records"]
    assert ledger(path).spent(ds) == pytest.approx(spent)
    assert led.spent(ds) == pytest.approx(spent)


def _record_many(path: str, worker: int) -> None:
    led = PrivacyLedger(Path(path), Policy(1000.0, DELTA))
    ds = led.register(A)
    for i in range(5):
        led.record(ds, M1, release_id=f"w{worker}-{i}", run_id=f"run-{worker}", server_round=i)


def test_processes_sharing_a_ledger_lose_no_spend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    ctx = multiprocessing.get_context("spawn")  # fork after torch ran can hang the child
    procs = [ctx.Process(target=_record_many, args=(str(path), w)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    led = ledger(path, budget=1000.0)
    assert len(led.history(dataset_id(A))) == 15


def test_private_files_only(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = ledger(path)
    ds = led.register(A)
    record(led, ds, M1, "rel-1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(led.records_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((led.records_dir / f"{ds}.digests").stat().st_mode) == 0o600
    path.chmod(0o644)
    with pytest.raises(PrivacyError, match="chmod 600") as info:
        ledger(path)
    assert str(path) in str(info.value)
    path.chmod(0o600)
    (led.records_dir / f"{ds}.digests").chmod(0o640)
    fresh = ledger(path)
    other = fresh.register(digests("other"))
    with pytest.raises(PrivacyError, match="chmod 600"):
        fresh.spent(other)  # finding overlaps reads every spent dataset's digests
    (led.records_dir / f"{ds}.digests").chmod(0o600)
    (led.records_dir / f"{ds}.digests").unlink()
    with pytest.raises(PrivacyError, match="restore"):
        ledger(path).spent(led.register(digests("other")))


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b'{"version": 99, "datasets": {}}',
        b"[]",
        b'{"version": 1, "datasets": {"x": {"records": 1, "registered": "t", "releases": [{"steps": 1}]}}}',
    ],
)
def test_corrupt_ledger_is_refused_naming_the_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "ledger.json"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(PrivacyError, match=str(path)):
        ledger(path)


def test_open_uses_the_stored_policy(tmp_path: Path) -> None:
    path = tmp_path / "ledger.json"
    led = ledger(path, budget=4.0, accountant="prv")
    record(led, led.register(A), M1, "rel-1")
    opened = PrivacyLedger.open(path)
    assert opened.policy == Policy(4.0, DELTA, "prv")
    with pytest.raises(PrivacyError, match="no privacy ledger"):
        PrivacyLedger.open(tmp_path / "missing.json")


def test_state_dict_round_trip_never_forgets(tmp_path: Path) -> None:
    led = ledger(tmp_path / "a.json")
    ds = led.register(A)
    record(led, ds, M1, "rel-1")
    record(led, led.register(A + digests("z")), M2, "rel-2")
    copy = ledger(tmp_path / "b.json")
    copy.load_state_dict(json.loads(json.dumps(led.state_dict())))
    restored = ledger(tmp_path / "b.json")
    assert restored.report() == led.report()
    with pytest.raises(PrivacyError, match="never forgets"):
        copy.load_state_dict({"version": 1, "datasets": {}, "digests": {}})


def test_record_digests_ignore_order_and_duplicates() -> None:
    a = Example.from_instruction("extract", "note one", "{}")
    b = Example.from_instruction("extract", "note two", "{}")
    assert record_digests([a, b]) == record_digests([b, a, a])
    assert dataset_id(record_digests([a, b])) != dataset_id(record_digests([a]))


def test_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="`budget_epsilon`"):
        Policy(0.0, DELTA)
    with pytest.raises(ConfigError, match="`delta`"):
        Policy(1.0, 0.0)
    led = ledger(tmp_path / "ledger.json")
    with pytest.raises(ConfigError, match="`digests`"):
        led.register([b"short"])
    with pytest.raises(PrivacyError, match="not registered"):
        led.check("ab" * 32, M1)
    with pytest.raises(ConfigError, match="`release_id`"):
        led.record(led.register(A), M1, release_id="", run_id="r", server_round=1)
