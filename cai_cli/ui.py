"""Terminal output for stages: one stderr console, warnings, and the progress bar.

Stages print progress and messages to stderr, so stdout stays clean for data (``config show``).
"""

from __future__ import annotations

import os

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

# Under torchrun / accelerate launch every process runs the same stage: only the main one
# (global rank 0) prints, or each line would appear once per process. Errors still come from
# every process (the command line prints them).
console = Console(stderr=True, highlight=False,
                  quiet=os.environ.get("RANK", "0").strip() not in ("", "0"))
stdout = Console(highlight=False)  # for reports the user may pipe: status tables


def info(message: str) -> None:
    console.print(message, soft_wrap=True, markup=False)


def warn(message: str) -> None:
    console.print("warning:", message, style="yellow", soft_wrap=True, markup=False)


def progress(*extra_columns: TextColumn) -> Progress:
    """A progress bar: description, bar, done/total, extra columns, elapsed and ETA.

    On a terminal it redraws in place; in a log (not a terminal) rich prints it once at the end.
    """
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
    )
