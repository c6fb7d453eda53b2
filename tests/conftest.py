"""Shared fixtures: a private model cache and the tiny LLaMA-style model built in code.

Tests that start Flower processes carry ``@pytest.mark.flower`` and stay out of the fast
subset (``pytest -m "not flower"``); a test without the mark that starts one fails,
so the subset stays fast and honest.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # the tests that start Flower (the long ones) first, so that neither xdist worker is left
    # with a long test at the end while the other idles; a stable sort keeps each file's order
    items.sort(key=lambda item: "flower" not in item.keywords)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# what starts Flower: its own programs, the SuperNode fedtune paces, and the fedtune
# commands that run a SuperLink, a SuperNode or a simulation
FLOWER_PROGRAMS = ("flower-superlink", "flower-supernode", "flwr", "flwr-simulation", "fedtune.supernode")
FLOWER_COMMANDS = (("simulate",), ("run",), ("sweep",), ("compare",), ("server", "start"), ("client", "start"))


def starts_flower(argv: Sequence[str]) -> bool:
    """Whether a command line starts a Flower process (directly, or through a fedtune command)."""
    words = [str(a) for a in argv]
    if any(Path(w).name in FLOWER_PROGRAMS for w in words[:3]):
        return True
    if "fedtune" in words[:3]:
        rest = words[words.index("fedtune") + 1 :]
        return any(tuple(rest[: len(c)]) == c for c in FLOWER_COMMANDS)
    return False


@pytest.fixture(autouse=True)
def _flower_needs_the_mark(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if request.node.get_closest_marker("flower") is not None:
        yield
        return
    real = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[bytes], args: object, *a: object, **kw: object) -> None:
        argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)  # type: ignore[call-overload]
        if starts_flower([os.fsdecode(x) if isinstance(x, bytes | os.PathLike) else str(x) for x in argv]):
            raise AssertionError(f"this test starts Flower ({argv[:4]}): mark it @pytest.mark.flower")
        real(self, args, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)
    yield


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every model a test needs is built or converted into a private cache (SmolLM2: ~10 s),
    one for the whole run: xdist's workers share it (their base folders sit side by side),
    so SmolLM2 is converted once, not once per worker; concurrent builds race and one rename wins."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "fedtune-cache"
    cache.mkdir(exist_ok=True)
    os.environ["FEDTUNE_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_dir(model_cache: Path) -> Path:
    from fedtune.models import TINY, resolve_model_dir

    return resolve_model_dir(TINY)


@pytest.fixture()
def tiny_cfg():  # type: ignore[no-untyped-def]
    """A config small enough for a federation of the tiny model in seconds."""
    from fedtune.config import load_config

    return load_config(
        None,
        {
            "model.source": "tiny",
            "model.threads": 1,
            "model.precision": "fp32",
            "data.hospitals": 2,
            "data.train_per_hospital": 24,
            "data.eval_per_hospital": 4,
            "train.local_steps": 2,
            "train.batch_size": 4,
            "train.max_length": 256,
            "federation.rounds": 2,
            "eval.max_new_tokens": 4,
            "run.baselines": False,
        },
    )


@pytest.fixture()
def client_app_module(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run the next simulations with a test ClientApp module from tests/ in the app bundle."""
    import shutil

    from fedtune import launcher
    from fedtune.runfolder import RunFolder

    def install(name: str) -> None:
        source = Path(__file__).with_name("apps") / f"{name}.py"
        honest_write_app = launcher.write_app

        def write_app(folder: RunFolder) -> None:
            honest_write_app(folder)
            shutil.copy(source, folder.app_dir / source.name)
            project = folder.app_dir / "pyproject.toml"
            text = project.read_text().replace('"fedtune.client.client_app:app"', f'"{name}:app"')
            assert f"{name}:app" in text
            project.write_text(text)

        monkeypatch.setattr(launcher, "write_app", write_app)

    return install


@pytest.fixture()
def flower_run_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages outside a Flower run need a run id to be built."""
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)
