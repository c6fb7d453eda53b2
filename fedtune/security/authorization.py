"""The coordinator's signature on a run, and the hospital's check of the run it is asked to serve.

A Flower SuperNode executes whatever app a run ships. A hospital must run nothing but the
consortium's code, for nobody but its coordinator, so its daemon serves a run only when:

1. the run's app bundle (FAB) is fedtune's own: one ``pyproject.toml`` (plus Flower's
   ``.info/CONTENT`` manifest) naming the app ``fedtune-run`` of publisher ``fedtune``
   whose components are fedtune's installed ServerApp and ClientApp, and no other file.
   The daemon never executes code from a bundle; it runs the fedtune it has installed.
2. the run's config carries ``run-authorization``: the coordinator's Ed25519 signature,
   with the envelope key whose public half every hospital holds (``coordinator.pub``),
   over a statement naming the run folder, the SHA-256 of the run's settings
   (``experiment``), the app's identity and when it was issued. Whoever can start runs
   on the SuperLink but does not hold the coordinator's key cannot produce one.
3. one authorization serves one Flower run: the hospital remembers the first Flower run
   that used each authorization (:class:`SeenRuns`), so resubmitting a signed bundle as
   a new run (a replay) is refused. ``fedtune run`` and ``--resume`` sign afresh.

Format (``run-authorization``): ``v1.<issued_ms>.<base64url signature>``; the signed
statement is ``fedtune-run-authorization-v1\\n`` followed by canonical JSON.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import tomllib
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature

from fedtune.errors import FedTuneError
from fedtune.security.keys import KeyPair, PublicIdentity

APP_NAME = "fedtune-run"
PUBLISHER = "fedtune"
COMPONENTS = {"serverapp": "fedtune.server.server_app:app", "clientapp": "fedtune.client.client_app:app"}
CONFIG_KEY = "run-authorization"
VERSION = "v1"
_STATEMENT = b"fedtune-run-authorization-v1\n"
_FAB_FILES = frozenset({"pyproject.toml", ".info/CONTENT"})


class RunRefused(FedTuneError):
    """The hospital will not serve this run; the message is safe to send to the coordinator."""


def _statement(*, run: str, experiment: str, issued_ms: int) -> bytes:
    body = {
        "app": {"name": APP_NAME, "publisher": PUBLISHER, "components": COMPONENTS},
        "experiment-sha256": hashlib.sha256(experiment.encode()).hexdigest(),
        "issued-ms": issued_ms,
        "run": run,
    }
    return _STATEMENT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign_run(coordinator: KeyPair, *, run: str, experiment: str, issued_ms: int) -> str:
    """The ``run-authorization`` value for the run folder ``run`` with settings ``experiment``."""
    if coordinator.role != "coordinator":
        raise FedTuneError(f"runs are signed with the coordinator's key, not a {coordinator.role}'s")
    signature = coordinator.signing.sign(_statement(run=run, experiment=experiment, issued_ms=issued_ms))
    return f"{VERSION}.{issued_ms}.{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


@dataclass(frozen=True)
class AuthorizedRun:
    """A run the hospital checked: its folder's name, its settings, and the authorization's digest."""

    run: str
    experiment: str
    digest: str  # SHA-256 of the authorization: what SeenRuns remembers
    issued_ms: int


def check_app(fab: bytes) -> None:
    """Refuse any bundle that is not fedtune's own (other files, other components, other app)."""
    try:
        with zipfile.ZipFile(io.BytesIO(fab)) as archive:
            names = set(archive.namelist())
            if not names <= _FAB_FILES or "pyproject.toml" not in names:
                extra = sorted(names - _FAB_FILES)[:3]
                raise RunRefused(f"the run's app is not fedtune's (it carries files of its own: {', '.join(extra)})")
            project = tomllib.loads(archive.read("pyproject.toml").decode())
    except (zipfile.BadZipFile, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError) as err:
        raise RunRefused(f"the run's app bundle is unreadable ({type(err).__name__})") from err
    app = project.get("tool", {}).get("flwr", {}).get("app", {})
    name = project.get("project", {}).get("name")
    if name != APP_NAME or app.get("publisher") != PUBLISHER or app.get("components") != COMPONENTS:
        raise RunRefused(
            f"the run's app is not fedtune's (app {name!r} of {app.get('publisher')!r} with components "
            f"{app.get('components')!r})"
        )


def check_run(fab: bytes, run_config: Mapping[str, Any], coordinator: PublicIdentity) -> AuthorizedRun:
    """The run the coordinator signed, or :class:`RunRefused` saying why not.

    Checked against the run's *fused* config (what the ClientApp will read), so settings
    overridden at ``flwr run --run-config`` are covered by the signature too.
    """
    check_app(fab)
    token = run_config.get(CONFIG_KEY)
    run, experiment = run_config.get("run-dir"), run_config.get("experiment")
    if not isinstance(token, str) or not token:
        raise RunRefused("the run is not signed by the coordinator (no `run-authorization`)")
    if not isinstance(run, str) or not isinstance(experiment, str):
        raise RunRefused("the run lacks its settings (`run-dir`, `experiment`)")
    try:
        version, issued, signature = token.split(".")
        if version != VERSION:
            raise ValueError(f"format {version!r}")
        issued_ms = int(issued)
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        name = Path(run).name
        coordinator.signing.verify(raw, _statement(run=name, experiment=experiment, issued_ms=issued_ms))
    except (ValueError, InvalidSignature) as err:
        raise RunRefused("the run's authorization does not verify with the coordinator's key") from err
    return AuthorizedRun(name, experiment, hashlib.sha256(token.encode()).hexdigest(), issued_ms)


class SeenRuns:
    """Which Flower run first used each authorization (a JSON file in the hospital's state folder)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def _load(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            raise FedTuneError(f"{self.path}: unreadable ({err}); delete it only if no run is in progress") from err
        return {str(k): int(v) for k, v in data.items()}

    def claim(self, authorized: AuthorizedRun, flower_run_id: int) -> None:
        """Bind the authorization to ``flower_run_id``; refuse it for any other Flower run."""
        from fedtune.atomic import atomic_write_json

        seen = self._load()
        first = seen.get(authorized.digest)
        if first is None:
            seen[authorized.digest] = int(flower_run_id)
            atomic_write_json(self.path, seen)
            return
        if first != int(flower_run_id):
            raise RunRefused(
                f"the run's authorization was already used by Flower run {first} (a replayed run); "
                "the coordinator signs every launch and resume afresh"
            )
