"""The coordinator and the hospital daemon through the fedtune commands, on loopback:
a SuperLink with TLS and SuperNode authentication, a registered hospital that connects,
an unregistered one that is refused, and a hospital without TLS material that is refused
unless it says --insecure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune import coordinator, pki
from fedtune.cli import main
from fedtune.clinical import generate_site
from fedtune.data import write_records
from fedtune.hospital import EXAMPLE
from fedtune.launcher import free_port

pytestmark = pytest.mark.timeout(300)


def _fedtune(*args: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "fedtune", *args], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _stop(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return int(proc.returncode)


def _until(check, what: str, limit: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + limit
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _hospital(root: Path, name: str, home: coordinator.CoordinatorHome, port: int, index: int) -> Path:
    folder = root / name
    main(["pki", "hospital", "--name", name, "--out", str(folder / "keys")])
    (folder / "keys" / "ca.pem").write_bytes(home.ca_cert.read_bytes())
    (folder / "keys" / "coordinator.pub").write_bytes((home.pki_dir / "coordinator.pub").read_bytes())
    records = generate_site(index, 12, seed=0)
    write_records(folder / "data" / "train.jsonl", records[:10])
    write_records(folder / "data" / "eval.jsonl", records[10:])
    text = (
        EXAMPLE.replace("st-elsewhere", name)
        .replace("coordinator.example.org:9092", f"127.0.0.1:{port}")
        .replace('path = "models/SmolLM2-135M-Instruct"', 'path = "tiny"')
        .replace("127.0.0.1:9094", f"127.0.0.1:{free_port()}")
    )
    (folder / "hospital.toml").write_text(text)
    return folder / "hospital.toml"


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[coordinator.CoordinatorHome, int, subprocess.Popen[bytes]]]:
    home = coordinator.CoordinatorHome(tmp_path / "coordinator")
    main(["pki", "ca", "--out", str(home.pki_dir)])
    main(["pki", "server", "--ca", str(home.pki_dir), "--out", str(home.pki_dir), "--address", "127.0.0.1"])
    port = free_port()
    proc = _start_server(home, port, tmp_path / "server.out")
    try:
        yield home, port, proc
    finally:
        assert _stop(proc) == 0
        assert not home.server_json.exists()


def _node_status(home: coordinator.CoordinatorHome, name: str) -> str:
    _, hospitals, _ = coordinator.status_rows(home)
    return next((h["status"] for h in hospitals if h["hospital"] == name), "absent")


def test_registered_hospital_connects_unregistered_is_refused(server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    home, port, _ = server
    admitted = _hospital(tmp_path, "st-elsewhere", home, port, 0)
    stranger = _hospital(tmp_path, "northgate-general", home, port, 1)
    keys = admitted.parent / "keys"
    assert main(["server", "add-hospital", "--home", str(home.root), "--name", "st-elsewhere",
                 "--node-key", str(keys / "st-elsewhere.node.pub"),
                 "--envelope-key", str(keys / "st-elsewhere.pub")]) == 0  # fmt: skip
    assert "registered as SuperNode" in capsys.readouterr().out
    assert (home.hospitals_dir / "st-elsewhere.pub").exists()  # the allow-list
    assert _node_status(home, "st-elsewhere") == "registered"

    daemon = _fedtune("client", "start", "--config", str(admitted), log=tmp_path / "admitted.out")
    refused = _fedtune(
        "client", "start", "--config", str(stranger), "--max-retries", "3", log=tmp_path / "stranger.out"
    )
    try:
        _until(lambda: _node_status(home, "st-elsewhere") == "online", "the admitted hospital to come online")
        assert refused.wait(timeout=120) != 0  # it gave up: never admitted
        # the admitted hospital's own key, but without TLS: the SuperLink does not talk to it
        plain = admitted.with_name("plain.toml")
        plain.write_text(admitted.read_text().replace('"state/', '"plain-state/').replace('"state"', '"plain-state"'))
        without_tls = _fedtune("client", "start", "--config", str(plain), "--insecure", "--max-retries", "2",
                               log=tmp_path / "plain.out")  # fmt: skip
        assert without_tls.wait(timeout=120) != 0
        assert "WARNING: INSECURE MODE" in (tmp_path / "plain.out").read_text()
        superlink_log = (home.logs_dir / "superlink.log").read_text()
        assert "No SuperNode found with the given public key" in superlink_log
        assert main(["status", "--home", str(home.root)]) == 0
        out = capsys.readouterr().out
        assert "TLS + SuperNode authentication" in out and "| st-elsewhere" in out and "online" in out
        assert "northgate-general" not in out
        # structured logs, and the health endpoint of the daemon
        cfg_port = int(admitted.read_text().split('health = "127.0.0.1:')[1].split('"')[0])
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{cfg_port}/health", timeout=5) as reply:
            assert reply.status == 200
        records = [json.loads(x) for x in (admitted.parent / "state" / "client.log.jsonl").read_text().splitlines()]
        assert records[0]["hospital"] == "st-elsewhere" and "with TLS and node authentication" in records[0]["message"]
        assert {"time", "level", "source", "message"} <= set(records[-1])
    finally:
        assert _stop(daemon) == 0
        _stop(refused)
    assert main(["server", "remove-hospital", "--home", str(home.root), "--name", "st-elsewhere"]) == 0
    assert not (home.hospitals_dir / "st-elsewhere.pub").exists() and home.registry() == {}


def test_a_hospital_without_tls_is_refused_unless_insecure(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    home = coordinator.CoordinatorHome(tmp_path / "coordinator")
    main(["pki", "ca", "--out", str(home.pki_dir)])
    main(["pki", "server", "--ca", str(home.pki_dir), "--out", str(home.pki_dir), "--address", "127.0.0.1"])
    config = _hospital(tmp_path, "st-elsewhere", home, free_port(), 0)
    config.write_text(config.read_text().replace('ca = "keys/ca.pem"', 'ca = ""'))
    capsys.readouterr()
    assert main(["client", "start", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "`coordinator.ca` is required (TLS and node authentication are on" in err
    # with the flag it starts, says so loudly, and (nothing listens there) gives up by itself
    assert main(["client", "start", "--config", str(config), "--insecure", "--max-retries", "2"]) != 0
    assert "WARNING: INSECURE MODE" in capsys.readouterr().err
    logged = (config.parent / "state" / "client.log.jsonl").read_text()
    assert "INSECURE MODE" in logged


def test_server_start_refuses_a_certificate_without_its_address(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    home = coordinator.CoordinatorHome(tmp_path / "coordinator")
    assert main(["server", "start", "--home", str(home.root), "--address", "127.0.0.1"]) == 2
    assert "pki/ca.pem is missing; create the PKI first" in capsys.readouterr().err
    pki.create_ca(home.pki_dir)
    main(["pki", "server", "--ca", str(home.pki_dir), "--out", str(home.pki_dir), "--address", "localhost"])
    capsys.readouterr()
    assert main(["server", "start", "--home", str(home.root), "--address", "10.0.0.7"]) == 2
    assert "does not name '10.0.0.7'" in capsys.readouterr().err


RUN_TOML = (
    '[run]\nname = "{name}"\nbaselines = false\n[model]\nsource = "tiny"\nthreads = 1\nprecision = "fp32"\n'
    "[train]\nlocal_steps = 2\nbatch_size = 4\nmax_length = 256\n[eval]\nmax_new_tokens = 4\n"
    "[federation]\nrounds = {rounds}\nmin_clients = {min_clients}\nround_timeout = {timeout}\njoin_timeout = 120.0\n"
)
NAMES = ["st-elsewhere", "northgate-general", "riverside-community"]


def _federation(home: coordinator.CoordinatorHome, port: int, tmp_path: Path) -> list[Path]:
    configs = []
    for i, name in enumerate(NAMES):
        config = _hospital(tmp_path, name, home, port, i)
        config.write_text(config.read_text().replace("require_dp = true", "require_dp = false"))
        _admit(home, config, name)
        configs.append(config)
    return configs


def _admit(home: coordinator.CoordinatorHome, config: Path, name: str) -> None:
    keys = config.parent / "keys"
    args = ["--home", str(home.root), "--name", name, "--node-key", str(keys / f"{name}.node.pub")]
    assert main(["server", "add-hospital", *args, "--envelope-key", str(keys / f"{name}.pub")]) == 0


def test_three_hospitals_two_sealed_rounds_through_the_commands(server, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.client.audit import AuditLog

    from fedtune.report import round_records
    from fedtune.runfolder import RunFolder

    home, port, _ = server
    names = NAMES
    configs = _federation(home, port, tmp_path)
    run_cfg = tmp_path / "run.toml"
    run_cfg.write_text(RUN_TOML.format(name="e2e", rounds=2, min_clients=0, timeout=120.0))
    daemons = [_fedtune("client", "start", "--config", str(c), log=tmp_path / f"{c.parent.name}.out") for c in configs]
    try:
        capsys.readouterr()
        assert main(["run", str(run_cfg), "--home", str(home.root)]) == 0
        out = capsys.readouterr().out
        assert "round 1/2" in out and "round 2/2" in out and "exported the global adapter" in out
    finally:
        for d in daemons:
            assert _stop(d) == 0
    (run_dir,) = list(home.runs_dir.iterdir())
    folder = RunFolder(run_dir)
    records = round_records(folder)
    assert [r["round"] for r in records] == [1, 2]
    assert all(set(r["train"]) == set(names) and not r["rejected"] for r in records)
    assert (folder.adapter_dir / "adapter_model.safetensors").exists() and (folder.plots_dir).is_dir()
    for config in configs:  # the base model stayed resident in each daemon across all four messages
        logged = [
            json.loads(x)["message"] for x in (config.parent / "state" / "client.log.jsonl").read_text().splitlines()
        ]
        served = [m for m in logged if "s in the daemon's process" in m]
        assert len(served) == 4 and all(m.endswith("base model loads in this process: 1") for m in served)
    for config in configs:  # each hospital's audit trail: 2 sealed updates and 2 evaluations, intact
        log = AuditLog(config.parent / "state" / "audit.jsonl")
        assert log.verify().ok
        assert sorted(r["kind"] for r in log.records()) == ["evaluate", "evaluate", "train", "train"]
        assert {r["run"] for r in log.records()} == {run_dir.name}


def _kill_hospital(config: Path) -> None:
    """SIGKILL everything of one hospital: its daemon, SuperNode and ClientApp processes."""
    from fedtune.client.daemon import _DaemonHome

    from fedtune.launcher import kill_run_processes

    assert kill_run_processes(_DaemonHome(config.parent / "state"), graceful=False) == 0  # type: ignore[arg-type]


@pytest.mark.parametrize(("min_clients", "completes"), [(2, True), (3, False)])
def test_a_hospital_killed_mid_round(  # type: ignore[no-untyped-def]
    server, tmp_path: Path, capsys, client_app_module, min_clients: int, completes: bool
) -> None:
    from fedtune.report import round_records
    from fedtune.runfolder import RunFolder

    home, port, _ = server
    configs = _federation(home, port, tmp_path)
    run_cfg = tmp_path / "run.toml"
    run_cfg.write_text(RUN_TOML.format(name="fault", rounds=1, min_clients=min_clients, timeout=30.0))
    client_app_module("stall_app")
    daemons = {
        c.parent.name: _fedtune("client", "start", "--config", str(c), log=tmp_path / f"{c.parent.name}.out")
        for c in configs
    }
    victim = configs[NAMES.index("riverside-community")]
    import threading

    def kill_when_stalled() -> None:
        marker = victim.parent / "state" / "stalled"
        deadline = time.monotonic() + 240
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.3)
        _kill_hospital(victim)

    killer = threading.Thread(target=kill_when_stalled, daemon=True)
    killer.start()
    try:
        capsys.readouterr()
        code = main(["run", str(run_cfg), "--home", str(home.root)])
        killer.join(timeout=240)
        assert (victim.parent / "state" / "stalled").exists()
    finally:
        for name, d in daemons.items():
            if name != "riverside-community":
                assert _stop(d) == 0
            else:
                d.wait(timeout=30)
    (run_dir,) = list(home.runs_dir.iterdir())
    records = round_records(RunFolder(run_dir))
    if completes:
        assert code == 0
        (record,) = records
        assert set(record["train"]) == {"st-elsewhere", "northgate-general"}
        assert record["rejected"] == [
            {"site": "(no reply)", "reason": "1 hospital(s) sent nothing within `round_timeout`"}
        ]
    else:
        assert code == 2 and records == []
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "round 1: only 2 valid update(s), the round needs 3" in err, err
        assert "(no reply): 1 hospital(s) sent nothing within `round_timeout`" in err


def _start_server(home: coordinator.CoordinatorHome, port: int, log: Path) -> subprocess.Popen[bytes]:
    args = ["--home", str(home.root), "--address", "127.0.0.1", "--host", "127.0.0.1", "--port", str(port)]
    proc = _fedtune("server", "start", *args, log=log)
    _until(lambda: home.server() is not None or proc.poll() is not None, "the SuperLink")
    assert proc.poll() is None, log.read_text()
    return proc


def test_the_coordinator_sigkilled_and_resumed_runs_every_round_once(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.launcher import kill_run_processes
    from fedtune.report import round_records
    from fedtune.runfolder import RunFolder

    home = coordinator.CoordinatorHome(tmp_path / "coordinator")
    main(["pki", "ca", "--out", str(home.pki_dir)])
    main(["pki", "server", "--ca", str(home.pki_dir), "--out", str(home.pki_dir), "--address", "127.0.0.1"])
    port = free_port()
    first = _start_server(home, port, tmp_path / "server-1.out")
    configs = _federation(home, port, tmp_path)
    daemons = [_fedtune("client", "start", "--config", str(c), log=tmp_path / f"{c.parent.name}.out") for c in configs]
    second = None
    try:
        run_cfg = tmp_path / "run.toml"
        run_cfg.write_text(RUN_TOML.format(name="crash", rounds=2, min_clients=0, timeout=120.0))
        run = _fedtune("run", str(run_cfg), "--home", str(home.root), log=tmp_path / "run-1.out")

        def one_round_done() -> bool:
            runs = list(home.runs_dir.glob("*/metrics.jsonl")) if home.runs_dir.exists() else []
            return bool(runs) and '"round": 1' in runs[0].read_text()

        _until(one_round_done, "round 1", limit=240)
        # the coordinator dies at once: SuperLink, ServerApp, `flwr run` and `fedtune run`, no goodbye
        os.killpg(first.pid, signal.SIGKILL)
        kill_run_processes(home, graceful=False)  # type: ignore[arg-type]
        os.killpg(run.pid, signal.SIGKILL)
        first.wait(timeout=30)
        run.wait(timeout=30)
        (run_dir,) = list(home.runs_dir.iterdir())
        assert len(round_records(RunFolder(run_dir))) < 2

        second = _start_server(home, port, tmp_path / "server-2.out")  # the same state database
        capsys.readouterr()
        assert main(["run", "--resume", str(run_dir), "--home", str(home.root)]) == 0
        assert "exported the global adapter" in capsys.readouterr().out
    finally:
        for d in daemons:
            _stop(d)
        if second is not None:
            assert _stop(second) == 0
        _stop(first)
    records = round_records(RunFolder(run_dir))
    assert [r["round"] for r in records] == [1, 2]  # every round exactly once
    assert all(len(r["train"]) == 3 for r in records)
