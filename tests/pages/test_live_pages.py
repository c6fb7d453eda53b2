"""The live pages in a real headless Chromium, on real runs: a tiny-model simulation with
``--watch``, and a loopback deployment (2 hospitals, 2 rounds) with the coordinator's page
and a hospital's own page. Each checks that the rounds, the hospitals' states and the
curves appear and that the page updates itself (the round count grows, same document).

``FEDTUNE_SCREENSHOTS=DIR`` saves the screenshots there (``docs/`` holds the README's).
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from fedtune.cli.loopback import federation, fedtune_process, stop, until
from tests.pages.browser import Browser

pytestmark = [pytest.mark.flower, pytest.mark.timeout(600)]
TINY = ["--model", "tiny", "--hospitals", "2", "--local-steps", "2", "--batch-size", "4"] + [
    x
    for s in ("model.threads=1", 'model.precision="fp32"', "data.train_per_hospital=24", "data.eval_per_hospital=4")
    + ("train.max_length=256", "eval.max_new_tokens=4")
    for x in ("--set", s)
]
DONE = (
    "return document.querySelector('#run-name').textContent ? Number(document.querySelector('#done').textContent) : -1"
)


def shot(browser: Browser, tmp_path: Path, name: str) -> Path:
    folder = Path(os.environ.get("FEDTUNE_SCREENSHOTS", tmp_path))
    browser.screenshot(folder / name)
    return folder / name


def follow_rounds(browser: Browser, total: int, finished: str, limit: float = 240) -> list[int]:
    """The completed-round counts the page showed, read every 0.2 s until it shows ``total`` and ``finished``."""
    seen: list[int] = []
    deadline = time.monotonic() + limit
    while not (seen and seen[-1] == total and finished in browser.text("#run-state")):
        assert time.monotonic() < deadline, f"the page showed rounds {seen} and never {total}"
        state = browser.text("#run-state")
        assert not state.startswith(("stopped", "failed")), f"the run ended early, and the page says so: {state}"
        done = int(browser.js(DONE))
        if not seen or seen[-1] != done:
            seen.append(done)
        time.sleep(0.2)
    return seen


def series(browser: Browser, chart: str) -> dict[str, int]:
    """A chart's lines: name -> points drawn."""
    script = (
        f"return [...document.querySelectorAll('{chart} path.series')].map(p => [p.dataset.name, p.dataset.points])"
    )
    return {name: int(points) for name, points in browser.js(script)}


def cells(browser: Browser, table: str, column: int) -> list[str]:
    script = f"return [...document.querySelectorAll('{table} tr')].slice(1).map(r => r.children[{column}].textContent)"
    return list(browser.js(script))


def test_a_simulation_page_shows_the_rounds_and_baselines_arrive(browser: Browser, tmp_path: Path) -> None:
    from fedtune.launcher import free_port

    port, out = free_port(), tmp_path / "simulate.out"
    args = ["simulate", *TINY, "--rounds", "3", "--out", str(tmp_path / "run"), "--watch", "--watch-address"]
    proc = fedtune_process(*args, f"127.0.0.1:{port}", log=out)
    try:
        until(lambda: "live page: http://" in out.read_text() or proc.poll() is not None, "the page's URL", 120)
        url = re.search(r"live page: (http://\S+)", out.read_text())
        assert url is not None and url.group(1) == f"http://127.0.0.1:{port}/", out.read_text()
        browser.open(url.group(1))
        browser.js("window.sameDocument = true")
        seen = follow_rounds(browser, 3, "finished")
        assert seen[0] < 3 and seen == sorted(seen), seen  # it showed the run before its end, then rounds arriving
        baselines = "return [...document.querySelectorAll('#chart-metric line.baseline')].map(l => l.dataset.name)"
        names = browser.wait(f"const b = {baselines.removeprefix('return ')}; return b.length == 3 && b", "baselines")
        assert sorted(names) == ["base model", "centralized", "local only (mean)"]
        assert browser.js("return window.sameDocument") is True  # updated in place, never reloaded
        assert series(browser, "#chart-loss") == {"northgate-general": 3, "st-elsewhere": 3, "pooled": 3}
        assert series(browser, "#chart-metric") == {"northgate-general": 3, "st-elsewhere": 3, "pooled": 3}
        assert series(browser, "#chart-bytes") == {"to the coordinator": 3, "to the hospitals": 3}
        assert cells(browser, "#hospitals", 1) == ["accepted", "accepted"]
        assert cells(browser, "#rounds-table", 0) == ["1", "2", "3"]
        shot(browser, tmp_path, "live-simulation.png")
        until(lambda: "the live page stays" in out.read_text(), "the run to end", 60)
    finally:
        code = stop(proc)
    assert code == 0, out.read_text()[-2000:]  # Ctrl-C closes the page after the run: a clean exit


RUN = (
    '[run]\nname = "watched"\nbaselines = false\n[model]\nsource = "tiny"\nthreads = 1\nprecision = "fp32"\n'
    "[train]\nlocal_steps = 12\nbatch_size = 4\nmax_length = 256\n[eval]\nmax_new_tokens = 4\n"
    "[federation]\nrounds = 2\nmin_clients = 2\nround_timeout = 120.0\njoin_timeout = 120.0\n"
    "[dp]\nenabled = true\nnoise_multiplier = 4.0\n"  # so the pages show epsilon and the ledger too
)


def test_the_coordinator_and_hospital_pages_follow_a_deployment(browser: Browser, tmp_path: Path) -> None:
    from fedtune.client.audit import AuditLog
    from fedtune.client.hospital import load_hospital_config
    from fedtune.client.ledger import PrivacyLedger

    fed = federation(tmp_path / "fed", 2)
    try:
        browser.open(f"http://127.0.0.1:{fed.page_port}/")
        browser.js("window.sameDocument = true")
        online = "return [...document.querySelectorAll('#registry span.online')].length"
        browser.wait(f"{online} == 2", "both hospitals online", 60)
        (tmp_path / "run.toml").write_text(RUN)
        run = fedtune_process("run", str(tmp_path / "run.toml"), "--home", str(fed.home.root), log=tmp_path / "run.out")
        seen = follow_rounds(browser, 2, "finished")
        assert run.wait(timeout=120) == 0, (tmp_path / "run.out").read_text()[-2000:]
        assert seen[0] < 2 and seen == sorted(seen), seen
        assert browser.js("return window.sameDocument") is True
        assert sorted(cells(browser, "#hospitals", 0)) == ["northgate-general", "st-elsewhere"]
        assert cells(browser, "#hospitals", 1) == ["accepted", "accepted"]
        assert cells(browser, "#hospitals", 2) == ["evaluated", "evaluated"]
        assert series(browser, "#chart-metric") == {"northgate-general": 2, "st-elsewhere": 2, "pooled": 2}
        assert series(browser, "#chart-seconds") == {"seconds": 2}
        assert series(browser, "#chart-epsilon") == {"northgate-general": 2, "st-elsewhere": 2}
        shot(browser, tmp_path, "live-coordinator.png")

        cfg = load_hospital_config(fed.config("st-elsewhere"), check_files=False)
        browser.open(f"http://{cfg.daemon.health}/")
        browser.wait("return document.querySelector('#link-state').textContent == 'connected'", "the link", 30)
        records = AuditLog(cfg.audit_path).records()
        assert len(records) == 4  # 2 rounds: a train and an evaluate reply each
        browser.wait(f"return document.querySelectorAll('#messages tr').length == {len(records) + 1}", "messages")
        assert cells(browser, "#messages", 6) == [r["sha256"] for r in reversed(records)]
        assert cells(browser, "#messages", 5) == [str(r["bytes"]) for r in reversed(records)]
        assert "chain verifies" in browser.text("#audit-verdict")
        assert cells(browser, "#runs", 0) == [records[0]["run"]]
        spent = PrivacyLedger.open(cfg.ledger_path).report()
        assert len(spent) == 1 and cells(browser, "#privacy", 1) == [spent[0]["label"]]
        assert series(browser, "#chart-epsilon") == {records[0]["run"]: 2}  # the train records' epsilon
        shot(browser, tmp_path, "live-hospital.png")
    finally:
        codes = fed.close()
    assert all(code == 0 for code in codes.values()), codes
