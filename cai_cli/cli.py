"""The ``cai`` command: parse arguments, load the config, call a stage's ``run``. Nothing else.

The stage commands are generated from the table in ``cai_cli.stages``. Heavy libraries are
imported by the stages themselves, so ``cai --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from cai_cli.errors import USER_OS_ERRORS, UserError
from cai_cli.stages import STAGES

app = typer.Typer(
    name="cai",
    help="Constitutional AI end to end: SL-CAI critique/revision data, fine-tuning, AI-feedback "
    "preference labels, reward model and policy optimisation, from one YAML config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = typer.Typer(help="Check or print a config without running anything.", no_args_is_help=True)
app.add_typer(config_app, name="config")

CONFIG = typer.Option(..., "--config", "-c", metavar="FILE", help="YAML config file.", show_default=False)


def _set_option(example: str = "generate_sl.num_revisions=3"):
    return typer.Option(None, "--set", metavar="KEY=VALUE", show_default=False,
                        help=f"Override a config key by dotted path, e.g. --set {example} "
                        "(repeatable; `cai config keys` lists them).")


SET = _set_option()
# Each stage's --help shows a key of its own section.
SET_EXAMPLES = {
    "generate-prompts": "generate_prompts.num_prompts=200",
    "generate-sl": "generate_sl.num_revisions=3",
    "finetune": "finetune.training.learning_rate=1e-5",
    "label-prefs": "label_prefs.principles_per_pair=2",
    "train-rm": "train_rm.training.epochs=2",
    "optimize": "optimize.beta=0.2",
    "evaluate": "evaluate.limit=64",
}
FORCE = typer.Option(False, "--force", help="Redo the stage even if its output is complete, "
                     "replacing outputs made from another config.")
PUSH = typer.Option(None, "--push-to-hub", metavar="REPO_ID", show_default=False,
                    help="After the stage completes, upload its model to this Hugging Face hub "
                    "repository (created private if missing), with the token in HF_TOKEN. Only "
                    "this flag uploads: a config cannot.")
SHARD = typer.Option(None, "--shard", metavar="I/N", show_default=False,
                     help="Run only shard I of N (I from 0 to N-1): the I-th contiguous slice of "
                     "the prompts (generate-prompts: of its requests), as datasets' "
                     "Dataset.shard(N, I) cuts them. Shards run at once "
                     "as separate processes (a Slurm array, or & in a shell); the last one to "
                     "finish merges them into the stage's files (or `cai merge STAGE`).")


def _load(config: Path, overrides: Optional[List[str]]):
    from cai_cli.config import load_config

    return load_config(config, overrides or [])


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"cai_cli {version('cai_cli')}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
):
    """Options before the command; ``main`` reads ``--debug`` itself."""


def _writing(command: str, config, force: bool, work, shard=None) -> None:
    """Run ``work()`` holding the run directory's lock (a shard: shared with the other shards,
    and its own shard lock), with the right advice on Ctrl-C."""
    from cai_cli.run.lock import ShardLock, run_lock

    lock = (ShardLock(config.run_dir, command, shard.index, shard.count) if shard is not None
            else run_lock(config.run_dir, command))
    try:
        with lock:
            work()
    except KeyboardInterrupt:
        again = ("rerun the same command without --force to resume where it stopped" if force
                 else "rerun the same command to resume where it stopped")
        typer.echo(f"interrupted: {again}", err=True)
        raise typer.Exit(130) from None


def _stage_command(name: str, trains: bool, shardable: bool):
    """The command of one stage in the table of ``cai_cli.stages``."""
    SET = _set_option(SET_EXAMPLES.get(name, "generate_sl.num_revisions=3"))

    def run_one(config: Path, set_: Optional[List[str]], force: bool, push: Optional[str],
                shard: Optional[str] = None) -> None:
        from cai_cli.stages.pipeline import run_stage

        part = None
        if shard is not None:
            from cai_cli.run.shards import Shard

            part = Shard.parse(shard)
        loaded = _load(config, set_)
        _writing(name, loaded, force, lambda: run_stage(name, loaded, force=force, shard=part),
                 shard=part)
        if push:
            from cai_cli.commands.push import push_stage

            push_stage(loaded, name, push)

    if trains:
        def command(config: Path = CONFIG, set_: Optional[List[str]] = SET,
                    force: bool = FORCE, push: Optional[str] = PUSH):
            run_one(config, set_, force, push)
    elif shardable:
        def command(config: Path = CONFIG, set_: Optional[List[str]] = SET,
                    force: bool = FORCE, shard: Optional[str] = SHARD):
            run_one(config, set_, force, None, shard)
    else:
        def command(config: Path = CONFIG, set_: Optional[List[str]] = SET,
                    force: bool = FORCE):
            run_one(config, set_, force, None)
    return command


for _name, _stage in STAGES.items():
    app.command(_name, help=_stage.help)(_stage_command(_name, _stage.trains, _stage.shards))


@app.command("merge")
def merge(
    stage: str = typer.Argument(..., metavar="STAGE", help="generate-prompts, generate-sl, label-prefs or evaluate."),
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
):
    """Merge the complete shards of a stage run with --shard I/N into its files (the last shard
    to finish does this by itself); says which shards are missing otherwise."""
    from cai_cli.run.shards import merge_by_hand

    loaded = _load(config, set_)
    _writing("merge", loaded, False, lambda: merge_by_hand(loaded, stage))


@app.command("judge-check")
def judge_check(
    config: Path = CONFIG,
    set_: Optional[List[str]] = _set_option("judge_check.principles_per_pair=4"),
    pairs: Optional[str] = typer.Option(
        None, "--pairs", metavar="SOURCE", show_default=False,
        help="Labelled preference pairs to check the judge on: a .jsonl/.json/.csv/.parquet file "
        "or a dataset id, in TRL's preference format (prompt, chosen, rejected) or as HH "
        "chosen/rejected transcripts (default: judge_check.pairs, else the shipped set)."),
    force: bool = FORCE,
):
    """Measure the feedback model as a judge on pairs whose better answer is known: agreement,
    per principle, position bias, calibration and the cost of labelling the configured run."""
    from cai_cli.stages.judge_check import run as check

    loaded = _load(config, set_)
    _writing("judge-check", loaded, force, lambda: check(loaded, pairs=pairs, force=force))


@app.command("run")
def run(
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    first: Optional[str] = typer.Option(None, "--from", metavar="STAGE", help="First stage to run (e.g. finetune)."),
    last: Optional[str] = typer.Option(None, "--to", metavar="STAGE", help="Last stage to run (e.g. label-prefs)."),
    force: bool = typer.Option(False, "--force", help="Rerun the selected stages even if fresh."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print what would run and an estimate "
                                 "of its time (`cai plan`) instead of running."),
):
    """Run the stages in order, skipping those whose output is fresh for this config."""
    from cai_cli.stages.pipeline import run_pipeline

    loaded = _load(config, set_)
    if dry_run:
        from cai_cli.commands.plan import print_plan

        return print_plan(loaded, first=first, last=last, force=force)
    _writing("run", loaded, force,
             lambda: run_pipeline(loaded, first=first, last=last, force=force))


@app.command("plan")
def plan(
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    first: Optional[str] = typer.Option(None, "--from", metavar="STAGE",
                                        help="First stage to plan."),
    last: Optional[str] = typer.Option(None, "--to", metavar="STAGE", help="Last stage to plan."),
    force: bool = typer.Option(False, "--force", help="Plan every selected stage, even if fresh."),
    assume: Optional[List[str]] = typer.Option(
        None, "--assume", metavar="KEY=VALUE", show_default=False,
        help="Change an assumption of the estimate, e.g. --assume device=h100 or --assume "
        "params.policy=1.5e9 (repeatable; the plan lists them all)."),
    calibrate: bool = typer.Option(False, "--calibrate", help="Load the models and time a few "
                                   "real batches and a training step, then estimate from those."),
    as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
):
    """What `cai run` would do and about how long it would take: prompts, generations, tokens,
    training steps and time per stage, with the assumptions; loads no weights, writes nothing."""
    from cai_cli.commands.plan import print_plan

    print_plan(_load(config, set_), first=first, last=last, force=force, assume=assume or [],
               calibrate_now=calibrate, as_json=as_json)


@app.command("status")
def status(config: Path = CONFIG, set_: Optional[List[str]] = SET):
    """Table of stages: done / partial / stale / missing, counts, time taken, artifact path."""
    from cai_cli.stages.pipeline import print_status

    print_status(_load(config, set_))


@app.command("report")
def report(
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="PATH",
                                          help="Markdown file to write (default: "
                                          "<run_dir>/report.md)."),
):
    """One Markdown page about the run: each stage's figures and plots, example critiques and
    preference pairs, judge-check and the evaluation's tables and verdict."""
    from cai_cli.commands.report import write_report

    write_report(_load(config, set_), output)


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="A run directory, or a chains.jsonl, pairs.jsonl or prompts/red_team.jsonl file."),
    id: Optional[str] = typer.Option(None, "--id", metavar="ID", help="Show the record with this id."),
    index: Optional[int] = typer.Option(None, "--index", metavar="N", help="Show the record at this position (0-based)."),
    principle: Optional[str] = typer.Option(None, "--principle", metavar="ID", help="Keep records that use this principle id."),
    grep: Optional[str] = typer.Option(None, "--grep", metavar="TEXT", help="Keep records whose text contains this (case-insensitive)."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="Show at most this many records."),
):
    """Read the generated critiques, revisions and preference pairs in the terminal."""
    from cai_cli.commands.inspect import run_inspect

    run_inspect(path, record_id=id, index=index, principle=principle, grep=grep, limit=limit)


@app.command("init")
def init(
    directory: Path = typer.Argument(..., metavar="DIR", help="Directory to write the files to (created if missing)."),
    model: str = typer.Option("HuggingFaceTB/SmolLM2-135M-Instruct", "--model", metavar="NAME_OR_PATH",
                              help="The helpful-only model the config names (a hub id or a local directory)."),
    force: bool = typer.Option(False, "--force", help="Overwrite files of an earlier init."),
):
    """Write a starter config, the constitution and sample prompts into DIR, to edit and run."""
    from cai_cli.commands.init import write_starter

    write_starter(directory, model=model, force=force)


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Directory to write the model and tokenizer to."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights."),
    hidden_size: int = typer.Option(256, "--hidden-size", help="Width of the model."),
    layers: int = typer.Option(4, "--layers", help="Number of decoder layers."),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="Tokenizer vocabulary size."),
):
    """Build a small random Llama-style model with a tokenizer and chat template (offline)."""
    from cai_cli.commands.tiny_model import build_tiny_model

    build_tiny_model(out_dir, seed=seed, hidden_size=hidden_size, layers=layers, vocab_size=vocab_size)


@app.command("import-gguf")
def import_gguf(
    gguf_file: Path = typer.Argument(..., metavar="FILE", help="A .gguf model file (llama.cpp's format)."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Directory to write the model to."),
    dtype: str = typer.Option("float32", "--dtype", help="Weight type to store: float32, bfloat16 or float16."),
):
    """Turn a GGUF file into a model directory (safetensors, tokenizer, chat template), offline."""
    from cai_cli.commands.import_gguf import import_gguf as run_import

    run_import(gguf_file, out_dir, dtype=dtype)


@config_app.command("validate")
def config_validate(config: Path = CONFIG, set_: Optional[List[str]] = SET):
    """Check a config (schema, constitution, prompt source) without running anything."""
    from cai_cli.commands.validate import check_config

    check_config(_load(config, set_))


@config_app.command("show")
def config_show(config: Path = CONFIG, set_: Optional[List[str]] = SET):
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from cai_cli.config import dump_config

    typer.echo(dump_config(_load(config, set_)), nl=False)


@config_app.command("keys")
def config_keys(
    section: Optional[str] = typer.Argument(None, metavar="SECTION",
                                            help="Only keys under this dotted prefix, e.g. finetune."),
    markdown: bool = typer.Option(False, "--markdown", help="A Markdown table (the one in docs/config.md)."),
):
    """Every config key with its default and meaning, from the schema's own field docs."""
    from cai_cli.config import print_keys

    print_keys(section, markdown=markdown)


@config_app.command("schema")
def config_schema():
    """The config's JSON schema, for editors such as the YAML language server."""
    import json

    from cai_cli.config import Config

    typer.echo(json.dumps(Config.model_json_schema(), indent=2))


def main() -> None:
    debug = "--debug" in sys.argv[1:]
    try:
        app()
    except UserError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except OSError as exc:
        # The disk, not the program: full, read-only or not ours. Finished artifacts are never
        # half-written (atomic renames), so fixing this and rerunning resumes.
        if exc.errno not in USER_OS_ERRORS or debug:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        typer.echo(f"error: {exc.strerror}{where}: free space or fix the permissions, then rerun "
                   "the same command (it resumes where it stopped)", err=True)
        sys.exit(2)
