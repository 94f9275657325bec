"""Preference-labelling throughput: label-prefs' option scoring against a generating judge.

Both sides judge the same pairs under the same principles, in both orders, on the same feedback
model, in this one process (best of two interleaved runs each). label-prefs reads the option
probabilities in batched forward passes; the baseline asks the judge to write a short verdict
(up to 40 new tokens, greedy), one comparison order at a time, as a "generate then parse" judge
does. A comparison is one pair under one principle, judged in both orders.

    python benchmarks/labelling.py [--config configs/tiny.yaml] [--pairs 24]

Needs the tiny model: ``cai tiny-model runs/tiny-model``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--verdict-tokens", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], help="config override, as for cai")
    args = parser.parse_args()

    import torch

    from cai_cli.run.artifacts import read_jsonl
    from cai_cli.engines.hf import HFBackend
    from cai_cli.config import load_config
    from cai_cli.constitution import load_constitution
    from cai_cli.data.sources import load_prompts
    from cai_cli.engines.judge import Judge

    config = load_config(args.config, ["label_prefs.chain_of_thought=false", *args.set])
    constitution = load_constitution(config.constitution_paths)
    prompts = load_prompts(config.data.red_team.model_copy(update={"limit": args.pairs}), config.seed)
    # Real answer text of realistic length: two different helpful answers per prompt.
    answers = [r["messages"][1]["content"] for r in read_jsonl(ROOT / "cai_cli/resources/helpful.jsonl")]
    records = [{"id": p.id, "prompt": p.text,
                "responses": [answers[i % len(answers)], answers[(i + 1) % len(answers)]]}
               for i, p in enumerate(prompts)]

    backend = HFBackend(config.feedback_model, "models.feedback")
    judge = Judge(config, constitution, backend,
                  principles_per_pair=config.label_prefs.principles_per_pair,
                  pairs_per_prompt=config.label_prefs.pairs_per_prompt)
    judge.batch(records[:1])  # warm-up

    jobs = judge.comparisons_of(records)
    model, tokenizer = backend.model, backend.tokenizer

    def ours() -> tuple[int, float]:
        backend.prefixes.clear()  # each run computes its shared prefixes afresh
        start = time.perf_counter()
        labelled = judge.batch(records)
        return sum(len(p.judgments) for p in labelled) // 2, time.perf_counter() - start

    def generating_judge() -> float:
        """The baseline: the same comparison prompts, each order generated as a verdict, one
        at a time."""
        start = time.perf_counter()
        with torch.inference_mode(), backend.plain_attention():
            for job in jobs:
                ids = torch.tensor([backend.encode(job.prompt_input(judge.fmt, False))])
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               max_new_tokens=args.verdict_tokens, do_sample=False,
                               pad_token_id=tokenizer.pad_token_id)
        return time.perf_counter() - start

    # Best of two interleaved runs each: the machine is shared, and a slow moment should not
    # decide the ratio either way.
    runs = [(ours(), generating_judge()) for _ in range(2)]
    comparisons, ours_seconds = min((r[0] for r in runs), key=lambda r: r[1])
    baseline = min(r[1] for r in runs)
    assert len(jobs) == 2 * comparisons

    ours_rate, base_rate = comparisons / ours_seconds, comparisons / baseline
    print(f"pairs: {len(records)}, principles per pair: {config.label_prefs.principles_per_pair}, "
          f"few-shot examples: {config.label_prefs.few_shot}, comparisons: {comparisons}, "
          f"torch threads: {torch.get_num_threads()}")
    print(f"label-prefs scoring (batched option log-probs): {ours_seconds:.2f} s = "
          f"{ours_rate:,.2f} comparisons/s")
    print(f"generating judge ({args.verdict_tokens} tokens, one at a time): {baseline:.2f} s = "
          f"{base_rate:,.2f} comparisons/s")
    print(f"ratio: {ours_rate / base_rate:.1f}x (target >= 8x)")


if __name__ == "__main__":
    main()
