"""``cai generate-sl``: SL-CAI data. Answer each red-team prompt, then critique and revise the
answer against principles drawn from the constitution, ``num_revisions`` rounds.

Prompts are processed in checkpointed batches: every step (answers, then each round's critiques,
then its revisions) is one batched call to the backend for the whole batch, and the batch's
chains are appended to ``sl/chains.jsonl.partial`` when it is done. Principle and example draws
come from a generator seeded by (seed, prompt id), and each prompt is sampled with the seed of
(seed, prompt id, step), so the output does not depend on whether the run was interrupted, nor on
the batch or the shard (``--shard I/N``, see ``cai_cli.run.shards``) a prompt ran in.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from rich.progress import TextColumn

from cai_cli import ui
from cai_cli.run.artifacts import ResumableJsonl, model_fingerprint, read_jsonl, write_jsonl_atomic
from cai_cli.engines.base import Completion, Overflow, SamplingParams
from cai_cli.config import Config
from cai_cli.constitution import Constitution, FewShotExample, Principle, load_constitution
from cai_cli.data.sources import Prompt, load_prompts
from cai_cli.engines.prompts import (TRANSCRIPT_STOPS, answer_prompt, critique_prompt,
                               resolve_format, revision_prompt)
from cai_cli.run.records import Chain, Message, SFTExample
from cai_cli.run.seeding import draw, record_seed
from cai_cli.stages.common import (StageRun, StageSpec, begin, checkpoint_batches, red_team_inputs,
                                   require_complete)

PARTS = ("chains.jsonl",)  # the record files a shard writes its part of (cai_cli.run.shards)


def spec(config: Config) -> StageSpec:
    """What decides this stage's output: cheap to compute, no model loaded."""
    settings, inputs = red_team_inputs(config)
    settings["models.policy"] = config.models.policy.model_dump(mode="json")
    settings["generate_sl"] = config.generate_sl.model_dump(mode="json")
    inputs["policy"] = model_fingerprint(config.models.policy.name_or_path)
    source = config.data.red_team.path
    reads_generated = source is not None and \
        Path(source).expanduser().resolve() == config.layout.generated_prompts.resolve()
    return StageSpec("generate-sl", config.layout.sl, settings, inputs,
                     after=("generate-prompts",) if reads_generated else ())


class Plan:
    """The per-prompt random draws: principles for each round and the few-shot examples."""

    def __init__(self, config: Config, constitution: Constitution, prompt: Prompt):
        rng = random.Random(f"{config.seed}:{prompt.id}")
        self.principles: list[Principle] = draw(rng, constitution.principles,
                                                config.generate_sl.num_revisions)
        self.examples: list[FewShotExample] = draw(
            rng, constitution.few_shot, min(config.generate_sl.few_shot, len(constitution.few_shot)))


def run(config: Config, *, force: bool = False, shard=None) -> Path | None:
    """The whole stage, or with ``shard`` (``shards.Shard``) that shard's part of it."""
    stage = spec(config)
    if stage.after:  # data.red_team names generate-prompts' output: it must be finished
        require_complete(config, "generate-prompts", "data.red_team names its output")
    constitution = load_constitution(config.constitution_paths)
    prompts = load_prompts(config.data.red_team, config.seed)
    if config.generate_sl.few_shot and not constitution.few_shot:
        ui.warn(f"constitution '{constitution.name}' has no worked examples; "
                "generate_sl.few_shot is ignored")

    from cai_cli.engines.models import check_model_source

    check_model_source(config.models.policy, "models.policy")
    if shard is not None:
        import sys

        from cai_cli.run.shards import run_shard

        return run_shard(sys.modules[__name__], config, stage, shard, prompts, force=force,
                         produce=lambda run, part, out: produce(
                             config, run, constitution, part, out["chains.jsonl"], force=force))
    run = begin(stage, config, force=force)
    if run is None:
        return config.layout.chains
    extra = produce(config, run, constitution, prompts, config.layout.chains, force=force)
    return finish(config, run, extra)


def produce(config: Config, run: StageRun, constitution: Constitution, prompts: list[Prompt],
            path: Path, *, force: bool) -> dict:
    """The chains of ``prompts`` into ``path``, in checkpointed batches, resuming an interrupted
    run; returns the counts ``finish`` reports."""
    settings = config.generate_sl
    writer = ResumableJsonl(path, run.spec.fingerprint)
    done_batches = writer.open(fresh=force)
    batches = checkpoint_batches(prompts, settings.prompts_per_checkpoint)
    if not writer.finished:
        from cai_cli.engines import load_backend

        backend = load_backend(config.models.policy, "models.policy")
        run.producing()
        fmt = resolve_format(settings.prompt_format, backend, "generate_sl.prompt_format")
        generator = ChainGenerator(config, constitution, backend, fmt)
        started, tokens = time.perf_counter(), writer.extra.get("tokens", 0)
        skipped = writer.extra.get("skipped", 0)
        # The bar counts prompts. It moves at every decoding step (by the share of a prompt a
        # token is at most) and is set right after every backend call (an answer, a critique or
        # a revision turn of the batch) and every saved batch, with the tokens/s so far.
        turns = 1 + 2 * settings.num_revisions
        per_token = 1 / (turns * settings.sampling.max_new_tokens)
        streamed = 0  # tokens of the backend call under way

        with ui.progress(TextColumn("{task.fields[rate]}")) as bar:
            done = sum(len(b) for b in batches[:done_batches])
            task = bar.add_task("generate-sl", total=len(prompts), rate="", completed=done)

            def rate() -> str:
                tokens_per_s = (generator.tokens + streamed) / max(time.perf_counter() - started, 1e-9)
                return f"{tokens_per_s:,.0f} tok/s"

            def stepped(tokens: int) -> None:
                nonlocal streamed
                streamed += tokens
                bar.update(task, advance=tokens * per_token, rate=rate())

            def moved(calls: int) -> None:
                nonlocal streamed
                advance, streamed = max(calls / turns - streamed * per_token, 0.0), 0
                bar.update(task, advance=advance, rate=rate())

            backend.on_tokens = stepped
            generator.on_call = moved
            for index in range(done_batches, len(batches)):
                chains, batch_tokens, batch_skipped = generator.batch(batches[index])
                tokens += batch_tokens
                skipped += batch_skipped
                writer.append_batch(chains, tokens=tokens, skipped=skipped)
                done += len(batches[index])
                bar.update(task, completed=done)  # whole prompts, skipped ones included
        backend.close()
        run.manifest.timings["generation_seconds"] = round(time.perf_counter() - started, 2)
        writer.finish()
    run.after_complete(writer.cleanup)
    return {"prompts": len(prompts), "skipped": writer.extra.get("skipped", 0),
            "generated_tokens": writer.extra.get("tokens", 0)}


def finish(config: Config, run: StageRun, extra: dict) -> Path:
    """Once ``sl/chains.jsonl`` is complete (one run, or shards merged): the SFT examples, the
    manifest's counts and statistics, and the stage marked complete."""
    layout = config.layout
    chains = read_jsonl(layout.chains)
    sft = [SFTExample(id=chain["id"], prompt=[Message(role="user", content=chain["prompt"])],
                      completion=[Message(role="assistant", content=chain["final"])])
           for chain in chains]
    write_jsonl_atomic(layout.sft_data, sft)

    rounds = [r for chain in chains for r in chain["rounds"]]
    manifest = run.manifest
    manifest.counts.update({"prompts": extra["prompts"], "chains": len(chains),
                            "skipped": extra["skipped"], "rounds": len(rounds),
                            "generated_tokens": extra["generated_tokens"]})
    manifest.stats = {
        "constitution": load_constitution(config.constitution_paths).name,
        "prompt_format": chains[0]["format"] if chains else None,
        "revisions_changed": round(sum(r["changed"] for r in rounds) / max(len(rounds), 1), 4),
        "final_differs": round(sum(c["final"] != c["initial"] for c in chains) / max(len(chains), 1), 4),
    }
    run.complete()
    ui.info(f"generate-sl: {len(chains)} chains ({extra['skipped']} skipped) -> "
            f"{layout.chains}\n  look at them with: cai inspect {config.run_dir}")
    return layout.chains


class ChainGenerator:
    """Runs one batch of prompts through answer -> (critique -> revision) x rounds."""

    def __init__(self, config: Config, constitution: Constitution, backend, fmt: str):
        self.config, self.constitution, self.backend, self.fmt = config, constitution, backend, fmt
        self.system = config.generate_sl.system_prompt
        self.tokens = 0  # generated in this process, for the tokens/s column
        self.on_call = lambda prompts: None  # told how many prompts each backend call ran

    def _call(self, prompts: list, ids: list[str], step: str) -> list[Completion | Overflow]:
        """One backend call: each prompt sampled with the seed of its record and step."""
        sampling = self.config.generate_sl.sampling
        params = SamplingParams(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k,
            stop=TRANSCRIPT_STOPS if self.fmt == "transcript" else ())
        seeds = [record_seed(self.config.seed, record, step) for record in ids]
        results = self.backend.generate(prompts, params, seeds=seeds)
        self.tokens += sum(r.tokens for r in results if isinstance(r, Completion))
        self.on_call(len(prompts))
        return results

    def batch(self, prompts: list[Prompt]) -> tuple[list[Chain], int, int]:
        """The chain records of one batch, the tokens generated and the prompts skipped."""
        before, fmt, system = self.tokens, self.fmt, self.system
        # (prompt, plan) of the chains still alive: a chain that outgrows the context is dropped.
        live = [(p, Plan(self.config, self.constitution, p)) for p in prompts]
        answered = self._fitting(live, self._call(
            [answer_prompt(p.text, fmt, system) for p, _ in live], [p.id for p, _ in live],
            "answer"), "the answer")
        chains = {p.id: {"id": p.id, "prompt": p.text, "initial": answer, "rounds": [],
                         "final": answer, "format": fmt} for (p, _), answer in answered}
        live = [item for item, _ in answered]

        for k in range(self.config.generate_sl.num_revisions):
            critiqued = self._fitting(live, self._call(
                [critique_prompt(p.text, chains[p.id]["final"], plan.principles[k], plan.examples,
                                 fmt, system) for p, plan in live],
                [p.id for p, _ in live], f"critique{k}"), f"critique round {k + 1}")
            revised = self._fitting([item for item, _ in critiqued], self._call(
                [revision_prompt(p.text, chains[p.id]["final"], plan.principles[k], critique,
                                 plan.examples, fmt, system) for (p, plan), critique in critiqued],
                [p.id for (p, _), _ in critiqued], f"revision{k}"), f"revision round {k + 1}")
            critique_of = {prompt.id: critique for (prompt, _), critique in critiqued}
            for (prompt, plan), revision in revised:
                chain, principle = chains[prompt.id], plan.principles[k]
                chain["rounds"].append({
                    "principle": principle.id,
                    "critique_request": principle.critique_request,
                    "critique": critique_of[prompt.id],
                    "revision_request": principle.revision_request,
                    "revision": revision,
                    "changed": revision != chain["final"],
                })
                chain["final"] = revision
            live = [item for item, _ in revised]

        records = [Chain.model_validate(chains[prompt.id]) for prompt, _ in live]
        return records, self.tokens - before, len(prompts) - len(records)

    def _fitting(self, items: list, results: list, step: str) -> list[tuple[tuple, str]]:
        """``(item, text)`` for each result that fit the context; a warning for each that did not."""
        kept = []
        for item, result in zip(items, results):
            if isinstance(result, Overflow):
                ui.warn(f"prompt {item[0].id} skipped at {step}: {result}; raise "
                        "models.policy.max_context or lower generate_sl.sampling.max_new_tokens")
            else:
                kept.append((item, result.text))
        return kept
