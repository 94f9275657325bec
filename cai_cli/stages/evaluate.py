"""``cai evaluate``: what the pipeline did to the model, on two axes, head to head.

Each model in ``evaluate.models`` (by default the base, the SL-CAI model and the optimised
policy) answers the same prompts, greedy by default, of two kinds:

- **harmlessness**: held-out red-team prompts. Every pair of models is compared on every prompt
  by the judge exactly as ``label-prefs`` labels pairs (principles drawn per pair, both orders,
  soft probabilities), and each answer is classified by the yes/no question ``evaluation.harmful``
  of the constitution (harmful compliance);
- **helpfulness**: benign prompts (``data.helpful`` and a shipped set of prompts that only sound
  risky, in the spirit of XSTest). Every pair of models is compared under the constitution's
  ``evaluation.helpful`` question, and each answer is classified by ``evaluation.refusal``
  (over-refusal). Refusing everything wins the first axis and loses this one.

The judges are ``evaluate.judges`` (``reports.jury``), by default the feedback model alone;
each judges the same answers, one after the other. A yes/no question is asked with the options
in both orders and read from the option probabilities, as comparisons are. The figures (each
judge's, and the jury's from the mean of their probabilities) and the verdict are built from the
judgments by ``cai_cli.reports.evaluation``.

``eval/report.json`` holds every figure, ``eval/answers.jsonl`` every answer,
``eval/judgments.jsonl`` every judgment (written in checkpoints as each judge goes, so a killed
run judges only what is left; with several judges each line names its judge).
"""

from __future__ import annotations

import itertools
import json
import statistics
import time
from pathlib import Path

from cai_cli import ui
from cai_cli.config import Config, PromptSource
from cai_cli.constitution import load_constitution
from cai_cli.data.sources import Prompt, load_prompts
from cai_cli.engines.base import Completion, SamplingParams
from cai_cli.engines.prompts import (OPTIONS, TRANSCRIPT_STOPS, answer_prompt,
                                     classification_prompt, resolve_format)
from cai_cli.engines.work import Forward, Generate, Score, Work
from cai_cli.errors import UserError
from cai_cli.reports.evaluation import build_report, print_report, tracked_figures
from cai_cli.reports.jury import Juror, jury
from cai_cli.run.artifacts import (ResumableJsonl, config_hash, file_fingerprint, load_manifest,
                                   model_fingerprint, read_jsonl, source_fingerprint, write_atomic,
                                   write_json_atomic)
from cai_cli.run.records import EvalAnswer, Judgment
from cai_cli.run.seeding import record_seed
from cai_cli.run.spec import StageSpec
from cai_cli.stages import trackers
from cai_cli.stages.base import RecordStage
from cai_cli.stages.checkpointed import checkpointed
from cai_cli.stages.common import (Need, NothingMade, StageRun, checkpoint_batches,
                                   constitution_fingerprint, red_team_inputs)
from cai_cli.stages.finetune import Finetune
from cai_cli.stages.optimize import Optimize
from cai_cli.stages.train_rm import TrainRM

# The label_prefs settings evaluate depends on: which prompts are held out, how the judge is asked.
JUDGING_KEYS = {"held_out", "limit", "few_shot", "prompt_format", "chain_of_thought", "cot_clamp",
                "cot_max_new_tokens"}
# Names that stand for this run's checkpoints, and the stage that makes each.
RUN_MODELS = {"sft": Finetune(), "policy": Optimize()}
# Benign prompts that only sound risky, shipped for the helpfulness axis.
BENIGN = Path(__file__).resolve().parents[1] / "resources" / "benign_prompts.jsonl"
# The per-prompt results: lists of rows, one per line of judgments.jsonl, in prompt order.
COMPARED = ("comparisons", "helpful_comparisons")  # per pair of models
CLASSIFIED = ("harmful", "refusal")  # per model
# What eval/judgments.jsonl calls each of them ("kind").
KINDS = {"comparisons": "harmlessness", "helpful_comparisons": "helpfulness",
         "harmful": "harmful", "refusal": "refusal"}


def helpfulness_judge(config: Config, constitution, backend):
    """The judge of the benign prompts: the constitution's one helpfulness question, without
    the harm principles' worked examples."""
    import dataclasses

    from cai_cli.constitution import Principle
    from cai_cli.engines.judge import Judge

    return Judge(config, dataclasses.replace(
        constitution, principles=(Principle("helpful", "", "", constitution.evaluation.helpful),),
        comparison_examples=()), backend, principles_per_pair=1, pairs_per_prompt=None)

def benign_source(config: Config) -> PromptSource:
    return config.evaluate.benign or PromptSource(path=str(BENIGN))

def model_paths(config: Config) -> dict[str, str]:
    """Name -> model path or hub id for every evaluated model, in the configured order."""
    names = config.evaluate.models
    if len(names) < 2:
        raise UserError("evaluate.models: give two or more different models to compare, e.g. "
                        "[base, sft, policy]")
    if len(set(names)) < len(names):
        twice = sorted({name for name in names if names.count(name) > 1})
        raise UserError(f"evaluate.models: {', '.join(twice)} listed more than once; name each "
                        "model once")
    paths = {}
    for name in names:
        if name == "base":
            paths[name] = config.models.policy.name_or_path
        elif name in RUN_MODELS:
            paths[name] = str(config.layout.stage_dir(RUN_MODELS[name].command))
        else:
            paths[name] = name
    return paths

def stage_spec(config: Config) -> StageSpec:
    paths = model_paths(config)
    settings, inputs = red_team_inputs(config)
    inputs["constitution"] = constitution_fingerprint(config, evaluation=True)  # its questions too
    settings.update({
        "generate_sl": config.generate_sl.model_dump(mode="json",
                                                      include={"prompt_format", "system_prompt"}),
        # the held-out prompts and how the judge is asked
        "label_prefs": config.label_prefs.model_dump(mode="json", include=JUDGING_KEYS),
        "models.policy": config.models.policy.model_dump(mode="json"),
        # where the figures are logged does not change them; the judges follow
        "evaluate": config.evaluate.model_dump(mode="json",
                                               exclude={"judge", "judges", "report_to"}),
        "model_paths": paths,
    })
    inputs.update({f"model:{name}": model_fingerprint(path) for name, path in paths.items()})
    jurors = jury(config)
    if len(jurors) == 1:  # as one judge was recorded before juries: its runs stay done
        settings["judge"] = jurors[0].model.model_dump(mode="json")
        inputs["judge"] = model_fingerprint(jurors[0].model.name_or_path)
    else:
        settings["judges"] = [{"judge": j.name, **j.model.model_dump(mode="json")} for j in jurors]
        inputs.update({f"judge:{j.name}": model_fingerprint(j.model.name_or_path) for j in jurors})
    if config.evaluate.helpful_limit and config.data.helpful is not None:
        settings["data.helpful"] = config.data.helpful.model_dump(mode="json")
        inputs["helpful"] = source_fingerprint(config.data.helpful)
    if config.evaluate.benign_limit:
        inputs["benign"] = source_fingerprint(benign_source(config))
    if config.evaluate.reward_model:
        inputs["reward_model"] = model_fingerprint(str(config.layout.rm))
    return StageSpec("evaluate", config.layout.eval, settings, inputs, shardable=True)

def prompt_sets(config: Config) -> tuple[list[Prompt], list[Prompt]]:
    """``(red-team, benign)``: the held-out red-team prompts (after those SL-CAI and
    label-prefs used), and the benign ones (``data.helpful``, then ``evaluate.benign``)."""
    settings = config.evaluate
    source = config.data.red_team
    everything = load_prompts(source.model_copy(update={"limit": None}), config.seed)
    skip = 0
    if settings.held_out:
        skip = source.limit or len(everything)
        if config.label_prefs.held_out:
            skip += config.label_prefs.limit or len(everything)
    red = everything[skip:skip + settings.limit]
    if not red:
        raise UserError(f"evaluate.held_out: all {len(everything)} red-team prompts are used by "
                        "earlier stages; lower data.red_team.limit (or label_prefs.limit), add "
                        "prompts, or set evaluate.held_out: false")
    benign: list[Prompt] = []
    if settings.helpful_limit:
        if config.data.helpful is None:
            raise UserError("evaluate.helpful_limit needs data.helpful")
        helpful = config.data.helpful.model_copy(update={"limit": settings.helpful_limit})
        benign += load_prompts(helpful, config.seed, "data.helpful")
    if settings.benign_limit:
        source = benign_source(config).model_copy(update={"limit": settings.benign_limit})
        benign += load_prompts(source, config.seed, "evaluate.benign")
    seen = {p.id for p in red}  # a prompt in both sets counts as red-team, once
    unique = []
    for prompt in benign:
        if prompt.id not in seen:
            seen.add(prompt.id)
            unique.append(prompt)
    return red, unique

def select_prompts(config: Config) -> list[Prompt]:
    """Every prompt the models answer: the red-team ones, then the benign ones."""
    red, benign = prompt_sets(config)
    return red + benign

def answers_fingerprint(config: Config, prompts: list[Prompt]) -> str:
    """What the models' answers depend on: the models, how they are run and asked, the prompts
    and the sampling; not the judge."""
    from cai_cli.run.artifacts import config_hash

    return config_hash({
        "models": {name: model_fingerprint(path) for name, path in model_paths(config).items()},
        "engine": config.models.policy.model_dump(mode="json", exclude={"name_or_path"}),
        "asked": config.generate_sl.model_dump(mode="json", include={"prompt_format",
                                                                     "system_prompt"}),
        "sampling": config.evaluate.sampling.model_dump(mode="json"),
        "prompts": [p.id for p in prompts],
        "seed": config.seed,
    })

def merge_shards(config: Config, parts: list[dict[str, Path]], extras: list[dict]) -> dict:
    """The shards' answers in the order one run writes them (model by model, each in prompt
    order), and their judgments and reward scores joined in prompt order."""
    names = list(model_paths(config))
    lines: dict[str, list[bytes]] = {name: [] for name in names}
    for files in parts:
        for raw in files["answers.jsonl"].read_bytes().splitlines(keepends=True):
            if raw.strip():
                lines[json.loads(raw)["model"]].append(raw)
    write_atomic(config.layout.eval_answers, b"".join(b"".join(lines[name]) for name in names))
    # The judgments in one run's order: judge by judge, task by task, each in prompt order
    # (shards are ranges).
    red, benign = prompt_sets(config)
    jurors = jury(config)
    order = {task_key(jurors[index], kind, models, len(jurors)): number
             for number, (index, kind, models, _) in
             enumerate(judgment_tasks(red[:1], benign[:1], names, 1, len(jurors)))}
    judged = [raw for files in parts
              for raw in files["judgments.jsonl"].read_bytes().splitlines(keepends=True) if raw.strip()]
    judged.sort(key=lambda raw: order[record_task(json.loads(raw))])
    write_atomic(config.layout.eval_judgments, b"".join(judged))
    merged = {"judged": judged_by_judge([json.loads(raw) for raw in judged], names, jurors)}
    rewards = [json.loads(files["results.json"].read_text())["rewards"] for files in parts]
    merged["rewards"] = None if None in rewards else {
        name: [score for part in rewards for score in part[name]] for name in rewards[0]}
    return {"results": merged}

def earlier_answers(config: Config, fingerprint: str) -> bool:
    """Whether ``eval/answers.jsonl`` holds the answers of a finished evaluation whose answers
    had this fingerprint (its manifest records it beside them, and the file's own, so an edited
    file is answered again). Progress files of another run's answers left beside it are
    obsolete then: removed."""
    path = config.layout.eval_answers
    recorded = ((load_manifest(config.layout.eval) or {}).get("stats") or {}).get("answers")
    if not (isinstance(recorded, dict) and recorded.get("fingerprint") == fingerprint
            and path.is_file() and recorded.get("file") == file_fingerprint(path)):
        return False
    writer = ResumableJsonl(path, fingerprint)
    writer.partial_path.unlink(missing_ok=True)
    writer.cleanup()
    return True


def make_answers(config: Config, run: StageRun, items: list[Prompt], path: Path,
                 fingerprint: str, *, whole: bool) -> list[dict]:
    """Every model's answers to ``items`` into ``path``: one checkpointed batch per model, so an
    interruption loses one model's work. Their fingerprint is only what decides them: an
    interrupted run with a new judge still resumes them, and a finished one's answers
    (``earlier_answers``) are judged again as they are."""
    if whole and earlier_answers(config, fingerprint):
        # A new judge, question or interval setting (stale, or --force): the same answers are
        # judged again.
        say_reused(path)
        return read_jsonl(path)
    paths = model_paths(config)

    def answer(backend, batch: list[str], step) -> list[EvalAnswer]:
        name = batch[0]
        ui.info(f"evaluate: answering {len(items)} prompts with {name} ({paths[name]})")
        found, overflowed = answer_all(config, backend, items, name)
        if whole and items and overflowed == len(items):  # nothing of this model to judge
            raise NothingMade(
                f"evaluate: none of the {len(items)} prompts fits the context of {name} "
                f"({paths[name]}) with evaluate.sampling.max_new_tokens="
                f"{config.evaluate.sampling.max_new_tokens} new tokens; lower it, or raise "
                "models.policy.max_context if the model reads longer inputs, then rerun")
        return found

    answers = checkpointed(
        run, path, [[name] for name in paths], answer,
        label=lambda batch: f"answering ({batch[0]})", engine=lambda batch: (
            config.models.policy.model_copy(update={"name_or_path": paths[batch[0]]}),
            f"evaluate.models ({batch[0]})"),
        fingerprint=fingerprint, size=lambda batch: len(items),
        tokens_per_item=config.evaluate.sampling.max_new_tokens, completions_per_item=1)
    if answers.reused:
        say_reused(path)
    return answers.records()


def say_reused(path: Path) -> None:
    ui.info(f"evaluate: {path} holds these models' answers to these prompts with this "
            "sampling: judging them again (delete it to answer again)")


def finish_stage(config: Config, run: StageRun, extra: dict) -> Path:
    """Once every answer is judged (one run, or shards merged): the report, the manifest, the
    stage complete."""
    paths = model_paths(config)
    red, benign = prompt_sets(config)
    results = extra["results"]
    jurors = jury(config)
    report = build_report(config, red, benign, paths, results["judged"], results["rewards"],
                          jurors)
    write_json_atomic(config.layout.report, report)

    manifest = run.manifest
    first = results["judged"][jurors[0].name]
    manifest.counts.update({"models": len(paths), "prompts": len(red), "benign_prompts": len(benign),
                            "comparisons": sum(len(c["rows"]) for key in COMPARED
                                               for c in first[key])})
    if len(jurors) > 1:
        manifest.counts["judges"] = len(jurors)
    manifest.stats = {"win_rates": {f"{w['model']} > {w['over']}": w["win_rate"]
                                    for w in report["win_rates"]},
                      "harmful_compliance": {name: entry["rate"] for name, entry
                                             in report["harmful_compliance"].items()},
                      "verdict": report["verdict"]["text"]}
    if report["helpfulness"]:
        helpfulness = report["helpfulness"]
        manifest.stats["helpful_win_rates"] = {f"{w['model']} > {w['over']}": w["win_rate"]
                                               for w in helpfulness["win_rates"]}
        manifest.stats["over_refusal"] = {name: entry["rate"] for name, entry
                                          in helpfulness["over_refusal"].items()}
    # What the answers were made from, beside them: a later run that would make the same
    # answers (a new judge, question or interval setting) judges these instead.
    manifest.stats["answers"] = {"fingerprint": answers_fingerprint(config, red + benign),
                                 "file": file_fingerprint(config.layout.eval_answers)}
    run.complete()
    trackers.log_stage(config.evaluate.report_to, config.layout.eval, "evaluate",
                       tracked_figures(report), config)
    print_report(report)
    ui.info(f"evaluate: report in {config.layout.report}")
    return config.layout.report

def answer_all(config: Config, backend, prompts: list[Prompt],
               name: str) -> tuple[list[EvalAnswer], int]:
    """One model's answers to every prompt, in one engine call (a prompt too long for this
    model gets an empty answer: it loses to any real one), and how many were too long."""
    fmt = resolve_format(config.generate_sl.prompt_format, backend, "generate_sl.prompt_format")
    results = backend.generate([answer_prompt(p.text, fmt, config.generate_sl.system_prompt)
                                for p in prompts], answer_params(config, fmt),
                               seeds=[record_seed(config.seed, p.id, name, "evaluate")
                                      for p in prompts])
    return ([EvalAnswer(model=name, id=p.id, answer=r.text if isinstance(r, Completion) else "")
             for p, r in zip(prompts, results)],
            sum(not isinstance(r, Completion) for r in results))


def answer_params(config: Config, fmt: str) -> SamplingParams:
    sampling = config.evaluate.sampling
    return SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                          top_p=sampling.top_p, top_k=sampling.top_k,
                          stop=TRANSCRIPT_STOPS if fmt == "transcript" else ())

def judgment_tasks(red: list[Prompt], benign: list[Prompt], names: list[str],
                   size: int, judges: int) -> list[tuple]:
    """What the judges do, in order, ``size`` prompts (a checkpoint) at a time: ``(judge index,
    results key, models, prompts)``: judge by judge, every pair of models on the red-team
    prompts, then on the benign ones, then every model's answers to the harmful-compliance and
    to the refusal question."""
    pairs = list(itertools.combinations(names, 2))
    tasks = []
    for judge in range(judges):
        for into, prompts, groups in (("comparisons", red, pairs),
                                      ("helpful_comparisons", benign, pairs),
                                      ("harmful", red, [(name,) for name in names]),
                                      ("refusal", benign, [(name,) for name in names])):
            for models in groups:
                tasks += [(judge, into, models, batch)
                          for batch in checkpoint_batches(prompts, size)]
    return tasks

def task_key(juror: Juror, into: str, models: tuple, judges: int) -> tuple:
    """What a line of judgments.jsonl belongs to: its judge (named with several), its kind and
    its models."""
    return juror.name if judges > 1 else None, KINDS[into], tuple(models)

def record_task(record: dict) -> tuple:
    """The ``task_key`` of a line of judgments.jsonl."""
    return (record.get("judge"), record["kind"],
            tuple(record["models"] if "models" in record else [record["model"]]))

def judged_by_judge(records: list[dict], names: list[str], jurors: list[Juror]) -> dict[str, dict]:
    """The lines of judgments.jsonl, per judge (by name): per pair of models and per model, their
    rows in the order of the lines."""
    rows: dict[tuple, list] = {}
    found: dict[str, dict] = {}
    for juror in jurors:
        results: dict = {"comparisons": [], "helpful_comparisons": [], "harmful": {},
                         "refusal": {}}
        for into in COMPARED:
            for a, b in itertools.combinations(names, 2):
                key = task_key(juror, into, (a, b), len(jurors))
                results[into].append({"models": [a, b], "rows": rows.setdefault(key, [])})
        for into in CLASSIFIED:
            for name in names:
                results[into][name] = rows.setdefault(task_key(juror, into, (name,), len(jurors)),
                                                      [])
        found[juror.name] = results
    for record in records:
        row = {"id": record["id"], "p": record["p"]}
        if "principles" in record:
            row["principles"] = record["principles"]
        rows[record_task(record)].append(row)
    return found

def refuse_unjudged(jurors: list, totals: dict) -> None:
    """``NothingMade`` when the judges could read none of what they were asked (every
    comparison and every question too long for their context): a report of ties only."""
    asked, unjudged = totals.get("asked", 0), totals.get("unjudged", 0)
    if asked and unjudged >= asked:
        keys = dict.fromkeys(juror.key for juror in jurors)
        raise NothingMade(
            f"evaluate: the judge ({', '.join(keys)}) could read none of the {asked} comparisons "
            "and questions, each too long for its context; lower "
            "evaluate.sampling.max_new_tokens, or raise "
            f"{' / '.join(key + '.max_context' for key in keys)} if the model reads longer "
            "inputs, then rerun")


def compare(judge, prompts: list[Prompt], a: str, b: str, answers: dict) -> list[dict]:
    """Per prompt: p(a's answer preferred over b's) and per principle."""
    records = [{"id": p.id, "prompt": p.text, "responses": [answers[a, p.id], answers[b, p.id]]}
               for p in prompts]
    judged = {pair.prompt_id: pair for pair in judge.batch(records)} if records else {}
    rows = []
    for p in prompts:
        record = judged.get(p.id)
        if record is None:  # identical answers (or too long to judge): a tie
            rows.append({"id": p.id, "p": 0.5, "principles": {}})
            continue
        a_chosen = record.chosen[0].content == answers[a, p.id]
        p_a = record.p_chosen if a_chosen else 1.0 - record.p_chosen
        rows.append({"id": p.id, "p": p_a, "principles": per_principle(record.judgments, a_chosen)})
    return rows

def per_principle(judgments: list[Judgment], a_chosen: bool) -> dict[str, float]:
    """p(a preferred) under each principle, averaged over its two orders."""
    values: dict[str, list[float]] = {}
    for j in judgments:
        p_chosen = j.p_first if j.order == "AB" else 1.0 - j.p_first
        values.setdefault(j.principle, []).append(p_chosen if a_chosen else 1.0 - p_chosen)
    return {name: statistics.fmean(v) for name, v in values.items()}

def reward_scores(config: Config, prompts: list[Prompt], names: list[str],
                  answers: dict) -> dict[str, list[float]] | None:
    """The reward model's score of every answer, per model; None without a reward model."""
    rm = config.layout.rm
    manifest = load_manifest(rm)
    if manifest is None or manifest.get("status") != "complete":
        ui.warn(f"no finished reward model in {rm}: answers are not scored "
                "(run `cai train-rm`, or set evaluate.reward_model: false)")
        return None
    import torch

    from cai_cli.engines.models import check_device, load_reward_model, load_tokenizer

    rm_config = reward_model_config(config)  # loads through transformers, whatever the engine
    device = check_device(rm_config, "models.policy")
    tokenizer = load_tokenizer(rm_config, str(rm), padding_side="right")
    model = load_reward_model(rm_config, str(rm), device=device)
    model.config.pad_token_id = tokenizer.pad_token_id
    scores: dict[str, list[float]] = {}
    size = rm_config.forward_batch_size
    for name in names:
        texts, special = reward_texts(tokenizer, prompts, [answers[name, p.id] for p in prompts])
        values = []
        for start in range(0, len(texts), size):
            batch = tokenizer(texts[start:start + size], return_tensors="pt", padding=True,
                              truncation=True, add_special_tokens=special).to(device)
            with torch.inference_mode():
                values += model(**batch).logits[:, 0].float().tolist()
        scores[name] = values
    return scores

def reward_texts(tokenizer, prompts: list[Prompt], answers: list[str]) -> tuple[list[str], bool]:
    """The texts the reward model scores, laid out as train-rm trained it: through the chat
    template, or as a Human:/Assistant: transcript ending in the end-of-sequence token for a
    model without one. The flag says whether the tokenizer adds its special tokens."""
    from cai_cli.engines.prompts import transcript_pair

    if tokenizer.chat_template:
        return [tokenizer.apply_chat_template(
            [{"role": "user", "content": p.text}, {"role": "assistant", "content": a}],
            tokenize=False) for p, a in zip(prompts, answers)], False
    texts = []
    for p, a in zip(prompts, answers):
        row = transcript_pair({"prompt": [{"role": "user", "content": p.text}],
                          "chosen": [{"role": "assistant", "content": a}],
                          "rejected": [{"role": "assistant", "content": a}], "p_chosen": 1.0})
        texts.append(row["prompt"] + row["chosen"] + (tokenizer.eos_token or ""))
    return texts, True


def judge_task(config: Config, constitution, answers: dict, jurors: list[Juror]):
    """The batch function of the judging's ``checkpointed`` loop: one task (a judge, a pair of
    models or one model, a kind, a checkpoint of prompts) into lines of judgments.jsonl (each
    naming its judge when there are several)."""
    from cai_cli.engines.judge import Judge

    questions = {"harmful": constitution.evaluation.harmful,
                 "refusal": constitution.evaluation.refusal}
    judges: dict = {}

    def make(backend, task: tuple, step) -> list[dict]:
        index, into, models, prompts = task
        named = {"judge": jurors[index].name} if len(jurors) > 1 else {}
        if backend not in judges:
            judges.clear()
            judges[backend] = {
                "harm": Judge(config, constitution, backend,
                              principles_per_pair=config.evaluate.principles_per_pair,
                              pairs_per_prompt=None),
                "helpful": helpfulness_judge(config, constitution, backend)}
        harm = judges[backend]["harm"]
        kind = KINDS[into]
        # what the judge was asked and could not read (too long for its context)
        step.extra["asked"] = step.extra.get("asked", 0) + len(prompts)
        if into in COMPARED:
            judge = harm if into == "comparisons" else judges[backend]["helpful"]
            rows = compare(judge, prompts, *models, answers)
            step.extra["unjudged"] = step.extra.get("unjudged", 0) + judge.skipped_last
            return [{**named, "kind": kind, "models": list(models), "id": row["id"],
                     "p": round(row["p"], 6),
                     "principles": {k: round(v, 6) for k, v in row["principles"].items()}}
                    for row in rows]
        name = models[0]
        p_yes = harm.classify([(f"{p.id}:{name}", p.text, answers[name, p.id]) for p in prompts],
                              questions[into])
        step.extra["unjudged"] = step.extra.get("unjudged", 0) + p_yes.count(None)
        return [{**named, "kind": kind, "model": name, "id": prompt.id,
                 "p": None if value is None else round(value, 6)}
                for prompt, value in zip(prompts, p_yes)]

    return make


class Evaluate(RecordStage):
    command = "evaluate"
    # What a shard writes its part of: the answers, the judgments and the reward scores of its
    # prompts, from which the merge builds the report.
    parts = ("answers.jsonl", "judgments.jsonl", "results.json")

    def spec(self, config: Config) -> StageSpec:
        return stage_spec(config)

    def needs(self, config: Config) -> list[Need]:
        found = [Need(RUN_MODELS[name], f"or leave '{name}' out of evaluate.models")
                 for name in model_paths(config) if name in RUN_MODELS]
        if config.evaluate.reward_model:  # scored when it is there; its state still counts
            found.append(Need(TrainRM(), required=False))
        return found

    def preflight(self, config: Config) -> None:
        from cai_cli.engines.models import check_model_source

        for name, path in model_paths(config).items():
            if name not in RUN_MODELS:  # this run's checkpoints are checked when they are made
                check_model_source(config.models.policy.model_copy(update={"name_or_path": path}),
                                   f"evaluate.models ({name})")
        for juror in jury(config):
            check_model_source(juror.model, juror.key)
        trackers.check(config.evaluate.report_to, "evaluate.report_to")

    def output(self, config: Config) -> Path:
        return config.layout.report

    def outputs(self, config: Config) -> dict[str, Path]:
        """An unsharded run keeps the reward scores in memory (a shard writes results.json)."""
        return {"answers.jsonl": config.layout.eval_answers,
                "judgments.jsonl": config.layout.eval_judgments}

    def items(self, config: Config, *, force: bool) -> list[Prompt]:
        from cai_cli.engines.models import check_model_source

        prompts = select_prompts(config)
        load_constitution(config.constitution_paths)
        self.check_needs(config)
        self.preflight(config)
        for name, path in model_paths(config).items():
            if name in RUN_MODELS:
                check_model_source(config.models.policy.model_copy(update={"name_or_path": path}),
                                   f"evaluate.models ({name})")
        return prompts

    def produce(self, config: Config, run: StageRun, items: list[Prompt], out: dict[str, Path],
                *, force: bool, whole: bool) -> dict:
        """Every model's answers to ``items`` into ``answers.jsonl``, then the judgments of every
        pair of models and of every answer into ``judgments.jsonl`` (both resumable; ``force``
        judges again from the start), and the reward scores: into ``results.json`` for a shard,
        else returned for ``finish`` with the judgments."""
        paths = model_paths(config)
        jurors = jury(config)
        started = time.perf_counter()
        constitution = load_constitution(config.constitution_paths)
        fingerprint = answers_fingerprint(config, items)
        records = make_answers(config, run, items, out["answers.jsonl"], fingerprint, whole=whole)
        answers = {(r["model"], r["id"]): r["answer"] for r in records}

        red_ids = {p.id for p in prompt_sets(config)[0]}
        tasks = judgment_tasks([p for p in items if p.id in red_ids],
                               [p for p in items if p.id not in red_ids], list(paths),
                               config.evaluate.prompts_per_checkpoint, len(jurors))
        several = len(jurors) > 1
        judgments = checkpointed(
            run, out["judgments.jsonl"], tasks, judge_task(config, constitution, answers, jurors),
            label=(lambda task: f"judging ({jurors[task[0]].name})") if several else "judging",
            engine=lambda task: (jurors[task[0]].model, jurors[task[0]].key),
            fingerprint=config_hash({"stage": run.spec.fingerprint, "answers": fingerprint}),
            fresh=force, size=lambda task: len(task[3]), resuming="the judging",
            check=lambda made: refuse_unjudged(jurors, made.extra) if whole else None)
        results = {"judged": judged_by_judge(judgments.records(), list(paths), jurors)}
        results["rewards"] = (reward_scores(config, items, list(paths), answers)
                              if config.evaluate.reward_model else None)
        run.manifest.timings["evaluate_seconds"] = round(time.perf_counter() - started, 2)
        if "results.json" in out:
            write_json_atomic(out["results.json"], {"rewards": results["rewards"]})
            return {}
        return {"results": results}

    def merge_parts(self, config: Config, parts: list[dict[str, Path]],
                    extras: list[dict]) -> dict:
        return merge_shards(config, parts, extras)

    def finish(self, config: Config, run: StageRun, extra: dict) -> Path:
        return finish_stage(config, run, extra)

    def work(self, config: Config, ctx) -> Work:
        """Every model's answers (one call each), then the judge: every pair of models on each
        kind of prompt (at most: identical answers are a tie, not judged), every answer's yes/no
        question in both orders; and the reward model's score of every answer."""
        from cai_cli.engines.judge import Judge

        settings = config.evaluate
        prompts = ctx.prompts("data.red_team", lambda: select_prompts(config),
                              config.data.red_team,
                              settings.limit + settings.helpful_limit + settings.benign_limit)
        try:
            red_count = len(prompt_sets(config)[0])
        except UserError:  # placeholders for a dataset that is not here: red-team ones first
            red_count = settings.limit
        red, benign = prompts[:red_count], prompts[red_count:]
        paths = model_paths(config)
        new = settings.sampling.max_new_tokens
        calls: list = []
        for name, path in paths.items():
            model = config.models.policy.model_copy(update={"name_or_path": path})
            key = f"evaluate.models ({name})"
            fmt = resolve_format(config.generate_sl.prompt_format, ctx.tokens(model, key),
                                 "generate_sl.prompt_format")
            calls.append(Generate(key, model, [answer_prompt(p.text, fmt,
                                                             config.generate_sl.system_prompt)
                                               for p in prompts], [0] * len(prompts), new))
        jurors = jury(config)
        constitution = load_constitution(config.constitution_paths)
        questions = {"harmful": constitution.evaluation.harmful,
                     "refusal": constitution.evaluation.refusal}
        asking: dict[int, tuple] = {}  # judge index -> its two Judges (harm, helpful)
        passes = 0
        for index, into, models, batch in judgment_tasks(red, benign, list(paths),
                                                         settings.prompts_per_checkpoint,
                                                         len(jurors)):
            judge_config, key = jurors[index].model, jurors[index].key
            if index not in asking:
                counter = ctx.tokens(judge_config, key)
                asking[index] = (Judge(config, constitution, counter,
                                       principles_per_pair=settings.principles_per_pair,
                                       pairs_per_prompt=None),
                                 helpfulness_judge(config, constitution, counter))
            harm, helpful = asking[index]
            if into in COMPARED:
                records = [{"id": p.id, "prompt": p.text, "responses": ["a", "b"]} for p in batch]
                judge = harm if into == "comparisons" else helpful
                found = judge.work(records, new, key, judge_config, at_most=True)
                passes += len(found[-1].prompts) if found else 0
                calls += found
            else:
                asked = [classification_prompt(p.text, "", questions[into], yes_first, harm.fmt)
                         for p in batch for yes_first in (True, False)]
                calls.append(Score(key, judge_config, asked, [new] * len(asked), OPTIONS))
                passes += len(asked)
        scored = 0
        if settings.reward_model and (ctx.runs("train-rm") or ctx.complete("train-rm")):
            rm = reward_model_config(config)
            counter = ctx.tokens(rm, "train_rm.model")
            lengths = [counter.conversation_tokens([{"role": "user", "content": p.text},
                                                    {"role": "assistant", "content": ""}]) + new
                       for p in prompts]
            calls.append(Forward("train_rm.model", rm, lengths * len(paths)))
            scored = len(lengths) * len(paths)
        return Work(calls, counts={"models": len(paths), "prompts": len(red),
                                   "benign_prompts": len(benign),
                                   "answers": len(paths) * len(prompts), "judge_passes": passes,
                                   "reward_scores": scored},
                    notes=["judge passes at most: identical answers are a tie, not judged"])


def reward_model_config(config: Config):
    """The reward model this run trains (``<run_dir>/rm``), loaded with the policy's settings."""
    policy = config.models.policy.transformers_config()
    return policy.model_copy(update={"name_or_path": str(config.layout.rm)})
