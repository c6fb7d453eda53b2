"""Progress inside a round: rate-limited step records, the terminal's lines, the daemon's JSON log."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedtune import progress
from fedtune.client.daemon_log import StructuredLog


def test_a_reporter_passes_the_first_and_last_step_and_one_per_interval_between() -> None:
    now = [0.0]
    records: list[dict[str, Any]] = []
    hook = progress.StepReporter(
        records.append, site="st-elsewhere", server_round=2, rounds=5, interval=10.0, clock=lambda: now[0]
    )
    with progress.reporting(hook):
        for step in range(1, 101):  # one step a second
            now[0] = float(step)
            progress.step(step, 100, 1.5)
    assert [r["step"] for r in records] == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100]
    assert records[0] == {
        "run": "",
        "site": "st-elsewhere",
        "round": 2,
        "rounds": 5,
        "step": 1,
        "steps": 100,
        "seconds": 1.0,
        "loss": 1.5,
    }
    assert progress.describe(records[-1]) == "round 2/5: st-elsewhere step 100/100 (loss 1.500, 100.0 s)"
    progress.step(1, 1)  # outside `reporting`: nothing to call, nothing recorded
    assert len(records) == 11


def test_a_failing_hook_never_stops_training() -> None:
    def broken(done: int, total: int, loss: float | None) -> None:
        raise OSError("disk full")

    with progress.reporting(broken):
        progress.step(1, 2, None)


def test_the_terminal_gets_one_line_per_round_with_each_hospitals_latest_step(tmp_path: Path) -> None:
    path = tmp_path / progress.PROGRESS_FILE
    base = {"run": "r", "rounds": 3, "steps": 5, "seconds": 1.0}
    progress.append_record(path, {**base, "site": "old", "round": 1, "step": 5})  # an earlier attempt's
    lines: list[str] = []
    poll = progress.progress_printer(path, lines.append)
    poll()
    assert lines == []
    for site, step in (("a", 1), ("b", 1), ("a", 3)):
        progress.append_record(path, {**base, "site": site, "round": 2, "step": step})
    with open(path, "a") as f:
        f.write('{"site": "c", "round": 2')  # being written: waits for the next poll
    poll()
    assert lines == ["round 2/3 training: a step 3/5 (1.0 s); b step 1/5 (1.0 s)"]
    poll()
    assert len(lines) == 1  # nothing new, nothing said


def test_the_daemons_log_holds_step_records(tmp_path: Path) -> None:
    log = StructuredLog(tmp_path / "client.log.jsonl", "st-elsewhere", None)
    log.progress({"run": "r", "site": "st-elsewhere", "round": 1, "rounds": 2, "step": 4, "steps": 4, "seconds": 2.5})
    log.close()
    (record,) = [json.loads(line) for line in (tmp_path / "client.log.jsonl").read_text().splitlines()]
    assert record["event"] == "train-progress" and record["level"] == "INFO" and record["hospital"] == "st-elsewhere"
    assert (record["round"], record["step"], record["steps"]) == (1, 4, 4)
    assert record["message"] == "round 1/2: st-elsewhere step 4/4 (2.5 s)"


def test_a_polls_lines_are_said_in_round_order_steps_before_the_rounds_end() -> None:
    said: list[str] = []
    order = progress.RoundOrder(said.append)
    for line in ("round 2/2 training: a step 3/3", "round 1/2  train loss 1.0", "round 1/2 training: a step 3/3"):
        order(line)
    order.flush()
    assert said == ["round 1/2 training: a step 3/3", "round 1/2  train loss 1.0", "round 2/2 training: a step 3/3"]
    order.flush()
    assert len(said) == 3
