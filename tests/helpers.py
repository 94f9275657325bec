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


def cai(*args, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """``cai ARGS`` as a user runs it, from the repository root, offline (``env``: more
    environment variables, e.g. ``COLUMNS``)."""
    return subprocess.run([sys.executable, "-m", "cai_cli", *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=timeout,
                          env={**ENV, **(env or {})}, cwd=ROOT)


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


class Captured(Exception):
    """Stops a training stage where training would start, carrying the trainer TRL built."""


def trainer_capture(monkeypatch, trainer_class, run_stage):
    """A function ``prepare(config_path, *overrides)`` that runs a stage up to the point where
    ``trainer_class.train`` would start and returns the trainer instead."""
    import pytest

    def train(self, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(trainer_class, "train", train)  # subclasses inherit it

    def prepare(path: Path, *overrides: str):
        with pytest.raises(Captured) as info:  # force: an earlier capture left a started stage
            run_stage(path, *overrides, force=True)
        return info.value.args[0]

    return prepare


def interrupt_at_step(monkeypatch, step: int) -> None:
    """Make the next training run raise KeyboardInterrupt (Ctrl-C) right after it writes the
    checkpoint of ``step``; ``monkeypatch.undo()`` lifts it."""
    from cai_cli.stages import training

    original = training.progress_callback

    def interrupting(bar, description):
        callback = original(bar, description)

        def on_save(args, state, control, **kwargs):
            if state.global_step == step:
                raise KeyboardInterrupt

        callback.on_save = on_save
        return callback

    monkeypatch.setattr(training, "progress_callback", interrupting)


def cai_main(*args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``cai ARGS`` in this process, through ``cai_cli.cli.main`` as the ``cai`` script runs it
    (the real exit codes and messages, without a new interpreter's start-up): the exit code and
    what it printed. ``env``: environment variables set for the call."""
    import contextlib
    import io

    from cai_cli.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_argv, saved_env = sys.argv, {name: os.environ.get(name) for name in env or {}}
    sys.argv = ["cai", *map(str, args)]
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    finally:
        sys.argv = saved_argv
        for name, value in saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
