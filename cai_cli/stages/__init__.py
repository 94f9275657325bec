"""The pipeline's stages, one module each, in order. A stage module imports no other stage: what
one stage needs of another (its spec, to check that its output is fresh) goes through
``stage_module``. The command line's stage commands are generated from ``STAGES``.

No heavy imports here: ``cai --help`` reads this table.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from cai_cli.run.layout import STAGE_DIRS


@dataclass(frozen=True)
class Stage:
    module: str  # in cai_cli.stages
    help: str  # one line for --help
    trains: bool  # a training stage: may run under torchrun / accelerate launch, can be uploaded
    shards: bool = False  # may run as shards (--shard I/N, cai merge): see cai_cli.run.shards


# In pipeline order (the order of STAGE_DIRS).
STAGES = {
    "generate-prompts": Stage("generate_prompts", "New red-team prompts from few-shot seed "
                              "prompts, filtered (off in `cai run` unless enabled).",
                              trains=False, shards=True),
    "generate-sl": Stage("generate_sl", "SL-CAI: answer red-team prompts, critique and revise "
                         "each answer against principles.", trains=False, shards=True),
    "finetune": Stage("finetune", "Supervised fine-tuning on the SL-CAI revisions (TRL "
                      "SFTTrainer, full or LoRA).", trains=True),
    "label-prefs": Stage("label_prefs", "RLAIF labels: sample answer pairs, score them with the "
                         "feedback model's option probabilities.", trains=False,
                         shards=True),
    "train-rm": Stage("train_rm", "Train the reward model on the AI-labelled pairs (TRL "
                      "RewardTrainer, soft labels).", trains=True),
    "optimize": Stage("optimize", "Optimise the policy: DPO on the pairs, or GRPO / RLOO against "
                      "the reward model.", trains=True),
    "evaluate": Stage("evaluate", "Compare models on harmlessness and helpfulness, judged by "
                      "evaluate.judge (default: the feedback model) and the reward model.", trains=False, shards=True),
}
assert list(STAGES) == list(STAGE_DIRS)


def stage_module(command: str):
    return importlib.import_module(f"cai_cli.stages.{STAGES[command].module}")
