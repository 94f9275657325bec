"""Inference engines behind one protocol (``base.Backend``). ``load_backend`` picks by config."""

from __future__ import annotations

import importlib

from cai_cli.engines.base import Backend, Completion, Overflow, PromptInput, SamplingParams
from cai_cli.config import AnyModelConfig

__all__ = ["Backend", "Completion", "Overflow", "PromptInput", "SamplingParams", "load_backend"]


def load_backend(model: AnyModelConfig, what: str) -> Backend:
    """Load the engine that runs ``model`` (its config class names it: ``engine``); ``what`` is
    the config path, for messages."""
    module, _, name = type(model).engine.partition(":")
    return getattr(importlib.import_module(module), name)(model, what)
