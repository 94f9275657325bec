"""``cai plan``: what a run will do and roughly how long it will take, before it starts.

For each stage that would run (as ``cai run`` decides; ``--from``, ``--to`` and ``--force`` as
there), the stage itself says what it will do: its ``work`` (``Stage.work``, read from the same
helpers its ``run`` uses) lists every engine call with its prompts rendered as the engine will
render them, the model-written parts at their ``max_new_tokens`` bound, and every training run
with its examples' lengths. This module only prices that list: prompt tokens (a prefix the rows
of a batch share counted once), generated tokens, training tokens and optimiser steps, in
seconds on the assumed devices. It reads no weights: a model's size comes from its
``config.json`` and the JSON headers of its safetensors files (``engines.sizes``).

Time is a roofline-style estimate (``commands.costs``); every figure it rests on is printed,
and can be changed with ``--assume KEY=VALUE``.
``--calibrate`` loads the models and times real batches (a generation, a scoring pass, a training
step) with the configured engines, and scales the device figures to what it measured; it prints
them as ``--assume`` options to reuse, and writes nothing.

Only the tokenizer is loaded (transformers), never weights, unless ``--calibrate``; hub models
and datasets are read from the local cache only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from cai_cli import ui
from cai_cli.commands.costs import Assumptions, Planner, StagePlan, human
from cai_cli.config import Config
from cai_cli.stages.planning import WorkContext


@dataclass
class Plan:
    run_dir: str
    stages: list[StagePlan]
    assumptions: list[str]
    calibration: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.cost.total for s in self.stages if s.runs)

    def to_json(self) -> dict:
        return {"run_dir": self.run_dir, "stages": [s.to_json() for s in self.stages],
                "total_seconds": round(self.seconds, 1), "assumptions": self.assumptions,
                "calibration": self.calibration}


def build_plan(config: Config, *, first: str | None = None, last: str | None = None,
               force: bool = False, assume: Sequence[str] = (),
               calibrate_now: bool = False) -> Plan:
    """The plan of ``cai run`` with these options; reads nothing but the data, the tokenizers,
    model configs and the run directory's manifests (and with ``calibrate_now``, the models)."""
    from cai_cli.stages.pipeline import select, statuses

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # plan never downloads
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    assumptions = Assumptions(assume)
    selected = select(first, last, config)
    states = {s.name: s for s in statuses(config)}
    running = {name for name in selected if force or states[name].state != "done"}
    ctx = WorkContext(config, running, prompt_tokens=int(assumptions["prompt_tokens"]))
    planner = Planner(config, assumptions, ctx)
    stages = []
    for name in selected:
        status = states[name]
        why = ("--force" if force else f"{status.state}: {status.reason}") if name in running \
            else "up to date, skipped"
        stages.append(StagePlan(name, name in running, why))
    calibration = []
    if calibrate_now:
        from cai_cli.commands.calibrate import calibrate

        calibration = calibrate(planner)
    for stage in stages:
        if stage.runs:
            planner.stage(stage, ctx.work(stage.name))
    lines = planner.lines()
    lines.append(f"generated tokens: max_new_tokens x {assumptions['answer_fraction']:g} "
                 "(answer_fraction): an upper bound, as decoding runs until every row of a batch "
                 "stops")
    lines.append("prompt tokens: the conversations rendered with the chat template, each "
                 "model-written part at its max_new_tokens bound; a prefix the rows of a batch "
                 "share (worked examples, system prompt) is computed once")
    lines.append(f"fixed costs: {assumptions['load_s']:.3g} s + 1 s a GB to load a model "
                 f"(load_s), {assumptions['trainer_setup_s']:.3g} s + 1 s a GB to set up a "
                 "training stage and save its model (trainer_setup_s), vLLM start-up "
                 f"{assumptions['engine_start_s']:.3g} s (engine_start_s)")
    if assumptions.given:
        lines.append("given or measured: " + ", ".join(
            f"{k}={_short(assumptions[k])}" for k in sorted(assumptions.given)))
    return Plan(config.run_dir, stages, lines, calibration)


def print_plan(config: Config, *, first: str | None = None, last: str | None = None,
               force: bool = False, assume: Sequence[str] = (), calibrate_now: bool = False,
               as_json: bool = False) -> None:
    plan = build_plan(config, first=first, last=last, force=force, assume=assume,
                      calibrate_now=calibrate_now)
    if as_json:
        print(json.dumps(plan.to_json(), indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE, title=f"plan for {config.run_dir}", title_justify="left")
    table.add_column("stage", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("prompt\ntokens", justify="right", no_wrap=True)
    table.add_column("generated\ntokens ≤", justify="right", no_wrap=True)
    table.add_column("trained\ntokens", justify="right", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("time in", ratio=1)
    for stage in plan.stages:
        if not stage.runs:
            table.add_row(stage.name, "", "", "", "", "", f"[dim]{stage.why}[/]")
            continue
        parts = sorted(((getattr(stage.cost, name), name) for name in
                        ("load", "setup", "prefill", "decode", "train")), reverse=True)
        split = ", ".join(f"{name} {ui.duration(sec)}" for sec, name in parts if sec >= 0.5)
        tally = stage.tally
        table.add_row(stage.name, ui.duration(stage.cost.total), _count(tally.prompt_tokens),
                      _count(tally.generated_tokens), _count(tally.train_tokens),
                      _count(stage.steps), split)
    table.add_row("[bold]total[/]", f"[bold]{ui.duration(plan.seconds)}[/]", "", "", "", "", "")
    ui.stdout.print(table)
    if not any(stage.runs for stage in plan.stages):
        ui.stdout.print("Work: none, every stage is up to date (--force plans them again)",
                        markup=False)
    else:
        ui.stdout.print("Work:", markup=False)
    for stage in plan.stages:
        if stage.runs:
            work = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in stage.counts.items())
            notes = f" ({'; '.join(stage.notes)})" if stage.notes else ""
            ui.stdout.print(f"  - {stage.name}: {work}{notes}", markup=False, soft_wrap=True)
    ui.stdout.print("Assumptions (change any with --assume KEY=VALUE):", markup=False)
    for line in plan.assumptions:
        ui.stdout.print(f"  - {line}", markup=False, soft_wrap=True)
    if plan.calibration:
        ui.stdout.print("Calibration (measured here, now):", markup=False)
        for line in plan.calibration:
            ui.stdout.print(f"  - {line}", markup=False, soft_wrap=True)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _count(value: int) -> str:
    if not value:
        return ""
    return human(value) if value >= 10_000 else f"{value:,}"

