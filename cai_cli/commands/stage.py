"""Running a command that writes a run directory: load the config, hold the run directory's
lock (a shard: shared with the other shards, and its own shard lock), run, and on Ctrl-C or
SIGTERM say how to resume."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer

from cai_cli.errors import UserError, relative_note


def load(config: Path, overrides: Optional[list[str]]):
    from cai_cli.config import load_config

    return load_config(config, overrides or [])


@contextmanager
def reading(run_dir: Optional[Path], config: Optional[Path], overrides: Optional[list[str]]) -> Iterator:
    """The config of a command that reads a run (status, report, plan), for the body of the
    ``with``: ``--config FILE`` as given (with ``RUN_DIR`` too: that file's settings for the run
    in ``RUN_DIR``), or ``RUN_DIR`` alone: the config its last stage recorded there, overrides
    included, with its relative paths read from where the run was run (``run.resolved``)."""
    from cai_cli import ui
    from cai_cli.config import load_config
    from cai_cli.run.layout import TOOL_DIR, RunLayout
    from cai_cli.run.resolved import base, recorded_cwd, working_directory

    overrides = list(overrides or [])
    if config is not None:
        yield load(config, overrides + ([f"run_dir={run_dir}"] if run_dir is not None else []))
        return
    if run_dir is None:
        raise UserError("give a run directory (e.g. `myproject/runs/cai`) or a config "
                        "(--config FILE)")
    recorded = RunLayout.of(run_dir).resolved_config
    if run_dir.is_file():
        raise UserError(f"{run_dir} is a file, not a run directory; a config is given with "
                        f"--config (--config {ui.shell(run_dir)}), or give the run directory")
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: no such directory{relative_note(run_dir)}; give a run "
                        "directory (run_dir in the config) or the config (--config FILE)")
    if not recorded.is_file():
        raise UserError(f"{run_dir} has no {TOOL_DIR}/config.yaml: no stage has run there yet, "
                        "or it is not a run directory; give the config instead (--config FILE)")
    import yaml

    from cai_cli import reading as text_reading

    text = text_reading.read_text(recorded)
    try:
        data = text_reading.load_yaml(text, str(recorded))
    except (yaml.YAMLError, UserError):
        data = None  # load_config below says what is wrong with it
    named = str(data.get("run_dir") or "") if isinstance(data, dict) else ""
    where = base(run_dir, named or str(run_dir), recorded_cwd(text))
    here = where.resolve() == Path.cwd().resolve()
    if here and named and Path(named).resolve() == run_dir.resolve():
        moved = []  # read from where it was run: the run directory as the config names it
    else:  # as given, or from elsewhere in full, so that messages name it as it is from here
        moved = [f"run_dir={run_dir if here else run_dir.resolve()}"]
    source = recorded if here else recorded.resolve()  # before moving to where
    with working_directory(where):
        yield load_config(source, overrides + moved)


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
