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

import time
from pathlib import Path

from rich.progress import TextColumn

from cai_cli import ui
from cai_cli.stages import trackers
from cai_cli.run.artifacts import ResumableJsonl, model_fingerprint, read_jsonl
from cai_cli.engines.base import Overflow, SamplingParams
from cai_cli.config import Config, ModelConfig
from cai_cli.constitution import Constitution, load_constitution
from cai_cli.data.sources import Prompt, load_prompts
from cai_cli.reports.statistics import label_diagnostics
from cai_cli.errors import UserError
from cai_cli.engines.judge import Judge
from cai_cli.engines.prompts import TRANSCRIPT_STOPS, answer_prompt, resolve_format
from cai_cli.run.records import Sample
from cai_cli.run.seeding import record_seed
from cai_cli.stages.common import (StageRun, StageSpec, begin, checkpoint_batches, red_team_inputs,
                                   require_complete)


COT_KEYS = {"cot_clamp", "cot_max_new_tokens"}  # used only with chain_of_thought
NOT_DECIDING = {"report_to"}  # where the figures are logged does not change the labels
PARTS = ("samples.jsonl", "pairs.jsonl")  # the record files a shard writes its part of


def unused_keys(config: Config) -> set[str]:
    """Settings of ``label_prefs`` that do not apply to this config (left out of the stage's
    fingerprint, so that they do not make its output stale)."""
    unused = set() if config.label_prefs.chain_of_thought else set(COT_KEYS)
    if not config.feedback_model.remote:  # only a server may lack log-probabilities
        unused.add("verdict_samples")
    return unused


def policy_path(config: Config) -> str:
    return config.label_prefs.policy or str(config.layout.sft)


def spec(config: Config) -> StageSpec:
    settings, inputs = red_team_inputs(config)
    settings.update({
        "models.policy": policy_model(config).model_dump(mode="json"),
        "models.feedback": config.feedback_model.model_dump(mode="json"),
        "label_prefs": config.label_prefs.model_dump(
            mode="json", exclude=unused_keys(config) | NOT_DECIDING),
        "generate_sl": config.generate_sl.model_dump(mode="json",
                                                      include={"prompt_format", "system_prompt"}),
    })
    inputs["policy"] = model_fingerprint(policy_path(config))
    inputs["feedback"] = model_fingerprint(config.feedback_model.name_or_path)
    after = ("finetune",) if config.label_prefs.policy is None else ()
    return StageSpec("label-prefs", config.layout.prefs, settings, inputs, after)


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
    """The default policy is the SL-CAI model: it must be there and finished; the trackers
    must be installed."""
    from cai_cli.engines.models import check_model_source

    trackers.check(config.label_prefs.report_to, "label_prefs.report_to")
    if config.label_prefs.policy is None:
        require_complete(config, "finetune",
                         "or set label_prefs.policy to a model to sample from")
    check_model_source(policy_model(config), "label_prefs.policy")
    check_model_source(config.feedback_model, "models.feedback" if config.models.feedback
                       else "models.policy")


def run(config: Config, *, force: bool = False, shard=None) -> Path | None:
    """The whole stage, or with ``shard`` (``shards.Shard``) that shard's part of it: its
    prompts sampled and their pairs judged."""
    stage = spec(config)
    constitution = load_constitution(config.constitution_paths)
    prompts = select_prompts(config)
    check_inputs(config)
    if shard is not None:
        import sys

        from cai_cli.run.shards import run_shard

        return run_shard(sys.modules[__name__], config, stage, shard, prompts, force=force,
                         produce=lambda run, part, out: produce(
                             config, run, constitution, part, out, force=force))
    run = begin(stage, config, force=force)
    if run is None:
        return config.layout.pairs
    layout = config.layout
    extra = produce(config, run, constitution, prompts,
                    {"samples.jsonl": layout.samples, "pairs.jsonl": layout.pairs}, force=force)
    return finish(config, run, extra)


def produce(config: Config, run: StageRun, constitution: Constitution, prompts: list[Prompt],
            out: dict[str, Path], *, force: bool) -> dict:
    """Sample answers to ``prompts`` into ``out["samples.jsonl"]``, then judge their pairs into
    ``out["pairs.jsonl"]``, each phase resumable; returns the counts ``finish`` reports."""
    settings = config.label_prefs
    started = time.perf_counter()
    samples = ResumableJsonl(out["samples.jsonl"], run.spec.fingerprint)
    done = samples.open(fresh=force)
    batches = checkpoint_batches(prompts, settings.prompts_per_checkpoint)
    if not samples.finished:
        from cai_cli.engines import load_backend

        policy = load_backend(policy_model(config), "label_prefs.policy")
        run.producing()
        with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
            task = bar.add_task("sampling", total=len(prompts), rate="",
                                completed=sum(len(b) for b in batches[:done]))
            for index in range(done, len(batches)):
                samples.append_batch(sample_batch(config, policy, batches[index]))
                bar.update(task, advance=len(batches[index]))
        samples.finish()
        policy.close()

    sampled = samples.records()
    pairs = ResumableJsonl(out["pairs.jsonl"], run.spec.fingerprint)
    done = pairs.open(fresh=force)
    groups = checkpoint_batches(sampled, settings.prompts_per_checkpoint)
    if not pairs.finished:
        from cai_cli.engines import load_backend

        feedback = load_backend(config.feedback_model, "models.feedback")
        run.producing()
        judge = Judge(config, constitution, feedback,
                      principles_per_pair=settings.principles_per_pair,
                      pairs_per_prompt=settings.pairs_per_prompt)
        with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
            task = bar.add_task("judging", total=len(sampled), rate="",
                                completed=sum(len(g) for g in groups[:done]))
            judge_started = time.perf_counter()
            for index in range(done, len(groups)):
                records = judge.batch(groups[index])
                skipped = pairs.extra.get("skipped", 0) + judge.skipped_last
                pairs.append_batch(records, skipped=skipped)
                rate = judge.comparisons / max(time.perf_counter() - judge_started, 1e-9)
                bar.update(task, advance=len(groups[index]), rate=f"{rate:,.1f} comparisons/s")
        feedback.close()
        pairs.finish()
    run.manifest.timings["label_seconds"] = round(time.perf_counter() - started, 2)
    run.after_complete(samples.cleanup)
    run.after_complete(pairs.cleanup)
    return {"prompts": len(prompts), "skipped_pairs": pairs.extra.get("skipped", 0)}


def finish(config: Config, run: StageRun, extra: dict) -> Path:
    """Once ``prefs/samples.jsonl`` and ``prefs/pairs.jsonl`` are complete (one run, or shards
    merged): the manifest's counts, the label statistics and diagnostics, the stage complete."""
    layout, settings = config.layout, config.label_prefs
    sampled = read_jsonl(layout.samples)
    records = read_jsonl(layout.pairs)
    confidence = [abs(r["p_chosen"] - 0.5) for r in records]
    manifest = run.manifest
    manifest.counts.update({"prompts": extra["prompts"], "sampled_prompts": len(sampled),
                            "pairs": len(records), "skipped_pairs": extra["skipped_pairs"],
                            "judgments": sum(len(r["judgments"]) for r in records)})
    manifest.stats = {
        "order_disagreement": round(sum(r["order_disagreement"] for r in records)
                                    / max(len(records), 1), 4),
        "mean_confidence": round(sum(confidence) / max(len(confidence), 1), 4),
        "mean_p_chosen": round(sum(r["p_chosen"] for r in records) / max(len(records), 1), 4),
        "chain_of_thought": settings.chain_of_thought,
        "label_sources": label_sources(records),
        **label_diagnostics(records),
    }
    run.complete()
    stats = manifest.stats
    ui.info(f"label-prefs: {len(records)} pairs, mean confidence {stats['mean_confidence']:.3f}, "
            f"orders disagree on {stats['order_disagreement']:.0%} of pairs -> {layout.pairs}")
    if stats["position_bias"] is not None:
        ui.info(f"  position bias (mean probability of the option shown first): "
                f"{stats['position_bias']:.2f}; orders agree on "
                f"{stats['order_agreement'] or 0:.0%} of pair-principles")
        say = ui.info if stats["verdict"].startswith("the feedback model's choices") else ui.warn
        say(stats["verdict"])
    if len(stats["label_sources"]) > 1:
        ui.warn(f"judgments come from different sources ({stats['label_sources']}): some are "
                "option probabilities, some sampled verdicts; each judgment's label_source says "
                "which (rerun with --force against one server for labels of one kind)")
    ui.info(f"  look at them with: cai inspect {layout.pairs}")
    trackers.log_stage(settings.report_to, layout.prefs, "label-prefs",
                       {**manifest.counts, **stats, **manifest.timings}, config)
    return layout.pairs


def label_sources(records: list[dict]) -> dict[str, int]:
    """Judgments per ``label_source``: ``logprobs`` (soft) or ``verdict`` (sampled)."""
    counts: dict[str, int] = {}
    for record in records:
        for judgment in record["judgments"]:
            source = judgment.get("label_source") or "logprobs"
            counts[source] = counts.get(source, 0) + 1
    return counts


def sample_batch(config: Config, policy, prompts: list[Prompt]) -> list[Sample]:
    """``responses_per_prompt`` answers to each prompt, in one backend call."""
    settings, fmt = config.label_prefs, resolve_format(config.generate_sl.prompt_format, policy,
                                                              "generate_sl.prompt_format")
    n = settings.responses_per_prompt
    sampling = settings.sampling
    params = SamplingParams(
        max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
        top_p=sampling.top_p, top_k=sampling.top_k,
        stop=TRANSCRIPT_STOPS if fmt == "transcript" else ())
    conversation = [answer_prompt(p.text, fmt, config.generate_sl.system_prompt) for p in prompts]
    seeds = [record_seed(config.seed, p.id, "sample", j) for p in prompts for j in range(n)]
    results = policy.generate([c for c in conversation for _ in range(n)], params, seeds=seeds)
    records = []
    for index, prompt in enumerate(prompts):
        answers = results[index * n:(index + 1) * n]
        overflow = next((a for a in answers if isinstance(a, Overflow)), None)
        if overflow is not None:  # the same prompt n times: all fit or none does
            ui.warn(f"prompt {prompt.id} skipped: {overflow}; raise models.policy.max_context or "
                    "lower label_prefs.sampling.max_new_tokens")
            continue
        records.append(Sample(id=prompt.id, prompt=prompt.text,
                              responses=[a.text for a in answers]))
    return records
