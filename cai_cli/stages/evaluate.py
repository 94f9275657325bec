"""``cai evaluate``: what the pipeline did to the model, head to head.

Each model in ``evaluate.models`` (by default the base, the SL-CAI model and the optimised
policy) answers the same held-out red-team prompts (and helpful prompts when configured), greedy
by default. Every pair of models is then compared on every prompt by the feedback model exactly
as ``label-prefs`` labels pairs (principles drawn per pair, both orders, soft probabilities), and
every answer is scored by the reward model when there is one.

A model's win rate over another is the mean, over prompts, of the probability that the judge
prefers its answer (identical answers count 0.5); its 95% interval comes from a bootstrap over
prompts. ``eval/report.json`` holds the win rates, a per-principle breakdown, the mean reward
per model and example prompt ids; ``eval/answers.jsonl`` every answer.
"""

from __future__ import annotations

import itertools
import json
import random
import statistics
import time
from pathlib import Path

from rich.progress import TextColumn

from cai_cli import ui
from cai_cli.artifacts import (ResumableJsonl, load_manifest, model_fingerprint, source_fingerprint,
                               write_atomic, write_json_atomic)
from cai_cli.backends.base import Completion, SamplingParams
from cai_cli.config import Config
from cai_cli.constitution import load_constitution
from cai_cli.data import Prompt, load_prompts
from cai_cli.errors import UserError
from cai_cli.prompting import TRANSCRIPT_STOPS, answer_prompt, resolve_format
from cai_cli.records import EvalAnswer, Judgment
from cai_cli.seeding import record_seed
from cai_cli.stages.common import StageRun, StageSpec, begin, red_team_inputs, require_complete

# The label_prefs settings evaluate depends on: which prompts are held out, how the judge is asked.
JUDGING_KEYS = {"held_out", "limit", "few_shot", "prompt_format", "chain_of_thought", "cot_clamp",
                "cot_max_new_tokens"}
# Names that stand for this run's checkpoints, and the command that makes each.
RUN_MODELS = {"sft": "finetune", "policy": "optimize"}
# What a shard writes its part of (cai_cli.shards): the answers, and the judgments and reward
# scores of its prompts, from which the merge builds the report.
PARTS = ("answers.jsonl", "results.json")


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
            paths[name] = str(config.layout.stage_dir(RUN_MODELS[name]))
        else:
            paths[name] = name
    return paths


def spec(config: Config) -> StageSpec:
    paths = model_paths(config)
    settings, inputs = red_team_inputs(config)
    settings.update({
        "generate_sl": config.generate_sl.model_dump(mode="json",
                                                      include={"prompt_format", "system_prompt"}),
        # the held-out prompts and how the judge is asked
        "label_prefs": config.label_prefs.model_dump(mode="json", include=JUDGING_KEYS),
        "models.policy": config.models.policy.model_dump(mode="json"),
        "models.feedback": config.feedback_model.model_dump(mode="json"),
        "evaluate": config.evaluate.model_dump(mode="json"),
        "model_paths": paths,
    })
    inputs.update({f"model:{name}": model_fingerprint(path) for name, path in paths.items()})
    inputs["feedback"] = model_fingerprint(config.feedback_model.name_or_path)
    if config.evaluate.helpful_limit and config.data.helpful is not None:
        settings["data.helpful"] = config.data.helpful.model_dump(mode="json")
        inputs["helpful"] = source_fingerprint(config.data.helpful)
    if config.evaluate.reward_model:
        inputs["reward_model"] = model_fingerprint(str(config.layout.rm))
    after = tuple(RUN_MODELS[name] for name in paths if name in RUN_MODELS)
    after += ("train-rm",) if config.evaluate.reward_model else ()
    return StageSpec("evaluate", config.layout.eval, settings, inputs, after)


def select_prompts(config: Config) -> list[Prompt]:
    """Held out: the red-team prompts after those SL-CAI and label-prefs used."""
    settings = config.evaluate
    source = config.data.red_team
    everything = load_prompts(source.model_copy(update={"limit": None}), config.seed)
    skip = 0
    if settings.held_out:
        skip = source.limit or len(everything)
        if config.label_prefs.held_out:
            skip += config.label_prefs.limit or len(everything)
    prompts = everything[skip:skip + settings.limit]
    if not prompts:
        raise UserError(f"evaluate.held_out: all {len(everything)} red-team prompts are used by "
                        "earlier stages; lower data.red_team.limit (or label_prefs.limit), add "
                        "prompts, or set evaluate.held_out: false")
    if settings.helpful_limit:
        if config.data.helpful is None:
            raise UserError("evaluate.helpful_limit needs data.helpful")
        helpful = config.data.helpful.model_copy(update={"limit": settings.helpful_limit})
        prompts += load_prompts(helpful, config.seed, "data.helpful")
    return prompts


def check_inputs(config: Config) -> None:
    from cai_cli.models import check_model_source

    for name, path in model_paths(config).items():
        if name in RUN_MODELS:
            require_complete(config, RUN_MODELS[name],
                             f"or leave '{name}' out of evaluate.models")
        check_model_source(config.models.policy.model_copy(update={"name_or_path": path}),
                           f"evaluate.models ({name})")


def run(config: Config, *, force: bool = False, shard=None) -> Path | None:
    """The whole stage, or with ``shard`` (``shards.Shard``) that shard's prompts: answered by
    every model, judged and scored; the merge of all shards writes the report."""
    stage = spec(config)
    prompts = select_prompts(config)
    constitution = load_constitution(config.constitution_paths)
    check_inputs(config)
    if shard is not None:
        import sys

        from cai_cli.shards import run_shard

        return run_shard(sys.modules[__name__], config, stage, shard, prompts, force=force,
                         produce=lambda run, part, out: produce(
                             config, run, constitution, part, out, force=force))
    run = begin(stage, config, force=force)
    if run is None:
        return config.layout.report
    extra = produce(config, run, constitution, prompts,
                    {"answers.jsonl": config.layout.eval_answers}, force=force)
    return finish(config, run, extra)


def produce(config: Config, run: StageRun, constitution, prompts: list[Prompt],
            out: dict[str, Path], *, force: bool) -> dict:
    """Every model's answers to ``prompts`` into ``out["answers.jsonl"]`` (resumable), then the
    judgments of every pair of models and the reward scores. These go to ``out["results.json"]``
    when given (a shard), else they are returned for ``finish``."""
    paths = model_paths(config)
    started = time.perf_counter()
    # Answers: one checkpointed batch per model, so an interruption loses one model's work.
    answers_file = ResumableJsonl(out["answers.jsonl"], run.spec.fingerprint)
    done = answers_file.open(fresh=force)
    if not answers_file.finished:
        from cai_cli.backends import load_backend

        for index, (name, path) in enumerate(list(paths.items())[done:], start=done):
            ui.info(f"evaluate: answering {len(prompts)} prompts with {name} ({path})")
            backend = load_backend(config.models.policy.model_copy(update={"name_or_path": path}),
                                   f"evaluate.models ({name})")
            run.producing()
            answers_file.append_batch(answer_all(config, backend, prompts, name))
            backend.close()
        answers_file.finish()
    run.after_complete(answers_file.cleanup)
    answers = {(r["model"], r["id"]): r["answer"] for r in answers_file.records()}

    comparisons = judge_all(config, constitution, prompts, list(paths), answers)
    rewards = reward_scores(config, prompts, list(paths), answers) if config.evaluate.reward_model else None
    results = {"comparisons": [{"models": list(pair), "rows": rows}
                               for pair, rows in comparisons.items()],
               "rewards": rewards}
    run.manifest.timings["evaluate_seconds"] = round(time.perf_counter() - started, 2)
    if "results.json" in out:
        write_json_atomic(out["results.json"], results)
        return {}
    return {"results": results}


def merge_parts(config: Config, parts: list[dict[str, Path]], extras: list[dict]) -> dict:
    """The shards' answers in the order one run writes them (model by model, each in prompt
    order), and their judgments and reward scores joined in prompt order."""
    names = list(model_paths(config))
    lines: dict[str, list[bytes]] = {name: [] for name in names}
    for files in parts:
        for raw in files["answers.jsonl"].read_bytes().splitlines(keepends=True):
            if raw.strip():
                lines[json.loads(raw)["model"]].append(raw)
    write_atomic(config.layout.eval_answers, b"".join(b"".join(lines[name]) for name in names))
    merged: dict = {"comparisons": [], "rewards": None}
    for number, files in enumerate(parts):
        results = json.loads(files["results.json"].read_text())
        if number == 0:
            merged = results
            continue
        for into, more in zip(merged["comparisons"], results["comparisons"]):
            into["rows"] += more["rows"]
        if merged["rewards"] is not None and results["rewards"] is not None:
            for name, scores in results["rewards"].items():
                merged["rewards"][name] += scores
        else:
            merged["rewards"] = None
    return {"results": merged}


def finish(config: Config, run: StageRun, extra: dict) -> Path:
    """Once every answer is judged (one run, or shards merged): the report, the manifest, the
    stage complete."""
    paths = model_paths(config)
    prompts = select_prompts(config)
    results = extra["results"]
    comparisons = {tuple(c["models"]): c["rows"] for c in results["comparisons"]}
    report = build_report(config, prompts, paths, comparisons, results["rewards"])
    write_json_atomic(config.layout.report, report)

    manifest = run.manifest
    manifest.counts.update({"models": len(paths), "prompts": len(prompts),
                            "comparisons": sum(len(v) for v in comparisons.values())})
    manifest.stats = {"win_rates": {f"{w['model']} > {w['over']}": w["win_rate"]
                                    for w in report["win_rates"]}}
    run.complete()
    print_report(report)
    ui.info(f"evaluate: report in {config.layout.report}")
    return config.layout.report


def answer_all(config: Config, backend, prompts: list[Prompt],
               name: str) -> list[EvalAnswer]:
    fmt = resolve_format(config.generate_sl.prompt_format, backend, "generate_sl.prompt_format")
    sampling = config.evaluate.sampling
    params = SamplingParams(
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k,
        stop=TRANSCRIPT_STOPS if fmt == "transcript" else ())
    # The bar moves at every decoding step, by the share of a prompt a token is at most.
    started, streamed = time.perf_counter(), 0
    with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
        task = bar.add_task(f"answering ({name})", total=len(prompts), rate="")

        def stepped(tokens: int) -> None:
            nonlocal streamed
            streamed += tokens
            rate = streamed / max(time.perf_counter() - started, 1e-9)
            bar.update(task, advance=tokens / params.max_new_tokens, rate=f"{rate:,.0f} tok/s")

        backend.on_tokens = stepped
        results = backend.generate([answer_prompt(p.text, fmt, config.generate_sl.system_prompt)
                                    for p in prompts], params,
                                   seeds=[record_seed(config.seed, p.id, name, "evaluate")
                                          for p in prompts])
        bar.update(task, completed=len(prompts))
    # A prompt too long for this model gets an empty answer: it loses to any real one.
    return [EvalAnswer(model=name, id=p.id, answer=r.text if isinstance(r, Completion) else "")
            for p, r in zip(prompts, results)]


def judge_all(config: Config, constitution, prompts: list[Prompt], names: list[str],
              answers: dict) -> dict[tuple[str, str], list[dict]]:
    """For each pair of models (a, b): per prompt, p(a's answer preferred) and per-principle
    probabilities, judged as label-prefs judges."""
    from cai_cli.backends import load_backend
    from cai_cli.judging import Judge

    feedback = load_backend(config.feedback_model, "models.feedback")
    judge = Judge(config, constitution, feedback,
                  principles_per_pair=config.evaluate.principles_per_pair, pairs_per_prompt=None)
    out: dict[tuple[str, str], list[dict]] = {}
    pairs = list(itertools.combinations(names, 2))
    with ui.progress() as bar:
        task = bar.add_task("judging", total=len(pairs) * len(prompts))
        for a, b in pairs:
            records = [{"id": p.id, "prompt": p.text,
                        "responses": [answers[a, p.id], answers[b, p.id]]} for p in prompts]
            judged = {pair.prompt_id: pair for pair in judge.batch(records)}
            rows = []
            for p in prompts:
                record = judged.get(p.id)
                if record is None:  # identical answers (or too long to judge): a tie
                    rows.append({"id": p.id, "p": 0.5, "principles": {}})
                    continue
                a_chosen = record.chosen[0].content == answers[a, p.id]
                p_a = record.p_chosen if a_chosen else 1.0 - record.p_chosen
                rows.append({"id": p.id, "p": p_a,
                             "principles": per_principle(record.judgments, a_chosen)})
            out[a, b] = rows
            bar.update(task, advance=len(prompts))
    feedback.close()
    return out


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

    from cai_cli.models import check_device, load_reward_model, load_tokenizer

    policy = config.models.policy.transformers_config()  # the reward model loads through transformers
    rm_config = policy.model_copy(update={"name_or_path": str(rm)})
    device = check_device(rm_config, "models.policy")
    tokenizer = load_tokenizer(rm_config, str(rm), padding_side="right")
    model = load_reward_model(rm_config, str(rm), device=device)
    model.config.pad_token_id = tokenizer.pad_token_id
    scores: dict[str, list[float]] = {}
    size = policy.forward_batch_size
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
    from cai_cli.prompting import transcript_pair

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


def bootstrap_interval(values: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling the values with replacement."""
    rng = random.Random(seed)
    means = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(round(0.975 * (resamples - 1)))]


def build_report(config: Config, prompts: list[Prompt], paths: dict[str, str],
                 comparisons: dict, rewards: dict | None) -> dict:
    win_rates, principles = [], {}
    for (a, b), rows in comparisons.items():
        p_a = [row["p"] for row in rows]
        for model, over, values in ((a, b, p_a), (b, a, [1.0 - p for p in p_a])):
            low, high = bootstrap_interval(values, config.evaluate.bootstrap, config.seed)
            ranked = sorted(rows, key=lambda row: row["p"], reverse=model == a)
            win_rates.append({
                "model": model, "over": over, "win_rate": round(statistics.fmean(values), 4),
                "ci95": [round(low, 4), round(high, 4)], "prompts": len(values),
                "examples": {"most_preferred": [row["id"] for row in ranked[:3]],
                             "least_preferred": [row["id"] for row in ranked[-3:]]},
            })
        by_principle: dict[str, list[float]] = {}
        for row in rows:
            for name, value in row["principles"].items():
                by_principle.setdefault(name, []).append(value)
        principles[f"{a} vs {b}"] = {name: {"win_rate_first": round(statistics.fmean(v), 4),
                                            "judged": len(v)}
                                     for name, v in sorted(by_principle.items())}
    report = {
        "models": paths,
        "prompts": len(prompts),
        "prompt_ids": [p.id for p in prompts],
        "win_rates": win_rates,
        "per_principle": principles,
        "reward_model": None,
    }
    if rewards is not None:
        report["reward_model"] = {
            "path": str(config.layout.rm),
            "mean_score": {name: round(statistics.fmean(v), 4) for name, v in rewards.items()},
        }
    return report


def print_report(report: dict) -> None:
    from rich import box
    from rich.table import Table

    names = list(report["models"])
    # The title is a line of its own: as the table's title it would wrap at the table's width.
    title = (f"win rate of row over column ({report['prompts']} prompts, feedback model, 95% "
             "bootstrap interval)")
    table = Table(box=box.SIMPLE)
    table.add_column("model", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    if report["reward_model"]:
        table.add_column("mean reward", justify="right")
    cells = {(w["model"], w["over"]): w for w in report["win_rates"]}
    for row in names:
        values = []
        for column in names:
            w = cells.get((row, column))
            values.append("-" if w is None else
                          f"{w['win_rate']:.2f} [{w['ci95'][0]:.2f}, {w['ci95'][1]:.2f}]")
        if report["reward_model"]:
            values.append(f"{report['reward_model']['mean_score'][row]:.3f}")
        table.add_row(row, *values)
    ui.stdout.print(title, markup=False, soft_wrap=True)
    ui.stdout.print(table)
