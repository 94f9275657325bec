"""The vLLM engine (``backend: vllm``) against raw vLLM and against the hf backend.

- **Wrapper overhead**: generate-sl's work (the demo's prompts: first answers, then a critique
  turn with a worked example for each) through ``VLLMBackend.generate`` against vLLM's own
  ``LLM.chat`` on the same conversations, same engine, same greedy settings, so both generate
  the same tokens (checked). Each run starts with an empty prefix cache. Goal: at most 10%.
- **Against the hf backend**: the same conversations through ``HFBackend.generate``.
- **Labelling**: label-prefs' option scoring (both orders, several principles) through both
  engines' ``score_options``, and how far their probabilities are apart.
- The engines' start-up times.

Best of several interleaved runs per side, by wall and by CPU time; the model is ``runs/smollm2`` when it is there (a real
SmolLM2-135M-Instruct), else the demo's tiny model. Runs in ``.venv-vllm`` (``make vllm``): from
another environment it starts itself there, and says it skipped when there is none.

    python benchmarks/engines.py [--model DIR] [--max-new-tokens 32] [--pairs 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--pairs", type=int, default=12)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved runs of each vLLM side")
    args = parser.parse_args()
    try:
        import vllm  # noqa: F401
    except ImportError:
        if VLLM_PYTHON.is_file() and Path(sys.prefix).resolve() != VLLM_PYTHON.parents[1].resolve():
            os.execv(str(VLLM_PYTHON), [str(VLLM_PYTHON), *sys.argv])
        print("skipped: vLLM is not installed (`make vllm` builds .venv-vllm)")
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    model = args.model or next((str(p) for p in (ROOT / "runs" / "smollm2", ROOT / "runs" / "tiny-model")
                                if (p / "config.json").is_file()), None)
    if model is None:
        print("skipped: no model (`cai tiny-model runs/tiny-model`)")
        return

    import torch
    import vllm

    from cai_cli.run.artifacts import read_jsonl
    from cai_cli.engines.base import SamplingParams
    from cai_cli.engines.hf import HFBackend
    from cai_cli.engines.vllm import VLLMBackend
    from cai_cli.config import HFModelConfig, VLLMModelConfig, load_config
    from cai_cli.constitution import load_constitution
    from cai_cli.data.sources import load_prompts
    from cai_cli.engines.judge import Judge, option_probability
    from cai_cli.engines.prompts import OPTIONS, answer_prompt, critique_prompt

    config = load_config(ROOT / "configs" / "demo.yaml")
    constitution = load_constitution(config.constitution_paths)
    prompts = load_prompts(config.data.red_team, config.seed)[: args.prompts]
    principle, examples = constitution.principles[0], constitution.few_shot[:1]
    conversations = [answer_prompt(p.text, "chat") for p in prompts]
    conversations += [critique_prompt(p.text, "An answer to critique.", principle, examples, "chat")
                      for p in prompts]

    started = time.perf_counter()
    ours = VLLMBackend(VLLMModelConfig(name_or_path=model, dtype="float32", max_context=2048,
                                       gpu_memory_utilization=0.1, enforce_eager=True),
                       "models.policy")
    vllm_start = time.perf_counter() - started
    started = time.perf_counter()
    hf = HFBackend(HFModelConfig(name_or_path=model, device="cpu", dtype="float32",
                                 forward_batch_size=48), "models.policy")
    hf_start = time.perf_counter() - started

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0)
    raw_params = vllm.SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0,
                                     stop_token_ids=ours.stop_token_ids)

    # Each side is timed by the wall clock and by this process's CPU time: on a CPU vLLM's
    # engine runs in this process (see VLLMBackend), so the CPU time counts all of its work and
    # hardly moves with the load other programs put on a shared machine.
    def timed(work):
        wall, cpu = time.perf_counter(), time.process_time()
        texts, tokens = work()
        return texts, tokens, time.perf_counter() - wall, time.process_time() - cpu

    def through_backend():
        ours.llm.reset_prefix_cache()  # every run computes its shared prefixes afresh
        results = ours.generate(conversations, params)
        return [r.text for r in results], sum(r.tokens for r in results)

    def raw_chat():
        ours.llm.reset_prefix_cache()
        outputs = ours.llm.chat(conversations, raw_params, use_tqdm=False)
        return ([o.outputs[0].text.strip() for o in outputs],
                sum(len(o.outputs[0].token_ids) for o in outputs))

    def hf_backend():
        hf.prefixes.clear()
        results = hf.generate(conversations, params)
        return [r.text for r in results], sum(r.tokens for r in results)

    through_backend(), raw_chat()  # warm-up
    pairs = [(timed(through_backend), timed(raw_chat)) for _ in range(args.rounds)]
    hf_runs = [timed(hf_backend) for _ in range(2)]
    fastest = lambda runs, i: min(run[i] for run in runs)  # noqa: E731
    mine, raw = [p[0] for p in pairs], [p[1] for p in pairs]
    ours_texts, ours_tokens = mine[0][0], mine[0][1]
    raw_texts, raw_tokens = raw[0][0], raw[0][1]
    hf_tokens = hf_runs[0][1]
    ours_s, raw_s, hf_s = fastest(mine, 2), fastest(raw, 2), fastest(hf_runs, 2)
    ours_cpu, raw_cpu, hf_cpu = fastest(mine, 3), fastest(raw, 3), fastest(hf_runs, 3)

    print(f"model: {model}; {len(conversations)} conversations ({len(prompts)} answers, "
          f"{len(prompts)} critique turns with a worked example), greedy, at most "
          f"{args.max_new_tokens} new tokens; vLLM {vllm.__version__}, torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads, fp32; best of "
          f"{args.rounds} interleaved runs (hf: 2)")
    print(f"start-up: backend vllm {vllm_start:.1f} s, backend hf {hf_start:.1f} s")
    print(f"backend vllm:  {ours_tokens} tokens, {ours_s:.2f} s wall ({ours_tokens / ours_s:,.0f} "
          f"tokens/s), {ours_cpu:.2f} s CPU")
    print(f"raw LLM.chat:  {raw_tokens} tokens, {raw_s:.2f} s wall ({raw_tokens / raw_s:,.0f} "
          f"tokens/s), {raw_cpu:.2f} s CPU (same texts: {ours_texts == raw_texts})")
    print(f"backend hf:    {hf_tokens} tokens, {hf_s:.2f} s wall ({hf_tokens / hf_s:,.0f} "
          f"tokens/s), {hf_cpu:.2f} s CPU")
    print(f"wrapper overhead: {ours_cpu / raw_cpu - 1:+.1%} of raw vLLM's CPU time, "
          f"{ours_s / raw_s - 1:+.1%} of its wall time (goal <= +10%); backend vllm vs hf: "
          f"{hf_s / ours_s:.2f}x faster (wall), {hf_cpu / ours_cpu:.2f}x (CPU)")

    # Labelling: the comparisons label-prefs asks, through both engines' score_options.
    answers = [r["messages"][1]["content"] for r in read_jsonl(ROOT / "cai_cli/resources/helpful.jsonl")]
    records = [{"id": p.id, "prompt": p.text,
                "responses": [answers[i % len(answers)], answers[(i + 1) % len(answers)]]}
               for i, p in enumerate(prompts[: args.pairs])]
    judge = Judge(config, constitution, ours, principles_per_pair=2, pairs_per_prompt=None)
    questions = [job.prompt_input(judge.fmt, False) for job in judge.comparisons_of(records)]

    def score(backend):
        if backend is ours:
            ours.llm.reset_prefix_cache()
        else:
            hf.prefixes.clear()
        start = time.perf_counter()
        scores = backend.score_options(questions, OPTIONS)
        return [option_probability(s) for s in scores], time.perf_counter() - start

    score(ours), score(hf)  # warm-up
    scored = [(score(ours), score(hf)) for _ in range(2)]
    (p_vllm, vllm_s), (p_hf, hf_score_s) = [min((r[i] for r in scored), key=lambda r: r[1])
                                             for i in range(2)]
    comparisons = len(questions) // 2
    print(f"labelling: {len(questions)} questions ({comparisons} comparisons, both orders, "
          f"{args.pairs} pairs x 2 principles)")
    print(f"  backend vllm: {vllm_s:.2f} s = {comparisons / vllm_s:,.1f} comparisons/s; "
          f"backend hf: {hf_score_s:.2f} s = {comparisons / hf_score_s:,.1f} comparisons/s; "
          f"ratio {hf_score_s / vllm_s:.2f}x")
    print(f"  largest difference in p_first between the engines: "
          f"{max(abs(a - b) for a, b in zip(p_vllm, p_hf)):.2e}")
    ours.close()
    hf.close()


if __name__ == "__main__":
    main()
