"""What ``cai plan`` prices is what the stages do: each stage's ``work`` (computed before it runs,
as ``cai plan`` computes it) against the engine calls the stage then really makes on the tiny
model: the same calls in the same order, the same number of prompts in each (at most, where two
equal answers make no pair), every prompt's tokens within its bound, and the training runs'
optimiser steps and examples.

A bound counts each model-written text at its max_new_tokens. The tiny model is random: the text
of its tokens, tokenised again, can take more tokens than it generated (a real model's does not,
or barely), so the bound is scaled by the most a completion of this run grew that way."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from cai_cli.config import load_config

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
HELPFUL = ROOT / "cai_cli" / "resources" / "helpful.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
NEW = 8  # max_new_tokens of every model-written text in this config
# Tokens a model-written text may gain when its decoded text is tokenised again inside another
# prompt (a word split differently at its edges).
EDGE = 2


def write_config(tmp_path: Path, model: Path, judge: Path) -> Path:
    """The whole pipeline on the tiny model; evaluate judged by a jury (the feedback model and
    ``judge``)."""
    training = {"epochs": 1, "per_device_batch_size": 4, "max_length": 256}
    config = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 5},
                 "helpful": {"path": str(HELPFUL), "field": "messages"}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu",
                              "forward_batch_size": 8}},
        "generate_prompts": {"num_prompts": 6, "per_request": 3, "few_shot": 2,
                             "prompts_per_checkpoint": 1, "feedback_filter": True,
                             "feedback_threshold": 0.0, "min_words": 0, "min_readable": 0.0,
                             "min_chars": 1,
                             "sampling": {"max_new_tokens": 3 * NEW}},
        "generate_sl": {"num_revisions": 2, "few_shot": 1, "prompts_per_checkpoint": 3,
                        "sampling": {"max_new_tokens": NEW}},
        "finetune": {"helpful_ratio": 0.5, "training": training},
        "label_prefs": {"limit": 4, "responses_per_prompt": 2, "principles_per_pair": 2,
                        "prompts_per_checkpoint": 2, "sampling": {"max_new_tokens": NEW}},
        "train_rm": {"eval_fraction": 0.25, "training": training},
        "optimize": {"training": {**training, "per_device_batch_size": 2}},
        "evaluate": {"models": ["base", "policy"], "limit": 3, "helpful_limit": 1,
                     "benign_limit": 2, "principles_per_pair": 2,
                     "prompts_per_checkpoint": 2, "sampling": {"max_new_tokens": NEW},
                     "judges": ["feedback", {"name_or_path": str(judge), "device": "cpu",
                                             "forward_batch_size": 8}]},
        "judge_check": {"pairs": {"path": str(ROOT / "cai_cli" / "resources" /
                                              "judge_pairs.jsonl"), "limit": 3},
                        "pairs_per_checkpoint": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Recorder:
    """An engine that records every call made to it, then makes it."""

    def __init__(self, backend, role: str, calls: list):
        object.__setattr__(self, "_backend", backend)
        object.__setattr__(self, "_role", role)
        object.__setattr__(self, "_calls", calls)

    def generate(self, prompts, params, seeds=None):
        results = self._backend.generate(prompts, params, seeds=seeds)
        self._calls.append(("generate", self._role, list(prompts), params.max_new_tokens,
                            [(r.text, r.tokens) for r in results if hasattr(r, "text")]))
        return results

    def score_options(self, prompts, options):
        self._calls.append(("score", self._role, list(prompts), 0, []))
        return self._backend.score_options(prompts, options)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._backend.close()

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def __setattr__(self, name, value):
        setattr(self._backend, name, value)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory, tiny_model_dir):
    """Each stage's work, described before it runs, and the engine calls it made."""
    import cai_cli.engines as engines
    from cai_cli.commands.tiny_model import build_tiny_model
    from cai_cli.stages.judge_check import JudgeCheck
    from cai_cli.stages.pipeline import STAGES
    from cai_cli.stages.planning import WorkContext

    folder = tmp_path_factory.mktemp("work")
    judge = build_tiny_model(folder / "judge", seed=1)
    config = load_config(write_config(folder, tiny_model_dir, judge), [])
    calls: list = []
    load = engines.load_backend
    patch = pytest.MonkeyPatch()
    patch.setattr(engines, "load_backend",
                  lambda model, what: Recorder(load(model, what), what, calls))
    found = {}
    try:
        stages = [JudgeCheck(), *STAGES.values()]
        for stage in stages:
            work = stage.work(config, WorkContext(config, {stage.command}))
            before = len(calls)
            stage.run(config)
            manifest = stage.spec(config).manifest()
            found[stage.command] = (work, calls[before:], manifest, config)
        # Chain of thought: the judge reasons (a generation), then is scored after its reasoning.
        cot = config.model_copy(update={"label_prefs": config.label_prefs.model_copy(
            update={"chain_of_thought": True, "cot_max_new_tokens": NEW})})
        stage = STAGES["label-prefs"]
        work = stage.work(cot, WorkContext(cot, {stage.command}))
        before = len(calls)
        stage.run(cot, force=True)
        found["label-prefs with chain of thought"] = (work, calls[before:],
                                                      stage.spec(cot).manifest(), cot)
    finally:
        patch.undo()
    return found


def tokens_of(config, role: str, model, prompts: list) -> list[int]:
    from cai_cli.stages.planning import WorkContext

    counter = WorkContext(config, set()).tokens(model, role)
    return [len(ids) for ids in counter.encode_many(prompts)]


def matched(planned: list, made: list) -> list[tuple]:
    """Planned and made calls side by side, in order. The last planned calls may not have been
    made where they are marked ``at_most`` (the feedback filter's last batches, when the other
    filters dropped prompts); every other planned call must have been."""
    pairs, rest = [], list(made)
    for call in planned:
        if not rest and call.at_most:
            continue
        assert rest, f"planned {call.kind} call of {call.role} not made"
        assert (rest[0][0], rest[0][1]) == (call.kind, call.role)
        pairs.append((call, rest.pop(0)))
    assert not rest, f"{len(rest)} calls made that were not planned: {rest[0][:2]}"
    return pairs


def growth(config, made: list, planned: list) -> float:
    """The most a completion's text grew in tokens when tokenised again (1.0: not at all)."""
    models = {call.role: call.model for call in planned}
    most = 1.0
    for kind, role, _, _, completions in made:
        if kind != "generate" or not completions:
            continue
        lengths = tokens_of(config, role, models[role], [text for text, _ in completions])
        most = max([most] + [n / max(tokens, 1) for n, (_, tokens) in zip(lengths, completions)])
    return most


@pytest.mark.parametrize("command", ["judge-check", "generate-prompts", "generate-sl",
                                     "label-prefs", "label-prefs with chain of thought",
                                     "evaluate"])
def test_the_engine_calls_a_stage_makes_are_its_work(recorded, command):
    work, made, manifest, config = recorded[command]
    assert manifest["status"] == "complete"
    planned = [call for call in work.calls if call.kind in ("generate", "score")]
    pairs = matched(planned, made)
    grown = growth(config, made, planned)
    for call, (_, role, prompts, max_new_tokens, completions) in pairs:
        if call.kind == "generate":
            assert max_new_tokens == call.max_new_tokens
            assert all(tokens <= max_new_tokens for _, tokens in completions)
        lowest = tokens_of(config, role, call.model, call.prompts)
        # Each model-written text: at most NEW tokens (scaled by ``grown``), and EDGE more once
        # tokenised inside another prompt.
        highest = [low + math.ceil(bound * grown) + EDGE * -(-bound // NEW)
                   for low, bound in zip(lowest, call.bounds)]
        actual = tokens_of(config, role, call.model, prompts)
        if call.at_most:  # equal answers make no pair: rows may be missing, never added
            assert len(prompts) <= len(call.prompts)
            assert max(actual, default=0) <= max(highest, default=0)
            continue
        assert len(prompts) == len(call.prompts)
        for low, high, tokens in zip(lowest, highest, actual):
            assert low <= tokens <= high


def test_counts_that_work_promises_are_what_the_stages_count(recorded):
    work, _, manifest, _ = recorded["generate-sl"]
    assert work.counts["prompts"] == manifest["counts"]["prompts"] == 5
    assert manifest["counts"]["rounds"] == work.counts["revisions"]
    work, made, _, _ = recorded["evaluate"]  # every judge of the jury, one after the other
    roles = [role for kind, role, _, _, _ in made if kind == "score"]
    assert roles[0] == "models.policy" and roles[-1] == "evaluate.judges[1]"
    assert roles == sorted(roles, key=["models.policy", "evaluate.judges[1]"].index)
    work, made, manifest, _ = recorded["label-prefs"]
    assert work.counts["answers"] == sum(len(p) for kind, _, p, _, _ in made
                                         if kind == "generate")
    assert manifest["counts"]["pairs"] <= work.counts["pairs"]
    assert manifest["counts"]["judgments"] == sum(len(p) for kind, _, p, _, _ in made
                                                  if kind == "score")


@pytest.mark.parametrize("command", ["finetune", "train-rm", "optimize"])
def test_a_training_stage_takes_the_steps_its_work_says(recorded, command):
    work, made, manifest, _ = recorded[command]
    (train,) = [call for call in work.calls if call.kind == "train"]
    assert made == []  # trainers run the model themselves, not through an engine
    assert manifest["counts"]["steps"] == train.steps()
    examples = {"finetune": "train_examples", "train-rm": "train_pairs",
                "optimize": "train_pairs"}[command]
    assert manifest["counts"][examples] == work.counts[examples]
