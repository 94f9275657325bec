"""The pipeline's stages, one module each, in order. A stage module imports no other stage: what
one stage needs of another (its spec, to check that its output is fresh) goes through
``stage_module``."""

from __future__ import annotations

import importlib

from cai_cli.layout import STAGE_DIRS

# Command name -> module in cai_cli.stages, in pipeline order (the same order as STAGE_DIRS).
STAGES = {command: command.replace("-", "_") for command in STAGE_DIRS}


def stage_module(command: str):
    return importlib.import_module(f"cai_cli.stages.{STAGES[command]}")
