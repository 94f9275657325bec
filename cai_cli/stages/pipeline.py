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
from cai_cli.run import dist
from cai_cli.config import Config
from cai_cli.errors import UserError
from cai_cli.stages import STAGES, stage_module
from cai_cli.stages.common import StageSpec


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
    for name in STAGES:
        spec = stage_module(name).spec(config)
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
        rerun = [stage for stage in spec.after if stage in will_run]
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
        module = stage_module(name)
        spec = module.spec(config)  # recomputed: an earlier stage may just have rewritten inputs
        state = spec.state()
        if state == "done" and not force:
            continue
        ui.info(f"── {name} " + "─" * max(0, 60 - len(name)))
        # A stale stage is the point of `cai run`: replace it. A partial one resumes.
        module.run(config, force=force or state == "stale")


def run_stage(name: str, config: Config, *, force: bool = False, shard=None) -> None:
    """One stage command (``cai generate-sl`` ...): refused under several processes unless it
    trains, checked up front like ``cai run`` does, then run (with ``shard``, one shard of it:
    ``cai_cli.run.shards``)."""
    check_ranks([name])
    check_before_running(config, [name])
    if shard is None:
        stage_module(name).run(config, force=force)
    else:
        stage_module(name).run(config, force=force, shard=shard)


def check_ranks(names: list[str]) -> None:
    """Generation, labelling and evaluation run in one process; only training stages may run
    under torchrun / accelerate launch."""
    single = [name for name in names if not STAGES[name].trains]
    if single:
        dist.refuse_multiprocess(", ".join(single))


def check_before_running(config: Config, names: list[str]) -> None:
    """What can fail hours later but be known now (trainer arguments, trackers), for every stage
    about to run, before the first one starts."""
    from cai_cli.commands.validate import training_problems

    problems = training_problems(config, names)
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise UserError(f"config is not ready to run: {count}:\n"
                        + "\n".join(f"  - {p}" for p in problems))


def print_status(config: Config) -> None:
    from rich import box
    from rich.table import Table

    colours = {"done": "green", "partial": "yellow", "stale": "magenta", "missing": "red",
               "off": "dim"}
    from cai_cli.run.lock import describe, holder

    title = f"run directory: {config.run_dir}"
    writer = holder(config.run_dir)
    if writer and writer.get("live") is not False:
        title += f"  (in use: {describe(writer)})"
    from cai_cli.run.lock import shard_holders

    shards = shard_holders(config.run_dir)
    if shards:
        title += f"  ({len(shards)} shard{'s' if len(shards) > 1 else ''} running: " \
            + ", ".join(f"{r['command']} {r.get('shard')} (pid {r['pid']})" for r in shards) + ")"
    table = Table(box=box.SIMPLE, title=title, title_justify="left")
    # Stage names and states never shrink; long paths and details wrap instead.
    table.add_column("stage", no_wrap=True, min_width=11)
    table.add_column("state", no_wrap=True, min_width=7)
    table.add_column("time", no_wrap=True, justify="right")
    table.add_column("artifact", no_wrap=True)  # relative to the run directory
    table.add_column("details", overflow="fold", ratio=1)
    found = statuses(config)
    for status in found:
        if status.state == "off":
            continue  # an optional stage never run: not part of this run directory
        manifest = status.spec.manifest() or {}
        counts = describe_counts(manifest)
        seconds = (manifest.get("timings") or {}).get("seconds")
        took = "" if seconds is None or status.state == "missing" else ui.duration(seconds)
        details = "; ".join(part for part in (status.reason, counts) if part)
        table.add_row(status.name, f"[{colours[status.state]}]{status.state}[/]", took,
                      f"{status.spec.directory.name}/", details)
    ui.stdout.print(table)
    print_plots(config, [status.name for status in found] + ["judge-check"])


def describe_counts(manifest: dict) -> str:
    """A manifest's counts in words: ``8 prompts, 8 chains, 16 rounds``."""
    return ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in (manifest.get("counts") or {}).items())


def print_plots(config: Config, commands: list[str]) -> None:
    """Each stage's plot files, one line a stage: its plots folder (relative to the run
    directory; the table's artifact column names the stage's folder) and the files. A line
    starts with the folder, not the stage, so the table's rows stay the only ones that do."""
    from rich.text import Text

    from cai_cli.reports.plots import listed

    lines = []
    for command in commands:
        files = listed(config, command)
        if files:
            folder = files[0].parent.relative_to(config.layout.root).as_posix() + "/"
            lines.append(Text(f"  {folder:<15} " + ", ".join(f.name for f in files)))
    if lines:
        ui.stdout.print("plots (PNG; `cai report --config ...` puts them on one page):")
        for line in lines:
            ui.stdout.print(line)
