"""Faults of a deployment on loopback, each on its own federation: a hospital SIGKILLed mid-round
(the round goes on without it, or fails naming why; restarted, it takes part again), the
coordinator SIGKILLed and resumed (every round exactly once), and the refusals before
anything runs (a hospital without TLS material, a certificate without the address)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.cli.loopback import Loopback, federation, fedtune_process, stop, until
from fedtune.server.home import CoordinatorHome
from tests.e2e.deployment_common import NAMES, RUN_TOML

pytestmark = [pytest.mark.timeout(420), pytest.mark.flower]


def test_a_hospital_without_tls_material_is_refused_unless_insecure(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    fed = Loopback(tmp_path)
    fed.pki()
    config = fed.add_hospital("st-elsewhere", 0)
    config.write_text(config.read_text().replace('ca = "keys/ca.pem"', 'ca = ""'))
    capsys.readouterr()
    assert main(["client", "start", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`coordinator.ca` is required (TLS and node authentication are on" in err
    # with the flag it starts, says so loudly, and (nothing listens there) gives up by itself
    assert main(["client", "start", "--config", str(config), "--insecure", "--max-retries", "2"]) != 0
    assert "WARNING: INSECURE MODE" in capsys.readouterr().err
    assert "INSECURE MODE" in (config.parent / "state" / "client.log.jsonl").read_text()


def test_server_start_refuses_a_certificate_without_its_address(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.security import pki

    home = CoordinatorHome(tmp_path / "coordinator")
    assert main(["server", "start", "--home", str(home.root), "--address", "127.0.0.1"]) == 2
    assert "pki/ca.pem is missing; create the PKI first" in capsys.readouterr().err
    pki.create_ca(home.pki_dir)
    main(["pki", "server", "--ca", str(home.pki_dir), "--out", str(home.pki_dir), "--address", "localhost"])
    capsys.readouterr()
    assert main(["server", "start", "--home", str(home.root), "--address", "10.0.0.7"]) == 2
    assert "does not name '10.0.0.7'" in capsys.readouterr().err


def _kill_hospital(fed: Loopback, name: str) -> None:
    """SIGKILL one hospital's daemon, as the OOM killer would; its SuperNode must not outlive it."""
    from fedtune.client.daemon import _DaemonHome
    from fedtune.flowerhome import run_processes

    os.kill(fed.daemons[name].pid, signal.SIGKILL)
    home = _DaemonHome(fed.folder(name) / "state")
    until(lambda: not run_processes(home), "the SuperNode to die with its daemon", 10)  # type: ignore[arg-type]


@pytest.mark.parametrize(("min_clients", "completes"), [(2, True), (3, False)])
def test_a_hospital_killed_mid_round(tmp_path: Path, capsys, min_clients: int, completes: bool) -> None:  # type: ignore[no-untyped-def]
    """SIGKILLed the moment its train message arrives: the round goes on without it (or fails,
    naming why); restarted with `fedtune client start`, it takes part in the next round under
    its own name (its SuperNode died with it: no stale node, no port taken)."""
    from fedtune.experiments.report import round_records
    from fedtune.runfolder import RunFolder

    fed = federation(tmp_path, 3)
    victim = "riverside-community"
    run_cfg = tmp_path / "run.toml"
    rounds = 2 if completes else 1
    run_cfg.write_text(RUN_TOML.format(name="fault", rounds=rounds, min_clients=min_clients, timeout=20.0))
    killed = threading.Event()

    def kill_when_the_train_message_arrives() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if any(str(r["message"]).startswith("Receiving: train") for r in fed.log(victim)):
                _kill_hospital(fed, victim)  # before its app can answer (site build + training)
                fed.daemons[victim].wait(timeout=30)
                if completes:
                    fed.start_daemon(victim)  # the same hospital.toml, state folder and health port
                killed.set()
                return
            time.sleep(0.02)

    killer = threading.Thread(target=kill_when_the_train_message_arrives, daemon=True)
    killer.start()
    try:
        capsys.readouterr()
        code = main(["run", str(run_cfg), "--home", str(fed.home.root)])
        killer.join(timeout=60)
        assert killed.is_set()
    finally:
        if not completes:
            del fed.daemons[victim]
        codes = fed.close()
    assert all(c == 0 for c in codes.values()), codes
    (run_dir,) = list(fed.home.runs_dir.iterdir())
    records = round_records(RunFolder(run_dir))
    said = [str(r["message"]) for r in fed.log(victim)]
    if completes:
        assert code == 0
        first, second = records
        assert set(first["train"]) == {"st-elsewhere", "northgate-general"}
        (lost,) = first["rejected"]  # its SuperNode left as it died: the coordinator knew at once
        # named: the coordinator maps the Flower node to the hospital admitted with it
        assert ("Node Unavailable" in lost["reason"] and lost["site"] == victim) or lost["site"] == "(no reply)", lost
        assert set(second["train"]) == set(NAMES) and not second["rejected"]  # back, under its own name
        assert any("train (round 2)" in m and "served in" in m for m in said)
        assert not any("address already in use" in m.lower() or "stopped" in m and "earlier daemon" in m for m in said)
        assert sum(m.startswith("connected to the coordinator") for m in said) == 2
    else:
        assert not any("served in" in m for m in said)  # it never answered
        assert code == 2 and records == []
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "round 1: only 2 valid update(s), the round needs 3" in err, err
        # its SuperNode left the coordinator as it died: "Node Unavailable" at once, not a wait for `round_timeout`
        assert "Node Unavailable" in err or "(no reply): 1 hospital(s) sent nothing within `round_timeout`" in err


def test_the_coordinator_sigkilled_and_resumed_runs_every_round_once(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.experiments.report import round_records
    from fedtune.flowerhome import kill_run_processes
    from fedtune.live import read_status
    from fedtune.runfolder import RunFolder
    from fedtune.server.home import flwr_cli

    fed = federation(tmp_path, 3)
    first = fed.server
    assert first is not None
    try:
        run_cfg = tmp_path / "run.toml"
        run_cfg.write_text(RUN_TOML.format(name="crash", rounds=2, min_clients=0, timeout=120.0))
        run = fedtune_process("run", str(run_cfg), "--home", str(fed.home.root), log=tmp_path / "run-1.out")

        def one_round_done() -> bool:
            runs = list(fed.home.runs_dir.glob("*/metrics.jsonl")) if fed.home.runs_dir.exists() else []
            return bool(runs) and '"round": 1' in runs[0].read_text()

        until(one_round_done, "round 1", limit=240)
        # the coordinator dies at once: SuperLink, ServerApp, `flwr run` and `fedtune run`, no goodbye
        os.killpg(first.pid, signal.SIGKILL)
        kill_run_processes(fed.home, graceful=False)  # type: ignore[arg-type]
        os.killpg(run.pid, signal.SIGKILL)
        first.wait(timeout=30)
        run.wait(timeout=30)
        (run_dir,) = list(fed.home.runs_dir.iterdir())
        assert len(round_records(RunFolder(run_dir))) < 2
        # the hospitals' readiness says so: retrying, with the last error, until the coordinator is back
        until(lambda: fed.health("st-elsewhere")[1]["state"] == "retrying", "st-elsewhere to notice", limit=60)
        code, state = fed.health("st-elsewhere", "/health/ready")
        error = str(state["last_error"])  # "ConnectError: [Errno 111] Connection refused", or a request cut off
        assert code == 503 and state["state"] == "retrying" and error and "\n" not in error
        assert fed.health("st-elsewhere", "/health/live")[0] == 200

        fed.start_server()  # the same home and state database, the same port
        until(lambda: fed.health("st-elsewhere", "/health/ready")[0] == 200, "st-elsewhere to reconnect", limit=90)
        assert fed.health("st-elsewhere")[1]["state"] == "connected"
        capsys.readouterr()
        dead = str((read_status(run_dir) or {})["flower-run-id"])  # the launch that died with the coordinator
        assert main(["run", "--resume", str(run_dir), "--home", str(fed.home.root)]) == 0
        said = capsys.readouterr().out
        assert "exported the global adapter" in said and f"(Flower run {dead}) died with the coordinator" in said
        # stopped at the SuperLink before the new launch, so no hospital waits on its stale messages
        (old,) = [r for r in flwr_cli(fed.home, "ls")["runs"] if r["run-id"] == dead]
        assert "running" not in str(old["status"]).lower(), old
    finally:
        codes = fed.close()
        stop(first)
    assert codes["coordinator"] == 0
    records = round_records(RunFolder(run_dir))
    assert [r["round"] for r in records] == [1, 2]  # every round exactly once
    assert all(len(r["train"]) == 3 for r in records)
