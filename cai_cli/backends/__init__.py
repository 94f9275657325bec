"""Inference engines behind one protocol (``base.Backend``). ``load_backend`` picks by config."""

from __future__ import annotations

from cai_cli.backends.base import (Backend, Completion, Overflow, PromptInput, SamplingParams,
                                   record_seed)
from cai_cli.config import ModelConfig

__all__ = ["Backend", "Completion", "Overflow", "PromptInput", "SamplingParams", "load_backend",
           "record_seed"]


def load_backend(model: ModelConfig, what: str) -> Backend:
    """Load the engine ``model.backend`` names; ``what`` is the config path, for messages."""
    if model.backend == "hf":
        from cai_cli.backends.hf import HFBackend

        return HFBackend(model, what)
    raise AssertionError(f"unhandled backend {model.backend}")  # the config schema rules this out
