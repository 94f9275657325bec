"""The feedback model as a judge: a pair of answers under one comparison principle, asked as a
multiple-choice question in both orders, read from the probabilities of the option letters.

label-prefs labels its pairs with it and evaluate compares models with it, so both ask the same
question the same way. ``Judge.batch`` turns sampled records into pair records
(``records.Pair``); the soft label is the order-averaged, principle-averaged probability.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
from dataclasses import dataclass
from typing import Callable

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.constitution import Constitution
from cai_cli.engines.base import Completion, NoLogprobs, Overflow, SamplingParams
from cai_cli.engines.prompts import (OPTIONS, TRANSCRIPT_STOPS, classification_prompt,
                                     comparison_prompt, resolve_format)
from cai_cli.run.records import Judgment, Message, Pair
from cai_cli.run.seeding import draw, record_seed


def option_probability(logprobs: list[float]) -> float:
    """Probability of the first option, normalised over the options."""
    top = max(logprobs)
    weights = [math.exp(x - top) for x in logprobs]
    return weights[0] / sum(weights)


def named_option(text: str) -> int | None:
    """The option a verdict names (0 for A, 1 for B) when it starts with one, e.g. "A)" or
    " (B"; None otherwise."""
    head = text.strip().lstrip("(").strip()
    for index, option in enumerate(OPTIONS):
        if head.startswith(option) and not head[len(option):len(option) + 1].isalnum():
            return index
    return None


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


VERDICT_ADVICE = ("use a server that returns log-probabilities (vLLM, SGLang, TGI, llama.cpp) "
                  "for probabilities")


def sampled_verdicts(backend, questions: list, keys: list[tuple], *, seed: int,
                     samples: int) -> list[float | Overflow]:
    """For a feedback model that gives no log-probabilities: the probability of the first
    option as the share of sampled answers that name it. ``samples`` answers per question,
    each seeded by its key: one greedy answer gives a hard 0/1 label, several (temperature 1)
    a vote share. An answer that names no option does not vote; a question without a vote
    counts as a tie (0.5). The caller says what the fallback means for its use."""
    params = SamplingParams(max_new_tokens=4, temperature=0.0 if samples == 1 else 1.0)
    seeds = [record_seed(seed, *key, "verdict", k) for key in keys for k in range(samples)]
    answers = backend.generate([q for q in questions for _ in range(samples)], params,
                               seeds=seeds)
    out: list[float | Overflow] = []
    silent = 0
    for index in range(len(questions)):
        mine = answers[index * samples:(index + 1) * samples]
        overflow = next((a for a in mine if isinstance(a, Overflow)), None)
        if overflow is not None:
            out.append(overflow)
            continue
        votes = [named_option(a.text) for a in mine]
        votes = [v for v in votes if v is not None]
        silent += not votes
        out.append(votes.count(0) / len(votes) if votes else 0.5)
    if silent:
        ui.warn(f"{silent} of {len(questions)} questions got no answer naming an option; "
                "counted as ties (0.5)")
    return out


@dataclass(frozen=True)
class YesNo:
    """A yes/no question's answer: ``p_yes`` the mean of ``by_order``, P(Yes) with Yes shown as
    option (A) and with No shown as (A); ``source`` ``logprobs`` or ``verdict``."""

    p_yes: float
    by_order: tuple[float, float]
    source: str


def yes_probabilities(backend, fmt: str, items: list[tuple[str, str | None]], question: str,
                      keys: list[str], *, seed: int, verdict_samples: int,
                      on_verdicts: Callable[[str], None]) -> list[YesNo | None]:
    """For each ``(prompt, answer)`` (``answer`` None: the request alone), the probability that
    the answer to ``question`` about it is yes: asked with Yes as option (A) and again with No
    as (A), the two probabilities averaged, as a comparison averages its two orders. None where
    the question does not fit the model's context. Without log-probabilities, from sampled
    verdicts (``sampled_verdicts``, seeded by ``(key, question, order)``), after calling
    ``on_verdicts(why)`` so the caller can say what that means for its figures."""
    questions = [classification_prompt(prompt, answer, question, yes_first, fmt)
                 for prompt, answer in items for yes_first in (True, False)]
    try:
        firsts = [s if isinstance(s, Overflow) else option_probability(s)
                  for s in backend.score_options(questions, OPTIONS)]
        source = "logprobs"
    except NoLogprobs as exc:
        on_verdicts(str(exc))
        firsts = sampled_verdicts(
            backend, questions, [(key, question, order) for key in keys for order in ("yes", "no")],
            seed=seed, samples=verdict_samples)
        source = "verdict"
    out: list[YesNo | None] = []
    for yes_first, no_first in zip(firsts[::2], firsts[1::2]):
        if isinstance(yes_first, Overflow) or isinstance(no_first, Overflow):
            out.append(None)
        else:
            out.append(YesNo((yes_first + 1.0 - no_first) / 2, (yes_first, 1.0 - no_first),
                             source))
    return out


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
        self.warned_verdicts: set[str] = set()
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

    def work(self, records: list[dict], answer_bound: int, role: str, model, *,
             at_most: bool = False, known: bool = False) -> list:
        """The engine calls ``batch`` makes for ``records`` (``engines.work``), with the answers
        left empty: each question holds two answers of at most ``answer_bound`` tokens each
        (and with chain of thought, its reasoning). ``known``: the records' answers are the
        ones that will be judged, so they are kept. ``at_most``: two equal answers make no
        pair, so their questions may not be asked."""
        from cai_cli.engines.work import Generate, Score

        settings = self.settings
        _, jobs = self.plan(records)
        blank = jobs if known else [dataclasses.replace(job, first="", second="") for job in jobs]
        bound = [0 if known else 2 * answer_bound] * len(jobs)
        if not settings.chain_of_thought:
            return [Score(role, model, [job.prompt_input(self.fmt, False) for job in blank], bound,
                          OPTIONS, at_most=at_most)]
        reasoning = settings.cot_max_new_tokens
        return [Generate(role, model, [job.prompt_input(self.fmt, True) for job in blank], bound,
                         reasoning, at_most=at_most),
                Score(role, model, [job.prompt_input(self.fmt, True, "") for job in blank],
                      [b + reasoning for b in bound], OPTIONS, at_most=at_most)]

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
        questions = [job.prompt_input(self.fmt, cot, r if isinstance(r, str) else None)
                     for job, r in zip(jobs, reasoning)]
        try:
            firsts = [s if isinstance(s, Overflow) else option_probability(s)
                      for s in self.backend.score_options(questions, OPTIONS)]
            source = "logprobs"
        except NoLogprobs as exc:
            keys = [(pairs[job.pair][0], job.principle, job.order) for job in jobs]
            firsts, source = self.verdicts(questions, keys, str(exc)), "verdict"

        judgments: dict[int, list[dict]] = {}
        overflowing: set[int] = set()
        low, high = settings.cot_clamp
        for job, thought, p_first in zip(jobs, reasoning, firsts):
            if isinstance(thought, Overflow) or isinstance(p_first, Overflow):
                overflowing.add(job.pair)
                continue
            entry = {"principle": job.principle, "order": job.order, "p_first": round(p_first, 6),
                     "label_source": source}
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

    def classify(self, items: list[tuple[str, str, str]], question: str) -> list[float | None]:
        """For each ``(key, prompt, answer)``, the probability that the answer to ``question``
        about it is yes (``yes_probabilities``, asked as ``batch`` asks); None where the question
        does not fit the model's context."""
        found = yes_probabilities(
            self.backend, self.fmt, [(prompt, answer) for _, prompt, answer in items], question,
            [key for key, _, _ in items], seed=self.config.seed,
            verdict_samples=self.settings.verdict_samples,
            on_verdicts=lambda why: self.warn_verdicts(
                why, "yes/no answers are sampled verdicts ({n} per question), not "
                "probabilities"))
        return [None if answer is None else answer.p_yes for answer in found]

    def warn_verdicts(self, why: str, what: str) -> None:
        """Say once per kind of figure (``what``, with ``{n}`` the samples per question) that
        it comes from sampled verdicts."""
        if what not in self.warned_verdicts:
            self.warned_verdicts.add(what)
            ui.warn(f"{why}: {what.format(n=self.settings.verdict_samples)}; {VERDICT_ADVICE}")

    def verdicts(self, questions: list, keys: list[tuple],
                 why: str) -> list[float | Overflow]:
        """``sampled_verdicts`` for the comparisons of ``batch``, ``label_prefs.verdict_samples``
        per question, each seeded by its judgment."""
        self.warn_verdicts(why, "labels are sampled verdicts ({n} per question, label_source "
                           "'verdict' in each judgment), not probabilities")
        return sampled_verdicts(self.backend, questions, keys, seed=self.config.seed,
                                samples=self.settings.verdict_samples)
