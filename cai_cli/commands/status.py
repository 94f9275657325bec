"""``cai status``: a table of the stages of a run directory, each done / partial / stale /
missing / off, with its counts, time and artifact, and the plots each stage drew.

No heavy imports: it must answer in well under a second.
"""

from __future__ import annotations

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.stages.pipeline import statuses


def print_status(config: Config) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

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
    # The title on a line of its own, left for the terminal to wrap: as a table title rich
    # would break a long run directory at the table's width.
    ui.stdout.print(Text(title), soft_wrap=True)
    table = Table(box=box.SIMPLE)
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
        ui.stdout.print("plots (PNG):")
        for line in lines:
            ui.stdout.print(line)
        ui.stdout.print(Text(f"  all on one page: cai report {ui.shell(config.run_dir)}"),
                        soft_wrap=True)
