"""Terminal output for stages: one stderr console, warnings, and the progress bar.

Stages print progress and messages to stderr, so stdout stays clean for data (``config show``).
"""

from __future__ import annotations

import os
import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

from cai_cli.errors import scrub



class _Trimmed:
    """Standard output without the spaces rich pads each line with to the console width, so a
    piped ``inspect`` or ``status`` is plain text. Looks ``sys.stdout`` up at each write (tests
    replace it)."""

    def __init__(self) -> None:
        self._pending = ""

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            sys.stdout.write(line.rstrip(" ") + "\n")
        return len(text)

    def flush(self) -> None:
        if self._pending.endswith(" "):  # an unfinished line: wait for the rest
            return
        sys.stdout.write(self._pending)
        self._pending = ""
        sys.stdout.flush()

    def isatty(self) -> bool:
        return sys.stdout.isatty()

    def fileno(self) -> int:
        return sys.stdout.fileno()

    @property
    def encoding(self) -> str:
        return getattr(sys.stdout, "encoding", "utf-8") or "utf-8"


class _Console(Console):
    def on_broken_pipe(self) -> None:
        """rich exits 1 when its reader has gone; the command decides instead (``cai plan |
        head`` has done its job: exit 0; a stage stopped: see ``commands.stage``)."""
        self.quiet = True
        raise BrokenPipeError("the reader of cai's output has closed it")


# Under torchrun / accelerate launch every process runs the same stage: only the main one
# (global rank 0) prints, or each line would appear once per process. Errors still come from
# every process (the command line prints them).
console = _Console(stderr=True, highlight=False,
                   quiet=os.environ.get("RANK", "0").strip() not in ("", "0"))
# Reports the user may pipe: tables, inspect. Piped, rich would assume 80 columns; lines are
# trimmed anyway, so a wider page keeps tables readable (COLUMNS still decides when set).
_PIPED_WIDTH = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 120
stdout = _Console(file=_Trimmed(), highlight=False, width=_PIPED_WIDTH)


def shell(path) -> str:
    """``path`` as a shell reads it back, for a command a message suggests (``cai inspect
    'runs/my run'``): quoted when it holds spaces or other characters a shell would take."""
    import shlex

    return shlex.quote(str(path))


def reader_gone() -> bool:
    """Whether standard output or error is a pipe whose reader has closed it (``| head``):
    what a ``BrokenPipeError`` then means. poll() reports POLLERR on such a pipe."""
    import select

    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            if any(events & select.POLLERR for _, events in poller.poll(0)):
                return True
        except (AttributeError, OSError, ValueError):  # no poll, or no such stream
            continue
    return False


# Characters a terminal or a pipe must not get from model text: C0 and C1 controls (NUL, ESC,
# which starts colour and cursor sequences) but tab and newline. A model writes any byte.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with line breaks as ``\\n`` and every other control character shown as U+FFFD
    (the replacement character), as ``cai inspect`` and ``cai report`` show model text."""
    return CONTROL.sub("\ufffd", text.replace("\r\n", "\n").replace("\r", "\n"))


def duration(seconds: float) -> str:
    """``m:ss``, or ``h:mm:ss`` from an hour: the time column of status and plan."""
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def info(message: str) -> None:
    console.print(scrub(str(message)), soft_wrap=True, markup=False)


def warn(message: str) -> None:
    console.print("warning:", scrub(str(message)), style="yellow", soft_wrap=True, markup=False)


@contextmanager
def warnings_to(log: Path, source: str) -> Iterator[None]:
    """Python warnings raised while the body runs go to the file ``log`` (appended, created
    when the first one comes), not the terminal: the libraries' notices (torch's ``pin_memory``
    one in every training stage on a CPU) are for their developers, and the terminal keeps
    what the user acts on (``warn``). Each line says when, from which ``source`` (the stage),
    what and where."""
    import warnings

    def record(message, category, filename, lineno, file=None, line=None) -> None:
        text = warnings.formatwarning(message, category, filename, lineno, line)
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            with log.open("a", encoding="utf-8") as out:
                out.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {source}: {scrub(text)}")
        except OSError:
            pass  # a warning is never worth failing a stage

    with warnings.catch_warnings():
        warnings.showwarning = record
        yield


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
