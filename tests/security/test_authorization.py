"""The hospital serves only fedtune's own app, for runs its coordinator signed, once each."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
import tomli_w

from fedtune.security import authorization
from fedtune.security.authorization import RunRefused, SeenRuns, check_run, sign_run
from fedtune.security.keys import KeyPair

EXPERIMENT = '[run]\nname = "e2e"\n'


def _fab(
    *, components: dict[str, str] | None = None, name: str = "fedtune-run", extra: dict[str, bytes] | None = None
) -> bytes:
    project = {
        "project": {"name": name, "version": "1.0.0"},
        "tool": {"flwr": {"app": {"publisher": "fedtune", "components": components or dict(authorization.COMPONENTS)}}},
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        z.writestr("pyproject.toml", tomli_w.dumps(project))
        z.writestr(".info/CONTENT", "pyproject.toml,0,0\n")
        for path, data in (extra or {}).items():
            z.writestr(path, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def coordinator() -> KeyPair:
    return KeyPair.generate("coordinator", "coordinator")


def _config(token: str, *, run: str = "/srv/coordinator/runs/e2e-1", experiment: str = EXPERIMENT) -> dict[str, str]:
    return {"run-dir": run, "experiment": experiment, authorization.CONFIG_KEY: token}


def test_a_signed_run_of_fedtunes_app_is_served(coordinator: KeyPair) -> None:
    token = sign_run(coordinator, run="e2e-1", experiment=EXPERIMENT, issued_ms=1)
    run = check_run(_fab(), _config(token), coordinator.public)
    assert (run.run, run.experiment, run.issued_ms) == ("e2e-1", EXPERIMENT, 1)


@pytest.mark.parametrize(
    ("fab", "why"),
    [
        (_fab(components={"serverapp": "x.server:app", "clientapp": "x.client:app"}), "not fedtune's"),
        (_fab(name="exfiltrate"), "not fedtune's"),
        (_fab(extra={"fedtune/client/client_app.py": b"import os"}), "carries files of its own"),
        (b"not a zip", "unreadable"),
    ],
)
def test_any_other_app_is_refused_even_when_signed(coordinator: KeyPair, fab: bytes, why: str) -> None:
    token = sign_run(coordinator, run="e2e-1", experiment=EXPERIMENT, issued_ms=1)
    with pytest.raises(RunRefused, match=why):
        check_run(fab, _config(token), coordinator.public)


def test_unsigned_forged_or_altered_runs_are_refused(coordinator: KeyPair) -> None:
    token = sign_run(coordinator, run="e2e-1", experiment=EXPERIMENT, issued_ms=1)
    with pytest.raises(RunRefused, match="not signed by the coordinator"):
        check_run(_fab(), {"run-dir": "/x/e2e-1", "experiment": EXPERIMENT}, coordinator.public)
    impostor = KeyPair.generate("coordinator", "coordinator")
    forged = sign_run(impostor, run="e2e-1", experiment=EXPERIMENT, issued_ms=1)
    with pytest.raises(RunRefused, match="does not verify"):
        check_run(_fab(), _config(forged), coordinator.public)
    # settings changed after signing (e.g. `flwr run --run-config`), another run folder, a bad token
    altered = EXPERIMENT + "[dp]\nenabled = false\n"
    for config in (_config(token, experiment=altered), _config(token, run="/x/e2e-2"), _config("v1.1.AAAA")):
        with pytest.raises(RunRefused, match="does not verify"):
            check_run(_fab(), config, coordinator.public)
    with pytest.raises(RunRefused, match="does not verify"):
        check_run(_fab(), _config("v2" + token[2:]), coordinator.public)
    hospital = KeyPair.generate("st-elsewhere", "hospital")
    with pytest.raises(Exception, match="coordinator's key"):
        sign_run(hospital, run="e2e-1", experiment=EXPERIMENT, issued_ms=1)


def test_one_authorization_serves_one_flower_run(coordinator: KeyPair, tmp_path: Path) -> None:
    seen = SeenRuns(tmp_path / "runs.json")
    first = check_run(
        _fab(), _config(sign_run(coordinator, run="e2e-1", experiment=EXPERIMENT, issued_ms=1)), coordinator.public
    )
    seen.claim(first, 11)
    seen.claim(first, 11)  # the same Flower run again (every message of it, a daemon restart): fine
    with pytest.raises(RunRefused, match="already used by Flower run 11"):
        SeenRuns(tmp_path / "runs.json").claim(first, 12)  # remembered across restarts
    resumed = check_run(
        _fab(), _config(sign_run(coordinator, run="e2e-1", experiment=EXPERIMENT, issued_ms=2)), coordinator.public
    )
    seen.claim(resumed, 12)  # a resume is signed afresh


def test_the_launcher_signs_what_the_hospital_checks(coordinator: KeyPair, tmp_path: Path, tiny_cfg) -> None:  # type: ignore[no-untyped-def]
    """The bundle `fedtune run` ships, built by Flower's own builder, passes the hospital's check."""
    import tomllib

    from flwr.cli.build import build_fab_from_disk

    from fedtune.launcher import write_app
    from fedtune.runfolder import RunFolder

    folder = RunFolder(tmp_path / "e2e-20261129-120000")
    folder.root.mkdir()
    folder.config_path.write_text(tiny_cfg.to_toml())
    write_app(folder, signer=coordinator)
    fab = build_fab_from_disk(folder.app_dir)
    with zipfile.ZipFile(io.BytesIO(fab)) as z:
        config = tomllib.loads(z.read("pyproject.toml").decode())["tool"]["flwr"]["app"]["config"]
    run = check_run(fab, config, coordinator.public)
    assert run.run == folder.root.name and run.experiment == tiny_cfg.to_toml()
    write_app(folder)  # a simulation's bundle: unsigned, which no hospital serves
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(folder.app_dir))) as z:
        unsigned = tomllib.loads(z.read("pyproject.toml").decode())["tool"]["flwr"]["app"]["config"]
    with pytest.raises(RunRefused, match="not signed"):
        check_run(build_fab_from_disk(folder.app_dir), unsigned, coordinator.public)
