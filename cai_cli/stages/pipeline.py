"""``cai run`` and ``cai status``: the stages in order, which are fresh, which must run.

A stage is fresh ("done") when its manifest says complete and was made from the settings and
input fingerprints the current config gives (``StageSpec.state``). Inputs include the outputs of
earlier stages, so a stage rerun with new output makes the stages after it stale in turn; before
anything runs, every stage after one that will run is reported as stale too.

No heavy imports: ``cai status`` must answer in well under a second.
"""

from __future__ import annotations

from dataclasses import dataclass

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.errors import UserError
from cai_cli.run import dist
from cai_cli.run.spec import StageSpec
from cai_cli.stages.base import Stage
from cai_cli.stages.common import draw_pending_plots
from cai_cli.stages.evaluate import Evaluate
from cai_cli.stages.finetune import Finetune
from cai_cli.stages.generate_prompts import GeneratePrompts
from cai_cli.stages.generate_sl import GenerateSL
from cai_cli.stages.label_prefs import LabelPrefs
from cai_cli.stages.optimize import Optimize
from cai_cli.stages.train_rm import TrainRM

# Every stage, in pipeline order (the order of run.layout.STAGE_DIRS).
STAGES: dict[str, Stage] = {stage.command: stage for stage in (
    GeneratePrompts(), GenerateSL(), Finetune(), LabelPrefs(), TrainRM(), Optimize(), Evaluate())}


@dataclass
class StageStatus:
    name: str
    spec: StageSpec
    state: str  # missing / partial / done / stale; off: an optional stage not in cai run
    reason: str  # why it is not done, for the plan


def statuses(config: Config) -> list[StageStatus]:
    """Every stage's state; a stage that reads the output of one that will run is stale."""
    out: list[StageStatus] = []
    will_run: set[str] = set()
    for name, stage in STAGES.items():
        spec = stage.spec(config)
        state = spec.state()
        reason = ""
        if state == "stale":
            reason = "changed: " + spec.describe_changes(4)
        elif state == "partial":
            own = spec.manifest()
            sharded = None if own and own.get("config_hash") == spec.fingerprint else spec.sharded()
            reason = sharded or "interrupted: resumes where it stopped"
        elif state == "missing":
            reason = "not run yet"
        rerun = [need.stage.command for need in stage.needs(config)
                 if need.stage.command in will_run]
        if rerun and state == "done":
            state, reason = "stale", f"reads the output of {rerun[0]}, which will run"
        off = name == OPTIONAL and not config.generate_prompts.enabled
        if off and state == "missing":  # not part of cai run, and never run
            state, reason = "off", "not in cai run: generate_prompts.enabled is false"
        if state != "done" and not off:
            will_run.add(name)
        out.append(StageStatus(name, spec, state, reason))
    return out


# Not part of `cai run` unless its section enables it, or --from names it.
OPTIONAL = "generate-prompts"


def select(first: str | None, last: str | None, config: Config | None = None) -> list[str]:
    names = list(STAGES)
    if config is not None and not config.generate_prompts.enabled and first != OPTIONAL:
        names.remove(OPTIONAL)
    for value, flag in ((first, "--from"), (last, "--to")):
        if value is not None and value not in STAGES:
            raise UserError(f"{flag} {value}: unknown stage; stages in order: {', '.join(names)}")
    start = names.index(first) if first else 0
    stop = names.index(last) + 1 if last else len(names)
    if start >= stop:
        raise UserError(f"--from {first} comes after --to {last}; stages in order: {', '.join(names)}")
    return names[start:stop]


def run_pipeline(config: Config, *, first: str | None = None, last: str | None = None,
                 force: bool = False) -> None:
    """Run the selected stages in order, skipping those that are fresh (all, with ``force``)."""
    selected = select(first, last, config)
    plan = {s.name: s for s in statuses(config)}
    will_run = [name for name in selected if force or plan[name].state != "done"]
    check_ranks(will_run)
    check_before_running(config, will_run)
    for name in selected:
        status = plan[name]
        if force:
            ui.info(f"{name:12} will run (--force)")
        elif status.state == "done":
            ui.info(f"{name:12} up to date, skipped")
        else:
            ui.info(f"{name:12} will run ({status.state}: {status.reason})")
    ui.info("")

    for name in selected:
        stage = STAGES[name]
        spec = stage.spec(config)  # recomputed: an earlier stage may just have rewritten inputs
        state = spec.state()
        if state == "done" and not force:
            draw_pending_plots(config, name)
            continue
        ui.info(f"── {name} " + "─" * max(0, 60 - len(name)))
        # A stale stage is the point of `cai run`: replace it. A partial one resumes.
        with ui.warnings_to(config.layout.warnings_log, name):
            stage.run(config, force=force or state == "stale")


def run_stage(stage: Stage, config: Config, *, force: bool = False, shard=None) -> None:
    """One stage command (``cai generate-sl`` ..., ``cai judge-check``): refused under several
    processes unless it trains, checked up front like ``cai run`` does, then run (with
    ``shard``, one shard of it: ``cai_cli.stages.sharded``)."""
    if not stage.trains:
        dist.refuse_multiprocess(stage.command)
    if stage.command in STAGES:
        check_before_running(config, [stage.command])
    with ui.warnings_to(config.layout.warnings_log, stage.command):
        stage.run(config, force=force, shard=shard)


def check_ranks(names: list[str]) -> None:
    """Generation, labelling and evaluation run in one process; only training stages may run
    under torchrun / accelerate launch."""
    single = [name for name in names if not STAGES[name].trains]
    if single:
        dist.refuse_multiprocess(", ".join(single))


def check_before_running(config: Config, names: list[str]) -> None:
    """What can fail hours later but be known now (trainer arguments, trackers), for every stage
    about to run, before the first one starts."""
    problems = training_problems(config, names)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise UserError(f"config is not ready to run: {count}:\n"
                        + "\n".join(f"  - {p}" for p in problems))


def training_problems(config: Config, names: list[str]) -> list[str]:
    """Build the trainer arguments of every training stage in ``names`` (unknown ``trl_args``,
    values TRL rejects, GRPO / RLOO batch divisibility, trackers that are not installed), and
    check the trackers of the other stages: what would otherwise fail only once the stage
    starts, maybe hours into ``cai run``."""
    from cai_cli.stages import trackers

    problems = []
    for name in names:
        if STAGES[name].trains:
            try:
                STAGES[name].preflight(config)
            except UserError as exc:
                problems.append(f"{name}: {exc}")
        else:
            problems += [f"{name}: {problem}" for problem in trackers.stage_problems(config, name)]
    return problems
