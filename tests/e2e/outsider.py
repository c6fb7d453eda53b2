"""The outsider of the deployment tests: someone on the hospital network with the public ca.pem."""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
from pathlib import Path

import httpx
import tomli_w

from fedtune.cli import main
from fedtune.cli.loopback import Loopback

APPS = Path(__file__).resolve().parents[1] / "apps"


def flwr(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Flower's own `flwr` CLI with its config in ``home`` (FLWR_HOME)."""
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0"}
    flwr = str(Path(sys.executable).with_name("flwr"))
    return subprocess.run([flwr, *args], env=env, capture_output=True, text=True, timeout=timeout)


def outsider_home(fed: Loopback, folder: Path) -> Path:
    """An outsider's `flwr` config: the coordinator's public address and the public ca.pem."""
    folder.mkdir(parents=True, exist_ok=True)
    conn = {"address": fed.address, "root-certificates": str(fed.home.ca_cert)}
    (folder / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": "target", "target": conn}}))
    return folder


def listening(port: int) -> set[str]:
    """The local addresses listening on ``port`` (IPv4), from /proc/net/tcp."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, hex_port = local.split(":")
        if int(hex_port, 16) == port and state == "0A":  # LISTEN
            found.add(".".join(str(int(address[i : i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


def attack(fed: Loopback, tmp: Path) -> dict[str, object]:
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
    outsider = outsider_home(fed, tmp / "outsider-flwr")
    key = tmp / "intruder"
    main(["pki", "hospital", "--name", "intruder", "--out", str(key)])
    victim = str(fed.home.registry()["st-elsewhere"]["node-id"])
    results["flwr ls"] = flwr(outsider, "ls").returncode
    results["flwr register"] = flwr(outsider, "supernode", "register", str(key / "intruder.node.pub")).returncode
    results["flwr unregister"] = flwr(outsider, "supernode", "unregister", victim).returncode
    results["flwr run"] = flwr(outsider, "run", str(APPS / "foreign"), "target").returncode
    return results
