"""A real model (SmolLM2-135M-Instruct): generate-sl's backend against plain batched generate.

Critique turns with one worked example (about 560 prompt tokens each, most of them the same
system prompt and example), ``--max-new-tokens`` new tokens each, through three engines on the
same model in this one process (best of ``--repeats`` interleaved runs each):

- our hf backend (shared-prefix groups, cascade attention, prefill in runs), ``--batch-size``
  rows at a time;
- plain batched ``model.generate``: the same conversations, left padding, the same batch size
  and new tokens, transformers' own sdpa attention;
- a one-conversation-at-a-time loop.

End-of-turn stopping is off everywhere, so every turn generates exactly ``--max-new-tokens``
and the work is the same; all sample with SmolLM2's recommended temperature 0.2 and top-p 0.9.
Ours and plain batched generate are also timed making one token each, which is the prompts'
prefill and a step: the line "where the time goes" splits each ratio into the prefill's and the
decoding's, so it shows which of the two holds the total back.
Then label-prefs' judge scores ``--pairs`` answer pairs (few-shot comparison prompts, both
orders) through the backend's ``score_options``, in comparisons per second.

    python benchmarks/smollm2.py [--model runs/smollm2] [--turns 24] [--batch-size 24]
    python benchmarks/smollm2.py --model runs/tiny-model --config configs/tiny.yaml --target 4

Needs the imported model: ``make smollm2`` (or ``cai import-gguf ... runs/smollm2``). The second
line runs the same work on the random tiny model (``cai tiny-model runs/tiny-model``), where the
cache of shared prefixes matters more (its forward pass is cheap next to the attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEMPERATURE, TOP_P = 0.2, 0.9  # SmolLM2's model card


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--model", default=str(ROOT / "runs" / "smollm2"))
    parser.add_argument("--turns", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=24)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--target", type=float, default=2.5,
                        help="the ratio to plain batched generate this model should reach")
    parser.add_argument("--set", action="append", default=[], help="config override, as for cai")
    args = parser.parse_args()
    if not (Path(args.model) / "config.json").is_file():
        sys.exit(f"{args.model}: no model there; run `make smollm2` (or `cai tiny-model`) first")

    import torch

    from cai_cli.engines.base import SamplingParams
    from cai_cli.engines.hf import HFBackend
    from cai_cli.config import load_config
    from cai_cli.constitution import load_constitution
    from cai_cli.data.sources import load_prompts
    from cai_cli.engines.judge import Judge

    config = load_config(args.config, [
        f"models.policy.name_or_path={args.model}", f"models.feedback.name_or_path={args.model}",
        f"models.policy.forward_batch_size={args.batch_size}", "generate_sl.few_shot=1",
        "label_prefs.few_shot=1", "label_prefs.chain_of_thought=false", *args.set])
    constitution = load_constitution(config.constitution_paths)
    conversations = critique_conversations(config, constitution, args.turns)
    answers = helpful_answers()

    backend = HFBackend(config.models.policy, "models.policy")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE,
                            top_p=TOP_P, seed=0)
    work = GenerationWork(backend, conversations, params, args.batch_size)
    lengths = work.prompt_lengths
    backend.generate(conversations[:2], params)  # warm-up

    # Best of the interleaved runs: the machine is shared, and a slow moment should not decide
    # the ratio either way.
    runs = []
    for repeat in range(args.repeats):
        runs.append(tuple(_timed(name, side, repeat) for name, side in (
            ("ours", work.ours), ("plain batched", work.plain_batched),
            ("one at a time", work.one_at_a_time), ("ours, one token", lambda: work.ours(1)),
            ("plain batched, one token", lambda: work.plain_batched(1)))))
    best = [min((r[k] for r in runs), key=lambda r: r[1]) for k in range(5)]
    rates = [tokens / seconds for tokens, seconds in best]
    print(f"model: {Path(args.model).name}, critique turns: {len(conversations)}, prompt tokens: "
          f"mean {sum(lengths) / len(lengths):.0f} (min {min(lengths)}, max {max(lengths)}), "
          f"new tokens per turn: {args.max_new_tokens}, batch size: {args.batch_size}, "
          f"torch threads: {torch.get_num_threads()}")
    for name, (tokens, seconds), rate in zip(
            ("our hf backend (generate-sl)", "plain batched model.generate", "one at a time"), best, rates):
        print(f"{name + ':':31} {tokens} tokens in {seconds:6.2f} s = {rate:7,.1f} tokens/s")
    print(f"ratio: {rates[0] / rates[1]:.1f}x plain batched generate (target >= {args.target:g}x), "
          f"{rates[0] / rates[2]:.1f}x one at a time")
    (_, ours_all), (_, plain_all), _, (_, ours_one), (_, plain_one) = best
    ours_rest, plain_rest = max(ours_all - ours_one, 1e-9), max(plain_all - plain_one, 1e-9)
    print(f"where the time goes: prefill and first token ours {ours_one:.2f} s, plain "
          f"{plain_one:.2f} s ({plain_one / ours_one:.1f}x); the other {args.max_new_tokens - 1} "
          f"tokens ours {ours_rest:.2f} s, plain {plain_rest:.2f} s ({plain_rest / ours_rest:.1f}x)")
    floor = model_floor(backend, conversations, args.max_new_tokens)
    print(f"floor: the model's forward passes alone, each row's own tokens (after the shared "
          f"prefix, unpadded) and {args.max_new_tokens - 1} steps without a cache: {floor:.2f} s; "
          f"no engine on this model here beats plain batched generate by more than "
          f"{plain_all / floor:.1f}x")

    # Labelling: the judge's few-shot comparison prompts, both orders, option log-probabilities.
    pair_prompts = load_prompts(config.data.red_team.model_copy(update={"limit": args.pairs}), config.seed)
    records = [{"id": p.id, "prompt": p.text,
                "responses": [answers[i % len(answers)], answers[(i + 1) % len(answers)]]}
               for i, p in enumerate(pair_prompts)]
    judge_backend = backend  # the same model judges, as in the paper (models.feedback = policy)
    judge_backend.config = config.feedback_model  # its batch size: comparison prompts are long
    judge = Judge(config, constitution, judge_backend,
                  principles_per_pair=config.label_prefs.principles_per_pair, pairs_per_prompt=None)
    judge.batch(records[:1])  # warm-up
    jobs = judge.comparisons_of(records)
    judge_lengths = [len(judge_backend.encode(job.prompt_input(judge.fmt, False))) for job in jobs]
    timings = []
    for _ in range(args.repeats):
        judge_backend.prefixes.clear()
        start = time.perf_counter()
        labelled = judge.batch(records)
        timings.append(time.perf_counter() - start)
        print(f"  run {len(timings)}, label-prefs: {timings[-1]:.2f} s", file=sys.stderr, flush=True)
    comparisons = sum(len(p.judgments) for p in labelled) // 2
    print(f"label-prefs: {len(records)} pairs x {config.label_prefs.principles_per_pair} principles "
          f"= {comparisons} comparisons ({len(jobs)} prompts, both orders; prompt tokens mean "
          f"{sum(judge_lengths) / len(judge_lengths):.0f}), feedback batch size "
          f"{config.feedback_model.forward_batch_size}: {min(timings):.2f} s = "
          f"{comparisons / min(timings):.2f} comparisons/s")
    order_a = sum(j.p_first > 0.5 for p in labelled for j in p.judgments)
    print(f"position bias: the option shown first won {order_a} of {2 * comparisons} judgments")


def helpful_answers() -> list[str]:
    """Real answer text of realistic length to critique: the helpful conversations' answers."""
    from cai_cli.run.artifacts import read_jsonl

    return [r["messages"][1]["content"]
            for r in read_jsonl(ROOT / "cai_cli/resources/helpful.jsonl")]


def critique_conversations(config, constitution, turns: int) -> list:
    """The work: ``turns`` critique turns of the config's red-team prompts, each critiquing a
    helpful answer under a principle (drawn in turn), after the constitution's first worked
    example, so every turn begins with the same few hundred tokens."""
    from cai_cli.data.sources import load_prompts
    from cai_cli.engines.prompts import critique_prompt

    prompts = load_prompts(config.data.red_team.model_copy(update={"limit": turns}), config.seed)
    answers = helpful_answers()
    examples = constitution.few_shot[:1]
    return [critique_prompt(p.text, answers[i % len(answers)],
                            constitution.principles[i % len(constitution.principles)],
                            examples, "chat") for i, p in enumerate(prompts)]


def synchronize() -> None:
    """Wait for the GPU (if any) before reading a clock: its work is asynchronous."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GenerationWork:
    """The same conversations through three engines on one backend's model, each side returning
    ``(new tokens, seconds)``. End-of-turn stopping is turned off on every side (the backend's
    and the model's generation config), so every turn is ``params.max_new_tokens`` long and the
    work is the same."""

    def __init__(self, backend, conversations: list, params, batch_size: int):
        self.backend, self.conversations, self.params = backend, conversations, params
        self.batch_size = batch_size
        self.model, self.tokenizer = backend.model, backend.tokenizer
        backend.stop_token_ids = []
        self.model.generation_config.eos_token_id = None
        self.texts = [backend.render(c)[0] for c in conversations]
        self.prompt_lengths = [len(ids) for ids in
                               backend.tokenize_many([(t, False) for t in self.texts])]

    def ours(self, new_tokens: int | None = None) -> tuple[int, float]:
        """Our hf backend (shared-prefix groups, cascade attention, prefill in runs)."""
        params = self.params if new_tokens is None else dataclasses.replace(
            self.params, max_new_tokens=new_tokens)
        self.backend.prefixes.clear()  # each run computes its shared prefixes afresh
        synchronize()
        start = time.perf_counter()
        results = self.backend.generate(self.conversations, params)
        synchronize()
        return sum(r.tokens for r in results), time.perf_counter() - start

    def generate_kwargs(self, new_tokens: int | None = None) -> dict:
        new_tokens = new_tokens or self.params.max_new_tokens
        return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                    do_sample=True, temperature=self.params.temperature, top_p=self.params.top_p,
                    pad_token_id=self.tokenizer.pad_token_id)

    def plain_batched(self, new_tokens: int | None = None) -> tuple[int, float]:
        """What a script that batches does: left-padded batches straight into generate."""
        import torch

        torch.manual_seed(0)
        self.tokenizer.padding_side = "left"
        synchronize()
        start, tokens = time.perf_counter(), 0
        with torch.inference_mode(), self.backend.plain_attention():
            for first in range(0, len(self.texts), self.batch_size):
                batch = self.tokenizer(self.texts[first:first + self.batch_size], padding=True,
                                       add_special_tokens=False, return_tensors="pt")
                out = self.model.generate(**batch.to(self.model.device),
                                          **self.generate_kwargs(new_tokens))
                tokens += (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
        synchronize()
        return tokens, time.perf_counter() - start

    def one_at_a_time(self) -> tuple[int, float]:
        import torch

        torch.manual_seed(0)
        synchronize()
        start, tokens = time.perf_counter(), 0
        with torch.inference_mode(), self.backend.plain_attention():
            for text in self.texts:
                ids = self.tokenizer(text, add_special_tokens=False, return_tensors="pt")
                out = self.model.generate(**ids.to(self.model.device), **self.generate_kwargs())
                tokens += out.shape[1] - ids["input_ids"].shape[1]
        synchronize()
        return tokens, time.perf_counter() - start


def model_floor(backend, conversations: list, new_tokens: int) -> float:
    """Seconds of the work no engine can skip: the forward pass over every row's own prompt
    tokens (those after the prefix the rows share), without padding or attention to the prefix,
    and one forward pass per further token, without attention to a cache; best of three."""
    import torch

    from cai_cli.engines.hf import prefix_groups

    encoded = backend.encode_many(conversations)
    groups = prefix_groups(encoded, [1] * len(encoded))
    shared = {row: length for rows, length in groups for row in rows}
    own = sum(len(ids) - shared.get(row, 0) for row, ids in enumerate(encoded))
    rows, vocab = len(encoded), backend.model.config.vocab_size
    device = backend.model.device
    prompts = torch.randint(0, vocab, (rows, max(own // rows, 1)), device=device)
    step = torch.randint(0, vocab, (rows, 1), device=device)
    timings = []
    with torch.inference_mode(), backend.plain_attention() as model:
        for _ in range(3):
            synchronize()
            start = time.perf_counter()
            model(input_ids=prompts, use_cache=False, logits_to_keep=1)
            for _ in range(new_tokens - 1):
                model(input_ids=step, use_cache=False, logits_to_keep=1)
            synchronize()
            timings.append(time.perf_counter() - start)
    return min(timings)


def _timed(name: str, side, repeat: int) -> tuple[int, float]:
    tokens, seconds = side()
    print(f"  run {repeat + 1}, {name}: {tokens} tokens in {seconds:.2f} s", file=sys.stderr, flush=True)
    return tokens, seconds


if __name__ == "__main__":
    main()
