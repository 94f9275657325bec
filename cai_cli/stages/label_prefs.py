"""``cai label-prefs``: AI-feedback preference labels, as in the paper's RLAIF stage.

Two phases, each resumable on its own:

1. **Sample.** The policy (by default the SL-CAI model in ``<run_dir>/sft``) answers each prompt
   ``responses_per_prompt`` times -> ``prefs/samples.jsonl``. The policy is then unloaded, so a
   large policy and a large feedback model never share the device.
2. **Judge.** Pairs are formed from each prompt's answers. For each pair, ``principles_per_pair``
   comparison questions are drawn (seeded by the pair), and the feedback model is shown each
   question with the two answers as options (A) and (B), in both orders. The probability of each
   option is read from its next-token log-probabilities at the answer position and normalised
   over the two options: no text is generated (except the reasoning in chain-of-thought mode,
   whose probabilities are then clamped to ``cot_clamp``). For answer ``a`` of a pair::

       p(a) = mean over principles of ( p_A(a shown first) + 1 - p_A(b shown first) ) / 2

   The answer with p >= 0.5 is ``chosen`` and ``p_chosen`` its probability. Each judgment keeps
   the principle, the order (``AB``: chosen shown first as (A); ``BA``: rejected first) and
   ``p_first``, the probability of the option shown first -> ``prefs/pairs.jsonl``.
"""

from __future__ import annotations

import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

from rich.progress import TextColumn

from cai_cli import ui
from cai_cli.artifacts import ResumableJsonl, model_fingerprint
from cai_cli.backends.base import Completion, Overflow, SamplingParams
from cai_cli.config import Config, ModelConfig
from cai_cli.constitution import Constitution, load_constitution
from cai_cli.data import Prompt, load_prompts
from cai_cli.errors import UserError
from cai_cli.prompting import (OPTIONS, TRANSCRIPT_STOPS, answer_prompt,
                               comparison_prompt, resolve_format)
from cai_cli.stages import generate_sl
from cai_cli.stages.common import StageSpec, begin, complete, require_complete


COT_KEYS = {"cot_clamp", "cot_max_new_tokens"}  # used only with chain_of_thought


def policy_path(config: Config) -> str:
    return config.label_prefs.policy or str(Path(config.run_dir) / "sft")


def spec(config: Config) -> StageSpec:
    sl = generate_sl.spec(config)
    settings = {
        "seed": config.seed,
        "constitution": sl.settings["constitution"],
        "data.red_team": sl.settings["data.red_team"],
        "models.policy": policy_model(config).model_dump(mode="json"),
        "models.feedback": config.feedback_model.model_dump(mode="json"),
        "label_prefs": config.label_prefs.model_dump(
            mode="json", exclude=set() if config.label_prefs.chain_of_thought else COT_KEYS),
        "generate_sl": config.generate_sl.model_dump(mode="json",
                                                      include={"prompt_format", "system_prompt"}),
    }
    inputs = {
        "constitution": sl.inputs["constitution"],
        "prompts": sl.inputs["prompts"],
        "policy": model_fingerprint(policy_path(config)),
        "feedback": model_fingerprint(config.feedback_model.name_or_path),
    }
    after = ("finetune",) if config.label_prefs.policy is None else ()
    return StageSpec("label-prefs", Path(config.run_dir) / "prefs", settings, inputs, after)


def policy_model(config: Config) -> ModelConfig:
    """The policy's engine settings, pointed at the model that samples the answers."""
    return config.models.policy.model_copy(update={"name_or_path": policy_path(config)})


def select_prompts(config: Config) -> list[Prompt]:
    """The SL prompts, or with ``held_out`` those after them in the same seeded order."""
    source = config.data.red_team
    if not config.label_prefs.held_out:
        prompts = load_prompts(source, config.seed)
    else:
        if source.limit is None:
            raise UserError("label_prefs.held_out needs data.red_team.limit, so that some prompts "
                            "are left over after the ones SL-CAI used")
        everything = load_prompts(source.model_copy(update={"limit": None}), config.seed)
        prompts = everything[source.limit:]
        if not prompts:
            raise UserError(f"label_prefs.held_out: all {len(everything)} prompts of data.red_team "
                            f"are used by SL-CAI (limit {source.limit}); lower the limit")
    return prompts[: config.label_prefs.limit] if config.label_prefs.limit else prompts


def check_inputs(config: Config) -> None:
    """The default policy is the SL-CAI model: it must be there and finished."""
    from cai_cli.models import check_model_source

    if config.label_prefs.policy is None:
        require_complete(Path(config.run_dir) / "sft", "finetune",
                         "or set label_prefs.policy to a model to sample from")
    check_model_source(policy_model(config), "label_prefs.policy")
    check_model_source(config.feedback_model, "models.feedback" if config.models.feedback
                       else "models.policy")


def run(config: Config, *, force: bool = False) -> Path | None:
    stage = spec(config)
    settings = config.label_prefs
    constitution = load_constitution(generate_sl.constitution_paths(config))
    prompts = select_prompts(config)
    check_inputs(config)
    manifest = begin(stage, config, force=force)
    if manifest is None:
        return stage.directory / "pairs.jsonl"
    started = time.perf_counter()

    samples = ResumableJsonl(stage.directory / "samples.jsonl", stage.fingerprint)
    done = samples.open(fresh=force)
    batches = [prompts[i:i + settings.batch_size] for i in range(0, len(prompts), settings.batch_size)]
    if not samples.finished:
        from cai_cli.backends import load_backend

        policy = load_backend(policy_model(config), "label_prefs.policy")
        with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
            task = bar.add_task("sampling", total=len(prompts), rate="",
                                completed=sum(len(b) for b in batches[:done]))
            for index in range(done, len(batches)):
                samples.append_batch(sample_batch(config, policy, batches[index], index))
                bar.update(task, advance=len(batches[index]))
        samples.finish()
        policy.close()

    sampled = samples.records()
    pairs = ResumableJsonl(stage.directory / "pairs.jsonl", stage.fingerprint)
    done = pairs.open(fresh=force)
    groups = [sampled[i:i + settings.batch_size] for i in range(0, len(sampled), settings.batch_size)]
    if not pairs.finished:
        from cai_cli.backends import load_backend

        feedback = load_backend(config.feedback_model, "models.feedback")
        judge = Judge(config, constitution, feedback)
        with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
            task = bar.add_task("judging", total=len(sampled), rate="",
                                completed=sum(len(g) for g in groups[:done]))
            judge_started = time.perf_counter()
            for index in range(done, len(groups)):
                records = judge.batch(groups[index], index)
                skipped = pairs.extra.get("skipped", 0) + judge.skipped_last
                pairs.append_batch(records, skipped=skipped)
                rate = judge.comparisons / max(time.perf_counter() - judge_started, 1e-9)
                bar.update(task, advance=len(groups[index]), rate=f"{rate:,.1f} comparisons/s")
        feedback.close()
        pairs.finish()

    records = pairs.records()
    confidence = [abs(r["p_chosen"] - 0.5) for r in records]
    manifest.counts = {"prompts": len(prompts), "sampled_prompts": len(sampled),
                       "pairs": len(records), "skipped_pairs": pairs.extra.get("skipped", 0),
                       "judgments": sum(len(r["judgments"]) for r in records)}
    manifest.stats = {
        "order_disagreement": round(sum(r["order_disagreement"] for r in records)
                                    / max(len(records), 1), 4),
        "mean_confidence": round(sum(confidence) / max(len(confidence), 1), 4),
        "chain_of_thought": settings.chain_of_thought,
    }
    manifest.timings["label_seconds"] = round(time.perf_counter() - started, 2)
    complete(stage, manifest)
    samples.cleanup()
    pairs.cleanup()
    ui.info(f"label-prefs: {len(records)} pairs, mean confidence {manifest.stats['mean_confidence']:.3f}, "
            f"orders disagree on {manifest.stats['order_disagreement']:.0%} -> {pairs.final_path}\n"
            f"  look at them with: cai inspect {pairs.final_path}")
    return pairs.final_path


def sample_batch(config: Config, policy, prompts: list[Prompt], batch: int) -> list[dict]:
    """``responses_per_prompt`` answers to each prompt, in one backend call."""
    settings, fmt = config.label_prefs, resolve_format(config.generate_sl.prompt_format, policy,
                                                              "generate_sl.prompt_format")
    n = settings.responses_per_prompt
    sampling = settings.sampling
    params = SamplingParams(
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k, seed=generate_sl.call_seed(config.seed, batch, "sample"),
        stop=TRANSCRIPT_STOPS if fmt == "transcript" else ())
    conversation = [answer_prompt(p.text, fmt, config.generate_sl.system_prompt) for p in prompts]
    results = policy.generate([c for c in conversation for _ in range(n)], params)
    records = []
    for index, prompt in enumerate(prompts):
        answers = results[index * n:(index + 1) * n]
        overflow = next((a for a in answers if isinstance(a, Overflow)), None)
        if overflow is not None:  # the same prompt n times: all fit or none does
            ui.warn(f"prompt {prompt.id} skipped: {overflow}; raise models.policy.max_context or "
                    "lower label_prefs.sampling.max_new_tokens")
            continue
        records.append({"id": prompt.id, "prompt": prompt.text,
                        "responses": [a.text for a in answers]})
    return records


def option_probability(logprobs: list[float]) -> float:
    """Probability of the first option, normalised over the options."""
    top = max(logprobs)
    weights = [math.exp(x - top) for x in logprobs]
    return weights[0] / sum(weights)


def combine(judgments: list[dict]) -> tuple[float, bool]:
    """From raw judgments of answer ``a`` vs ``b`` (``order`` "ab": a shown first), the
    probability that ``a`` is better (order-averaged per principle, then averaged over
    principles) and whether the two orders ever disagree on a principle."""
    by_principle: dict[str, dict[str, float]] = {}
    for j in judgments:
        p_a = j["p_first"] if j["order"] == "ab" else 1.0 - j["p_first"]
        by_principle.setdefault(j["principle"], {})[j["order"]] = p_a
    means, disagree = [], False
    for orders in by_principle.values():
        means.append(sum(orders.values()) / len(orders))
        if len(orders) == 2 and (orders["ab"] - 0.5) * (orders["ba"] - 0.5) < 0:
            disagree = True
    return sum(means) / len(means), disagree


@dataclass(frozen=True)
class Comparison:
    """One question to the feedback model: a pair under one principle, in one order."""

    pair: int  # index of the pair in its batch
    principle: str
    order: str  # "ab": answer a shown first as (A); "ba": answer b first
    prompt: str
    first: str
    second: str
    question: str
    examples: list

    def prompt_input(self, fmt: str, chain_of_thought: bool, reasoning: str | None = None):
        return comparison_prompt(self.prompt, self.question, self.first, self.second,
                                 self.examples, fmt, chain_of_thought=chain_of_thought,
                                 reasoning=reasoning)


class Judge:
    """Scores the pairs of one batch of sampled prompts with the feedback model."""

    def __init__(self, config: Config, constitution: Constitution, backend):
        self.config, self.constitution, self.backend = config, constitution, backend
        self.settings = settings = config.label_prefs
        self.fmt = resolve_format(settings.prompt_format, backend, "label_prefs.prompt_format")
        self.comparisons = 0  # judged in this process, for the rate column
        self.skipped_last = 0

    def pairs_of(self, record: dict) -> list[tuple[str, str, str]]:
        """``(pair id, answer a, answer b)``: every pair of different answers, or a seeded
        sample of ``pairs_per_prompt`` of them."""
        answers = record["responses"]
        combos = [(i, j) for i, j in itertools.combinations(range(len(answers)), 2)
                  if answers[i] != answers[j]]
        limit = self.settings.pairs_per_prompt
        if limit and len(combos) > limit:
            combos = sorted(random.Random(f"{self.config.seed}:{record['id']}").sample(combos, limit))
        return [(f"{record['id']}-{i}-{j}", answers[i], answers[j]) for i, j in combos]

    def plan(self, records: list[dict]) -> tuple[list[tuple], list[Comparison]]:
        """The pairs of these sampled prompts, and every question to ask about them: each pair
        under its drawn principles (seeded by the pair), in both orders."""
        settings = self.settings
        pairs, jobs = [], []
        for record in records:
            for pair_id, a, b in self.pairs_of(record):
                rng = random.Random(f"{self.config.seed}:{pair_id}")
                principles = generate_sl.draw(rng, self.constitution.principles,
                                              settings.principles_per_pair)
                examples = generate_sl.draw(rng, self.constitution.comparison_examples, min(
                    settings.few_shot, len(self.constitution.comparison_examples)))
                pairs.append((pair_id, record, a, b))
                jobs += [Comparison(len(pairs) - 1, principle.id, order, record["prompt"], first,
                                    second, principle.comparison, examples)
                         for principle in principles
                         for order, first, second in (("ab", a, b), ("ba", b, a))]
        return pairs, jobs

    def comparisons_of(self, records: list[dict]) -> list[Comparison]:
        return self.plan(records)[1]

    def batch(self, records: list[dict], batch: int) -> list[dict]:
        settings, cot = self.settings, self.settings.chain_of_thought
        pairs, jobs = self.plan(records)
        reasoning: list = [None] * len(jobs)
        if cot:
            params = SamplingParams(
                max_new_tokens=settings.cot_max_new_tokens, temperature=0.0,
                seed=generate_sl.call_seed(self.config.seed, batch, "reason"),
                stop=("So the answer is", "\nSo the answer") + TRANSCRIPT_STOPS)
            reasoning = [r.text if isinstance(r, Completion) else r for r in self.backend.generate(
                [job.prompt_input(self.fmt, True) for job in jobs], params)]
        scores = self.backend.score_options(
            [job.prompt_input(self.fmt, cot, r if isinstance(r, str) else None)
             for job, r in zip(jobs, reasoning)], OPTIONS)

        judgments: dict[int, list[dict]] = {}
        overflowing: set[int] = set()
        low, high = settings.cot_clamp
        for job, thought, score in zip(jobs, reasoning, scores):
            if isinstance(thought, Overflow) or isinstance(score, Overflow):
                overflowing.add(job.pair)
                continue
            p_first = option_probability(score)
            entry = {"principle": job.principle, "order": job.order, "p_first": round(p_first, 6)}
            if cot:
                entry["p_first"] = round(min(max(p_first, low), high), 6)
                entry["reasoning"] = thought
            judgments.setdefault(job.pair, []).append(entry)

        out = []
        for index, (pair_id, record, a, b) in enumerate(pairs):
            if index in overflowing:
                ui.warn(f"pair {pair_id} skipped: a comparison does not fit the feedback model's "
                        "context; raise models.feedback.max_context or shorten the answers")
                continue
            raw = judgments[index]
            p_a, disagree = combine(raw)
            a_wins = p_a >= 0.5
            chosen, rejected = (a, b) if a_wins else (b, a)
            # Orders relative to the chosen answer: "AB" = chosen shown first.
            shown = [{**j, "order": "AB" if (j["order"] == "ab") == a_wins else "BA"} for j in raw]
            out.append({
                "id": pair_id,
                "prompt": [{"role": "user", "content": record["prompt"]}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "p_chosen": round(p_a if a_wins else 1.0 - p_a, 6),
                "order_disagreement": disagree,
                "judgments": shown,
                "prompt_id": record["id"],
            })
        self.comparisons += len(jobs) // 2  # a pair under one principle, both orders
        self.skipped_last = len(pairs) - len(out)
        return out
