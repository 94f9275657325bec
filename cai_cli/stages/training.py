"""What the training stages (``finetune``, ``train-rm``, ``optimize``) share: the model a stage
trains and the settings that decide its weights (its fingerprint), a TRL config built from our
``TrainingConfig`` plus checked ``trl_args``, loading the model and LoRA through peft, resumable
checkpoints in a hidden directory, a rich progress bar instead of the libraries' output, and
saving a finished model and putting it in place.

Heavy libraries are imported inside the functions, so importing this module stays cheap (the
stages' ``spec()`` use it).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterable

from rich.progress import TextColumn

from cai_cli import ui
from cai_cli.stages import trackers
from cai_cli.engines import models
from cai_cli.run.artifacts import (MANIFEST, file_fingerprint, model_fingerprint,
                                   write_json_atomic)
from cai_cli.run.layout import LOG_HISTORY, LOGS
from cai_cli.run.spec import StageSpec
from cai_cli.config import Config, LoraConfig, ModelConfig, TrainingConfig
from cai_cli.errors import UserError, reason

CHECKPOINTS = ".checkpoints"  # hidden: file fingerprints of the stage directory skip it
STAGING = ".final"  # the finished checkpoint is written here, then moved into place
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")

# TRL fields that cai sets without a config key of its own; trl_args may not touch them.
_MANAGED = {
    "output_dir": "checkpoints go to the stage's hidden .checkpoints directory",
    "resume_from_checkpoint": "a rerun of the same command resumes by itself",
    "disable_tqdm": "cai shows its own progress bar",
    "save_strategy": "set save_steps instead",
    "logging_strategy": "set logging_steps instead",
    "save_only_model": "checkpoints must keep the optimizer state to resume",
    # A shared config must not be able to publish someone's model with their HF_TOKEN.
    "push_to_hub": "uploads happen only with the command-line flag --push-to-hub REPO_ID",
    "hub_token": "the token is read from the environment (HF_TOKEN), never from a config",
    "hub_model_id": "name the repository with --push-to-hub REPO_ID",
    "hub_strategy": "--push-to-hub uploads the finished model once",
    "hub_private_repo": "--push-to-hub creates a private repository",
}
# TrainingConfig keys that do not change the trained weights: a stage's fingerprint leaves them
# out, so e.g. logging more often does not make a finished model stale.
NOT_DECIDING = frozenset({"logging_steps", "save_steps", "report_to"})
POLICY_KEY = "models.policy.name_or_path"


# ---------------------------------------------------------------------------------------------
# What a stage trains (no heavy imports: the stages' spec() use these)


def model_for(config: Config, override: str | None, key: str) -> tuple[ModelConfig, str]:
    """The model a stage trains, and the config key that names it (for messages): ``override``
    (set by ``key``, e.g. ``finetune.model``) with the policy's loading settings (revision,
    remote code, device), or without one the policy itself."""
    policy = config.models.policy.transformers_config()  # whatever engine generates with it
    if override is None:
        return policy, POLICY_KEY
    return policy.model_copy(update={"name_or_path": override}), key


def fingerprint_settings(config: Config, model: ModelConfig, section: str,
            exclude: Iterable[str] = ()) -> dict[str, Any]:
    """The settings that decide a training stage's weights, for its fingerprint: the seed, the
    model, how it loads and its device (``cpu`` trains there; otherwise precision ``auto`` may
    pick bf16), and the config section ``section`` less ``exclude`` and ``NOT_DECIDING``."""
    return {
        "seed": config.seed,
        "model": model.model_dump(mode="json", include={"name_or_path", "revision",
                                                        "trust_remote_code", "device"}),
        section: getattr(config, section).model_dump(
            mode="json", exclude={**dict.fromkeys(exclude, True), "training": NOT_DECIDING}),
    }


def stage_spec(config: Config, command: str, section: str, data: dict[str, Path], *,
               settings: dict[str, Any] | None = None,
               inputs: dict[str, str] | None = None) -> StageSpec:
    """The spec of a training stage: ``fingerprint_settings`` of the model ``section`` trains,
    and the fingerprints of its training ``data`` files and of that model; ``settings`` and
    ``inputs`` add more of each (e.g. a dataset mixed in: its config and its fingerprint)."""
    model = model_for(config, getattr(config, section).model, f"{section}.model")[0]
    decides = {**fingerprint_settings(config, model, section), **(settings or {})}
    fingerprints = {name: file_fingerprint(path) for name, path in data.items()}
    fingerprints["model"] = model_fingerprint(model.name_or_path)
    return StageSpec(command, config.layout.stage_dir(command), decides,
                     {**fingerprints, **(inputs or {})})


def quiet_libraries() -> None:
    """Our progress bar and messages replace the libraries' tqdm bars and log lines."""
    import logging
    import warnings

    import datasets

    from cai_cli.engines.models import quiet_transformers

    quiet_transformers()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    for name in ("trl", "accelerate", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Deprecation notices between the libraries (peft calling a renamed transformers method)
    # are for their developers, not for someone running `cai`.
    warnings.filterwarnings("ignore", category=FutureWarning,
                            module=r"(transformers|trl|peft|accelerate|datasets)\.")


def use_cpu(model: ModelConfig) -> bool:
    """Train where the model runs: ``cpu`` forces the CPU even when a GPU is there. Under a
    multi-process launcher on a machine without a GPU, ``auto`` trains on the CPU too: told
    nothing, accelerate would leave every process training alone on all the data."""
    if model.device == "cpu":
        return True
    from cai_cli.run import dist

    if model.device != "auto" or not dist.is_distributed():
        return False
    import torch

    return not torch.cuda.is_available()


def precision(training: TrainingConfig, cpu: bool) -> str:
    """``fp32``, ``bf16`` or ``fp16``: ``auto`` is bf16 on a GPU that supports it."""
    if training.precision != "auto":
        return training.precision
    import torch

    gpu = not cpu and torch.cuda.is_available()
    return "bf16" if gpu and torch.cuda.is_bf16_supported() else "fp32"


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    """A warning about the launch, once per process (the checks run before a stage and in it)."""
    if message not in _warned:
        _warned.add(message)
        ui.warn(message)


def launcher_checks(mode: str, cpu: bool, key: str) -> None:
    """Make accelerate's settings agree with ours before the trainer reads them.

    ``accelerate launch`` passes its config's ``mixed_precision`` to every process through
    ACCELERATE_MIXED_PRECISION, which transformers applies whenever our bf16 / fp16 flags are
    off; our ``precision`` (part of the stage's fingerprint, recorded in its manifest) decides
    instead. And accelerate shards with FSDP or DeepSpeed only on GPUs: on the CPU it falls
    back to plain data parallelism without a word.
    """
    from cai_cli.run import dist

    wanted = {"fp32": "no"}.get(mode, mode)
    launcher = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").lower()
    if launcher not in ("no", wanted):
        _warn_once(f"the launcher asks for mixed precision {launcher} (accelerate's config or "
                   f"--mixed_precision); {key}.precision decides and gives {mode}: set it to "
                   f"{launcher} to train that way")
    os.environ["ACCELERATE_MIXED_PRECISION"] = wanted
    engines = [name for name, variable in (("FSDP", "ACCELERATE_USE_FSDP"),
                                           ("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"))
               if os.environ.get(variable, "false").lower() == "true"]
    if engines and cpu and dist.is_distributed():
        _warn_once(f"accelerate runs {engines[0]} only on GPUs: on the CPU each of the "
                   f"{dist.world_size()} processes trains a full copy of the model (plain data "
                   "parallelism), with the same result")
    if ("DeepSpeed" in engines and os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") == "3"
            and not os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
            and os.environ.get("ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL", "false") != "true"):
        # Without it the finished weights stay split across the processes' checkpoints.
        raise UserError("DeepSpeed ZeRO-3 is launched without zero3_save_16bit_model: true in "
                        "accelerate's config, so the trained model could not be gathered and "
                        "saved; add it under deepspeed_config (configs/accelerate/zero3.yaml has it)")


def trl_config(config_cls: type, training: TrainingConfig, key: str, *, seed: int,
               output_dir: Path, cpu: bool, stage_args: dict[str, tuple[Any, str]],
               device_key: str = "models.policy.device"):
    """A TRL trainer config (``SFTConfig``, ``RewardConfig``, ``DPOConfig``) from our settings.

    ``key`` is where ``training`` sits in the config (``finetune.training``); ``stage_args``
    maps more TRL fields the stage sets to ``(value, the config key that sets it)``; ``cpu``
    comes from the model's device, named by ``device_key`` in messages. A name in
    ``trl_args`` that TRL does not know, or that one of our keys already sets, is a UserError
    naming the closest field or our key; all such problems are reported together.
    """
    fields = {f.name for f in dataclasses.fields(config_cls) if f.init}
    mode = precision(training, cpu)
    # Transformers 5.x renamed gradient_checkpointing; the old name warns on every run.
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in fields
                     else "gradient_checkpointing")
    ours: dict[str, tuple[Any, str]] = {
        "num_train_epochs": (training.epochs, f"{key}.epochs"),
        "max_steps": (training.max_steps or -1, f"{key}.max_steps"),
        "learning_rate": (training.learning_rate, f"{key}.learning_rate"),
        "per_device_train_batch_size": (training.per_device_batch_size,
                                        f"{key}.per_device_batch_size"),
        "gradient_accumulation_steps": (training.gradient_accumulation_steps,
                                        f"{key}.gradient_accumulation_steps"),
        "max_length": (training.max_length, f"{key}.max_length"),
        checkpointing: (training.gradient_checkpointing, f"{key}.gradient_checkpointing"),
        "logging_steps": (training.logging_steps, f"{key}.logging_steps"),
        "save_steps": (training.save_steps, f"{key}.save_steps"),
        "report_to": (training.report_to, f"{key}.report_to"),
        # TRL turns bf16 on unless told otherwise: say fp32 explicitly.
        "bf16": (mode == "bf16", f"{key}.precision"),
        "fp16": (mode == "fp16", f"{key}.precision"),
        "use_cpu": (cpu, device_key),
        "seed": (seed, "seed"),
        "data_seed": (seed, "seed"),
        **stage_args,
    }
    aliases = {"gradient_checkpointing": checkpointing, "activation_checkpointing": checkpointing}
    problems = []
    for name in training.trl_args:
        where = f"{key}.trl_args.{name}"
        if name in _MANAGED:
            problems.append(f"{where}: set by cai itself ({_MANAGED[name]}); remove it")
        elif aliases.get(name, name) in ours:
            problems.append(f"{where}: set it with {ours[aliases.get(name, name)][1]} instead")
        elif name not in fields:
            close = difflib.get_close_matches(name, sorted(fields), n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else "see its documentation"
            problems.append(f"{where}: not an argument of TRL's {config_cls.__name__}; {hint}")
    problems += trackers.tracker_problems(training.report_to, f"{key}.report_to")
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise UserError(f"{key}: {count}:\n" + "\n".join(f"  - {p}" for p in problems))
    trackers.point_tensorboard(training.report_to, output_dir / LOGS)  # outlives the checkpoints

    launcher_checks(mode, cpu, key)

    arguments = {name: value for name, (value, _) in ours.items() if name in fields}
    # Every parameter of the models trained here takes part in the loss; DDP's search for unused
    # ones costs a pass over the graph each step (trl_args may turn it back on).
    arguments["ddp_find_unused_parameters"] = False
    arguments.update(
        output_dir=str(output_dir / CHECKPOINTS),
        disable_tqdm=True,
        save_strategy="steps",
        logging_strategy="steps",
        save_total_limit=1,  # the newest complete checkpoint is all a resume needs
    )
    arguments.update(training.trl_args)
    try:
        return config_cls(**arguments)
    except (ValueError, TypeError) as exc:  # TRL's own checks on values and combinations
        raise UserError(f"{key}: TRL's {config_cls.__name__} rejects these settings: "
                        f"{reason(exc)}") from None


# ---------------------------------------------------------------------------------------------
# LoRA


def linear_module_names(model) -> list[str]:
    """Short names of the model's linear layers (what LoRA can adapt), e.g. ``q_proj``."""
    import torch
    from transformers.pytorch_utils import Conv1D

    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, (torch.nn.Linear, Conv1D)) and name})


def check_lora_targets(lora: LoraConfig, model, key: str) -> None:
    """Every target module must exist in ``model`` (a meta-device copy is enough) and not be
    the output head, whose weight TRL reads directly (an adapter there would never train)."""
    if lora.target_modules == "all-linear":
        return
    names = [name for name, _ in model.named_modules() if name]
    head = {name for name, module in model.named_modules()
            if module is model.get_output_embeddings()}
    valid = [n for n in linear_module_names(model)
             if not any(h == n or h.endswith("." + n) for h in head)]
    for target in lora.target_modules:
        matches = [n for n in names if n == target or n.endswith("." + target)]
        if not matches:
            raise UserError(f"{key}.target_modules: the model has no module '{target}'; its linear "
                            f"layers are {', '.join(valid[:8])} (or use all-linear)")
        if head & set(matches):
            raise UserError(f"{key}.target_modules: '{target}' is the output head, which TRL "
                            f"cannot train through an adapter; use {', '.join(valid[:8])}")


def peft_config(lora: LoraConfig, task_type: str):
    import peft

    return peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                           target_modules=lora.target_modules, task_type=task_type)


def check_lora(lora: LoraConfig, model: ModelConfig, key: str, auto_class=None,
               forbidden: dict[str, str] | None = None, **config_kwargs) -> None:
    """``check_lora_targets`` on an empty (meta-device) copy of ``model``: no weights are read.
    ``auto_class`` defaults to ``AutoModelForCausalLM``; ``config_kwargs`` (``num_labels=1``) go
    to its config. ``forbidden`` maps module names LoRA may not target to why (``{"score": "the
    reward head, which is always trained in full"}``)."""
    if not lora.enabled:
        return
    import torch
    from transformers import AutoModelForCausalLM

    from cai_cli.engines.models import load_config

    for name, why in (forbidden or {}).items():
        if lora.target_modules != "all-linear" and name in lora.target_modules:
            raise UserError(f"{key}.target_modules: '{name}' is {why}; remove it")
    auto_class = auto_class or AutoModelForCausalLM
    with torch.device("meta"):
        skeleton = auto_class.from_config(load_config(model, key, **config_kwargs),
                                          trust_remote_code=model.trust_remote_code)
    check_lora_targets(lora, skeleton, key)


# ---------------------------------------------------------------------------------------------
# Loading and saving models


def sharded(trainer) -> bool:
    """Whether FSDP or DeepSpeed hold the trained weights, split across the processes (or, for
    ZeRO-1/2, inside their engine): reading them back then takes every process."""
    return bool(trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled)


def save_model(trainer, tokenizer, lora: LoraConfig, out: Path) -> None:
    """The trained model (merged full weights, or the peft adapter alone when ``lora.merge`` is
    false) with its tokenizer and chat template, written to ``out`` by the main process.

    Every process of a job calls it: under FSDP and DeepSpeed the full weights are gathered
    from all of them (accelerate's ``get_state_dict``) before the main process writes them.
    """
    from cai_cli.run import dist

    model = trainer.accelerator.unwrap_model(trainer.model)
    # The Trainer switches the KV cache off in the model config while training; generating
    # from the saved model wants it back.
    model.config.use_cache = True
    # A reward model scoring a batch finds each sequence's last token by the pad id.
    model.config.pad_token_id = tokenizer.pad_token_id
    state_dict = None
    if sharded(trainer):
        engine = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
        try:
            state_dict = trainer.accelerator.get_state_dict(engine)  # every process takes part
        except ValueError as exc:  # ZeRO-3 told not to gather the weights when saving
            raise UserError(f"the trained weights cannot be gathered to save them: "
                            f"{reason(exc)} Then rerun the same command: it "
                            "resumes from the last checkpoint") from None
    if not dist.is_main():
        return
    shutil.rmtree(out, ignore_errors=True)
    if lora.enabled and lora.merge:
        model = (model.merge_and_unload() if state_dict is None
                 else merged_from_gathered(model, state_dict, out / ".adapter"))
        state_dict = None
    model.save_pretrained(out, state_dict=state_dict)
    tokenizer.save_pretrained(out)


def merged_from_gathered(model, state_dict: dict, scratch: Path):
    """LoRA merged into the base weights when the trained ones were split across processes:
    the adapter is taken from the gathered ``state_dict`` and put on a fresh copy of the base
    model (the same class, config and dtype, loaded on the CPU by this process alone)."""
    import peft
    import torch

    model.save_pretrained(scratch, state_dict=state_dict)  # peft keeps the adapter's weights
    base = model.get_base_model()
    frozen = next((p.dtype for p in base.parameters() if not p.requires_grad), torch.float32)
    adapter = model.peft_config[model.active_adapter]
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    # ZeRO-3 would otherwise partition the copy across processes that are not loading it.
    unset_hf_deepspeed_config()
    fresh = type(base).from_pretrained(adapter.base_model_name_or_path, config=base.config,
                                       dtype=frozen,
                                       revision=getattr(base.config, "_commit_hash", None))
    merged = peft.PeftModel.from_pretrained(fresh, scratch).merge_and_unload()
    shutil.rmtree(scratch, ignore_errors=True)
    return merged


# ---------------------------------------------------------------------------------------------
# Checkpoints


def last_checkpoint(directory: Path) -> Path | None:
    """The newest checkpoint under ``<directory>/.checkpoints`` that the trainer can read. The
    trainer writes ``trainer_state.json`` last, so a checkpoint without it was cut off
    mid-write; one whose files cannot be read (``unreadable``: truncated, damaged, refused by
    weights-only loading) would fail every rerun. Both are deleted, the unreadable ones with a
    warning naming them, so the trainer cannot pick one up either: the stage resumes from the
    one before, or starts over."""
    from cai_cli.run import dist

    folder = directory / CHECKPOINTS
    found = sorted((int(m.group(1)), path) for path in folder.glob("checkpoint-*")
                   if (m := _CHECKPOINT.match(path.name)) and path.is_dir())
    bad = [path for _, path in found if not (path / "trainer_state.json").is_file()]
    complete = [path for _, path in found if path not in bad]
    usable = None
    while complete and usable is None:
        newest = complete.pop()
        problem = unreadable(newest)
        if problem is None:
            usable = newest
            continue
        bad.append(newest)
        ui.warn(f"{newest} cannot be read: {problem}; removed it, "
                + (f"resuming from {complete[-1].name} instead" if complete
                   else "training from the start"))
    if dist.is_main():  # every process finds the same; one deletes
        for path in bad:
            shutil.rmtree(path, ignore_errors=True)
    return usable


# The files of a checkpoint that the trainer reads back with torch.load(weights_only=True).
_TORCH_STATE = ("optimizer.pt", "scheduler.pt", "scaler.pt", "rng_state*.pth", "pytorch_model*.bin")


def unreadable(checkpoint: Path) -> str | None:
    """Why the trainer could not resume from ``checkpoint``, or None: its state file, weights
    and optimizer, scheduler and random states are each opened as the trainer opens them, the
    tensors memory-mapped rather than read (seconds even for a large model). Checkpoints of
    FSDP or DeepSpeed keep more in folders of their own, which this does not open."""
    import json
    import pickle

    import torch
    from safetensors import safe_open
    from transformers.trainer_pt_utils import safe_globals

    def damaged(name: str, exc: Exception) -> str:
        return f"{name} is truncated or damaged ({reason(exc).split('. ')[0][:100]})"

    try:
        json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        return damaged("trainer_state.json", exc)
    for path in sorted(checkpoint.glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as exc:  # safetensors' own error type, or an OSError
            return damaged(path.name, exc)
    with safe_globals():  # numpy's random state, as the trainer allows it
        for path in sorted(p for pattern in _TORCH_STATE for p in checkpoint.glob(pattern)):
            try:
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:
                return (f"{path.name} is refused by weights-only loading: it holds objects "
                        "that are not tensors")
            except Exception as exc:  # torch's zip reader says RuntimeError, mmap OSError
                return damaged(path.name, exc)
    return None


def resume_point(directory: Path, resumable: bool) -> Path | None:
    """The checkpoint a rerun of an interrupted stage continues from. Without one (a fresh
    start) older checkpoints are deleted: nothing from another run may be resumed."""
    checkpoint = last_checkpoint(directory) if resumable else None
    if checkpoint is None:
        shutil.rmtree(directory / CHECKPOINTS, ignore_errors=True)
    return checkpoint


def put_in_place(directory: Path) -> None:
    """Replace the stage directory's checkpoint files with those in ``<directory>/.final``. The
    old files stay until the new checkpoint is complete. The training checkpoints stay until
    the stage is recorded complete (``save`` arranges it): a run killed in between resumes from
    the last one instead of training again."""
    staging = directory / STAGING
    for old in directory.iterdir():
        if old.name.startswith(".") or old.name in (MANIFEST, LOGS):
            continue
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    for new in staging.iterdir():
        new.rename(directory / new.name)
    staging.rmdir()


# ---------------------------------------------------------------------------------------------
# Progress


def progress_bar():
    """``ui.progress`` with a loss column; use as ``with progress_bar() as bar:``."""
    return ui.progress(TextColumn("{task.fields[loss]}"))


def progress_callback(bar, description: str):
    """A TrainerCallback that moves ``bar`` with the optimiser steps and shows the last loss."""
    from transformers import TrainerCallback

    class RichProgress(TrainerCallback):
        def __init__(self):
            self.task = bar.add_task(description, total=None, loss="")

        def on_train_begin(self, args, state, control, **kwargs):
            # On resume the state is already the checkpoint's: the bar starts where it stopped.
            bar.update(self.task, total=state.max_steps, completed=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                bar.update(self.task, loss=f"loss {logs['loss']:.4f}")

    return RichProgress()


# ---------------------------------------------------------------------------------------------
# The shape every training stage shares: checks, then begin, fit, save, record
#
#     run = begin(spec, config, force=force)          # None: nothing to do
#     trainer, result, checkpoint = training.fit(run, lambda: build_trainer(...), "finetune")
#     training.save(run, trainer, tokenizer, lora, result, args, checkpoint)
#     run.manifest.counts = {...}; run.complete()


def fit(run, build_trainer, description: str):
    """Build the trainer (model loaded, data tokenised), record the stage's start, and train,
    from the last checkpoint when ``run`` resumes an interrupted run. Returns ``(trainer,
    result, checkpoint)``; the training time goes into the manifest."""
    import time

    checkpoint = resume_point(run.directory, run.resuming)
    started = time.perf_counter()
    trainer = build_trainer()
    # Counted before training: FSDP and DeepSpeed then split the parameters across processes.
    run.manifest.stats["trainable_parameters"] = trainable_parameters(trainer.model)
    run.producing()
    result = train(trainer, description, checkpoint)
    run.manifest.timings["train_seconds"] = round(time.perf_counter() - started, 2)
    return trainer, result, checkpoint


def save(run, trainer, tokenizer, lora: LoraConfig, result, args, checkpoint) -> None:
    """Put the trained model in the stage directory (the main process writes, the others wait)
    and record what every training stage records."""
    from cai_cli.run import dist

    save_model(trainer, tokenizer, lora, run.directory / STAGING)
    if dist.is_main():
        if lora.enabled and not lora.merge:  # a base in the run directory: "../sft"
            models.record_adapter_base(run.directory / STAGING, run.directory,
                                       run.directory.parent)
        put_in_place(run.directory)
        # The log history (loss, margins per step) outlives the checkpoints, for the plots.
        write_json_atomic(run.directory / LOGS / LOG_HISTORY, trainer.state.log_history)
        run.after_complete(lambda: shutil.rmtree(run.directory / CHECKPOINTS, ignore_errors=True))
    dist.barrier()
    run.manifest.stats.update(run_stats(trainer, result, args, lora, checkpoint))


# ---------------------------------------------------------------------------------------------
# Training and what it records


def train(trainer, description: str, checkpoint: Path | None):
    """``trainer.train()`` under our progress bar, from ``checkpoint`` when there is one."""
    from transformers.trainer_callback import PrinterCallback

    from cai_cli.run import preemption

    if checkpoint is not None:
        ui.info(f"{description}: continuing from {checkpoint.name}")
    trainer.remove_callback(PrinterCallback)  # it prints every log dict; our bar shows the loss
    trainer.add_callback(sigterm_callback(description))
    with progress_bar() as bar:
        trainer.add_callback(progress_callback(bar, description))
        # A SIGTERM now stops after the step under way and its checkpoint, then raises.
        with preemption.stop_between_steps():
            return trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)


def sigterm_callback(description: str):
    """A TrainerCallback that, once a SIGTERM came to this process or another of the job
    (``run.preemption``), has the trainer save a checkpoint of the step just done and stop."""
    from transformers import TrainerCallback

    from cai_cli.run import preemption

    class StopOnSigterm(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if preemption.stop_after_step(args.device) and not control.should_training_stop:
                ui.info(f"{description}: SIGTERM: saving a checkpoint of step "
                        f"{state.global_step}, then stopping")
                control.should_save = control.should_training_stop = True

    return StopOnSigterm()


def logged(trainer, name: str) -> list[float]:
    """Every value the trainer logged under ``name``, in order (kept across a resume)."""
    return [entry[name] for entry in trainer.state.log_history if name in entry]


def run_stats(trainer, result, args, lora: LoraConfig, checkpoint: Path | None) -> dict:
    """What every training stage records besides the trainable parameters (``fit``): the last
    logged loss (the run's mean if none was logged), the step it resumed from, the precision
    and LoRA."""
    losses = logged(trainer, "loss")
    return {
        "final_loss": round(losses[-1] if losses else result.training_loss, 4) + 0.0,
        "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else None,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "lora": lora.enabled,
    }


def trainable_parameters(model) -> int:
    """Parameters the optimiser updates (ZeRO-3 keeps a parameter's real size in ds_numel when
    it loaded the model partitioned)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters() if p.requires_grad)
