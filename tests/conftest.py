"""Shared fixtures. Tests never touch the network: the hub is switched off before any Hugging Face
library is imported (they read these variables once, at import)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The default tiny model (width 256, 4 layers, as ``cai tiny-model`` builds it), built once
    per test session. Treat it as read-only: copy it before changing anything inside."""
    from cai_cli.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-model")
