"""How the command table reads and ends: the typer app whose usage lines and command list read
as click prints them, whose stage commands end their ``--help`` with examples, and whose
commands end with exit 0 when their reader stops reading (``cai plan | head -2``)."""

from __future__ import annotations

import os
import re
import sys

import typer
from typer.core import TyperCommand, TyperGroup


class Commands(TyperGroup):
    """The command group, except that a reader who stops reading (``cai plan | head -2``) ends
    the command with exit 0, as it has what it wanted (click exits 1 there, saying nothing); a
    broken pipe that is not standard output's (a server's socket) is an internal failure."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            from cai_cli import ui

            if not ui.reader_gone():
                raise
            # Python flushes standard output once more at exit: into nothing now, quietly.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None



# How the table is shown: usage lines and the list of commands as click prints them, and the
# examples that end each command's --help.

class Command(TyperCommand):
    """A command as click shows it: usage lines name the arguments (``DIR``, ``[RUN_DIR]``),
    and the list of commands gives each one's whole first sentence, never cut with "..."."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                pieces += param.get_usage_pieces(ctx)
                continue
            name = param.metavar or (param.name or "").upper()
            name = name if param.required else f"[{name}]"
            pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces

    def get_short_help_str(self, limit: int = 45) -> str:
        return first_sentence(self.short_help or self.help or "")


def first_sentence(text: str) -> str:
    """The first sentence of a command's help: up to the first full stop that ends a word."""
    words = " ".join(text.split("\n\n")[0].split())
    found = re.match(r"(.+?\.)(?=\s|$)", words)
    return found.group(1) if found else words


class App(typer.Typer):
    """``typer.Typer`` whose commands are ``Command`` s, in a ``Commands`` group."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("cls", Commands)
        super().__init__(*args, **kwargs)

    def command(self, *args, **kwargs):
        kwargs.setdefault("cls", Command)
        return super().command(*args, **kwargs)


def examples(*commands: str) -> str:
    """A command's epilog: example command lines, kept as written (click's ``\\b``); a
    command longer than a line of 80 columns goes on in the next, after `` \\``."""
    lines = []
    for command in commands:
        words, line = command.split(" "), "  "
        for word in words:
            if len(line) + len(word) > 72 and line.strip():
                lines.append(line + "\\")
                line = "      "
            line += word + " "
        lines.append(line.rstrip())
    return "Examples:\n\n\b\n" + "\n".join(lines)
