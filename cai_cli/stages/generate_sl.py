"""``cai generate-sl``: SL-CAI data. Answer each red-team prompt, then critique and revise the
answer against principles drawn from the constitution, ``num_revisions`` rounds.

Prompts are processed in checkpointed batches: every turn of a chain (the answer, then each
round's critique, then its revision: ``turns``) is one batched call to the engine for the whole
batch, and the batch's chains are appended to ``sl/chains.jsonl.partial`` when it is done.
Principle and example draws come from a generator seeded by (seed, prompt id), and each prompt
is sampled with the seed of (seed, prompt id, turn), so the output does not depend on whether
the run was interrupted, nor on the batch or the shard (``--shard I/N``) a prompt ran in.
"""

from __future__ import annotations

import random
from pathlib import Path

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.constitution import Constitution, FewShotExample, Principle, load_constitution
from cai_cli.data.sources import Prompt, load_prompts
from cai_cli.engines.base import Completion, Overflow, SamplingParams
from cai_cli.engines.prompts import (TRANSCRIPT_STOPS, answer_prompt, critique_prompt,
                                     resolve_format, revision_prompt)
from cai_cli.engines.work import Generate, Work
from cai_cli.run.artifacts import model_fingerprint, read_jsonl, write_jsonl_atomic
from cai_cli.run.records import Chain, Message, SFTExample
from cai_cli.run.seeding import draw, record_seed
from cai_cli.run.spec import StageSpec
from cai_cli.stages.base import RecordStage
from cai_cli.stages.checkpointed import checkpointed
from cai_cli.stages.common import (Need, NothingMade, StageRun, checkpoint_batches,
                                   red_team_inputs)
from cai_cli.stages.generate_prompts import GeneratePrompts


class Draws:
    """The per-prompt random draws: principles for each round and the few-shot examples."""

    def __init__(self, config: Config, constitution: Constitution, prompt: Prompt):
        rng = random.Random(f"{config.seed}:{prompt.id}")
        self.principles: list[Principle] = draw(rng, constitution.principles,
                                                config.generate_sl.num_revisions)
        self.examples: list[FewShotExample] = draw(
            rng, constitution.few_shot, min(config.generate_sl.few_shot, len(constitution.few_shot)))


def turns(num_revisions: int) -> list[tuple[str, int]]:
    """The turns of a chain, in the order they are asked for: ``("answer", 0)``, then
    ``("critique", k)`` and ``("revision", k)`` for each round ``k``."""
    return [("answer", 0)] + [(kind, k) for k in range(num_revisions)
                              for kind in ("critique", "revision")]


# Model-written texts a turn's prompt holds: the answer so far, and for a revision its critique.
WRITTEN = {"answer": 0, "critique": 1, "revision": 2}
SEED_STEP = {"answer": "answer", "critique": "critique{k}", "revision": "revision{k}"}
SKIPPED_AT = {"answer": "the answer", "critique": "critique round {n}",
              "revision": "revision round {n}"}


def turn_prompt(config: Config, turn: tuple[str, int], prompt: Prompt, draws: Draws, answer: str,
                critique: str, fmt: str):
    """The prompt of one turn of a chain: ``answer`` is the chain's answer so far (the last
    revision) and ``critique`` the critique of this round (a revision's)."""
    kind, k = turn
    system = config.generate_sl.system_prompt
    if kind == "answer":
        return answer_prompt(prompt.text, fmt, system)
    if kind == "critique":
        return critique_prompt(prompt.text, answer, draws.principles[k], draws.examples, fmt,
                               system)
    return revision_prompt(prompt.text, answer, draws.principles[k], critique, draws.examples,
                           fmt, system)


class GenerateSL(RecordStage):
    command = "generate-sl"
    parts = ("chains.jsonl",)

    def reads_generated(self, config: Config) -> bool:
        source = config.data.red_team.path
        return source is not None and \
            Path(source).expanduser().resolve() == config.layout.generated_prompts.resolve()

    def spec(self, config: Config) -> StageSpec:
        """What decides this stage's output: cheap to compute, no model loaded."""
        settings, inputs = red_team_inputs(config)
        settings["models.policy"] = config.models.policy.model_dump(mode="json")
        settings["generate_sl"] = config.generate_sl.model_dump(mode="json")
        inputs["policy"] = model_fingerprint(config.models.policy.name_or_path)
        return StageSpec(self.command, config.layout.sl, settings, inputs, shardable=True)

    def needs(self, config: Config) -> list[Need]:
        if self.reads_generated(config):
            return [Need(GeneratePrompts(), "data.red_team names its output")]
        return []

    def preflight(self, config: Config) -> None:
        from cai_cli.engines.models import check_model_source

        check_model_source(config.models.policy, "models.policy")

    def output(self, config: Config) -> Path:
        return config.layout.chains

    def items(self, config: Config, *, force: bool) -> list[Prompt]:
        self.check_needs(config)
        constitution = load_constitution(config.constitution_paths)
        prompts = load_prompts(config.data.red_team, config.seed)
        if config.generate_sl.few_shot and not constitution.few_shot:
            ui.warn(f"constitution '{constitution.name}' has no worked examples; "
                    "generate_sl.few_shot is ignored")
        self.preflight(config)
        return prompts

    def produce(self, config: Config, run: StageRun, items: list[Prompt], out: dict[str, Path],
                *, force: bool, whole: bool) -> dict:
        """The chains of ``items`` in checkpointed batches, resuming an interrupted run."""
        settings = config.generate_sl
        constitution = load_constitution(config.constitution_paths)
        generators: dict = {}

        def make(backend, batch: list[Prompt], step) -> list[Chain]:
            if backend not in generators:
                fmt = resolve_format(settings.prompt_format, backend, "generate_sl.prompt_format")
                generators.clear()
                generators[backend] = ChainGenerator(config, constitution, backend, fmt)
            chains, tokens = generators[backend].batch(batch, step)
            step.extra["tokens"] = step.extra.get("tokens", 0) + tokens
            step.extra["skipped"] = step.extra.get("skipped", 0) + len(batch) - len(chains)
            return chains

        writer = checkpointed(
            run, out["chains.jsonl"], checkpoint_batches(items, settings.prompts_per_checkpoint),
            make, label="generate-sl", engine=(config.models.policy, "models.policy"),
            fresh=force, timing="generation_seconds",
            tokens_per_item=len(turns(settings.num_revisions)) * settings.sampling.max_new_tokens,
            completions_per_item=len(turns(settings.num_revisions)),
            check=(lambda made: refuse_empty(len(items), made.empty)) if whole else None)
        return {"prompts": len(items), "skipped": writer.extra.get("skipped", 0),
                "generated_tokens": writer.extra.get("tokens", 0)}

    def finish(self, config: Config, run: StageRun, extra: dict) -> Path:
        """Once ``sl/chains.jsonl`` is complete (one run, or shards merged): the SFT examples,
        the manifest's counts and statistics, and the stage marked complete."""
        layout = config.layout
        chains = read_jsonl(layout.chains)
        refuse_empty(extra["prompts"], not chains)  # shards merged: each may have been empty
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
            "final_differs": round(sum(c["final"] != c["initial"] for c in chains)
                                   / max(len(chains), 1), 4),
        }
        run.complete()
        ui.info(f"generate-sl: {len(chains)} chains ({extra['skipped']} skipped) -> "
                f"{layout.chains}\n  look at them with: cai inspect {ui.shell(config.run_dir)}")
        return layout.chains

    def work(self, config: Config, ctx) -> Work:
        """Per checkpointed batch, one engine call per turn, each prompt holding the chain's
        answer so far (and a revision its critique) at ``max_new_tokens`` each."""
        settings = config.generate_sl
        source = config.data.red_team
        prompts = ctx.prompts("data.red_team", lambda: load_prompts(source, config.seed), source,
                              source.limit)
        model, key = config.models.policy, "models.policy"
        fmt = resolve_format(settings.prompt_format, ctx.tokens(model, key),
                             "generate_sl.prompt_format")
        constitution = load_constitution(config.constitution_paths)
        new = settings.sampling.max_new_tokens
        calls = []
        for batch in checkpoint_batches(prompts, settings.prompts_per_checkpoint):
            draws = [Draws(config, constitution, p) for p in batch]
            for turn in turns(settings.num_revisions):
                calls.append(Generate(key, model, [turn_prompt(config, turn, p, d, "", "", fmt)
                                                   for p, d in zip(batch, draws)],
                                      [WRITTEN[turn[0]] * new] * len(batch), new))
        rounds = settings.num_revisions
        return Work(calls, counts={"prompts": len(prompts),
                                   "generations": len(prompts) * (1 + 2 * rounds),
                                   "critiques": len(prompts) * rounds,
                                   "revisions": len(prompts) * rounds},
                    outputs={"prompts": prompts})


def refuse_empty(prompts: int, empty: bool) -> None:
    """``NothingMade`` when no chain was made of ``prompts`` prompts: each outgrew the policy
    model's context at some turn (a warning for each said where)."""
    if empty and prompts:
        raise NothingMade(
            f"generate-sl: all {prompts} prompts were skipped, each chain outgrowing the policy "
            "model's context (the warnings above say at which turn); lower "
            "generate_sl.sampling.max_new_tokens (or generate_sl.few_shot, num_revisions), or "
            "raise models.policy.max_context if the model reads longer inputs, then rerun")


class ChainGenerator:
    """Runs one batch of prompts through the turns of a chain."""

    def __init__(self, config: Config, constitution: Constitution, backend, fmt: str):
        self.config, self.constitution, self.backend, self.fmt = config, constitution, backend, fmt

    def _call(self, prompts: list, ids: list[str], step: str) -> list[Completion | Overflow]:
        """One engine call: each prompt sampled with the seed of its record and step."""
        sampling = self.config.generate_sl.sampling
        params = SamplingParams(
            max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
            top_p=sampling.top_p, top_k=sampling.top_k,
            stop=TRANSCRIPT_STOPS if self.fmt == "transcript" else ())
        seeds = [record_seed(self.config.seed, record, step) for record in ids]
        return self.backend.generate(prompts, params, seeds=seeds)

    def batch(self, prompts: list[Prompt], step=None) -> tuple[list[Chain], int]:
        """The chain records of one batch (a chain that outgrows the context is dropped with a
        warning) and the tokens generated."""
        config, fmt = self.config, self.fmt
        live = [(p, Draws(config, self.constitution, p)) for p in prompts]
        chains: dict[str, dict] = {}
        critiques: dict[str, str] = {}
        tokens = 0
        order = turns(config.generate_sl.num_revisions)
        for index, turn in enumerate(order):
            kind, k = turn
            results = self._call(
                [turn_prompt(config, turn, p, d, chains.get(p.id, {}).get("final", ""),
                             critiques.get(p.id, ""), fmt) for p, d in live],
                [p.id for p, _ in live], SEED_STEP[kind].format(k=k))
            tokens += sum(r.tokens for r in results if isinstance(r, Completion))
            if step is not None:
                step.at((index + 1) / len(order))
            kept = []
            for (prompt, draws), result in zip(live, results):
                if isinstance(result, Overflow):
                    ui.warn(f"prompt {prompt.id} skipped at {SKIPPED_AT[kind].format(n=k + 1)}: "
                            f"{result}; raise models.policy.max_context or lower "
                            "generate_sl.sampling.max_new_tokens")
                    continue
                kept.append((prompt, draws))
                text = result.text
                if kind == "answer":
                    chains[prompt.id] = {"id": prompt.id, "prompt": prompt.text, "initial": text,
                                         "rounds": [], "final": text, "format": fmt}
                elif kind == "critique":
                    critiques[prompt.id] = text
                else:
                    chain, principle = chains[prompt.id], draws.principles[k]
                    chain["rounds"].append({
                        "principle": principle.id,
                        "critique_request": principle.critique_request,
                        "critique": critiques[prompt.id],
                        "revision_request": principle.revision_request,
                        "revision": text,
                        "changed": text != chain["final"],
                    })
                    chain["final"] = text
            live = kept
        return [Chain.model_validate(chains[prompt.id]) for prompt, _ in live], tokens
