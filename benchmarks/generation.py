"""Generation throughput of generate-sl's backend against a one-conversation-at-a-time loop.

Both sides run the tiny config's prompts (their first answers, then a critique turn for each)
on the same model with the same number of new tokens per turn, in this one process (best of
two interleaved runs each), and the generated tokens per second and their ratio are printed.
End-of-turn stopping is switched off on both sides so every turn generates exactly
``max_new_tokens`` and the work is the same.

Also times ``cai --help`` against ``python -c "import typer, rich, pydantic"``.

    python benchmarks/generation.py [--config configs/tiny.yaml] [--max-new-tokens 32]

Needs the tiny model: ``cai tiny-model runs/tiny-model``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "tiny.yaml"))
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="backend batch size (default: the config's models.policy.forward_batch_size)")
    parser.add_argument("--set", action="append", default=[], help="config override, as for cai")
    args = parser.parse_args()

    import torch

    from cai_cli.engines.hf import HFBackend
    from cai_cli.config import load_config
    from cai_cli.constitution import load_constitution
    from cai_cli.data.sources import load_prompts
    from cai_cli.engines.prompts import answer_prompt, critique_prompt

    overrides = [f"models.policy.forward_batch_size={args.batch_size}"] if args.batch_size else []
    overrides += args.set
    config = load_config(args.config, overrides)
    prompts = load_prompts(config.data.red_team, config.seed)
    constitution = load_constitution(config.constitution_paths)
    principle = constitution.principles[0]
    examples = constitution.few_shot[: config.generate_sl.few_shot]
    conversations = [answer_prompt(p.text, "chat") for p in prompts]
    conversations += [critique_prompt(p.text, "An answer to critique.", principle, examples, "chat")
                      for p in prompts]

    backend = HFBackend(config.models.policy, "models.policy")
    # No end-of-turn stopping on either side: every turn is max_new_tokens long, the same work.
    backend.stop_token_ids = []
    backend.model.generation_config.eos_token_id = None
    from cai_cli.engines.base import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.8, seed=0)
    backend.generate(conversations[:2], params)  # warm-up
    model, tokenizer = backend.model, backend.tokenizer

    def batched() -> tuple[int, float]:
        backend.prefixes.clear()  # each run computes its shared prefixes afresh
        start = time.perf_counter()
        results = backend.generate(conversations, params)
        return sum(r.tokens for r in results), time.perf_counter() - start

    def one_at_a_time() -> tuple[int, float]:
        """The baseline: what a script without batching does, one conversation per call."""
        start = time.perf_counter()
        tokens = 0
        with torch.inference_mode(), backend.plain_attention():
            for conversation in conversations:
                ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True,
                                                    return_tensors="pt", return_dict=True)
                out = model.generate(**ids, max_new_tokens=args.max_new_tokens, do_sample=True,
                                     temperature=0.8, pad_token_id=tokenizer.pad_token_id)
                tokens += out.shape[1] - ids["input_ids"].shape[1]
        return tokens, time.perf_counter() - start

    # Best of two interleaved runs each: the machine is shared, and a slow moment should not
    # decide the ratio either way.
    runs = [(batched(), one_at_a_time()) for _ in range(2)]
    batched_tokens, batched_seconds = min((r[0] for r in runs), key=lambda r: r[1])
    loop_tokens, loop_seconds = min((r[1] for r in runs), key=lambda r: r[1])

    batched_rate, loop_rate = batched_tokens / batched_seconds, loop_tokens / loop_seconds
    print(f"conversations: {len(conversations)}, new tokens per turn: {args.max_new_tokens}, "
          f"batch size: {config.models.policy.forward_batch_size}, torch threads: {torch.get_num_threads()}")
    print(f"generate-sl backend (batched): {batched_tokens} tokens in {batched_seconds:.2f} s = "
          f"{batched_rate:,.0f} tokens/s")
    print(f"one at a time (baseline):      {loop_tokens} tokens in {loop_seconds:.2f} s = "
          f"{loop_rate:,.0f} tokens/s")
    print(f"ratio: {batched_rate / loop_rate:.1f}x (target >= 8x)")

    help_time = _wall([sys.executable, "-m", "cai_cli", "--help"])
    base_time = _wall([sys.executable, "-c", "import typer, rich, pydantic"])
    print(f"`cai --help`: {help_time * 1000:.0f} ms, `import typer, rich, pydantic`: "
          f"{base_time * 1000:.0f} ms, ratio: {help_time / base_time:.2f}x (target <= 3x)")


def _wall(command: list[str], repeats: int = 7) -> float:
    """Median wall time of a command (the first run warms the file cache)."""
    subprocess.run(command, capture_output=True, check=True)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(command, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
