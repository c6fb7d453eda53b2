"""The coordinator and the hospital daemons through the fedtune commands, on loopback.

One federation (a coordinator with TLS and SuperNode authentication, three admitted
hospitals with their daemons) serves the module's tests in order: outsiders holding only
the public ``ca.pem`` try to steer it while a real run goes on, which must finish; a
foreign app submitted through the coordinator's own control channel is refused by every
hospital; a stranger and a hospital without TLS are refused; a removed hospital is
re-admitted with a new node key; a run every hospital refuses ends non-zero exporting
nothing; a run interrupted with Ctrl-C is stopped at the coordinator, seen live by
`fedtune status` first; and, last, the coordinator itself is stopped with Ctrl-C while
that run resumes. The fault tests (a hospital killed mid-round, the coordinator
SIGKILLed and resumed) build their own federations.
"""

from __future__ import annotations

import json
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w

from fedtune.cli import main
from fedtune.cli.loopback import HOSPITALS, Loopback, federation, fedtune_process, stop, until
from fedtune.live import TRAIN_STATES, read_status
from fedtune.server.home import CONNECTION, CoordinatorHome, flwr_cli
from fedtune.server.status import status_data, status_rows

pytestmark = [pytest.mark.timeout(420), pytest.mark.flower]
APPS = Path(__file__).resolve().parents[1] / "apps"
NAMES = list(HOSPITALS[:3])
RUN_TOML = (
    '[run]\nname = "{name}"\nbaselines = false\n[model]\nsource = "tiny"\nthreads = 1\nprecision = "fp32"\n'
    "[train]\nlocal_steps = 2\nbatch_size = 4\nmax_length = 256\n[eval]\nmax_new_tokens = 4\n"
    "[federation]\nrounds = {rounds}\nmin_clients = {min_clients}\nround_timeout = {timeout}\njoin_timeout = 120.0\n"
)


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loopback]:
    running = federation(tmp_path_factory.mktemp("federation"), 3)
    try:
        yield running
    finally:
        codes = running.close()
        assert codes["coordinator"] == 0, codes
        assert not running.home.server_json.exists()


def _flwr(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Flower's own `flwr` CLI with its config in ``home`` (FLWR_HOME)."""
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    flwr = str(Path(sys.executable).with_name("flwr"))
    return subprocess.run([flwr, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _outsider_home(fed: Loopback, folder: Path) -> Path:
    """An outsider's `flwr` config: the coordinator's public address and the public ca.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    conn = {"address": fed.address, "root-certificates": str(fed.home.ca_cert)}
    (folder / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "target", "target": conn}}))
    return folder


def _listening(port: int) -> set[str]:
    """The local addresses listening on ``port`` (IPv4), from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def _attack(fed: Loopback, tmp: Path) -> dict[str, object]:
    """Everything an outsider with the public ca.pem tries; what each attempt got."""
    results: dict[str, object] = {}
    tls = ssl.create_default_context(cafile=str(fed.home.ca_cert))
    with httpx.Client(base_url=f"https://{fed.address}", verify=tls, timeout=30) as client:
        for path in ("/v1/control/list-runs", "/v1/control/list-nodes", "/v1/control/register-node",
                     "/v1/control/unregister-node", "/v1/control/start-run", "/v1/control/stream-logs",
                     "/v1/runtime/acquire-task", "/v1/runtime/push-messages", "/v1/runtime/get-nodes"):  # fmt: skip
            results[path] = client.post(path, content=b"", headers={"content-type": "application/protobuf"}).status_code
        for path in ("/docs", "/openapi.json"):
            results[path] = client.get(path).status_code
        # a Fleet call without a registered node's signature reaches the SuperLink, which refuses it
        results["fleet unsigned"] = client.post(
            "/v1/fleet/get-run", content=b"", headers={"content-type": "application/protobuf"}
        ).status_code
    outsider = _outsider_home(fed, tmp / "outsider-flwr")
    key = tmp / "intruder"
    main(["pki", "hospital", "--name", "intruder", "--out", str(key)])
    victim = str(fed.home.registry()["st-elsewhere"]["node-id"])
    results["flwr ls"] = _flwr(outsider, "ls").returncode
    results["flwr register"] = _flwr(outsider, "supernode", "register", str(key / "intruder.node.pub")).returncode
    results["flwr unregister"] = _flwr(outsider, "supernode", "unregister", victim).returncode
    results["flwr run"] = _flwr(outsider, "run", str(APPS / "foreign"), "target").returncode
    return results


def test_outsiders_cannot_steer_the_federation_while_it_runs(fed: Loopback, tmp_path: Path) -> None:
    from fedtune.client.audit import AuditLog
    from fedtune.experiments.report import round_records
    from fedtune.runfolder import RunFolder

    info = json.loads(fed.home.server_json.read_text())
    assert _listening(info["control-port"]) == {"127.0.0.1"}  # the SuperLink itself: loopback only
    run_cfg = tmp_path / "run.toml"
    run_cfg.write_text(RUN_TOML.format(name="e2e", rounds=2, min_clients=0, timeout=120.0))
    run = fedtune_process("run", str(run_cfg), "--home", str(fed.home.root), log=tmp_path / "run.out")
    attacks = _attack(fed, tmp_path)
    assert run.wait(timeout=300) == 0, (tmp_path / "run.out").read_text()[-3000:]

    assert all(attacks[p] == 404 for p in attacks if str(p).startswith("/")), attacks
    assert attacks["fleet unsigned"] == 401, attacks
    assert all(attacks[f"flwr {cmd}"] != 0 for cmd in ("ls", "register", "unregister", "run")), attacks
    refused = (fed.home.logs_dir / "front.log").read_text()
    assert "REFUSED 127.0.0.1 POST '/v1/control/register-node'" in refused
    # nothing changed: the same three hospitals, all still online, no intruder node, one run
    _, hospitals, runs = status_rows(fed.home)
    assert sorted(h["hospital"] for h in hospitals) == sorted(NAMES)
    assert all(h["status"] == "online" for h in hospitals), hospitals
    nodes = flwr_cli(fed.home, "supernode", "list")["nodes"]
    assert len(nodes) == 3
    assert len(runs) == 1
    said = (tmp_path / "run.out").read_text()
    assert "round 1/2" in said and "exported the global adapter" in said

    (run_dir,) = list(fed.home.runs_dir.iterdir())
    records = round_records(RunFolder(run_dir))
    assert [r["round"] for r in records] == [1, 2]
    assert all(set(r["train"]) == set(NAMES) and not r["rejected"] for r in records)
    live = read_status(run_dir)  # the round loop's last word: every hospital of round 2, by name
    assert live is not None and (live["phase"], live["round"]) == ("finished", 2)
    outcomes = {(h["hospital"], h["train"], h["evaluate"]) for h in live["hospitals"].values()}
    assert outcomes == {(name, "accepted", "evaluated") for name in NAMES}
    for name in NAMES:
        logged = [str(r["message"]) for r in fed.log(name)]
        served = [m for m in logged if "s in the daemon's process" in m]
        # every message served in the daemon's own process, the base model loaded once
        assert len(served) == 4 and all(m.endswith("base model loads in this process: 1") for m in served), served
        assert any("signed by the coordinator" in m for m in logged)
        log = AuditLog(fed.folder(name) / "state" / "audit.jsonl")
        assert log.verify().ok
        assert sorted(r["kind"] for r in log.records()) == ["evaluate", "evaluate", "train", "train"]
        # and the trail verifies against what the coordinator witnessed
        witness = tmp_path / f"{name}.witness.json"
        args = ["--home", str(fed.home.root), "--hospital", name, "--out", str(witness)]
        assert main(["server", "witness", *args]) == 0
        assert main(["client", "audit", "verify", str(log.path), "--witness", str(witness)]) == 0


def test_every_hospital_refuses_a_foreign_app_even_from_the_coordinators_own_channel(
    fed: Loopback, tmp_path: Path
) -> None:
    from fedtune.client.audit import AuditLog

    out, marker = tmp_path / "replies.json", tmp_path / "ran-at-a-hospital.json"
    config = f'out="{out}" marker="{marker}"'
    done = _flwr(fed.home.flwr_home, "run", str(APPS / "foreign"), CONNECTION, "--run-config", config)
    assert done.returncode == 0, done.stdout + done.stderr  # the coordinator's channel accepts it: its own machine
    until(out.exists, "the foreign ServerApp to hear back from the hospitals", limit=150)
    replies = json.loads(out.read_text())["replies"]
    assert len(replies) == 3 and not marker.exists()  # no hospital ran its ClientApp
    reasons = sorted(str(r["error"]) for r in replies)
    assert all("refuses this run: the run's app is not fedtune's" in r for r in reasons), reasons
    assert {r.split(" refuses", 1)[0] for r in reasons} == {f"hospital {n}" for n in NAMES}  # named, no local paths
    assert not any("/" in r.split("components", 1)[0] for r in reasons)
    for name in NAMES:
        errors = [r for r in fed.log(name) if r["level"] == "ERROR"]
        assert len(errors) == 1 and "refused train message of Flower run" in str(errors[0]["message"]), errors
        kinds = [r["kind"] for r in AuditLog(fed.folder(name) / "state" / "audit.jsonl").records()]
        assert kinds[-1] == "train/refused-run"  # what left is on record


def _errors(log: Path) -> list[str]:
    """The ERROR messages of a daemon's JSON log."""
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [str(r["message"]) for r in records if r["level"] == "ERROR"]


def test_a_stranger_a_wrong_ca_and_a_hospital_without_tls_are_refused_in_one_line(
    fed: Loopback, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedtune.launcher import free_port
    from fedtune.security import pki

    stranger = fed.add_hospital("harbor-county", 4)  # keys and config, never admitted
    refused = fed.start_daemon("harbor-county", "--max-retries", "3")
    # an admitted hospital's own key, but without TLS: the front does not talk to it
    admitted = fed.config("st-elsewhere")
    text = admitted.read_text()
    own_health = re.search(r'health = "([^"]+)"', text).group(1)  # type: ignore[union-attr]

    def variant(name: str, state: str, *changes: tuple[str, str]) -> Path:
        out = text.replace('"state/', f'"{state}/').replace('"state"', f'"{state}"')
        for old, new in ((own_health, f"127.0.0.1:{free_port()}"), *changes):
            out = out.replace(old, new)
        admitted.with_name(name).write_text(out)
        return admitted.with_name(name)

    plain = variant("plain.toml", "plain-state")
    without_tls = fedtune_process(
        "client", "start", "--config", str(plain), "--insecure", "--max-retries", "2", log=fed.root / "plain.out"
    )
    # and with a CA that did not sign the coordinator's certificate
    pki.create_ca(fed.root / "other-ca")
    (fed.folder("st-elsewhere") / "keys" / "other-ca.pem").write_bytes((fed.root / "other-ca" / "ca.pem").read_bytes())
    wrong = variant("wrong-ca.toml", "wrong-state", ('ca = "keys/ca.pem"', 'ca = "keys/other-ca.pem"'))
    wrong_ca = fedtune_process(
        "client", "start", "--config", str(wrong), "--max-retries", "1", log=fed.root / "wrong.out"
    )
    assert refused.wait(timeout=180) == 3 and without_tls.wait(timeout=180) != 0 and wrong_ca.wait(timeout=180) == 1
    del fed.daemons["harbor-county"]
    assert "WARNING: INSECURE MODE" in (fed.root / "plain.out").read_text()
    assert "No SuperNode found with the given public key" in (fed.home.logs_dir / "superlink.log").read_text()
    # each cause: one ERROR line, in the log and on the console, naming it and what to do; no traceback
    fingerprint = pki.node_fingerprint(pki.load_node_public(stranger.parent / "keys" / "harbor-county.node.pub"))
    (unknown,) = _errors(fed.folder("harbor-county") / "state" / "client.log.jsonl")
    assert unknown == (
        f"refused (not registered): the coordinator at {fed.address} does not know this node key ({fingerprint}): "
        "send keys/harbor-county.node.pub to the coordinator for `fedtune server add-hospital --name harbor-county`, "
        "then start again"
    )
    (mismatch,) = _errors(admitted.parent / "wrong-state" / "client.log.jsonl")
    assert mismatch.startswith(
        f"TLS mismatch: the coordinator's certificate at {fed.address} does not verify with `coordinator.ca` "
        "(keys/other-ca.pem): unable to get local issuer certificate"
    )
    for console in ("harbor-county.out", "wrong.out"):
        shown = (fed.root / console).read_text()
        assert shown.count(" ERROR ") == 1 and "Traceback" not in shown and "Exit Code" not in shown, shown
    # `client check --dial` names the same causes, one line each, before any daemon starts
    capsys.readouterr()
    assert main(["client", "check", "--dial", "--config", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"dial {fed.address}: TLS mismatch: the coordinator's certificate" in err
    assert main(["client", "check", "--dial", "--config", str(stranger)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"node key not registered: the coordinator at {fed.address} does not know" in err
    assert main(["client", "check", "--dial", "--config", str(admitted)]) == 0
    assert f"dial {fed.address}: OK: reached; TLS verified with `coordinator.ca`" in capsys.readouterr().out
    # the admitted hospital, dialled alongside its running daemon, is undisturbed: connected, ready
    code, state = fed.health("st-elsewhere", "/health/ready")
    assert code == 200 and state["state"] == "connected"
    assert state["node_id"] == int(fed.home.registry()["st-elsewhere"]["node-id"])
    assert fed.node_status("st-elsewhere") == "online"
    assert main(["status", "--home", str(fed.home.root)]) == 0
    out = capsys.readouterr().out
    assert "TLS + SuperNode authentication" in out and "| st-elsewhere" in out and "harbor-county" not in out


def test_a_removed_hospital_is_told_so_and_comes_back_with_a_new_node_key(
    fed: Loopback, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = "riverside-community"
    keys = fed.folder(name) / "keys"
    assert main(["server", "remove-hospital", "--home", str(fed.home.root), "--name", name]) == 0
    assert fed.daemons[name].wait(timeout=120) == 3  # refused from now on: no restart will help
    del fed.daemons[name]
    # one line for it (an earlier test left the foreign run's refusal in this log)
    (said,) = [e for e in _errors(fed.folder(name) / "state" / "client.log.jsonl") if "refused train" not in e]
    assert said.startswith(f"refused (removed by the coordinator): the coordinator at {fed.address} no longer accepts")
    assert f"`fedtune pki hospital --name {name} --out keys --rotate-node-key`" in said
    assert "Traceback" not in (fed.root / f"{name}.out").read_text()
    capsys.readouterr()
    args = ["--home", str(fed.home.root), "--name", name, "--node-key", str(keys / f"{name}.node.pub")]
    assert main(["server", "add-hospital", *args, "--envelope-key", str(keys / f"{name}.pub")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "never admits it again" in err and "--rotate-node-key" in err
    assert main(["pki", "hospital", "--name", name, "--out", str(keys), "--rotate-node-key"]) == 0
    shown = capsys.readouterr().out
    assert "node key     SHA256:" in shown and "envelope key " in shown
    fed.admit(name)
    # started from another folder with a relative --config (and the relative paths inside it)
    config = os.path.relpath(fed.config(name), tmp_path)
    assert config.startswith("..")
    fed.daemons[name] = fedtune_process(
        "client", "start", "--config", config, log=fed.root / f"{name}.out", cwd=tmp_path
    )
    fed.wait_online([name])
    assert fed.health(name, "/health/ready")[0] == 200


def test_a_run_every_hospital_refuses_exits_non_zero_and_exports_nothing(fed: Loopback, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    from fedtune.experiments.report import run_status

    run_cfg = tmp_path / "run.toml"  # DP noise under the hospitals' floor (`privacy.min_noise_multiplier` 0.5)
    run_cfg.write_text(
        RUN_TOML.format(name="refused", rounds=2, min_clients=0, timeout=120.0)
        + "[dp]\nenabled = true\nnoise_multiplier = 0.1\n"
    )
    capsys.readouterr()
    assert main(["run", str(run_cfg), "--home", str(fed.home.root)]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "trained nothing, so nothing was exported: round 1: 3 site(s) refused" in err
    assert "below this hospital's floor 0.5" in err and "exported" not in out
    (run_dir,) = [p for p in fed.home.runs_dir.iterdir() if p.name.startswith("refused-")]
    assert not (run_dir / "adapter").exists()
    assert run_status(run_dir)["state"].startswith("stopped (nothing trained): round 1: 3 site(s) refused")
    live = read_status(run_dir)
    assert live is not None and live["phase"] == "stopped"
    assert {(h["hospital"], h["train"]) for h in live["hospitals"].values()} == {(n, "refused") for n in NAMES}


def _slow_run(tmp_path: Path) -> Path:
    """A run whose rounds take seconds (enough local steps), so a test can act mid-run."""
    run_cfg = tmp_path / "slow.toml"
    text = RUN_TOML.format(name="slow", rounds=3, min_clients=0, timeout=120.0)
    run_cfg.write_text(text.replace("local_steps = 2", "local_steps = 20"))
    return run_cfg


def _live(fed: Loopback, round_at_least: int) -> tuple[str, dict[str, object]]:
    """Wait (bounded) until `fedtune status` shows a run live in round ``round_at_least`` or later, training."""
    seen: list[tuple[str, dict[str, object]]] = []

    def live() -> bool:
        for run, entry in status_data(fed.home)["live"].items():
            if int(entry["round"]) >= round_at_least and entry["phase"] == "train":
                seen.append((run, entry))
                return True
        return False

    until(live, f"a run live in round {round_at_least}", limit=240, step=0.5)
    return seen[-1]


def test_ctrl_c_of_fedtune_run_stops_the_run_at_the_coordinator(fed: Loopback, tmp_path: Path) -> None:
    run = fedtune_process("run", str(_slow_run(tmp_path)), "--home", str(fed.home.root), log=tmp_path / "run.out")
    try:
        run_name, live = _live(fed, 1)
        # while it trains, `fedtune status` names the Flower run and every hospital's state in the round
        run_id = str(live["flower-run-id"])
        assert run_id in {r["run-id"] for r in flwr_cli(fed.home, "ls")["runs"]}
        rows = live["hospitals"]
        assert isinstance(rows, list) and {r["hospital"] for r in rows} == set(NAMES)
        assert all(r["train"] in TRAIN_STATES for r in rows)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in the researcher's terminal
        assert run.wait(timeout=60) == 130
    finally:
        stop(run)
    said = (tmp_path / "run.out").read_text()
    folder = fed.home.runs_dir / run_name
    assert f"continue with `fedtune run --resume {folder} --home {fed.home.root}`" in said
    assert "fedtune simulate" not in said
    status = read_status(folder)
    assert status is not None and not _alive(int(status["pid"]))  # its ServerApp is gone: no second trainer
    assert status_data(fed.home)["live"] == {}


def _alive(pid: int) -> bool:
    from fedtune.process import running

    return running(pid, "flwr")


def test_a_sigint_of_the_coordinator_mid_run_ends_it_within_10_s_and_fedtune_run_names_it(
    fed: Loopback, tmp_path: Path
) -> None:
    """Last of the module's shared federation: its coordinator is stopped for good here."""
    from fedtune.flowerhome import run_processes

    (folder,) = [p for p in fed.home.runs_dir.iterdir() if p.name.startswith("slow-")]
    run = fedtune_process("run", "--resume", str(folder), "--home", str(fed.home.root), log=tmp_path / "run.out")
    server = fed.server
    assert server is not None
    try:
        done = len(round_records_of(folder))
        _live(fed, done + 1)
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in the coordinator's terminal
        assert server.wait(timeout=10) == 0  # bounded: everything is stopped within 10 s
        assert run.wait(timeout=10) == 2
    finally:
        stop(run)
    said = (tmp_path / "run.out").read_text().strip().splitlines()[-1]
    assert said.startswith(f"fedtune: error: the coordinator's SuperLink stopped during round {done + 1}/3"), said
    assert f"continue with `fedtune run --resume {folder} --home {fed.home.root}`" in said
    assert run_processes(fed.home) == []  # no SuperLink, SuperExec, ServerApp or `flwr run` left
    assert not fed.home.server_json.exists()


def round_records_of(folder: Path) -> list[dict[str, object]]:
    from fedtune.experiments.report import round_records
    from fedtune.runfolder import RunFolder

    return round_records(RunFolder(folder))


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
    from fedtune.runfolder import RunFolder

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
        assert main(["run", "--resume", str(run_dir), "--home", str(fed.home.root)]) == 0
        assert "exported the global adapter" in capsys.readouterr().out
    finally:
        codes = fed.close()
        stop(first)
    assert codes["coordinator"] == 0
    records = round_records(RunFolder(run_dir))
    assert [r["round"] for r in records] == [1, 2]  # every round exactly once
    assert all(len(r["train"]) == 3 for r in records)
