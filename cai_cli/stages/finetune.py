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
import time
from pathlib import Path

from cai_cli import models, training, ui
from cai_cli.artifacts import file_fingerprint, iter_jsonl, model_fingerprint
from cai_cli.config import Config, ModelConfig
from cai_cli.data import Conversation, chat_messages, read_records, transcript_messages
from cai_cli.errors import UserError
from cai_cli.stages import generate_sl
from cai_cli.stages.common import StageSpec, begin, complete, require_complete, warn_if_stale

RESPONSE_COLUMNS = ("response", "completion")  # the answer beside a prompt column


def base_model(config: Config) -> tuple[ModelConfig, str]:
    """The model to fine-tune and the config key that names it."""
    return training.model_for(config, config.finetune.model, "finetune.model")


def spec(config: Config) -> StageSpec:
    """What decides this stage's output: cheap to compute, no model loaded."""
    model, _ = base_model(config)
    sl = Path(config.run_dir) / "sl"
    settings = training.fingerprint_settings(config, model, "finetune")
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
    require_complete(sl, "generate-sl")
    warn_if_stale(generate_sl.spec(config), "fine-tuning on it as is")
    path = sl / "sft.jsonl"
    conversations = [chat_messages(record.get("messages"), f"{path}:{number}", answered=True)
                     for number, record in enumerate(iter_jsonl(path), start=1)]
    if not conversations:
        raise UserError(f"{path}: no examples (every chain was skipped); see `cai inspect "
                        f"{config.run_dir}` and rerun `cai generate-sl` with a larger context")
    return conversations


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
            conversation = chat_messages(value, f"{where}: field '{source.field}'",
                                         answered=True)
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


def check_chat_template(config: Config, tokenizer, model: ModelConfig, key: str) -> None:
    """The SL data are chat messages: the tokenizer needs a chat template, and assistant-only
    loss needs one that marks the assistant's tokens."""
    from trl.chat_template_utils import (get_training_chat_template, has_generation_markers,
                                         is_chat_template_stop_token_trained)

    if "chat_template_path" in config.finetune.training.trl_args:
        return  # TRL installs the template the user named
    name = model.name_or_path
    if not tokenizer.chat_template:
        raise UserError(f"{key}: '{name}' has no chat template, and the SL-CAI data "
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


# ---------------------------------------------------------------------------------------------
# The stage


def run(config: Config, *, force: bool = False) -> Path | None:
    from trl import SFTConfig

    stage = spec(config)
    settings = config.finetune
    model, key = base_model(config)
    models.check_model(model, key)
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
    tokenizer = models.load_tokenizer(model, key)
    check_chat_template(config, tokenizer, model, key)
    training.check_lora(settings.lora, model, "finetune.lora")

    resumable = stage.state() == "partial" and not force
    manifest = begin(stage, config, force=force)
    if manifest is None:
        return stage.directory
    checkpoint = training.resume_point(stage.directory, resumable)
    started = time.perf_counter()
    trainer = build_trainer(config, model, key, tokenizer, args, conversations)
    result = training.train(trainer, "finetune", checkpoint)
    manifest.timings["train_seconds"] = round(time.perf_counter() - started, 2)

    training.save_model(trainer, tokenizer, settings.lora, stage.directory / training.STAGING)
    training.put_in_place(stage.directory)
    manifest.counts = {"sl_examples": len(sl), "helpful_examples": helpful,
                       "train_examples": len(trainer.train_dataset), "steps": result.global_step}
    manifest.stats = training.run_stats(trainer, result, args, settings.lora, checkpoint)
    complete(stage, manifest)
    what = "LoRA adapter" if settings.lora.enabled and not settings.lora.merge else "model"
    ui.info(f"finetune: {len(sl)} SL-CAI + {helpful} helpful examples, {result.global_step} "
            f"steps, loss {manifest.stats['final_loss']:.4f} -> {what} in {stage.directory}")
    return stage.directory


def build_trainer(config: Config, model_config: ModelConfig, key: str, tokenizer, args,
                  conversations):
    import datasets
    from transformers import set_seed
    from trl import SFTTrainer

    lora = config.finetune.lora
    set_seed(config.seed)  # before loading: LoRA's initial weights come from the global RNG
    model = models.load_model(model_config, key, lora, args)
    dataset = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    peft_config = training.peft_config(lora, "CAUSAL_LM") if lora.enabled else None
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)
