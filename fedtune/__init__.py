"""fedtune: federated LoRA fine-tuning of LLMs for hospital consortia."""

from __future__ import annotations

__version__ = "0.1.0"
