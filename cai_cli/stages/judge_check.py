"""``cai judge-check``: how good is the feedback model as a judge, on pairs whose better answer
is known?

label-prefs trusts the feedback model's option probabilities. This command asks it the same
questions the same way (``judging.Judge``: the constitution's comparison questions, the
configured prompt format, worked examples and chain of thought, both orders, the same option
scoring) about preference pairs whose better answer is known, and measures:

    agreement          share of pairs where the order- and principle-averaged probability of
                       the known better answer is above 0.5, with a 95% Wilson interval
    per principle      the same, per comparison principle (order-averaged)
    position bias      how often the option shown first wins, the mean probability of each
                       position, and how often the two orders pick the same answer
                       (``diagnostics.label_diagnostics``, as label-prefs reports them)
    calibration        the judge's confidence in its pick (max(p, 1 - p)) against whether the
                       pick is right: a reliability table over [0.5, 1] and its ECE
    cost               seconds per question measured here x the questions the configured
                       label-prefs run asks

Pairs come from any source the prompt loader reads (``judge_check.pairs`` or ``--pairs``): TRL's
preference format, with a ``prompt`` or an implicit one, or Anthropic HH ``chosen`` /
``rejected`` transcripts. The default is a small set shipped with cai_cli, mild and clear-cut.

Outputs: ``<run_dir>/judge/judgments.jsonl`` (resumable, one record per pair),
``<run_dir>/judge/report.json`` and the manifest. It is not a stage of ``cai run``.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path

from cai_cli import ui
from cai_cli.config import Config, PromptSource
from cai_cli.data.transcripts import ROLES
from cai_cli.engines.work import Work
from cai_cli.errors import UserError
from cai_cli.reports.judge_check import build_report, print_report
from cai_cli.run import dist
from cai_cli.run.artifacts import (model_fingerprint, read_jsonl, source_fingerprint,
                                   write_json_atomic)
from cai_cli.run.spec import StageSpec
from cai_cli.stages.base import Stage
from cai_cli.stages.checkpointed import checkpointed
from cai_cli.stages.common import (NothingMade, begin, checkpoint_batches,
                                   constitution_fingerprint)
from cai_cli.stages.label_prefs import LabelPrefs

COMMAND = "judge-check"
SHIPPED = Path(__file__).resolve().parents[1] / "resources" / "judge_pairs.jsonl"
KEY = "judge_check.pairs"
# How the judge is asked: the label_prefs settings that decide a judgment.
ASKING_KEYS = {"few_shot", "prompt_format", "chain_of_thought", "cot_clamp", "cot_max_new_tokens",
               "verdict_samples"}


# ---------------------------------------------------------------------------------------------
# Pairs


def source(config: Config, pairs: str | None = None) -> PromptSource:
    """Where the labelled pairs come from: ``--pairs`` (a file, else a dataset id) over
    ``judge_check.pairs`` over the shipped set."""
    configured = config.judge_check.pairs
    if pairs is None:
        return configured or PromptSource(path=str(SHIPPED))
    rest = configured.model_dump(exclude={"path", "dataset"}) if configured else {}
    from cai_cli.data.sources import FILE_FORMATS

    local = Path(pairs).expanduser()
    # a file; a directory is a dataset saved to disk, anything else a dataset id
    kind = "path" if local.is_file() or (not local.exists() and local.suffix.lower()
                                         in FILE_FORMATS) else "dataset"
    return PromptSource(**rest, **{kind: pairs})


def as_text(messages: list[dict]) -> str:
    """Messages as the text the judge reads: one message as itself, several as a
    Human:/Assistant: transcript."""
    if len(messages) == 1:
        return messages[0]["content"]
    labels = {role: label for label, role in ROLES.items()}  # user -> Human, as HH writes it
    return "\n\n".join(f"{labels.get(m['role'], m['role'].title())}: {m['content']}"
                       for m in messages)


def load_pairs(where: PromptSource, seed: int) -> list[dict]:
    """The labelled pairs of a source as ``{"id", "prompt", "better", "worse"}``: read, checked,
    de-duplicated, shuffled with the seed and capped by the source's ``limit``."""
    # TRL and HH preference records, read as train-rm reads its mix
    from cai_cli.data.sources import preference_pair, read_records

    seen: dict[str, dict] = {}
    records = 0
    for place, record in read_records(where, KEY):
        records += 1
        if not isinstance(record, dict):
            raise UserError(f"{place}: expected a preference record with 'chosen' and 'rejected'")
        pair = preference_pair(record, place)
        if pair is None:
            continue  # the two conversations are the same: nothing to judge
        prompt = as_text(pair["prompt"])
        better, worse = as_text(pair["chosen"]), as_text(pair["rejected"])
        if better == worse or not prompt:
            continue
        key = hashlib.sha256(json.dumps([prompt, better, worse]).encode()).hexdigest()[:12]
        seen.setdefault(key, {"id": key, "prompt": prompt, "better": better, "worse": worse})
    if not seen:
        why = "it holds no records" if not records else "no record has two different answers"
        raise UserError(f"{KEY}: no preference pairs in {where.path or where.dataset} ({why})")
    pairs = sorted(seen.values(), key=lambda p: p["id"])
    random.Random(f"{seed}:judge-check").shuffle(pairs)
    return pairs[: where.limit] if where.limit else pairs


# ---------------------------------------------------------------------------------------------
# The run


def principles_per_pair(config: Config) -> int:
    return config.judge_check.principles_per_pair or config.label_prefs.principles_per_pair


def shipped_or(where: PromptSource) -> PromptSource:
    """``where``, with the shipped set's path as ``cai_cli/resources/...`` wherever it is."""
    if where.path and Path(where.path).expanduser().resolve() == SHIPPED.resolve():
        return where.model_copy(update={"path": "cai_cli/resources/" + SHIPPED.name})
    return where


def stage_spec(config: Config, where: PromptSource) -> StageSpec:
    asking = config.label_prefs.model_dump(mode="json", include=ASKING_KEYS)
    if not config.label_prefs.chain_of_thought:
        asking = {k: v for k, v in asking.items() if not k.startswith("cot_")}
    settings = {
        "seed": config.seed,
        "constitution": config.constitution,
        "models.feedback": config.feedback_model.model_dump(mode="json"),
        "label_prefs": asking,
        # the shipped set by name, not by where this checkout is: a moved checkout stays done
        "judge_check": {"pairs": shipped_or(where).model_dump(mode="json"),
                        "principles_per_pair": principles_per_pair(config),
                        "pairs_per_checkpoint": config.judge_check.pairs_per_checkpoint},
    }
    inputs = {
        "constitution": constitution_fingerprint(config),
        "pairs": source_fingerprint(where),
        "feedback": model_fingerprint(config.feedback_model.name_or_path),
    }
    return StageSpec(COMMAND, config.layout.judge, settings, inputs)


def judge_batch(judge, batch: list[dict]) -> list[dict]:
    """Judge one batch of labelled pairs; each record keeps its judgments with the order
    relative to the known better answer (``AB``: the better answer shown first)."""
    records = [{"id": p["id"], "prompt": p["prompt"], "responses": [p["better"], p["worse"]]}
               for p in batch]
    judged = {pair.prompt_id: pair for pair in judge.batch(records)}
    out = []
    for p in batch:
        pair = judged.get(p["id"])
        if pair is None:  # too long for the feedback model's context: skipped with a warning
            continue
        better_chosen = pair.chosen[0].content == p["better"]
        flip = {"AB": "AB", "BA": "BA"} if better_chosen else {"AB": "BA", "BA": "AB"}
        judgments = [{**j.model_dump(exclude_none=True), "order": flip[j.order]}
                     for j in pair.judgments]
        out.append({"id": p["id"], "prompt": p["prompt"], "better": p["better"],
                    "worse": p["worse"],
                    "p_better": pair.p_chosen if better_chosen else round(1 - pair.p_chosen, 6),
                    "judgments": judgments})
    return out


# ---------------------------------------------------------------------------------------------
# The report


def label_prefs_questions(config: Config) -> int | None:
    """Questions the configured label-prefs run asks the feedback model (at most: identical
    answers make no pair), or None when its prompts cannot be read here."""
    from cai_cli.stages.planning import WorkContext

    try:
        return LabelPrefs().work(config, WorkContext(config, {"label-prefs"})).counts["judge_passes"]
    except UserError:
        return None


def refuse_empty(config: Config, pairs: int, made) -> None:
    """``NothingMade`` when none of ``pairs`` pairs was judged: every comparison outgrew the
    feedback model's context, or every pair's two answers were the same text."""
    if not made.empty or not pairs:
        return
    skipped = made.extra.get("skipped", 0)
    why = (f"all {skipped} pairs were skipped, no comparison fitting the feedback model's "
           f"context (the warnings above); raise {config.feedback_key}.max_context if the "
           "model reads longer inputs, or check it on shorter pairs (--pairs)") if skipped else \
        f"none of the {pairs} pairs has two different answers: nothing to judge; check --pairs"
    raise NothingMade(f"judge-check: {why}")


class JudgeCheck(Stage):
    """``cai judge-check`` (not a stage of ``cai run``): ``pairs`` is ``--pairs``."""

    command = COMMAND

    def __init__(self, pairs: str | None = None):
        self.pairs = pairs

    def spec(self, config: Config) -> StageSpec:
        return stage_spec(config, source(config, self.pairs))

    def preflight(self, config: Config) -> None:
        from cai_cli.engines.models import check_model_source

        check_model_source(config.feedback_model, config.feedback_key)

    def output(self, config: Config) -> Path:
        return config.layout.judge_report

    def run(self, config: Config, *, force: bool = False, shard=None) -> Path | None:
        from cai_cli.constitution import load_constitution
        from cai_cli.engines.judge import Judge

        dist.refuse_multiprocess(COMMAND)
        where = source(config, self.pairs)
        labelled = load_pairs(where, config.seed)
        constitution = load_constitution(config.constitution_paths)
        self.preflight(config)
        stage = stage_spec(config, where)
        run = begin(stage, config, force=force)
        layout = config.layout
        if run is None:
            if layout.judge_report.is_file():
                print_report(json.loads(layout.judge_report.read_text()))
            return layout.judge_report
        judges: dict = {}

        def make(feedback, batch: list[dict], step) -> list[dict]:
            if feedback not in judges:
                judges.clear()
                judges[feedback] = Judge(config, constitution, feedback,
                                         principles_per_pair=principles_per_pair(config),
                                         pairs_per_prompt=None)
            started = time.perf_counter()
            judged = judge_batch(judges[feedback], batch)
            extra = step.extra
            extra["seconds"] = extra.get("seconds", 0.0) + time.perf_counter() - started
            extra["questions"] = extra.get("questions", 0) + sum(len(r["judgments"])
                                                                 for r in judged)
            extra["skipped"] = extra.get("skipped", 0) + judges[feedback].skipped_last
            step.rate(f"{extra['questions'] / max(extra['seconds'], 1e-9):,.1f} questions/s")
            return judged

        try:
            out = checkpointed(
                run, layout.judge_judgments,
                checkpoint_batches(labelled, config.judge_check.pairs_per_checkpoint), make,
                label="judging", engine=(config.feedback_model, config.feedback_key),
                fresh=force, check=lambda made: refuse_empty(config, len(labelled), made))
        except NothingMade:  # fixing the settings and rerunning starts anew
            run.discard()
            raise
        records = read_jsonl(layout.judge_judgments)
        timing = {"seconds": out.extra.get("seconds"), "questions": out.extra.get("questions")}
        report = build_report(config, shipped_or(where).path or where.dataset, records, timing,
                              label_prefs_questions(config), principles_per_pair(config),
                              skipped=out.extra.get("skipped", 0))
        write_json_atomic(layout.judge_report, report)
        run.manifest.counts.update({"pairs": report["pairs"], "skipped_pairs": report["skipped"],
                                    "judgments": sum(len(r["judgments"]) for r in records)})
        run.manifest.stats = {key: report[key] for key in
                              ("agreement", "ci95", "position", "calibration", "verdict")}
        run.complete()
        print_report(report)
        ui.info(f"judge-check: report in {layout.judge_report}")
        return layout.judge_report

    def work(self, config: Config, ctx) -> Work:
        """The judge's questions about every labelled pair, a checkpoint at a time."""
        from cai_cli.constitution import load_constitution
        from cai_cli.engines.judge import Judge

        labelled = load_pairs(source(config, self.pairs), config.seed)
        feedback = config.feedback_model
        judge = Judge(config, load_constitution(config.constitution_paths),
                      ctx.tokens(feedback, config.feedback_key),
                      principles_per_pair=principles_per_pair(config), pairs_per_prompt=None)
        calls: list = []
        for batch in checkpoint_batches(labelled, config.judge_check.pairs_per_checkpoint):
            records = [{"id": p["id"], "prompt": p["prompt"], "responses": [p["better"], p["worse"]]}
                       for p in batch]
            calls += judge.work(records, 0, config.feedback_key, feedback, known=True)
        return Work(calls, counts={"pairs": len(labelled)})
