"""Helpers the test modules share: running the real command, and looking at what it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def cai(*args, timeout: float = 900) -> subprocess.CompletedProcess:
    """``cai ARGS`` as a user runs it, from the repository root, offline."""
    return subprocess.run([sys.executable, "-m", "cai_cli", *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def kill_after_batches(args: list, state: Path, batches: int, timeout: float = 240) -> None:
    """Start ``cai ARGS`` and SIGKILL it once its progress file says ``batches`` are done."""
    process = subprocess.Popen([sys.executable, "-m", "cai_cli", *map(str, args)], cwd=ROOT,
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        if state.is_file() and json.loads(state.read_text() or "{}").get("batches", 0) >= batches:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()


def weights(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(Path(path) / "model.safetensors"))


def snapshot(directory: Path) -> dict | None:
    """Names, sizes and modification times of everything under a directory."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}
