"""deploy/kubernetes: `kubectl kustomize` plus the Kubernetes API schemas (kubernetes-validate), the
pods' security, probes and references, and the init scripts run for real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.client.hospital import load_hospital_config
from tests.deploy.common import (
    DEPLOY,
    IMAGES,
    K8S_VERSIONS,
    README,
    _under,
)

# --------------------------------------------------------------------------- Kubernetes


@pytest.fixture(scope="module")
def manifests() -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("needs kubectl (kustomize) to render deploy/k8s")
    out = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def _kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "StatefulSet")
    }


def _container(pod: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod["containers"] + pod.get("initContainers", []) if c["name"] == name)


def test_kubernetes_manifests_pass_the_api_schemas(manifests: list[dict[str, Any]]) -> None:
    import kubernetes_validate

    kinds = Counter(d["kind"] for d in manifests)
    assert kinds == Counter(
        Namespace=1, Service=1, StatefulSet=1, Deployment=1, ConfigMap=2, PersistentVolumeClaim=2, NetworkPolicy=2
    )
    for version in K8S_VERSIONS:
        for doc in manifests:
            kubernetes_validate.validate(doc, version, strict=True)
    typo = json.loads(json.dumps(_kind(manifests, "Deployment")[0]))
    client = typo["spec"]["template"]["spec"]["containers"][0]
    client["livenesProbe"] = client.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError, match="livenesProbe"):
        kubernetes_validate.validate(typo, K8S_VERSIONS[-1], strict=True)


def test_kubernetes_pods_run_unprivileged(manifests: list[dict[str, Any]]) -> None:
    namespace = _kind(manifests, "Namespace")[0]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for pod in _pods(manifests).values():
        context = pod["securityContext"]
        assert context["runAsNonRoot"] is True and context["seccompProfile"] == {"type": "RuntimeDefault"}
        for c in pod.get("initContainers", []) + pod["containers"]:
            image = IMAGES[c["image"].split(":")[0]]
            assert context["runAsUser"] == image["uid"]  # the image's user: its home and volume are its own
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
            env = dict(image["env"], **{e["name"]: e["value"] for e in c.get("env", [])})
            if c in pod["containers"]:
                cache = env["FEDTUNE_CACHE"]
                assert any(_under(cache, m["mountPath"]) and not m.get("readOnly") for m in c["volumeMounts"])


def test_kubernetes_everything_referenced_is_defined(manifests: list[dict[str, Any]]) -> None:
    claims = {d["metadata"]["name"] for d in _kind(manifests, "PersistentVolumeClaim")}
    config_maps = {d["metadata"]["name"] for d in _kind(manifests, "ConfigMap")}
    secrets: set[str] = set()
    for name, pod in _pods(manifests).items():
        templates = {
            t["metadata"]["name"]
            for d in manifests
            if d["metadata"]["name"] == name
            for t in d["spec"].get("volumeClaimTemplates", [])
        }
        volumes = {v["name"]: v for v in pod["volumes"]} | {t: {} for t in templates}
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert {m["name"] for m in c["volumeMounts"]} <= set(volumes), f"{name}/{c['name']}: a mount has no volume"
        for v in pod["volumes"]:
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in claims, f"{name}: PVC {v} is not defined"
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps
            if "secret" in v:
                secrets.add(v["secret"]["secretName"])
    # the Secrets are made by hand: deploy/README.md says how, for each
    assert secrets == {"coordinator-pki", "st-elsewhere-keys"}
    for secret in secrets:
        assert re.search(rf"kubectl -n fedtune create secret generic {secret}\b", README), secret


def test_kubernetes_secret_command_keeps_the_ca_key_out() -> None:
    command = re.search(r"create secret generic coordinator-pki((?:\\\n|[^\n])*)", README)
    assert command
    sources = re.findall(r"--from-file=(\S+)", command.group(1))
    assert sorted(Path(s).name for s in sources) == sorted(
        ["ca.pem", "server.pem", "server.key", "coordinator.key", "coordinator.pub"]
    )  # named files only: a whole folder would carry ca.key into the cluster


def _health_probes(container: dict[str, Any]) -> list[dict[str, Any]]:
    return [container[p] for p in ("startupProbe", "livenessProbe", "readinessProbe")]


def test_kubernetes_hospital_probes_run_inside_on_the_configured_loopback_address(
    manifests: list[dict[str, Any]],
) -> None:
    config_map = next(d for d in _kind(manifests, "ConfigMap") if "hospital.toml" in d["data"])
    toml_path = DEPLOY / "k8s" / "hospital.toml"
    assert config_map["data"]["hospital.toml"] == toml_path.read_text()
    cfg = load_hospital_config(toml_path, check_files=False)  # the fields parse and validate
    assert cfg.privacy.require_dp and cfg.ledger_path == Path("/var/lib/fedtune/privacy.json")
    client = _container(_pods(manifests)[cfg.name], "client")
    assert client["args"] == ["--config", "/etc/fedtune/hospital.toml"]
    routes = {"startupProbe": "/health/live", "livenessProbe": "/health/live", "readinessProbe": "/health/ready"}
    for name, route in routes.items():
        probe = client[name]
        # daemon.health listens on loopback: an httpGet from the kubelet to the pod IP never reaches it
        assert set(probe) & {"httpGet", "tcpSocket", "grpc"} == set()
        command = " ".join(probe["exec"]["command"])
        # ready only while connected to the coordinator; alive (never restarted) while it is away
        assert f'"http://{cfg.daemon.health}{route}"' in command and command.startswith("python -c"), command


def test_kubernetes_coordinator_is_probed_and_reachable_from_other_clusters(manifests: list[dict[str, Any]]) -> None:
    pod = _pods(manifests)["coordinator"]
    coordinator = _container(pod, "coordinator")
    args = coordinator["args"]
    address, port = args[args.index("--address") + 1], int(args[args.index("--port") + 1])
    assert args[args.index("--host") + 1] == "0.0.0.0"  # the TLS front listens on the pod IP
    (fleet,) = coordinator["ports"]
    assert fleet["containerPort"] == port
    for probe in _health_probes(coordinator):
        assert probe["httpGet"] == {"scheme": "HTTPS", "path": "/health", "port": fleet["name"]}
    (service,) = _kind(manifests, "Service")
    assert service["spec"]["type"] == "LoadBalancer"  # hospitals in other clusters dial it
    assert [(p["port"], p["targetPort"]) for p in service["spec"]["ports"]] == [(port, fleet["name"])]
    # the names hospitals dial resolve to the pod itself inside it (its own health checks, kubectl exec)
    aliases = {h for a in pod["hostAliases"] if a["ip"] == "127.0.0.1" for h in a["hostnames"]}
    hospital = load_hospital_config(DEPLOY / "k8s" / "hospital.toml", check_files=False)
    dialled, _, dialled_port = hospital.coordinator.address.rpartition(":")
    assert address in aliases and dialled in aliases and int(dialled_port) == port
    assert dialled == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc"


def _run_init(container: dict[str, Any], paths: dict[str, Path], uid: int | None) -> subprocess.CompletedProcess[str]:
    """The init container's script with its absolute paths moved into a test folder, run as
    the pod's user (when the tests run as root: root ignores the file modes that matter here)."""
    pattern = "|".join(rf"(?<![\w.-]){re.escape(path)}(?=[/ ]|$)" for path in paths)
    script = re.sub(pattern, lambda m: str(paths[m.group(0)]), container["command"][-1], flags=re.MULTILINE)
    user = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    return subprocess.run(["sh", "-c", script], capture_output=True, text=True, **user)  # type: ignore[call-overload]


@pytest.fixture
def pod_folder() -> Any:
    """A scratch folder a pod's user can reach (pytest's tmp_path is private to its owner)."""
    with tempfile.TemporaryDirectory(prefix="fedtune-pod-") as folder:
        os.chmod(folder, 0o755)
        yield Path(folder)


def _secret(folder: Path, names: list[str], gid: int) -> None:
    """Files as Kubernetes mounts a Secret: root-owned, group fsGroup, mode 0440 (defaultMode)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_text(name)
        if os.getuid() == 0:
            os.chown(folder / name, 0, gid)
        (folder / name).chmod(0o440)


def _volume(folder: Path, uid: int) -> Path:
    """An empty volume owned by the pod's fsGroup (here: its user)."""
    folder.mkdir()
    if os.getuid() == 0:
        os.chown(folder, uid, uid)
    return folder


def test_kubernetes_init_containers_copy_keys_0600_and_refuse_the_ca_key(
    manifests: list[dict[str, Any]], pod_folder: Path
) -> None:
    pods = _pods(manifests)
    uid = pods["coordinator"]["securityContext"]["runAsUser"]
    as_pod = uid if os.getuid() == 0 else None
    pki = ["ca.pem", "server.pem", "server.key", "coordinator.key", "coordinator.pub"]
    src, home = pod_folder / "pki-src", _volume(pod_folder / "home", uid)
    _secret(src, pki, uid)
    init = _container(pods["coordinator"], "pki")
    paths = {"/var/lib/fedtune": home, "/pki": src}
    for _ in range(2):  # a restarted pod copies over the last start's files
        out = _run_init(init, paths, as_pod)
        assert out.returncode == 0, out.stderr
    modes = {p.name: p.stat().st_mode & 0o777 for p in (home / "pki").iterdir()}
    assert set(modes) == set(pki) and modes["server.key"] == modes["coordinator.key"] == 0o600
    (home / "pki" / "ca.key").write_text("left by an older manifest")
    assert _run_init(init, paths, as_pod).returncode == 0 and not (home / "pki" / "ca.key").exists()
    _secret(src, ["ca.key"], uid)
    out = _run_init(init, paths, as_pod)
    assert out.returncode != 0 and "ca.key" in out.stderr

    uid = pods["st-elsewhere"]["securityContext"]["runAsUser"]
    as_pod = uid if os.getuid() == 0 else None
    keys_src, keys = pod_folder / "keys-src", _volume(pod_folder / "keys", uid)
    _secret(keys_src, ["ca.pem", "coordinator.pub", "st-elsewhere.node.key", "st-elsewhere.key"], uid)
    init = _container(pods["st-elsewhere"], "keys")
    paths = {"/keys-src": keys_src, "/etc/fedtune/keys": keys}
    for _ in range(2):
        out = _run_init(init, paths, as_pod)
        assert out.returncode == 0, out.stderr
    assert {p.stat().st_mode & 0o777 for p in keys.iterdir()} == {0o600} and len(list(keys.iterdir())) == 4
    _secret(keys_src, ["ca.key"], uid)
    assert _run_init(init, paths, as_pod).returncode != 0


def test_kubernetes_run_is_launched_inside_the_coordinator_pod(manifests: list[dict[str, Any]]) -> None:
    pod = _pods(manifests)["coordinator"]
    coordinator = _container(pod, "coordinator")
    runs = next(m for m in coordinator["volumeMounts"] if m["name"] == "runs")
    home = next(m for m in coordinator["volumeMounts"] if m["name"] == "home")["mountPath"]
    config_map = next(v["configMap"]["name"] for v in pod["volumes"] if v["name"] == "runs")
    assert "run.toml" in next(d for d in _kind(manifests, "ConfigMap") if d["metadata"]["name"] == config_map)["data"]
    # the Control API answers on the pod's loopback only: README's launch command execs into the pod
    readme = re.sub(r"\s*\\\n\s*", " ", README)  # shell lines continued with a backslash, joined
    exec_in = "kubectl -n fedtune exec coordinator-0 -c coordinator --"
    assert f"{exec_in} fedtune run {runs['mountPath']}/run.toml --home {home}" in readme
    assert f"{exec_in} fedtune server add-hospital --home {home}" in readme
    assert f"{exec_in} fedtune status --home {home}" in readme
