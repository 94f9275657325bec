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
from pathlib import Path

from cai_cli import ui
from cai_cli.config import Config, ModelConfig
from cai_cli.data.sources import Conversation, chat_messages, read_records, transcript_messages
from cai_cli.engines import models
from cai_cli.engines.work import Train, Work
from cai_cli.errors import UserError
from cai_cli.run import records
from cai_cli.run.artifacts import source_fingerprint
from cai_cli.run.records import SFTExample, conversation
from cai_cli.run.seeding import draw
from cai_cli.run.spec import StageSpec
from cai_cli.stages import training
from cai_cli.stages.base import Stage
from cai_cli.stages.common import Need, begin, require_complete
from cai_cli.stages.generate_sl import GenerateSL

# The SL-CAI data this stage trains on.
SL_DATA = Need(GenerateSL(), stale_use="fine-tuning on it as is")

RESPONSE_COLUMNS = ("response", "completion")  # the answer beside a prompt column


def base_model(config: Config) -> tuple[ModelConfig, str]:
    """The model to fine-tune and the config key that names it."""
    return training.model_for(config, config.finetune.model, "finetune.model")


# ---------------------------------------------------------------------------------------------
# Data


def sl_conversations(config: Config) -> list[Conversation]:
    """The SFT records of a finished ``cai generate-sl``."""
    require_complete(config, SL_DATA)
    path = config.layout.sft_data
    conversations = [conversation(example.prompt) + conversation(example.completion)
                     for example in records.read(path, SFTExample)]
    if not conversations:
        raise UserError(f"{path}: no examples (every chain was skipped); see `cai inspect "
                        f"{ui.shell(config.run_dir)}` and rerun `cai generate-sl` with a larger context")
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
    helpful = draw(random.Random(f"{config.seed}:helpful"), tuple(pool), count)
    return sl + helpful, len(helpful)


# ---------------------------------------------------------------------------------------------
# Checks that need the libraries (still before anything is written)


def check_chat_template(config: Config, tokenizer, model: ModelConfig, key: str) -> None:
    """The SL data are chat messages: the tokenizer needs a chat template, and assistant-only
    loss needs one that marks the assistant's tokens."""
    from trl.chat_template_utils import (
        get_training_chat_template,
        has_generation_markers,
        is_chat_template_stop_token_trained,
    )

    if "chat_template_path" in config.finetune.training.trl_args:
        return  # TRL installs the template the user named
    name = model.name_or_path
    if not tokenizer.chat_template:
        raise UserError(f"{key}: '{name}' has no chat template, and the SL-CAI data "
                        "are conversations; fine-tune an instruct model, or name a template with "
                        "finetune.training.trl_args.chat_template_path")
    if config.finetune.loss_on != "assistant":
        return
    training_template = None
    if not has_generation_markers(tokenizer.chat_template):
        try:  # TRL ships marked versions of common templates (Llama 3, Qwen, Gemma, ...)
            training_template = get_training_chat_template(tokenizer)
        except ValueError:
            raise UserError(
                f"finetune.loss_on: assistant: the chat template of '{name}' does not mark the "
                "assistant's tokens with {% generation %}, so the loss cannot be limited to them; "
                "set finetune.loss_on: completion (the final answer only, any template) or all "
                "(whole conversations)") from None
    if not is_chat_template_stop_token_trained(tokenizer, chat_template=training_template):
        ui.warn(f"the chat template of '{name}' leaves the end-of-turn token out of the "
                "assistant's tokens, so the model may not learn to stop; consider "
                "finetune.loss_on: completion")


# ---------------------------------------------------------------------------------------------
# The stage


def trainer_args(config: Config):
    """TRL's SFTConfig from our settings; UserError for anything TRL or we would reject."""
    from trl import SFTConfig

    model, _ = base_model(config)
    settings = config.finetune
    return training.trl_config(
        SFTConfig, settings.training, "finetune.training", seed=config.seed,
        output_dir=config.layout.sft, cpu=training.use_cpu(model),
        stage_args={"assistant_only_loss": (settings.loss_on == "assistant", "finetune.loss_on"),
                    "completion_only_loss": (settings.loss_on == "completion",
                                             "finetune.loss_on")})


def prompt_and_completion(conversation: Conversation) -> dict:
    """TRL's prompt-completion row: everything before the last assistant message, and that
    message (the one the loss is on)."""
    last = max(i for i, m in enumerate(conversation) if m["role"] == "assistant")
    if last == 0:
        raise UserError(f"a finetune example starts with the assistant's answer, so it has no "
                        f"prompt to learn it from: {conversation[0]['content'][:60]!r}")
    return {"prompt": conversation[:last], "completion": [conversation[last]]}


def build_trainer(config: Config, model_config: ModelConfig, key: str, tokenizer, args,
                  conversations):
    import datasets
    from transformers import set_seed
    from trl import SFTTrainer

    lora = config.finetune.lora
    set_seed(config.seed)  # before loading: LoRA's initial weights come from the global RNG
    model = models.load_model(model_config, key, lora, args)
    if config.finetune.loss_on == "completion":
        dataset = datasets.Dataset.from_list([prompt_and_completion(c) for c in conversations])
    else:
        dataset = datasets.Dataset.from_list([{"messages": c} for c in conversations])
    peft_config = training.peft_config(lora, "CAUSAL_LM") if lora.enabled else None
    return SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      peft_config=peft_config)


class Finetune(Stage):
    command = "finetune"
    trains = True

    def needs(self, config: Config) -> list[Need]:
        return [SL_DATA]

    def spec(self, config: Config) -> StageSpec:
        helpful = config.data.helpful if config.finetune.helpful_ratio > 0 else None
        return training.stage_spec(
            config, self.command, "finetune", {"sl": config.layout.sft_data},
            settings={"data.helpful": helpful.model_dump(mode="json")} if helpful else None,
            inputs={"helpful": source_fingerprint(helpful)} if helpful else None)

    def preflight(self, config: Config) -> None:
        """What can be checked before any stage runs (``cai config validate``, ``cai run``): the
        trainer arguments, and for a local model its chat template and the LoRA targets."""
        trainer_args(config)
        model, key = base_model(config)
        if Path(model.name_or_path).expanduser().is_dir():  # made already, or the user's own
            check_chat_template(config, models.load_tokenizer(model, key), model, key)
            training.check_lora(config.finetune.lora, model, "finetune.lora")

    def run(self, config: Config, *, force: bool = False, shard=None) -> Path | None:
        stage = self.spec(config)
        settings = config.finetune
        model, key = base_model(config)
        models.check_model(model, key)
        sl = sl_conversations(config)
        conversations, helpful = mix(config, sl)
        training.quiet_libraries()
        args = trainer_args(config)
        # TRL's collator pads on the right by itself; the saved tokenizer keeps load_tokenizer's
        # left padding, which generation wants.
        tokenizer = models.load_tokenizer(model, key)
        check_chat_template(config, tokenizer, model, key)
        training.check_lora(settings.lora, model, "finetune.lora")

        run = begin(stage, config, force=force)
        if run is None:
            return stage.directory
        trainer, result, checkpoint = training.fit(
            run, lambda: build_trainer(config, model, key, tokenizer, args, conversations), "finetune")
        training.save(run, trainer, tokenizer, settings.lora, result, args, checkpoint)
        run.manifest.counts = {"sl_examples": len(sl), "helpful_examples": helpful,
                               "train_examples": len(trainer.train_dataset),
                               "steps": result.global_step}
        run.complete()
        what = "LoRA adapter" if settings.lora.enabled and not settings.lora.merge else "model"
        ui.info(f"finetune: {len(sl)} SL-CAI + {helpful} helpful examples, {result.global_step} "
                f"steps, loss {run.manifest.stats['final_loss']:.4f} -> {what} in {stage.directory}")
        return stage.directory

    def work(self, config: Config, ctx) -> Work:
        """One training run over the SL examples (from ``sl/sft.jsonl`` when it is complete and
        generate-sl will not run, else one per prompt, the revision at max_new_tokens) and the
        helpful conversations mixed in."""
        settings = config.finetune
        model, key = base_model(config)
        counter = ctx.tokens(model, key)
        notes = []
        if not ctx.runs("generate-sl") and ctx.complete("generate-sl"):
            lengths = [counter.conversation_tokens(c) for c in sl_conversations(config)]
            notes.append(f"SL examples from {config.layout.sft_data}")
        else:
            new = config.generate_sl.sampling.max_new_tokens
            lengths = [counter.conversation_tokens([{"role": "user", "content": p.text},
                                                    {"role": "assistant", "content": ""}]) + new
                       for p in ctx.output("generate-sl")["prompts"]]
            notes.append("SL examples: one per prompt, the revision at max_new_tokens")
        helpful = helpful_lengths(config, ctx, counter, round(settings.helpful_ratio * len(lengths))
                                  if config.data.helpful is not None else 0)
        limit = settings.training.max_length
        examples = [min(n, limit) for n in lengths + helpful]
        return Work([Train(key, model, examples, settings.training, settings.lora)],
                    counts={"sl_examples": len(lengths), "helpful_examples": len(helpful),
                            "train_examples": len(examples)}, notes=notes)


def helpful_lengths(config: Config, ctx, counter, count: int) -> list[int]:
    """Token lengths of ``count`` helpful conversations drawn from ``data.helpful`` (each at
    max_length when the dataset is not on this machine)."""
    if not count:
        return []
    limit = config.finetune.training.max_length
    pool = ctx.dataset("data.helpful", lambda: helpful_conversations(config), config.data.helpful,
                       f"each helpful conversation assumed {limit} tokens (max_length)")
    if pool is None:
        return [limit] * count
    lengths = [counter.conversation_tokens(c) for c in pool]
    rng = random.Random(f"{config.seed}:helpful")
    return [lengths[rng.randrange(len(lengths))] for _ in range(count)] if lengths else []
