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
from statistics import fmean

from cai_cli import ui
from cai_cli.run.artifacts import (ResumableJsonl, model_fingerprint, read_jsonl,
                               source_fingerprint, write_json_atomic)
from cai_cli.config import Config, PromptSource
from cai_cli.reports.statistics import (AGREEING, BIASED, expected_calibration_error, label_diagnostics,
                                 reliability_table, wilson_interval)
from cai_cli.errors import UserError
from cai_cli.stages.common import StageSpec, begin, checkpoint_batches, constitution_fingerprint
from cai_cli.data.transcripts import ROLES

COMMAND = "judge-check"
SHIPPED = Path(__file__).resolve().parents[1] / "resources" / "judge_pairs.jsonl"
KEY = "judge_check.pairs"
# How the judge is asked: the label_prefs settings that decide a judgment.
ASKING_KEYS = {"few_shot", "prompt_format", "chain_of_thought", "cot_clamp", "cot_max_new_tokens",
               "verdict_samples"}
WEAK = 0.7  # agreement below this (but above chance): labels with a weak signal


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
    from cai_cli.data.sources import read_records
    # TRL and HH preference records, read as train-rm reads its mix
    from cai_cli.stages.train_rm import mix_pair

    seen: dict[str, dict] = {}
    records = 0
    for place, record in read_records(where, KEY):
        records += 1
        if not isinstance(record, dict):
            raise UserError(f"{place}: expected a preference record with 'chosen' and 'rejected'")
        pair = mix_pair(record, place)
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


def spec(config: Config, where: PromptSource) -> StageSpec:
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


def run(config: Config, *, pairs: str | None = None, force: bool = False) -> Path | None:
    from cai_cli.run import dist
    from cai_cli.constitution import load_constitution
    from cai_cli.engines.models import check_model_source

    dist.refuse_multiprocess(COMMAND)
    where = source(config, pairs)
    labelled = load_pairs(where, config.seed)
    constitution = load_constitution(config.constitution_paths)
    check_model_source(config.feedback_model, "models.feedback" if config.models.feedback
                       else "models.policy")
    stage = spec(config, where)
    run = begin(stage, config, force=force)
    layout = config.layout
    if run is None:
        if layout.judge_report.is_file():
            print_report(json.loads(layout.judge_report.read_text()))
        return layout.judge_report

    out = ResumableJsonl(layout.judge_judgments, stage.fingerprint)
    done = out.open(fresh=force)
    batches = checkpoint_batches(labelled, config.judge_check.pairs_per_checkpoint)
    if not out.finished:
        from rich.progress import TextColumn

        from cai_cli.engines import load_backend
        from cai_cli.engines.judge import Judge

        feedback = load_backend(config.feedback_model, "models.feedback")
        run.producing()
        judge = Judge(config, constitution, feedback,
                      principles_per_pair=principles_per_pair(config), pairs_per_prompt=None)
        with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
            task = bar.add_task("judging", total=len(labelled), rate="",
                                completed=sum(len(b) for b in batches[:done]))
            for index in range(done, len(batches)):
                started = time.perf_counter()
                judged = judge_batch(judge, batches[index])
                seconds = out.extra.get("seconds", 0.0) + time.perf_counter() - started
                questions = out.extra.get("questions", 0) + sum(
                    len(r["judgments"]) for r in judged)
                out.append_batch(judged, seconds=seconds, questions=questions,
                                 skipped=out.extra.get("skipped", 0) + judge.skipped_last)
                bar.update(task, advance=len(batches[index]),
                           rate=f"{questions / max(seconds, 1e-9):,.1f} questions/s")
        feedback.close()
        out.finish()
    run.after_complete(out.cleanup)

    records = read_jsonl(layout.judge_judgments)
    timing = {"seconds": out.extra.get("seconds"), "questions": out.extra.get("questions")}
    report = build_report(config, where, records, timing, skipped=out.extra.get("skipped", 0))
    write_json_atomic(layout.judge_report, report)
    run.manifest.counts.update({"pairs": report["pairs"], "skipped_pairs": report["skipped"],
                                "judgments": sum(len(r["judgments"]) for r in records)})
    run.manifest.stats = {key: report[key] for key in
                          ("agreement", "ci95", "position", "calibration", "verdict")}
    run.complete()
    print_report(report)
    ui.info(f"judge-check: report in {layout.judge_report}")
    return layout.judge_report


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


def p_better(judgment: dict) -> float:
    """A judgment's probability of the better answer (``AB``: it was shown first)."""
    return judgment["p_first"] if judgment["order"] == "AB" else 1.0 - judgment["p_first"]


def label_prefs_questions(config: Config) -> int | None:
    """Questions the configured label-prefs run asks the feedback model (at most: identical
    answers make no pair), or None when its prompts cannot be read here."""
    from math import comb

    from cai_cli.stages import label_prefs

    try:
        prompts = len(label_prefs.select_prompts(config))
    except UserError:
        return None
    settings = config.label_prefs
    pairs = comb(settings.responses_per_prompt, 2)
    if settings.pairs_per_prompt:
        pairs = min(pairs, settings.pairs_per_prompt)
    return prompts * pairs * settings.principles_per_pair * 2


def build_report(config: Config, where: PromptSource, records: list[dict], timing: dict,
                 skipped: int = 0) -> dict:
    n = len(records)
    right = sum(r["p_better"] > 0.5 for r in records)
    ties = sum(r["p_better"] == 0.5 for r in records)
    low, high = wilson_interval(right, n)
    agreement = right / n if n else None

    by_principle: dict[str, dict[str, list[float]]] = {}
    for r in records:
        mine: dict[str, list[float]] = {}
        for j in r["judgments"]:
            mine.setdefault(j["principle"], []).append(p_better(j))
        for name, values in mine.items():
            by_principle.setdefault(name, {"p": []})["p"].append(fmean(values))
    principles = {}
    for name, entry in sorted(by_principle.items()):
        hits = sum(p > 0.5 for p in entry["p"])
        lo, hi = wilson_interval(hits, len(entry["p"]))
        principles[name] = {"agreement": round(hits / len(entry["p"]), 4),
                            "ci95": [round(lo, 4), round(hi, 4)], "pairs": len(entry["p"])}

    # As label-prefs would see these pairs: chosen = the judge's pick. Position figures and
    # order agreement do not depend on which answer is which.
    as_labels = [{"id": r["id"], "judgments": r["judgments"],
                  "p_chosen": max(r["p_better"], 1 - r["p_better"])} for r in records]
    figures = label_diagnostics(as_labels)
    firsts = [j["p_first"] for r in records for j in r["judgments"]]
    position = {
        "first_wins": figures["first_wins"],
        "mean_p_first": figures["position_bias"],
        "mean_p_second": round(1 - figures["position_bias"], 4) if firsts else None,
        "order_consistency": figures["order_agreement"],
        "judgments": len(firsts),
        "verdict": figures["verdict"],
    }

    bins = config.judge_check.reliability_bins
    confidence = [max(r["p_better"], 1 - r["p_better"]) for r in records]
    correct = [1.0 if r["p_better"] > 0.5 else 0.5 if r["p_better"] == 0.5 else 0.0
               for r in records]
    table = reliability_table(confidence, correct, bins, low=0.5) if records else []
    calibration = {
        "ece": round(expected_calibration_error(confidence, correct, bins, low=0.5), 4)
        if records else None,
        "mean_confidence": round(fmean(confidence), 4) if records else None,
        "bins": bins,
        "reliability": [{"bin": row["bin"], "pairs": row["count"],
                         "mean_confidence": round(row["mean_predicted"], 4),
                         "accuracy": round(row["mean_target"], 4)} for row in table],
    }

    per_question = (timing["seconds"] / timing["questions"]
                    if timing.get("seconds") and timing.get("questions") else None)
    questions = label_prefs_questions(config)
    cost = {
        "seconds_per_question": round(per_question, 4) if per_question else None,
        "label_prefs_questions": questions,
        "label_prefs_seconds": round(questions * per_question, 1)
        if questions is not None and per_question else None,
        "note": "the judging of label-prefs only (both orders of each principle of each pair), "
                "measured here on this machine; sampling the answers and loading models are not "
                "included",
    }
    report = {
        "pairs_source": shipped_or(where).path or where.dataset,
        "feedback_model": config.feedback_model.name_or_path,
        "principles_per_pair": principles_per_pair(config),
        "pairs": n,
        "skipped": skipped,
        "agreement": round(agreement, 4) if agreement is not None else None,
        "ci95": [round(low, 4), round(high, 4)],
        "right": right,
        "ties": ties,
        "per_principle": principles,
        "position": position,
        "calibration": calibration,
        "cost": cost,
    }
    report["verdict"] = verdict(report)
    return report


def verdict(report: dict) -> str:
    """One honest sentence or two: do this judge's labels carry signal?"""
    n, agreement = report["pairs"], report["agreement"]
    if not n:
        return "no pairs were judged"
    low, high = report["ci95"]
    shown = f"agreement {agreement:.2f} [{low:.2f}, {high:.2f}] on {n} pairs"
    if high < 0.5 and report.get("ties", 0) < n / 2:  # decided, and mostly against the labels
        line = (f"{shown} is below chance: this judge consistently prefers the answers the labels "
                "call worse, a preference of its own that is not the one these pairs encode; "
                "check the constitution's comparison questions against the pairs, or use another "
                "feedback model (models.feedback)")
    elif low <= 0.5:
        line = (f"{shown} is not above chance: this judge's labels carry little signal; use a "
                "larger feedback model (models.feedback)")
        if n < 30:
            line += f" or judge more pairs ({n} give a wide interval)"
    elif agreement < WEAK:
        line = (f"{shown} is above chance but weak: many labels will be wrong; a larger feedback "
                "model (models.feedback) or worked examples (label_prefs.few_shot) should help")
    else:
        line = f"{shown}: this judge mostly picks the known better answer"
    position = report["position"]
    bias = position["mean_p_first"]
    consistency = position["order_consistency"]
    if bias is not None and (abs(bias - 0.5) > BIASED
                             or (consistency is not None and consistency < AGREEING)):
        line += (f". Its picks depend on the order the answers are shown in: the first option "
                 f"wins {position['first_wins']:.0%} of questions (mean probability "
                 f"{bias:.2f}) and its two orders pick the same answer for only "
                 f"{consistency or 0:.0%} of pair-principles")
    return line


def print_report(report: dict) -> None:
    from rich import box
    from rich.table import Table

    def ci(values: list[float]) -> str:
        return f"[{values[0]:.2f}, {values[1]:.2f}]"

    title = (f"judge-check: {report['feedback_model']} on {report['pairs']} labelled pairs "
             f"({report['pairs_source']}), {report['principles_per_pair']} principles per pair, "
             "both orders")
    table = Table(box=box.SIMPLE, show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    if report["agreement"] is not None:
        table.add_row("agreement", f"{report['agreement']:.2f} {ci(report['ci95'])}",
                      "picks the known better answer (95% Wilson interval; 0.50 is chance)")
    for name, entry in report["per_principle"].items():
        table.add_row(f"  {name}", f"{entry['agreement']:.2f} {ci(entry['ci95'])}",
                      f"{entry['pairs']} pair{'s' if entry['pairs'] != 1 else ''}")
    position = report["position"]
    if position["mean_p_first"] is not None:
        table.add_row("first option wins", f"{position['first_wins']:.2f}",
                      "share of questions (0.50 is no position bias)")
        table.add_row("mean p(first) / p(second)",
                      f"{position['mean_p_first']:.2f} / {position['mean_p_second']:.2f}",
                      "mean probability of each position")
        table.add_row("order consistency", f"{position['order_consistency'] or 0:.2f}",
                      "both orders pick the same answer (share of pair-principles)")
    calibration = report["calibration"]
    if calibration["ece"] is not None:
        table.add_row("ECE", f"{calibration['ece']:.3f}",
                      f"confidence vs accuracy, {calibration['bins']} bins over [0.5, 1]")
        for row in calibration["reliability"]:
            table.add_row(f"  confidence {row['bin']}",
                          f"{row['accuracy']:.2f}",
                          f"accuracy of {row['pairs']} pair{'s' if row['pairs'] != 1 else ''}, "
                          "mean confidence "
                          f"{row['mean_confidence']:.2f}")
    cost = report["cost"]
    if cost["seconds_per_question"]:
        table.add_row("seconds per question", f"{cost['seconds_per_question']:.3f}",
                      "measured here (one principle, one order)")
    if cost["label_prefs_seconds"] is not None:
        table.add_row("label-prefs judging", _duration(cost["label_prefs_seconds"]),
                      f"{cost['label_prefs_questions']:,} questions of the configured run")
    # The title is a line of its own: as the table's title it would wrap at the table's width.
    ui.stdout.print(title, markup=False, soft_wrap=True)
    ui.stdout.print(table)
    good = report["agreement"] is not None and report["ci95"][0] > 0.5 and \
        report["agreement"] >= WEAK and "depend on the order" not in report["verdict"]
    (ui.info if good else ui.warn)(report["verdict"])


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
