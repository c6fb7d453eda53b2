"""The coordinator and the hospital daemons through the fedtune commands, on loopback.

One federation (a coordinator with TLS and SuperNode authentication, three admitted
hospitals with their daemons) serves the module's tests in order: outsiders holding only
the public ``ca.pem`` try to steer it while a real run goes on, which must finish; a
foreign app submitted through the coordinator's own control channel is refused by every
hospital; a stranger and a hospital without TLS are refused; a removed hospital is
re-admitted with a new node key; a run every hospital refuses ends non-zero exporting
nothing; a run interrupted with Ctrl-C is stopped at the coordinator, seen live by
`fedtune status` first; and, last, the coordinator itself is stopped with Ctrl-C mid-run.
Each test builds on no other's run (pytest-xdist may hand the module's last tests to
another worker, which then starts its own federation), only on the federation being up.
The fault tests (test_deployment_faults.py) build their own federations.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedtune.cli import main
from fedtune.cli.loopback import Loopback, federation, fedtune_process, stop, until
from fedtune.live import TRAIN_STATES, read_status
from fedtune.server.home import CONNECTION, flwr_cli
from fedtune.server.status import status_data, status_rows
from tests.e2e.deployment_common import NAMES, RUN_TOML, alive, errors, live_run, round_records_of, slow_run
from tests.e2e.outsider import APPS, attack, flwr, listening

pytestmark = [pytest.mark.timeout(420), pytest.mark.flower]


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loopback]:
    running = federation(tmp_path_factory.mktemp("federation"), 3)
    try:
        yield running
    finally:
        codes = running.close()
        assert codes["coordinator"] == 0, codes
        assert not running.home.server_json.exists()


def test_outsiders_cannot_steer_the_federation_while_it_runs(fed: Loopback, tmp_path: Path) -> None:
    from fedtune.client.audit import AuditLog
    from fedtune.experiments.report import round_records
    from fedtune.runfolder import RunFolder

    info = json.loads(fed.home.server_json.read_text())
    assert listening(info["control-port"]) == {"127.0.0.1"}  # the SuperLink itself: loopback only
    run_cfg = tmp_path / "run.toml"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the coordinator tracks the run in MLflow
    tracked = RUN_TOML.format(name="e2e", rounds=2, min_clients=0, timeout=120.0)
    run_cfg.write_text(f'{tracked}\n[tracking]\nuri = "{store}"\n')
    run = fedtune_process("run", str(run_cfg), "--home", str(fed.home.root), log=tmp_path / "run.out")
    attacks = attack(fed, tmp_path)
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
    _tracked_in_mlflow(store, records)
    assert "mlflow" not in (run_dir / "app" / "pyproject.toml").read_text()  # the settings the hospitals got
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
        # training progress in the daemon's JSON log: each round's first and last step, at least
        steps = [r for r in fed.log(name) if r.get("event") == "train-progress"]
        last = steps[-1]["steps"] if steps else 0
        assert {(r["round"], r["step"]) for r in steps} >= {(1, 1), (2, 1), (1, last), (2, last)}, steps
        log = AuditLog(fed.folder(name) / "state" / "audit.jsonl")
        assert log.verify().ok
        assert sorted(r["kind"] for r in log.records()) == ["evaluate", "evaluate", "train", "train"]
        # and the trail verifies against what the coordinator witnessed
        witness = tmp_path / f"{name}.witness.json"
        args = ["--home", str(fed.home.root), "--hospital", name, "--out", str(witness)]
        assert main(["server", "witness", *args]) == 0
        assert main(["client", "audit", "verify", str(log.path), "--witness", str(witness)]) == 0


def _tracked_in_mlflow(store: str, records: list[dict[str, object]]) -> None:
    """``fedtune run``'s MLflow run: each round at its step, the adapter; the hospitals never saw the URI."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("e2e").experiment_id])
    assert run.data.tags["fedtune.kind"] == "deployment" and run.info.status == "FINISHED"
    history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "eval.pooled.metric"))
    assert history == [(r["round"], r["eval"]["pooled"]["metric"]) for r in records]  # type: ignore[index]
    assert "adapter_model.safetensors" in {
        a.path.split("/")[-1] for a in client.list_artifacts(run.info.run_id, "adapter")
    }


def test_every_hospital_refuses_a_foreign_app_even_from_the_coordinators_own_channel(
    fed: Loopback, tmp_path: Path
) -> None:
    from fedtune.client.audit import AuditLog

    out, marker = tmp_path / "replies.json", tmp_path / "ran-at-a-hospital.json"
    config = f'out="{out}" marker="{marker}"'
    done = flwr(fed.home.flwr_home, "run", str(APPS / "foreign"), CONNECTION, "--run-config", config)
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


def _dial_names_the_same_causes(
    fed: Loopback, *, wrong: Path, stranger: Path, admitted: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`client check --dial` names the same causes, one line each, before any daemon starts."""
    capsys.readouterr()
    assert main(["client", "check", "--dial", "--config", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"dial {fed.address}: TLS mismatch: the coordinator's certificate" in err
    assert main(["client", "check", "--dial", "--config", str(stranger)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"node key not registered: the coordinator at {fed.address} does not know" in err
    assert main(["client", "check", "--dial", "--config", str(admitted)]) == 0
    assert f"dial {fed.address}: OK: reached; TLS verified with `coordinator.ca`" in capsys.readouterr().out


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
    (unknown,) = errors(fed.folder("harbor-county") / "state" / "client.log.jsonl")
    assert unknown == (
        f"refused (not registered): the coordinator at {fed.address} does not know this node key ({fingerprint}): "
        "send keys/harbor-county.node.pub to the coordinator for `fedtune server add-hospital --name harbor-county`, "
        "then start again"
    )
    (mismatch,) = errors(admitted.parent / "wrong-state" / "client.log.jsonl")
    assert mismatch.startswith(
        f"TLS mismatch: the coordinator's certificate at {fed.address} does not verify with `coordinator.ca` "
        "(keys/other-ca.pem): unable to get local issuer certificate"
    )
    for console in ("harbor-county.out", "wrong.out"):
        shown = (fed.root / console).read_text()
        assert shown.count(" ERROR ") == 1 and "Traceback" not in shown and "Exit Code" not in shown, shown
    _dial_names_the_same_causes(fed, wrong=wrong, stranger=stranger, admitted=admitted, capsys=capsys)
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
    (said,) = [e for e in errors(fed.folder(name) / "state" / "client.log.jsonl") if "refused train" not in e]
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


def test_ctrl_c_of_fedtune_run_stops_the_run_at_the_coordinator(fed: Loopback, tmp_path: Path) -> None:
    run = fedtune_process("run", str(slow_run(tmp_path)), "--home", str(fed.home.root), log=tmp_path / "run.out")
    try:
        run_name, live = live_run(fed, 1, hospitals=len(NAMES))
        # while it trains, `fedtune status` names the Flower run and every hospital's state in the round
        run_id = str(live["flower-run-id"])
        assert run_id in {r["run-id"] for r in flwr_cli(fed.home, "ls")["runs"]}
        rows = live["hospitals"]
        assert isinstance(rows, list) and {r["hospital"] for r in rows} == set(NAMES)
        assert all(r["train"] in TRAIN_STATES for r in rows)
        assert run.poll() is None, (tmp_path / "run.out").read_text()  # still training: the Ctrl-C lands mid-run
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C in the researcher's terminal
        assert run.wait(timeout=60) == 130, (tmp_path / "run.out").read_text()
    finally:
        stop(run)
    said = (tmp_path / "run.out").read_text()
    folder = fed.home.runs_dir / run_name
    assert f"continue with `fedtune run --resume {folder} --home {fed.home.root}`" in said
    assert "fedtune simulate" not in said
    status = read_status(folder)
    assert status is not None and not alive(int(status["pid"]))  # its ServerApp is gone: no second trainer
    assert status_data(fed.home)["live"] == {}


def test_a_sigint_of_the_coordinator_mid_run_ends_it_within_10_s_and_fedtune_run_names_it(
    fed: Loopback, tmp_path: Path
) -> None:
    """Last of the module's shared federation: its coordinator is stopped for good here."""
    from fedtune.flowerhome import run_processes

    run = fedtune_process(
        "run", str(slow_run(tmp_path, "sigint")), "--home", str(fed.home.root), log=tmp_path / "run.out"
    )
    server = fed.server
    assert server is not None
    try:
        run_name, _ = live_run(fed, 1)
        folder = fed.home.runs_dir / run_name
        done = len(round_records_of(folder))
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in the coordinator's terminal
        assert server.wait(timeout=10) == 0  # bounded: everything is stopped within 10 s
        assert run.wait(timeout=30) == 2  # and `fedtune run` names it (its own exit: loaded CI machines are slow)
    finally:
        stop(run)
    said = (tmp_path / "run.out").read_text().strip().splitlines()[-1]
    assert said.startswith(f"fedtune: error: the coordinator's SuperLink stopped during round {done + 1}/3"), said
    assert f"continue with `fedtune run --resume {folder} --home {fed.home.root}`" in said
    assert run_processes(fed.home) == []  # no SuperLink, SuperExec, ServerApp or `flwr run` left
    assert not fed.home.server_json.exists()
