"""What a stage will ask of its engines, described before it runs (``Stage.work``).

A stage's work is the list of calls it makes, in the order it makes them:

- ``Generate``: one ``Backend.generate`` call (a batch of prompts, each up to ``max_new_tokens``
  new tokens);
- ``Score``: one ``Backend.score_options`` call (a batch of prompts, the options' probabilities
  read at their end, nothing generated);
- ``Forward``: a reward model's forward passes over texts of known length;
- ``Train``: one trainer run over examples of known length (and, for online RL, the
  completions it samples and scores).

A prompt is rendered as the stage renders it, with every model-written part it will hold (an
answer, a critique, the reasoning of a chain of thought) left empty; ``bounds[i]`` is how many
tokens those parts add to prompt ``i`` at most. ``cai plan`` prices this list; a test runs each
stage and checks that the calls it really made are these (counts exactly, tokens within the
bounds), so the plan and the stage cannot drift apart.

No heavy imports here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from cai_cli.config import AnyModelConfig, LoraConfig, ModelConfig, TrainingConfig
from cai_cli.engines.base import PromptInput


@dataclass
class Generate:
    role: str  # the config key that names the model, e.g. "models.policy"
    model: AnyModelConfig
    prompts: list[PromptInput]
    bounds: list[int]  # tokens the model-written parts add to each prompt, at most
    max_new_tokens: int
    at_most: bool = False  # the prompts are a bound: some may not be asked (e.g. ties)
    kind = "generate"


@dataclass
class Score:
    role: str
    model: AnyModelConfig
    prompts: list[PromptInput]
    bounds: list[int]
    options: Sequence[str]
    at_most: bool = False
    kind = "score"


@dataclass
class Forward:
    role: str
    model: AnyModelConfig
    tokens: list[int]  # the length of each text scored
    kind = "forward"


@dataclass
class Train:
    role: str
    model: ModelConfig
    examples: list[int]  # each training example's tokens (each of its rows, for a pair)
    training: TrainingConfig
    lora: LoraConfig
    rows_per_example: int = 1  # 2: a preference pair (chosen and rejected)
    reference: bool = False  # a frozen reference model's forward pass too (DPO, KL penalty)
    head: bool = True  # through the vocabulary head (False: a reward model's one output)
    # Online RL (GRPO / RLOO): per optimiser step, completions sampled and scored
    completions_per_step: int = 0
    completion_tokens: int = 0
    reward_model: Optional[ModelConfig] = None
    kind = "train"

    def steps_per_epoch(self, world_size: int = 1) -> int:
        """Optimiser steps of one epoch: the examples split over the processes, in
        micro-batches, accumulated."""
        training = self.training
        per_process = math.ceil(len(self.examples) / world_size)
        micro = math.ceil(per_process / training.per_device_batch_size)
        accumulate = training.gradient_accumulation_steps
        return max(micro // accumulate + int(micro % accumulate > 0), 1)

    def steps(self, world_size: int = 1) -> int:
        """Optimiser steps the trainer takes (``max_steps``, else the epochs')."""
        training = self.training
        return training.max_steps or math.ceil(training.epochs * self.steps_per_epoch(world_size))


Call = Generate | Score | Forward | Train


@dataclass
class Work:
    """A stage's calls, the counts ``cai plan`` shows for it, notes on what is a bound, and
    what later stages' work reads of it (``outputs``, e.g. label-prefs' pairs)."""

    calls: list[Call] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    outputs: dict[str, Any] = field(default_factory=dict)
