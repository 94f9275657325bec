"""``cai finetune``: supervised fine-tuning on the SL-CAI revisions with TRL's SFTTrainer.

The training set is ``sl/sft.jsonl`` (a red-team prompt and its final revision per record),
mixed with ``helpful_ratio`` helpful conversations per SL example from ``data.helpful`` so the
model does not learn to refuse everything. By default only the assistant's tokens count in the
loss. Full fine-tuning or LoRA; the result in ``<run_dir>/sft`` is a plain ``save_pretrained``
checkpoint with its tokenizer and chat template (with LoRA and ``merge: false``: the peft
adapter and the tokenizer).

Trainer checkpoints go to the hidden ``sft/.checkpoints`` and are deleted when the stage
completes; an interrupted run resumes from the newest one when the same command is run again.
Everything a user can get wrong is checked before anything is written to ``sft/``.
"""

from __future__ import annotations

import random
import re
import shutil
import time
from pathlib import Path

from cai_cli import ui
from cai_cli.artifacts import file_fingerprint, iter_jsonl, load_manifest, model_fingerprint
from cai_cli.config import Config, ModelConfig
from cai_cli.data import read_records
from cai_cli.errors import UserError
from cai_cli.stages import generate_sl
from cai_cli.stages.common import StageSpec, begin, complete

RESPONSE_COLUMNS = ("response", "completion")  # the answer beside a prompt column
_HH_LABEL = re.compile(r"(?:^|\n\n)(Human|Assistant):")

Conversation = list[dict[str, str]]


def base_model(config: Config) -> ModelConfig:
    """The model to fine-tune, with the policy's loading settings (revision, remote code)."""
    if config.finetune.model is None:
        return config.models.policy
    return config.models.policy.model_copy(update={"name_or_path": config.finetune.model})


def model_key(config: Config) -> str:
    """The config key that names the model, for messages."""
    return "finetune.model" if config.finetune.model else "models.policy.name_or_path"


def spec(config: Config) -> StageSpec:
    """What decides this stage's output: cheap to compute, no model loaded."""
    model = base_model(config)
    sl = Path(config.run_dir) / "sl"
    settings = {
        "seed": config.seed,
        "model": model.model_dump(mode="json", include={"name_or_path", "revision",
                                                        "trust_remote_code"}),
        "finetune": config.finetune.model_dump(mode="json"),
    }
    inputs = {"sl": file_fingerprint(sl / "sft.jsonl"),
              "model": model_fingerprint(model.name_or_path)}
    if config.finetune.helpful_ratio > 0 and config.data.helpful is not None:
        settings["data.helpful"] = config.data.helpful.model_dump(mode="json")
        inputs["helpful"] = generate_sl.source_fingerprint(config.data.helpful)
    return StageSpec("finetune", Path(config.run_dir) / "sft", settings, inputs,
                     after=("generate-sl",))


# ---------------------------------------------------------------------------------------------
# Data


def sl_conversations(config: Config) -> list[Conversation]:
    """The SFT records of a finished ``cai generate-sl``."""
    sl = Path(config.run_dir) / "sl"
    manifest = load_manifest(sl)
    if manifest is None or manifest.get("status") != "complete":
        what = "is missing" if manifest is None else "is unfinished"
        raise UserError(f"{sl} {what}: run `cai generate-sl --config ...` first")
    made = generate_sl.spec(config)
    if made.state() == "stale":  # e.g. only a generation setting changed: the data still serve
        ui.warn(f"{sl} was made from a different config (changed: "
                f"{', '.join(made.changes()[:4])}); fine-tuning on it as is")
    path = sl / "sft.jsonl"
    conversations = [messages(record.get("messages"), f"{path}:{number}")
                     for number, record in enumerate(iter_jsonl(path), start=1)]
    if not conversations:
        raise UserError(f"{path}: no examples (every chain was skipped); see `cai inspect "
                        f"{config.run_dir}` and rerun `cai generate-sl` with a larger context")
    return conversations


def messages(value, where: str) -> Conversation:
    """Chat messages reduced to role and content, with at least one assistant answer."""
    if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        raise UserError(f"{where}: expected a list of chat messages ({{'role', 'content'}})")
    conversation = [{"role": m["role"], "content": m["content"]} for m in value]
    if not any(m["role"] == "assistant" for m in conversation):
        raise UserError(f"{where}: the conversation has no assistant message to learn from")
    return conversation


def transcript_messages(text: str) -> Conversation | None:
    """An Anthropic HH-style transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as messages;
    ``None`` for text that is not one."""
    parts = _HH_LABEL.split(text if text.startswith("\n\n") else "\n\n" + text.lstrip())
    if len(parts) < 5 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    turns = [{"role": roles[label], "content": body.strip()}
             for label, body in zip(parts[1::2], parts[2::2])]
    while turns and turns[-1]["role"] != "assistant":  # a trailing question has no answer
        turns.pop()
    return turns or None


def helpful_conversations(config: Config) -> list[Conversation]:
    """``helpful_ratio`` helpful conversations per SL example, drawn with the seed."""
    source, key = config.data.helpful, "data.helpful"
    pool: list[Conversation] = []
    for where, record in read_records(source, key):
        if source.field not in record:
            raise UserError(f"{where}: no field '{source.field}' (fields: "
                            f"{', '.join(map(str, record)) or 'none'}); set {key}.field")
        value = record[source.field]
        if isinstance(value, str):
            conversation = transcript_messages(value)
            if conversation is None:
                answer = next((record[c] for c in RESPONSE_COLUMNS if c in record), None)
                if not isinstance(answer, str):
                    raise UserError(f"{where}: '{source.field}' is a prompt but the record has no "
                                    f"{' or '.join(RESPONSE_COLUMNS)} column with its answer")
                conversation = [{"role": "user", "content": value},
                                {"role": "assistant", "content": answer}]
        else:
            conversation = messages(value, f"{where}: field '{source.field}'")
        pool.append(conversation)
    if not pool:
        raise UserError(f"{key}: no conversations in {source.path or source.dataset}")
    rng = random.Random(config.seed)
    rng.shuffle(pool)
    return pool[: source.limit] if source.limit else pool


def mix(config: Config, sl: list[Conversation]) -> tuple[list[Conversation], int]:
    """The training conversations (SL first, then helpful) and the number of helpful ones."""
    ratio = config.finetune.helpful_ratio
    if ratio == 0:
        return sl, 0
    if config.data.helpful is None:
        raise UserError(f"finetune.helpful_ratio is {ratio} but data.helpful is not set; add "
                        "data.helpful (e.g. {path: cai_cli/resources/helpful.jsonl, field: "
                        "messages}) or set finetune.helpful_ratio: 0")
    pool = helpful_conversations(config)
    count = round(ratio * len(sl))
    if count > len(pool):
        ui.warn(f"data.helpful has {len(pool)} conversations but helpful_ratio {ratio} asks for "
                f"{count}; some are used more than once")
    # The trainer shuffles the mixed set itself (seeded), so the order here does not matter.
    helpful = generate_sl.draw(random.Random(f"{config.seed}:helpful"), tuple(pool), count)
    return sl + helpful, len(helpful)


# ---------------------------------------------------------------------------------------------
# Checks that need the libraries (still before anything is written)


def check_model(config: Config, model: ModelConfig) -> None:
    from cai_cli.backends.hf import check_model_source, is_local_model

    if config.finetune.model is None:
        check_model_source(model, "models.policy")
    elif is_local_model(model.name_or_path):
        path = Path(model.name_or_path).expanduser()
        if not (path / "config.json").is_file():
            state = "has no config.json" if path.exists() else "does not exist"
            raise UserError(f"finetune.model: {path} {state}; expected a directory written by "
                            "save_pretrained, or a hub id")


def check_chat_template(config: Config, tokenizer) -> None:
    """The SL data are chat messages: the tokenizer needs a chat template, and assistant-only
    loss needs one that marks the assistant's tokens."""
    from trl.chat_template_utils import (get_training_chat_template, has_generation_markers,
                                         is_chat_template_stop_token_trained)

    if "chat_template_path" in config.finetune.training.trl_args:
        return  # TRL installs the template the user named
    name = base_model(config).name_or_path
    if not tokenizer.chat_template:
        raise UserError(f"{model_key(config)}: '{name}' has no chat template, and the SL-CAI data "
                        "are conversations; fine-tune an instruct model, or name a template with "
                        "finetune.training.trl_args.chat_template_path")
    if not config.finetune.assistant_only_loss:
        return
    training_template = None
    if not has_generation_markers(tokenizer.chat_template):
        try:  # TRL ships marked versions of common templates (Llama 3, Qwen, Gemma, ...)
            training_template = get_training_chat_template(tokenizer)
        except ValueError:
            raise UserError(
                f"finetune.assistant_only_loss: the chat template of '{name}' does not mark the "
                "assistant's tokens with {% generation %}, so the loss cannot be limited to them; "
                "set finetune.assistant_only_loss: false to train on whole conversations") from None
    if not is_chat_template_stop_token_trained(tokenizer, chat_template=training_template):
        ui.warn(f"the chat template of '{name}' leaves the end-of-turn token out of the "
                "assistant's tokens, so the model may not learn to stop; consider "
                "finetune.assistant_only_loss: false")


def check_lora(config: Config, model: ModelConfig) -> None:
    """LoRA target modules, checked on an empty (meta-device) copy of the model: no weights."""
    if not config.finetune.lora.enabled:
        return
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from cai_cli.training import check_lora_targets

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
            model.name_or_path, revision=model.revision,
            trust_remote_code=model.trust_remote_code), trust_remote_code=model.trust_remote_code)
    check_lora_targets(config.finetune.lora, skeleton, "finetune.lora")


# ---------------------------------------------------------------------------------------------
# The stage


def run(config: Config, *, force: bool = False) -> Path | None:
    from trl import SFTConfig

    from cai_cli import training
    from cai_cli.backends.hf import load_tokenizer

    stage = spec(config)
    settings = config.finetune
    model = base_model(config)
    check_model(config, model)
    sl = sl_conversations(config)
    conversations, helpful = mix(config, sl)
    training.quiet_libraries()
    args = training.trl_config(
        SFTConfig, settings.training, "finetune.training", seed=config.seed,
        output_dir=stage.directory, cpu=training.use_cpu(model),
        stage_args={"assistant_only_loss": (settings.assistant_only_loss,
                                            "finetune.assistant_only_loss")})
    # TRL's collator pads on the right by itself; the saved tokenizer keeps load_tokenizer's
    # left padding, which generation wants.
    tokenizer = load_tokenizer(model, model_key(config).removesuffix(".name_or_path"))
    check_chat_template(config, tokenizer)
    check_lora(config, model)

    resumable = stage.state() == "partial" and not force
    manifest = begin(stage, config, force=force)
    if manifest is None:
        return stage.directory
    checkpoint = training.last_checkpoint(stage.directory) if resumable else None
    if checkpoint is None:  # a fresh start: nothing from another run may be resumed
        shutil.rmtree(stage.directory / training.CHECKPOINTS, ignore_errors=True)
    started = time.perf_counter()
    trainer = build_trainer(config, model, tokenizer, args, conversations)
    if checkpoint is not None:
        ui.info(f"finetune: continuing from {checkpoint.name}")
    with training.progress_bar() as bar:
        trainer.add_callback(training.progress_callback(bar, "finetune"))
        result = trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    manifest.timings["train_seconds"] = round(time.perf_counter() - started, 2)

    save(trainer, tokenizer, config, stage.directory / training.STAGING)
    training.put_in_place(stage.directory)
    # The last logged loss (the log history survives a resume); the run's mean if none was.
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    manifest.counts = {"sl_examples": len(sl), "helpful_examples": helpful,
                       "train_examples": len(trainer.train_dataset), "steps": result.global_step}
    manifest.stats = {
        "final_loss": round(losses[-1] if losses else result.training_loss, 4),
        "resumed_from_step": int(checkpoint.name.split("-")[1]) if checkpoint else None,
        "precision": "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32",
        "lora": settings.lora.enabled,
        "trainable_parameters": sum(p.numel() for p in trainer.model.parameters()
                                    if p.requires_grad),
    }
    complete(stage, manifest)
    what = "LoRA adapter" if settings.lora.enabled and not settings.lora.merge else "model"
    ui.info(f"finetune: {len(sl)} SL-CAI + {helpful} helpful examples, {result.global_step} "
            f"steps, loss {manifest.stats['final_loss']:.4f} -> {what} in {stage.directory}")
    return stage.directory


def build_trainer(config: Config, model_config: ModelConfig, tokenizer, args, conversations):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, set_seed
    from trl import SFTTrainer

    from cai_cli import training

    settings = config.finetune
    set_seed(config.seed)  # before loading: LoRA's initial weights come from the global RNG
    # Full fine-tuning keeps fp32 master weights (bf16/fp16 is autocast); LoRA's base weights
    # are frozen, so they can sit in the training precision and halve the memory.
    dtype = torch.float32
    if settings.lora.enabled and (args.bf16 or args.fp16):
        dtype = torch.bfloat16 if args.bf16 else torch.float16
    try:
        model = AutoModelForCausalLM.from_pretrained(
            local_or_hub(model_config.name_or_path), dtype=dtype, revision=model_config.revision,
            trust_remote_code=model_config.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"{model_key(config)}: cannot load a causal LM from "
                        f"'{model_config.name_or_path}': {str(exc).splitlines()[0]}") from None
    dataset = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    peft_config = (training.peft_config(settings.lora, "CAUSAL_LM")
                   if settings.lora.enabled else None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset,
                         processing_class=tokenizer, peft_config=peft_config)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict; our bar shows the loss
    return trainer


def local_or_hub(name_or_path: str) -> str:
    """An absolute path for a local model, so a saved LoRA adapter finds its base from anywhere."""
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def save(trainer, tokenizer, config: Config, out: Path) -> None:
    """The finished model (merged, or a peft adapter) with its tokenizer and chat template."""
    shutil.rmtree(out, ignore_errors=True)
    model = trainer.accelerator.unwrap_model(trainer.model)
    lora = config.finetune.lora
    if lora.enabled and lora.merge:
        model = model.merge_and_unload()
    # The Trainer switches the KV cache off in the model config while training; generating
    # from the saved model wants it back.
    model.config.use_cache = True
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
