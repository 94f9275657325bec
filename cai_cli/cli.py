"""The ``cai`` command: parse arguments, load the config, call a stage's ``run``. Nothing else.

Heavy libraries are imported by the stages themselves, so ``cai --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from cai_cli.errors import UserError

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

_state = {"debug": False}

CONFIG = typer.Option(..., "--config", "-c", metavar="FILE", help="YAML config file.", show_default=False)
SET = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a config key by dotted path, e.g. "
                   "--set generate_sl.num_revisions=3 (repeatable).", show_default=False)
FORCE = typer.Option(False, "--force", help="Redo the stage even if its output is complete, "
                     "replacing outputs made from another config.")


def _load(config: Path, overrides: Optional[List[str]]):
    from cai_cli.config import load_config

    return load_config(config, overrides or [])


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks for user errors.")):
    _state["debug"] = debug


@app.command("generate-sl")
def generate_sl(config: Path = CONFIG, set_: Optional[List[str]] = SET, force: bool = FORCE):
    """SL-CAI: answer red-team prompts, critique and revise each answer against principles."""
    from cai_cli.stages import generate_sl as stage

    stage.run(_load(config, set_), force=force)


@app.command("finetune")
def finetune(config: Path = CONFIG, set_: Optional[List[str]] = SET, force: bool = FORCE):
    """Supervised fine-tuning on the SL-CAI revisions (TRL SFTTrainer, full or LoRA)."""
    from cai_cli.stages import finetune as stage

    stage.run(_load(config, set_), force=force)


@app.command("label-prefs")
def label_prefs(config: Path = CONFIG, set_: Optional[List[str]] = SET, force: bool = FORCE):
    """RLAIF labels: sample answer pairs, score them with the feedback model's option probabilities."""
    from cai_cli.stages import label_prefs as stage

    stage.run(_load(config, set_), force=force)


@app.command("train-rm")
def train_rm(config: Path = CONFIG, set_: Optional[List[str]] = SET, force: bool = FORCE):
    """Train the reward model on the AI-labelled pairs (TRL RewardTrainer, soft labels)."""
    from cai_cli.stages import train_rm as stage

    stage.run(_load(config, set_), force=force)


@app.command("optimize")
def optimize(config: Path = CONFIG, set_: Optional[List[str]] = SET, force: bool = FORCE):
    """Optimise the policy: DPO on the pairs, or GRPO / RLOO against the reward model."""
    from cai_cli.stages import optimize as stage

    stage.run(_load(config, set_), force=force)


@app.command("evaluate")
def evaluate(config: Path = CONFIG, set_: Optional[List[str]] = SET, force: bool = FORCE):
    """Compare models head to head with the feedback model and the reward model."""
    from cai_cli.stages import evaluate as stage

    stage.run(_load(config, set_), force=force)


@app.command("run")
def run(
    config: Path = CONFIG,
    set_: Optional[List[str]] = SET,
    first: Optional[str] = typer.Option(None, "--from", metavar="STAGE", help="First stage to run (e.g. finetune)."),
    last: Optional[str] = typer.Option(None, "--to", metavar="STAGE", help="Last stage to run (e.g. label-prefs)."),
    force: bool = typer.Option(False, "--force", help="Rerun the selected stages even if fresh."),
):
    """Run the stages in order, skipping those whose output is fresh for this config."""
    from cai_cli.pipeline import run_pipeline

    run_pipeline(_load(config, set_), first=first, last=last, force=force)


@app.command("status")
def status(config: Path = CONFIG, set_: Optional[List[str]] = SET):
    """Table of stages: done / partial / stale / missing, counts, time taken, artifact path."""
    from cai_cli.pipeline import print_status

    print_status(_load(config, set_))


@app.command("inspect")
def inspect(
    path: Path = typer.Argument(..., metavar="PATH", help="A run directory, or a chains.jsonl / pairs.jsonl file."),
    id: Optional[str] = typer.Option(None, "--id", metavar="ID", help="Show the record with this id."),
    index: Optional[int] = typer.Option(None, "--index", metavar="N", help="Show the record at this position (0-based)."),
    principle: Optional[str] = typer.Option(None, "--principle", metavar="ID", help="Keep records that use this principle id."),
    grep: Optional[str] = typer.Option(None, "--grep", metavar="TEXT", help="Keep records whose text contains this (case-insensitive)."),
    limit: Optional[int] = typer.Option(None, "--limit", metavar="N", help="Show at most this many records."),
):
    """Read the generated critiques, revisions and preference pairs in the terminal."""
    from cai_cli.inspect import run_inspect

    run_inspect(path, record_id=id, index=index, principle=principle, grep=grep, limit=limit)


@app.command("tiny-model")
def tiny_model(
    out_dir: Path = typer.Argument(..., help="Directory to write the model and tokenizer to."),
    seed: int = typer.Option(0, "--seed", help="Seed for the random weights."),
    hidden_size: int = typer.Option(256, "--hidden-size", help="Width of the model."),
    layers: int = typer.Option(4, "--layers", help="Number of decoder layers."),
    vocab_size: int = typer.Option(2048, "--vocab-size", help="Tokenizer vocabulary size."),
):
    """Build a small random Llama-style model with a tokenizer and chat template (offline)."""
    from cai_cli.tiny_model import build_tiny_model

    build_tiny_model(out_dir, seed=seed, hidden_size=hidden_size, layers=layers, vocab_size=vocab_size)


@app.command("import-gguf")
def import_gguf(
    gguf_file: Path = typer.Argument(..., metavar="FILE", help="A .gguf model file (llama.cpp's format)."),
    out_dir: Path = typer.Argument(..., metavar="OUT_DIR", help="Directory to write the model to."),
    dtype: str = typer.Option("float32", "--dtype", help="Weight type to store: float32, bfloat16 or float16."),
):
    """Turn a GGUF file into a model directory (safetensors, tokenizer, chat template), offline."""
    from cai_cli.gguf import import_gguf as run_import

    run_import(gguf_file, out_dir, dtype=dtype)


@config_app.command("validate")
def config_validate(config: Path = CONFIG, set_: Optional[List[str]] = SET):
    """Check a config (schema, constitution, prompt source) without running anything."""
    from cai_cli.preflight import check_config

    check_config(_load(config, set_))


@config_app.command("show")
def config_show(config: Path = CONFIG, set_: Optional[List[str]] = SET):
    """Print the resolved config (defaults filled in, overrides applied) as YAML."""
    from cai_cli.config import dump_config

    typer.echo(dump_config(_load(config, set_)), nl=False)


def main() -> None:
    try:
        app()
    except UserError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted: rerun the same command to resume where it stopped", err=True)
        sys.exit(130)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into a silent exit 130
            typer.echo("interrupted: rerun the same command to resume where it stopped", err=True)
        raise
