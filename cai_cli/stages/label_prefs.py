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

from cai_cli import ui
from cai_cli.config import Config, ModelConfig
from cai_cli.constitution import load_constitution
from cai_cli.data.sources import Prompt, load_prompts
from cai_cli.engines.base import Overflow, SamplingParams
from cai_cli.engines.judge import Judge
from cai_cli.engines.prompts import TRANSCRIPT_STOPS, answer_prompt, resolve_format
from cai_cli.engines.work import Generate, Work
from cai_cli.errors import UserError
from cai_cli.reports.statistics import label_diagnostics
from cai_cli.run.artifacts import model_fingerprint, read_jsonl
from cai_cli.run.records import Sample
from cai_cli.run.seeding import record_seed
from cai_cli.run.spec import StageSpec
from cai_cli.stages import trackers
from cai_cli.stages.base import RecordStage
from cai_cli.stages.checkpointed import checkpointed
from cai_cli.stages.common import (Need, NothingMade, StageRun, checkpoint_batches,
                                   red_team_inputs)
from cai_cli.stages.finetune import Finetune

COT_KEYS = {"cot_clamp", "cot_max_new_tokens"}  # used only with chain_of_thought
NOT_DECIDING = {"report_to"}  # where the figures are logged does not change the labels


def unused_keys(config: Config) -> set[str]:
    """Settings of ``label_prefs`` that do not apply to this config (left out of the stage's
    fingerprint, so that they do not make its output stale)."""
    unused = set() if config.label_prefs.chain_of_thought else set(COT_KEYS)
    if not config.feedback_model.remote:  # only a server may lack log-probabilities
        unused.add("verdict_samples")
    return unused


def policy_path(config: Config) -> str:
    return config.label_prefs.policy or str(config.layout.sft)


def stage_spec(config: Config) -> StageSpec:
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
    return StageSpec("label-prefs", config.layout.prefs, settings, inputs, shardable=True)


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


class LabelPrefs(RecordStage):
    command = "label-prefs"
    parts = ("samples.jsonl", "pairs.jsonl")

    def spec(self, config: Config) -> StageSpec:
        return stage_spec(config)

    def needs(self, config: Config) -> list[Need]:
        """The default policy is the SL-CAI model: it must be there and finished."""
        if config.label_prefs.policy is None:
            return [Need(Finetune(), "or set label_prefs.policy to a model to sample from")]
        return []

    def preflight(self, config: Config) -> None:
        from cai_cli.engines.models import check_model_source

        trackers.check(config.label_prefs.report_to, "label_prefs.report_to")
        if config.label_prefs.policy is not None:  # else made by finetune, checked when it is
            check_model_source(policy_model(config), "label_prefs.policy")
        check_model_source(config.feedback_model, config.feedback_key)

    def output(self, config: Config) -> Path:
        return config.layout.pairs

    def items(self, config: Config, *, force: bool) -> list[Prompt]:
        from cai_cli.engines.models import check_model_source

        load_constitution(config.constitution_paths)
        prompts = select_prompts(config)
        self.check_needs(config)
        self.preflight(config)
        check_model_source(policy_model(config), "label_prefs.policy")
        return prompts

    def produce(self, config: Config, run: StageRun, items: list[Prompt], out: dict[str, Path],
                *, force: bool, whole: bool) -> dict:
        """Sample answers to ``items`` into ``samples.jsonl``, then judge their pairs into
        ``pairs.jsonl``, each phase resumable."""
        settings = config.label_prefs
        started = time.perf_counter()
        constitution = load_constitution(config.constitution_paths)
        batches = checkpoint_batches(items, settings.prompts_per_checkpoint)
        samples = checkpointed(
            run, out["samples.jsonl"], batches,
            lambda policy, batch, step: sample_batch(config, policy, batch),
            label="sampling", engine=(policy_model(config), "label_prefs.policy"), fresh=force,
            tokens_per_item=settings.responses_per_prompt * settings.sampling.max_new_tokens,
            completions_per_item=settings.responses_per_prompt,
            check=(lambda made: refuse_no_samples(len(items), made.empty)) if whole else None)
        judges: dict = {}

        def judge(feedback, group: list[dict], step) -> list:
            if feedback not in judges:
                judges.clear()
                judges[feedback] = Judge(config, constitution, feedback,
                                         principles_per_pair=settings.principles_per_pair,
                                         pairs_per_prompt=settings.pairs_per_prompt)
            found = judges[feedback]
            records = found.batch(group)
            step.extra["skipped"] = step.extra.get("skipped", 0) + found.skipped_last
            step.rate(f"{found.comparisons / max(step.seconds, 1e-9):,.1f} comparisons/s")
            return records

        pairs = checkpointed(
            run, out["pairs.jsonl"], checkpoint_batches(samples.records(),
                                                        settings.prompts_per_checkpoint),
            judge, label="judging", engine=(config.feedback_model, config.feedback_key),
            fresh=force,
            check=(lambda made: refuse_no_pairs(config, len(items), made.empty,
                                                made.extra.get("skipped", 0))) if whole else None)
        run.manifest.timings["label_seconds"] = round(time.perf_counter() - started, 2)
        return {"prompts": len(items), "skipped_pairs": pairs.extra.get("skipped", 0)}

    def finish(self, config: Config, run: StageRun, extra: dict) -> Path:
        return finish_stage(config, run, extra)

    def work(self, config: Config, ctx) -> Work:
        """The answers (``responses_per_prompt`` a prompt, one call a checkpointed batch), then
        the judge's questions about each pair (at most: two equal answers make no pair)."""
        settings = config.label_prefs
        source = config.data.red_team
        prompts = ctx.prompts("data.red_team", lambda: select_prompts(config), source,
                              settings.limit or source.limit)
        policy, key = policy_model(config), "label_prefs.policy"
        fmt = resolve_format(config.generate_sl.prompt_format, ctx.tokens(policy, key),
                             "generate_sl.prompt_format")
        n, new = settings.responses_per_prompt, settings.sampling.max_new_tokens
        system = config.generate_sl.system_prompt
        calls: list = []
        for batch in checkpoint_batches(prompts, settings.prompts_per_checkpoint):
            calls.append(Generate(key, policy, [answer_prompt(p.text, fmt, system)
                                                for p in batch for _ in range(n)],
                                  [0] * (len(batch) * n), new))
        feedback = config.feedback_model
        judge = Judge(config, load_constitution(config.constitution_paths),
                      ctx.tokens(feedback, config.feedback_key),
                      principles_per_pair=settings.principles_per_pair,
                      pairs_per_prompt=settings.pairs_per_prompt)
        records = [{"id": p.id, "prompt": p.text, "responses": [f"answer {j}" for j in range(n)]}
                   for p in prompts]
        pairs_by_prompt: dict[str, int] = {}
        questions = 0
        for group in checkpoint_batches(records, settings.prompts_per_checkpoint):
            pairs, jobs = judge.plan(group)
            for _, record, _, _ in pairs:
                pairs_by_prompt[record["id"]] = pairs_by_prompt.get(record["id"], 0) + 1
            questions += len(jobs)
            calls += judge.work(group, new, config.feedback_key, feedback, at_most=True)
        return Work(calls, counts={"prompts": len(prompts), "answers": len(prompts) * n,
                                   "pairs": sum(pairs_by_prompt.values()),
                                   "judge_passes": questions},
                    notes=["pairs at most: two identical answers make no pair"],
                    outputs={"prompts": prompts, "pairs_by_prompt": pairs_by_prompt,
                             "answer_tokens": new})


def finish_stage(config: Config, run: StageRun, extra: dict) -> Path:
    """Once ``prefs/samples.jsonl`` and ``prefs/pairs.jsonl`` are complete (one run, or shards
    merged): the manifest's counts, the label statistics and diagnostics, the stage complete."""
    layout, settings = config.layout, config.label_prefs
    sampled = read_jsonl(layout.samples)
    records = read_jsonl(layout.pairs)
    # shards merged: each may have been empty
    refuse_no_samples(extra["prompts"], not sampled)
    refuse_no_pairs(config, extra["prompts"], not records, extra["skipped_pairs"])
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
    ui.info(f"  look at them with: cai inspect {ui.shell(layout.pairs)}")
    trackers.log_stage(settings.report_to, layout.prefs, "label-prefs",
                       {**manifest.counts, **stats, **manifest.timings}, config)
    return layout.pairs


def refuse_no_samples(prompts: int, empty: bool) -> None:
    """``NothingMade`` when ``prompts`` prompts gave no answers (``empty``): every prompt's
    answers outgrew the policy model's context."""
    if prompts and empty:
        raise NothingMade(
            f"label-prefs: all {prompts} prompts were skipped, their answers outgrowing the policy "
            "model's context (the warnings above); lower label_prefs.sampling.max_new_tokens or "
            "raise models.policy.max_context if the model reads longer inputs, then rerun")


def refuse_no_pairs(config: Config, prompts: int, empty: bool, skipped_pairs: int) -> None:
    """``NothingMade`` when the answers to ``prompts`` prompts gave no labelled pair
    (``empty``): every comparison outgrew the feedback model's context (``skipped_pairs`` of
    them), or every prompt's answers were one and the same text (no pair to compare)."""
    if not (prompts and empty):
        return
    if skipped_pairs:
        why = (f"all {skipped_pairs} pairs were skipped, no comparison fitting the feedback "
               f"model's context (the warnings above); raise {config.feedback_key}.max_context "
               "if the model reads longer inputs, or shorten what the judge reads "
               "(label_prefs.sampling.max_new_tokens, label_prefs.few_shot)")
    else:
        why = (f"no pair to judge: every prompt's {config.label_prefs.responses_per_prompt} "
               "answers were one and the same text; sample with variety "
               "(label_prefs.sampling.temperature above 0)")
    raise NothingMade(f"label-prefs: {why}, then rerun")


def training_pairs(config: Config, ctx, counter) -> tuple[list[dict], str]:
    """The labelled pairs a training stage's work reads (``{"group", "p_chosen", "tokens":
    (prompt + chosen, prompt + rejected)}``) and a note on where they come from:
    ``prefs/pairs.jsonl`` when it is complete and label-prefs will not run, else the pairs
    label-prefs' work will make (at most), each answer at its max_new_tokens."""
    from cai_cli.run import records
    from cai_cli.run.records import Pair, conversation

    if not ctx.runs("label-prefs") and ctx.complete("label-prefs"):
        out = []
        for pair in records.read(config.layout.pairs, Pair):
            prompt = conversation(pair.prompt)
            tokens = tuple(counter.conversation_tokens(prompt + conversation(answer))
                           for answer in (pair.chosen, pair.rejected))
            out.append({"group": pair.prompt_id or pair.id, "p_chosen": pair.p_chosen,
                        "tokens": tokens})
        return out, f"pairs from {config.layout.pairs}"
    planned = ctx.output("label-prefs")
    out = []
    for prompt in planned["prompts"]:
        length = counter.conversation_tokens([{"role": "user", "content": prompt.text},
                                              {"role": "assistant", "content": ""}])
        length += planned["answer_tokens"]
        out += [{"group": prompt.id, "p_chosen": 1.0, "tokens": (length, length)}
                ] * planned["pairs_by_prompt"].get(prompt.id, 0)
    return out, "pairs: as label-prefs will make them, at most"


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
