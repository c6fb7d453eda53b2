"""Shared fixtures: a private model cache and the tiny LLaMA-style model built in code."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Nothing in the tests may reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every model a test needs is built or converted into a private cache (SmolLM2: ~20 s)."""
    cache = tmp_path_factory.mktemp("fedtune-cache")
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
        source = Path(__file__).with_name(f"{name}.py")
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
