"""Running a command that writes a run directory: load the config, hold the run directory's
lock (a shard: shared with the other shards, and its own shard lock), run, and on Ctrl-C or
SIGTERM say how to resume."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import typer

from cai_cli.errors import UserError


def load(config: Path, overrides: Optional[list[str]]):
    from cai_cli.config import load_config

    return load_config(config, overrides or [])


def writing(command: str, config, force: bool, work: Callable[[], object], shard=None) -> None:
    """Run ``work()`` holding the run directory's lock, with the right advice on Ctrl-C and
    SIGTERM (``run.preemption``): every finished batch is kept and the lock released on the
    way out, so the same command resumes."""
    from cai_cli.run.lock import ShardLock, run_lock
    from cai_cli.run.preemption import EXIT_CODE, Terminated

    lock = (ShardLock(config.run_dir, command, shard.index, shard.count) if shard is not None
            else run_lock(config.run_dir, command))
    again = ("rerun the same command without --force to resume where it stopped" if force
             else "rerun the same command to resume where it stopped")
    try:
        with lock:
            work()
    except KeyboardInterrupt:
        _say(f"interrupted: {again}")
        raise typer.Exit(130) from None
    except Terminated:  # a launcher passes it to every process of a job: one says it
        _say(f"terminated (SIGTERM): {again}")
        raise typer.Exit(EXIT_CODE) from None
    except BrokenPipeError:
        from cai_cli import ui

        if not ui.reader_gone():
            raise
        # Whoever read our output went away (`cai run ... 2>&1 | head`): stopped, not done,
        # with no one left to tell; exit as a process that SIGPIPE ends does.
        raise typer.Exit(141) from None


def _say(message: str) -> None:
    """The advice on a stop, once per job (each process of a training job gets the signal)."""
    from cai_cli.run import dist

    if dist.is_main():
        typer.echo(message, err=True)


def run_stage_command(stage, config: Path, overrides: Optional[list[str]], *, force: bool,
                      shard: Optional[str] = None, push: Optional[str] = None) -> None:
    """``cai <stage> --config FILE [--set ...] [--force] [--shard I/N] [--push-to-hub ID]``."""
    from cai_cli.stages.pipeline import run_stage

    part = None
    if shard is not None:
        from cai_cli.run.shards import Shard

        if not stage.shardable:
            raise UserError(f"cai {stage.command} does not run in shards")
        part = Shard.parse(shard)
    loaded = load(config, overrides)
    writing(stage.command, loaded, force, lambda: run_stage(stage, loaded, force=force, shard=part),
            shard=part)
    if push:
        from cai_cli.commands.push import push_stage

        push_stage(loaded, stage, push)
