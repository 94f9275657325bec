"""Experiment trackers for the stages that do not train (``label-prefs``, ``evaluate``): a
stage's figures, once, at its end, to the trackers its ``report_to`` names, the same names the
training stages hand to TRL (``[tensorboard]``, ``[wandb]``, ``[trackio]``, ``[none]``...).

The writing is done by accelerate's tracker classes (``accelerate.tracking``), the ones
``Accelerator(log_with=...)`` uses: one small interface (start, configure, log, finish) over
tensorboard, wandb, trackio, mlflow, comet_ml, clearml, dvclive, swanlab and aim, kept by the
people who keep the trainers' integrations. No Accelerator is made: a stage that labels or
evaluates runs in one process, and a training job's other ranks never get here.

Nothing leaves the machine unless ``report_to`` names a tracker that sends data; each tracker
then follows its own environment (``WANDB_MODE=offline``, ``WANDB_PROJECT``, ``TRACKIO_SPACE_ID``,
``MLFLOW_TRACKING_URI``...), as it does for the training stages. TensorBoard's event files go to
``<stage dir>/logs/``, beside the training stages' own.

No heavy imports at module level.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Iterable

from cai_cli import ui
from cai_cli.run import dist
from cai_cli.config import dump_config
from cai_cli.run.layout import LOGS

PROJECT = "huggingface"  # the project transformers' trackers log training runs to by default
_TENSORBOARD_DIR = "TENSORBOARD_LOGGING_DIR"
_our_tensorboard_dir: str | None = None


def wanted(report_to: Iterable[str]) -> list[str]:
    """The tracker names of ``report_to``, less ``none`` and ``all``."""
    return [name for name in report_to if name not in ("none", "all")]


def tracker_problems(report_to: list[str], key: str) -> list[str]:
    """Experiment trackers named in ``report_to`` that transformers does not know or that are
    not installed."""
    wanted = [name for name in report_to if name not in ("none", "all")]
    if not wanted:
        return []
    from transformers.integrations import get_available_reporting_integrations
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    available = set(get_available_reporting_integrations())
    problems = []
    for name in wanted:
        if name not in INTEGRATION_TO_CALLBACK:
            close = difflib.get_close_matches(name, sorted(INTEGRATION_TO_CALLBACK), n=1)
            hint = f"did you mean '{close[0]}'?" if close else \
                f"known: {', '.join(sorted(INTEGRATION_TO_CALLBACK))}"
            problems.append(f"{key}: '{name}' is not a tracker that transformers knows; {hint}")
        elif name not in available:
            problems.append(f"{key}: '{name}' is not installed here; `pip install {name}` or "
                            "remove it")
    return problems


def problems(report_to: list[str], key: str) -> list[str]:
    """What is wrong with a non-training stage's ``report_to`` (``key`` names it in messages):
    trackers that are not installed, and trackers that only follow a training run."""
    found = tracker_problems(report_to, key)
    if found:
        return found
    names = wanted(report_to)
    if not names:
        return []
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    return [f"{key}: '{name}' follows training runs only and cannot take a stage's figures; "
            f"use one of {', '.join(sorted(LOGGER_TYPE_TO_CLASS))}, or remove it"
            for name in names if name not in LOGGER_TYPE_TO_CLASS]


def check(report_to: list[str], key: str) -> None:
    """``problems`` as a user error (exit 2), before a stage does any work."""
    from cai_cli.errors import UserError

    found = problems(report_to, key)
    if found:
        raise UserError("\n".join(found))


def stage_problems(config, command: str) -> list[str]:
    """``problems`` of a non-training stage whose config section has a ``report_to``
    (``label_prefs``, ``evaluate``), for the checks before a run starts."""
    key = command.replace("-", "_")
    section = getattr(config, key, None)
    if section is None or "report_to" not in type(section).model_fields:
        return []
    return problems(section.report_to, f"{key}.report_to")


def resolve(report_to: list[str]) -> list[str]:
    """The trackers to log to: the names given, or for ``all`` every installed one that can
    take a stage's figures (as TRL's ``all`` means every installed one)."""
    if "none" in report_to or not report_to:
        return []
    if "all" not in report_to:
        return wanted(report_to)
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS
    from transformers.integrations import get_available_reporting_integrations

    return [name for name in get_available_reporting_integrations()
            if name in LOGGER_TYPE_TO_CLASS]


def flatten(values: dict, prefix: str = "", separator: str = "/") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}``."""
    flat: dict[str, Any] = {}
    for name, value in values.items():
        path = f"{prefix}{separator}{name}" if prefix else str(name)
        if isinstance(value, dict):
            flat.update(flatten(value, path, separator))
        else:
            flat[path] = value
    return flat


def numbers(metrics: dict, stage: str) -> dict[str, float]:
    """The numbers of ``metrics`` (nested dicts flattened), each under ``<stage>/``; strings,
    flags and missing values are left out."""
    return {f"{stage}/{name}": value for name, value in flatten(metrics).items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)}


def _settings(config) -> dict[str, Any]:
    """The resolved config as flat ``section.key`` settings of the simple types every tracker
    stores (lists and missing values as text)."""
    flat = flatten(config.model_dump(mode="json"), separator=".")
    return {name: value if isinstance(value, (bool, int, float, str)) else str(value)
            for name, value in flat.items()}


def _tracker(name: str, directory: Path, run_name: str):
    """Accelerate's tracker ``name``, set up as transformers sets up its own for a training
    run: tensorboard writing into ``directory/logs``, wandb and trackio into ``WANDB_PROJECT`` /
    ``TRACKIO_PROJECT``, the others into transformers' default project; wandb, trackio and
    mlflow runs named ``run_name``."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS

    cls = LOGGER_TYPE_TO_CLASS[name]
    if name == "tensorboard":  # into logs/ itself, not a folder per run inside it
        tracker = cls("", _user_tensorboard_dir() or directory / LOGS)
    elif name == "wandb":
        tracker = cls(os.environ.get("WANDB_PROJECT", PROJECT), name=run_name)
    elif name == "trackio":
        tracker = cls(os.environ.get("TRACKIO_PROJECT", PROJECT), name=run_name)
    elif name == "mlflow":
        tracker = cls(None, run_name=run_name)  # MLFLOW_EXPERIMENT_NAME or mlflow's default
    elif cls.requires_logging_directory:  # accelerate's own convention for the others
        tracker = cls(PROJECT, directory / LOGS)
    else:
        tracker = cls(PROJECT)
    return tracker


def log_stage(report_to: list[str], directory: Path, stage: str, metrics: dict,
              config) -> list[str]:
    """Log a finished stage's figures to the trackers ``report_to`` names: each number of
    ``metrics`` (nested dicts are flattened) as ``<stage>/<name>`` at step 0, with the resolved
    config as the run's settings. ``directory`` is the stage's directory (tensorboard writes to
    ``directory/logs``). A tracker that fails is reported as a warning: the stage's output is
    complete by then. Returns the trackers logged to."""
    names = resolve(report_to)
    if not names or not dist.is_main():
        return []
    from accelerate import PartialState

    PartialState()  # the trackers ask it which process is the main one (here: this one)
    values = numbers(metrics, stage)
    settings = _settings(config)  # for the trackers that store a run's settings
    run_name = f"{Path(config.run_dir).name}-{stage}"
    logged = []
    for name in names:
        try:
            tracker = _tracker(name, Path(directory), run_name)
            tracker.start()
            if name == "tensorboard":
                # as transformers logs a trainer's arguments: one text entry (hparams would
                # add a run folder per call)
                tracker.log({"config": f"```yaml\n{dump_config(config)}```"})
            else:
                tracker.store_init_configuration(settings)
            tracker.log(values)
            tracker.finish()
            logged.append(name)
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not fail the stage
            ui.warn(f"{stage}: could not log to {name}: {type(exc).__name__}: {exc}")
    if logged:
        where = _user_tensorboard_dir() or directory / LOGS
        ui.info(f"  {len(values)} figures logged to {', '.join(logged)}"
                + (f" ({where})" if "tensorboard" in logged else ""))
    return logged


def _user_tensorboard_dir() -> str | None:
    """``TENSORBOARD_LOGGING_DIR`` when the user set it (not when ``point_tensorboard`` did)."""
    current = os.environ.get(_TENSORBOARD_DIR)
    return current if current != _our_tensorboard_dir else None


def point_tensorboard(report_to: list[str], directory: Path) -> None:
    """Make transformers' TensorBoard callback of the next trainer write to ``directory``
    (the training stage's ``logs/``, which outlives its checkpoints). The callback reads
    ``TENSORBOARD_LOGGING_DIR`` when a trainer is made: a value the user set is kept, ours is
    replaced for each stage, so the stages of one ``cai run`` each log into their own
    directory."""
    global _our_tensorboard_dir
    if "tensorboard" not in report_to and "all" not in report_to:
        return
    if _user_tensorboard_dir() is None:
        _our_tensorboard_dir = os.environ[_TENSORBOARD_DIR] = str(directory)
