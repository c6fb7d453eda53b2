"""Model sources and the content hash."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedtune.errors import ModelError
from fedtune.models import load_base_model, resolve_model_dir, state_sha256


def test_tiny_model_hash_is_stable_and_content_based(tiny_dir: Path) -> None:
    a = load_base_model("tiny")
    b = load_base_model(str(tiny_dir))  # same folder given as a local path: hashed from the weights
    assert a.sha256 == b.sha256 == state_sha256(b.model)
    with torch.no_grad():
        next(b.model.parameters()).view(-1)[0] += 1e-3
    assert state_sha256(b.model) != a.sha256


@pytest.mark.parametrize(
    ("source", "pattern"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "never downloaded from a hub"),
        ("/nonexistent/model.gguf", "GGUF file .* does not exist"),
    ],
)
def test_bad_sources_are_refused(source: str, pattern: str) -> None:
    with pytest.raises(ModelError, match=pattern):
        resolve_model_dir(source)


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model_dir(str(tmp_path))
