"""The deployment walk-through in docs/deployment.md, run as written.

Every code block that begins ``# on the coordinator`` or ``# at the hospital`` runs in
document order, with the relative paths it shows, in its machine's folder: one coordinator
folder, and three hospital folders (the blocks that name ``st-elsewhere`` run once per
hospital with its name). Only what cannot be the same on one machine is substituted: the
coordinator's address (``coord.example.org`` -> 127.0.0.1), its port, and each daemon's
loopback health port. What the page says a person does between blocks (send the kit and
the public keys, edit ``hospital.toml``'s data and model, write ``run.toml``) the test
does the same way. When the page and the code drift apart, this fails.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from fedtune.cli.loopback import HOSPITALS, stop, until

pytestmark = pytest.mark.timeout(600)
PAGE = Path(__file__).resolve().parents[2] / "docs" / "deployment.md"
EXAMPLE_NAME = "st-elsewhere"
LONG_RUNNING = ("fedtune server start", "fedtune client start")
RUN_TOML = """[run]
name = "walkthrough"
baselines = false
[model]
source = "tiny"
threads = 1
precision = "fp32"
[train]
local_steps = 2
batch_size = 4
max_length = 256
[eval]
max_new_tokens = 4
[federation]
rounds = 2
round_timeout = 120.0
join_timeout = 120.0
[dp]
enabled = true
noise_multiplier = 2.0
max_grad_norm = 1.0
"""


def blocks(page: Path) -> list[tuple[str, list[str]]]:
    """(where, commands) of every runnable block: continuation lines joined, comments dropped."""
    out = []
    for body in re.findall(r"```\n(.*?)```", page.read_text(), flags=re.S):
        lines = body.rstrip("\n").split("\n")
        where = lines[0]
        if not where.startswith(("# on the coordinator", "# at the hospital")):
            continue
        commands, pending = [], ""
        for line in lines[1:]:
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            command = (pending + line).strip()
            pending = ""
            if command:
                commands.append(command)
        out.append(("coordinator" if "coordinator" in where.split(",")[0] else "hospital", commands))
    return out


def test_the_page_has_the_whole_walk_through() -> None:
    steps = [c.split(" --")[0] for _, cmds in blocks(PAGE) for c in cmds]
    expected = [
        "fedtune pki ca", "fedtune pki server", "fedtune server start", "fedtune server invite",
        "fedtune pki hospital", "fedtune client check", "fedtune server add-hospital", "fedtune client check",
        "fedtune client start", "fedtune run run.toml", "fedtune status", "fedtune server witness",
        "fedtune client audit verify state/audit.jsonl", "fedtune client audit show state/audit.jsonl",
        "fedtune client privacy state/privacy.json", "fedtune client backup",
        "fedtune client release", "fedtune client release",
    ]  # fmt: skip
    assert steps == expected


class Machines:
    """The coordinator's folder and each hospital's, and the processes started in them."""

    def __init__(self, root: Path) -> None:
        from fedtune.launcher import free_port

        self.root = root
        self.coordinator = root / "coordinator-machine"
        self.coordinator.mkdir()
        self.port = free_port()
        self.hospitals = {name: root / f"{name}-machine" for name in HOSPITALS[:3]}
        self.background: list[subprocess.Popen[bytes]] = []
        self.health: dict[str, int] = {}

    def substitute(self, command: str, name: str) -> str:
        return (
            command.replace("coord.example.org", "127.0.0.1")
            .replace("9092", str(self.port))
            .replace(EXAMPLE_NAME, name)
        )

    def run(self, command: str, cwd: Path, log: Path) -> None:
        args = shlex.split(command, comments=True)
        assert args[0] == "fedtune", command
        argv = [sys.executable, "-m", "fedtune", *args[1:]]
        if command.startswith(LONG_RUNNING):
            with open(log, "ab") as out:
                proc = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            self.background.append(proc)
            return
        done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=400)
        with open(log, "a") as out:
            out.write(f"$ {command}\n{done.stdout}{done.stderr}")
        assert done.returncode == 0, f"`{command}` in {cwd} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}"

    def kit(self, name: str) -> Path:
        return self.hospitals[name] / f"{name}-kit"


def _hand_off(machines: Machines, command: str, name: str) -> None:
    """What the page says a person does after ``command``."""
    from fedtune.data.clinical import generate_site
    from fedtune.data.records import write_records
    from fedtune.launcher import free_port

    if not name:
        return
    coordinator, kit = machines.coordinator, machines.kit(name)
    if command.startswith("fedtune server invite"):  # the kit goes to the hospital
        shutil.copytree(coordinator / f"{name}-kit", kit)
    elif command.startswith("fedtune pki hospital"):
        # the hospital's own decisions: its data, its model, and a free health port on this shared machine
        index = list(machines.hospitals).index(name)
        records = generate_site(index, 12, seed=0)
        write_records(kit / "data" / "train.jsonl", records[:10])
        write_records(kit / "data" / "eval.jsonl", records[10:])
        config = kit / "hospital.toml"
        text = config.read_text()
        text = re.sub(r'(?m)^path = "[^"]*"', 'path = "tiny"', text)
        text = re.sub(r"(?m)^threads = \d+", "threads = 1", text)
        port = machines.health.setdefault(name, free_port())
        text, count = re.subn(r'(?m)^health = "127\.0\.0\.1:\d+"', f'health = "127.0.0.1:{port}"', text)
        assert count == 1 and 'train = ["data/train.jsonl"]' in text, text
        config.write_text(text)
        for pub in (f"{name}.node.pub", f"{name}.pub"):  # sent to the coordinator
            shutil.copy(kit / "keys" / pub, coordinator / pub)
    elif command.startswith("fedtune client start"):
        url = f"http://127.0.0.1:{machines.health[name]}/health/ready"

        def ready() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as answer:
                    return answer.status == 200
            except OSError:
                return False

        until(ready, f"hospital {name} to connect", limit=120)
    elif command.startswith("fedtune server witness"):  # sent to the hospital
        shutil.copy(coordinator / f"{name}.witness.json", kit / f"{name}.witness.json")


@pytest.mark.flower
def test_the_walk_through_runs_as_written(tmp_path: Path) -> None:
    machines = Machines(tmp_path)
    log = tmp_path / "walkthrough.log"
    (machines.coordinator / "run.toml").write_text(RUN_TOML)  # the coordinator's run config
    try:
        for where, commands in blocks(PAGE):
            per_hospital = where == "hospital" or any(EXAMPLE_NAME in c for c in commands)
            names = list(machines.hospitals) if per_hospital else [""]
            for name in names:
                for raw in commands:
                    command = machines.substitute(raw, name or EXAMPLE_NAME)
                    cwd = machines.coordinator if where == "coordinator" else machines.kit(name)
                    if command.startswith("fedtune server start"):
                        machines.run(command, cwd, tmp_path / "coordinator.out")
                        server = machines.coordinator / "coordinator" / "server.json"
                        until(server.exists, "the coordinator to start", limit=60)
                        continue
                    machines.run(command, cwd, log)
                    _hand_off(machines, command, name)
        said = log.read_text()
        assert "round 2/2" in said and "exported the global adapter" in said
        assert said.count("WITNESSED by the coordinator") == 3, said[-3000:]  # each trail, against what arrived
        for name in machines.hospitals:
            kit = machines.kit(name)
            backup = kit / f"{name}-backup.tar.gz"
            assert backup.exists() and oct(backup.stat().st_mode & 0o777) == "0o600"
            ledger = json.loads((kit / "state" / "privacy.json").read_text())
            assert ledger["datasets"], "the DP run spent from the hospital's ledger"
            decided = [
                json.loads(line) for line in (kit / "state" / "release" / "decisions.jsonl").read_text().splitlines()
            ]
            assert [d["round"] for d in decided] == [1, 2], decided  # the release gate judged each round's adapter
    finally:
        codes = [stop(p) for p in reversed(machines.background)]
        left = [p.pid for p in machines.background if p.poll() is None]
        assert not left
    assert all(code == 0 for code in codes), codes
