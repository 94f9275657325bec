"""The feedback model as a judge: a pair of answers under one comparison principle, asked as a
multiple-choice question in both orders, read from the probabilities of the option letters.

label-prefs labels its pairs with it and evaluate compares models with it, so both ask the same
question the same way. ``Judge.batch`` turns sampled records into pair records
(``records.Pair``); the soft label is the order-averaged, principle-averaged probability.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass

from cai_cli import ui
from cai_cli.backends.base import Completion, Overflow, SamplingParams
from cai_cli.config import Config
from cai_cli.constitution import Constitution
from cai_cli.prompting import OPTIONS, TRANSCRIPT_STOPS, comparison_prompt, resolve_format
from cai_cli.records import Judgment, Message, Pair
from cai_cli.seeding import draw, record_seed


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
    """Scores the pairs of one batch of sampled prompts with the feedback model.

    How the judge is asked (prompt format, worked examples, chain of thought) comes from the
    ``label_prefs`` section, so evaluation asks exactly as labelling did; how many principles
    and pairs per prompt are the caller's (label-prefs and evaluate set their own)."""

    def __init__(self, config: Config, constitution: Constitution, backend, *,
                 principles_per_pair: int, pairs_per_prompt: int | None):
        self.config, self.constitution, self.backend = config, constitution, backend
        self.settings = settings = config.label_prefs
        self.principles_per_pair, self.pairs_per_prompt = principles_per_pair, pairs_per_prompt
        self.fmt = resolve_format(settings.prompt_format, backend, "label_prefs.prompt_format")
        self.comparisons = 0  # judged in this process, for the rate column
        self.skipped_last = 0

    def pairs_of(self, record: dict) -> list[tuple[str, str, str]]:
        """``(pair id, answer a, answer b)``: every pair of different answers, or a seeded
        sample of ``pairs_per_prompt`` of them."""
        answers = record["responses"]
        combos = [(i, j) for i, j in itertools.combinations(range(len(answers)), 2)
                  if answers[i] != answers[j]]
        limit = self.pairs_per_prompt
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
                principles = draw(rng, self.constitution.principles, self.principles_per_pair)
                examples = draw(rng, self.constitution.comparison_examples, min(
                    settings.few_shot, len(self.constitution.comparison_examples)))
                pairs.append((pair_id, record, a, b))
                jobs += [Comparison(len(pairs) - 1, principle.id, order, record["prompt"], first,
                                    second, principle.comparison, examples)
                         for principle in principles
                         for order, first, second in (("ab", a, b), ("ba", b, a))]
        return pairs, jobs

    def comparisons_of(self, records: list[dict]) -> list[Comparison]:
        return self.plan(records)[1]

    def batch(self, records: list[dict]) -> list[Pair]:
        settings, cot = self.settings, self.settings.chain_of_thought
        pairs, jobs = self.plan(records)
        reasoning: list = [None] * len(jobs)
        if cot:
            params = SamplingParams(
                max_new_tokens=settings.cot_max_new_tokens, temperature=0.0,
                stop=("So the answer is", "\nSo the answer") + TRANSCRIPT_STOPS)
            seeds = [record_seed(self.config.seed, pairs[job.pair][0], job.principle, job.order,
                                 "reason") for job in jobs]
            reasoning = [r.text if isinstance(r, Completion) else r for r in self.backend.generate(
                [job.prompt_input(self.fmt, True) for job in jobs], params, seeds=seeds)]
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
            out.append(Pair(
                id=pair_id,
                prompt=[Message(role="user", content=record["prompt"])],
                chosen=[Message(role="assistant", content=chosen)],
                rejected=[Message(role="assistant", content=rejected)],
                p_chosen=round(p_a if a_wins else 1.0 - p_a, 6),
                order_disagreement=disagree,
                judgments=[Judgment(**j) for j in shown],
                prompt_id=record["id"],
            ))
        self.comparisons += len(jobs) // 2  # a pair under one principle, both orders
        self.skipped_last = len(pairs) - len(out)
        return out
