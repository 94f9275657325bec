"""New prompts per second of generate-prompts' batched requests against one request at a time.

Both sides send the same few-shot requests (the stage's own: seeds drawn per request, the same
per-request sampling seeds) to the same model in this one process, best of two interleaved runs
each, and print requests/s, new prompts/s (those parsed from the replies, before the filters)
and the ratio.

    python benchmarks/generate_prompts.py [--config configs/tiny.yaml] [--requests 32]
        [--set key=value ...]

Needs the model the config names (``cai tiny-model runs/tiny-model`` for the tiny config).
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
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--set", action="append", default=[], help="config override, as for cai")
    args = parser.parse_args()

    from cai_cli.engines import load_backend
    from cai_cli.engines.base import Completion, SamplingParams
    from cai_cli.config import load_config
    from cai_cli.engines.prompts import resolve_format
    from cai_cli.run.seeding import record_seed
    from cai_cli.stages.generate_prompts import (load_seeds, parse, request_prompt, requests,
                                                 shown_seeds)

    config = load_config(args.config, [f"generate_prompts.num_prompts={args.requests}",
                                       "generate_prompts.per_request=1", *args.set])
    settings = config.generate_prompts
    seeds = load_seeds(config)
    backend = load_backend(config.models.policy, "models.policy")
    fmt = resolve_format(settings.prompt_format, backend, "generate_prompts.prompt_format")
    jobs = requests(config)
    shown = [shown_seeds(config, seeds, number) for number, _ in jobs]
    inputs = [request_prompt(config, s, count, fmt) for s, (_, count) in zip(shown, jobs)]
    run_seeds = [record_seed(config.seed, "generate-prompts", number) for number, _ in jobs]
    sampling = settings.sampling
    params = SamplingParams(max_new_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                            top_p=sampling.top_p, top_k=sampling.top_k,
                            stop=("\n\n", f"\n{len(shown[0]) + 2}.") if fmt == "transcript" else ())

    def parsed(results) -> int:
        return sum(len(parse(r.text, len(s), 1, fmt)) for r, s in zip(results, shown)
                   if isinstance(r, Completion))

    def batched():
        return backend.generate(inputs, params, seeds=run_seeds)

    def one_at_a_time():
        return [backend.generate([prompt], params, seeds=[seed])[0]
                for prompt, seed in zip(inputs, run_seeds)]

    best = {"batched": float("inf"), "one at a time": float("inf")}
    found = {}
    for _ in range(2):
        for name, work in (("batched", batched), ("one at a time", one_at_a_time)):
            started = time.perf_counter()
            results = work()
            best[name] = min(best[name], time.perf_counter() - started)
            found[name] = parsed(results)
    backend.close()
    print(f"generate-prompts: {len(inputs)} requests of {len(shown[0])} seed prompts each, "
          f"{fmt} format, {sampling.max_new_tokens} new tokens at most, model "
          f"{config.models.policy.name_or_path}")
    for name, seconds in best.items():
        print(f"  {name:14} {len(inputs) / seconds:7.2f} requests/s  "
              f"{found[name] / seconds:7.2f} new prompts/s  ({found[name]} parsed, {seconds:.2f} s)")
    print(f"  batched / one at a time: {best['one at a time'] / best['batched']:.2f}x")


if __name__ == "__main__":
    main()
