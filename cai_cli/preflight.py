"""``cai config validate``: check everything a run would read, without running anything.

Schema errors are caught when the config loads; this goes on to the files the config names (the
constitution, the prompt source, local model directories) and reports every problem together.
"""

from __future__ import annotations

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.errors import UserError


def check_config(config: Config) -> None:
    from cai_cli.backends.hf import check_model_source
    from cai_cli.constitution import load_constitution
    from cai_cli.data import load_prompts
    from cai_cli.stages.generate_sl import constitution_paths

    problems: list[str] = []
    found: list[str] = []

    def attempt(check, describe):
        try:
            found.append(describe(check()))
        except UserError as exc:
            problems.append(str(exc))

    attempt(lambda: load_constitution(constitution_paths(config)),
            lambda c: f"constitution '{c.name}' ({c.source_format}): {len(c.principles)} principles, "
                      f"{len(c.few_shot)} worked examples, {len(c.comparison_examples)} comparison examples")
    attempt(lambda: load_prompts(config.data.red_team, config.seed, "data.red_team"),
            lambda prompts: f"data.red_team: {len(prompts)} prompts")
    models = {"models.policy": config.models.policy}
    if config.models.feedback is not None:
        models["models.feedback"] = config.models.feedback
    for what, model in models.items():
        attempt(lambda: check_model_source(model, what), lambda _: f"{what}: {model.name_or_path}")

    if problems:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        raise UserError(f"config is not ready to run: {count}:\n" + "\n".join(f"  - {p}" for p in problems))
    for line in found:
        ui.info(f"ok  {line}")
    ui.info("config is valid")
