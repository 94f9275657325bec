"""``cai config validate``: check everything a run would read, without running anything.

Schema errors are caught when the config loads; this goes on to the files the config names (the
constitution, the prompt source, local model directories), asks whether each hub model is in the
local cache or else on the hub (offline: it must be cached), and reports every problem together.
"""

from __future__ import annotations

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.errors import UserError


def check_config(config: Config) -> None:
    from cai_cli.constitution import load_constitution
    from cai_cli.data.sources import load_prompts, read_records
    from cai_cli.engines.models import check_model_source

    problems: list[str] = []
    found: list[str] = []

    def attempt(check, describe):
        try:
            found.append(describe(check()))
        except UserError as exc:
            if str(exc) not in problems:  # e.g. one device setting shared by several models
                problems.append(str(exc))

    attempt(lambda: load_constitution(config.constitution_paths),
            lambda c: f"constitution '{c.name}' ({c.source_format}): {len(c.principles)} principles, "
                      f"{len(c.few_shot)} worked examples, {len(c.comparison_examples)} comparison examples")
    attempt(lambda: load_prompts(config.data.red_team, config.seed, "data.red_team"),
            lambda prompts: f"data.red_team: {len(prompts)} prompts")
    if config.data.helpful is not None:
        attempt(lambda: load_prompts(config.data.helpful, config.seed, "data.helpful"),
                lambda prompts: f"data.helpful: {len(prompts)} records")
        if config.finetune.helpful_ratio:  # what finetune trains on: whole conversations
            from cai_cli.stages.finetune import helpful_conversations

            attempt(lambda: helpful_conversations(config),
                    lambda found: f"data.helpful: {len(found)} conversations to fine-tune on")
    if config.train_rm.mix is not None:
        attempt(lambda: sum(1 for _ in read_records(config.train_rm.mix, "train_rm.mix")),
                lambda count: f"train_rm.mix: {count} records")

    # Every model the config names directly; this run's own checkpoints (sft/, rm/, policy/)
    # are made by the stages and checked when a stage needs them.
    models = {"models.policy": config.models.policy.name_or_path}
    if config.models.feedback is not None:
        models["models.feedback"] = config.models.feedback.name_or_path
    for key, value in (("finetune.model", config.finetune.model),
                       ("label_prefs.policy", config.label_prefs.policy),
                       ("train_rm.model", config.train_rm.model),
                       ("optimize.model", config.optimize.model)):
        if value is not None:
            models[key] = value
    for name in config.evaluate.models:
        if name not in ("base", "sft", "policy"):
            models[f"evaluate.models ({name})"] = name
    for what, path in models.items():
        settings = config.models.feedback if what == "models.feedback" else config.models.policy
        model = settings.model_copy(update={"name_or_path": path})
        attempt(lambda: check_model_source(model, what), lambda _: f"{what}: {path}")

    from cai_cli.stages.pipeline import STAGES, training_problems

    problems += training_problems(config, list(STAGES))
    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise UserError(f"config is not ready to run: {count}:\n" + "\n".join(f"  - {p}" for p in problems))
    for line in found:
        ui.info(f"ok  {line}")
    ui.info("config is valid")
