"""The GPU check: correctness, the whole pipeline, speed and training steps, in one call.

Built for the lent GPU machine (``benchmarks/gpu/run.sh`` installs the carried wheels and the
project, then runs this), and run on a CPU by the test suite with ``--device cpu --shape small``
so it cannot rot between GPU sessions. Nothing is downloaded: every model is built here.

Parts, in this order, each timed; the table is rewritten after each, so a run cut short still
leaves what it measured:

- setup: versions and the device; ``cai tiny-model`` (the pipeline's model, and the tokenizer
  of every model here: a byte-level BPE trained on the package's own text, 2048 tokens, with a
  ChatML template); a random model of Qwen2.5-0.5B's shape (``--shape qwen2.5-0.5b``: hidden
  896, 24 layers, 14 heads, 2 KV heads, MLP 4864, vocabulary 151936, tied embeddings, rope
  theta 1e6, Qwen's initializer range 0.02) with that tokenizer, saved in fp32. The model
  keeps Qwen's vocabulary size (the cost of its embedding and output head): ids past the
  tokenizer's 2048 decode to nothing. The small shape (2 layers of 128) uses an initializer
  range of 0.1: at 0.02 its attention is so nearly uniform that a 10% error in the shared
  prefix's attention scores changed no greedy token (at 0.1 it changed every turn; the
  0.5B shape caught the same error at 0.02 in fp32, on a CPU: a chosen token 0.007 short).
- correctness, in bf16 and fp32: 24 critique turns that share a worked example, greedy, through
  the hf backend and through plain ``model.generate`` one at a time, compared token for token;
  every token the backend chose is then judged by an exact forward pass of the whole sequence
  (its logit against the largest: see ``check_correctness`` for the tolerances), so a
  divergence is shown to be a near tie and not a bug; ``score_options`` (one-token and
  several-token options) against log-softmax of plain forward passes. Calls into
  ``cai_cli.engines.kv`` are counted: the cascade path must have been taken (decoding steps and
  prefills against shared prefixes).
- pipeline: ``cai run`` of ``configs/tiny.yaml`` on the tiny model, device auto (cuda on a GPU:
  bf16 weights and bf16 training there), then ``cai status`` (every stage done) and every
  artifact loaded (checkpoints run a forward pass on the device).
- speed: the work of ``benchmarks/smollm2.py`` (critique turns with a worked example, 32 new
  tokens, batch 24, temperature 0.2, top-p 0.9) on the shaped model: our hf backend against
  plain batched ``model.generate`` and one at a time; tokens/s, ratios, peak GPU memory.
- training: ``cai finetune`` (full, then LoRA) and ``cai optimize`` (dpo, TRL's DPOTrainer) on the
  shaped model, with the pipeline's SL-CAI data and preference pairs: median seconds per
  optimiser step (from TensorBoard's wall times), peak GPU memory.

    python benchmarks/gpu/check.py [--device cuda] [--shape qwen2.5-0.5b] [--out DIR]
    python benchmarks/gpu/check.py --device cpu --shape small        # the suite's run

Writes ``gpu-check.md`` (the table, also printed) and ``gpu-check.json`` to ``--out`` (default
``$OUT``, else ``runs/gpu-check``). Exit code 1 when a check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

PARTS = ("correctness", "pipeline", "speed", "training")
STAGES = ("generate-sl", "finetune", "label-prefs", "train-rm", "optimize", "evaluate")
STAGE_DIRS = dict(zip(STAGES, ("sl", "sft", "prefs", "rm", "policy", "eval")))

# Qwen2.5-0.5B's published hyperparameters, and a small model of the same family for CPUs.
SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, intermediate_size=4864, vocab_size=151936),
    "small": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=352, vocab_size=4096),
}
# How much work each shape gets: the GPU's is the (24 turns, smollm2.py's 32 tokens);
# the small one's fits the test suite on two CPU cores.
WORK = {
    "qwen2.5-0.5b": dict(init_std=0.02, turns=24, greedy_tokens=16, new_tokens=32,
                         batch_size=24, repeats=2, train_steps=10, tiny_model=[], pipeline=[],
                         training=[]),
    "small": dict(init_std=0.1, turns=6, greedy_tokens=8, new_tokens=8, batch_size=6, repeats=1,
                  train_steps=3, tiny_model=["--hidden-size", "64", "--layers", "2"], pipeline=[
                      "data.red_team.limit=4", "generate_sl.num_revisions=1",
                      "generate_sl.sampling.max_new_tokens=8", "finetune.training.max_steps=2",
                      "finetune.training.per_device_batch_size=4", "finetune.training.max_length=256",
                      "label_prefs.limit=4", "label_prefs.principles_per_pair=1",
                      "label_prefs.sampling.max_new_tokens=8", "train_rm.training.max_steps=2",
                      "train_rm.training.max_length=256", "optimize.training.max_steps=2",
                      "optimize.training.max_length=256", "evaluate.limit=3",
                      "evaluate.helpful_limit=2", "evaluate.benign_limit=2",
                      "evaluate.principles_per_pair=1",
                      "evaluate.sampling.max_new_tokens=8", "evaluate.bootstrap=100"],
                  training=["finetune.training.per_device_batch_size=2",
                            "finetune.training.max_length=128",
                            "optimize.training.per_device_batch_size=2",
                            "optimize.training.max_length=128"]),
}
# fp32: the largest allowed shortfall of a greedy token's logit below the largest logit of a
# plain forward pass, and difference of an option's log-probability (bf16: check_correctness).
FP32_TOLERANCE = 1e-3


# ---------------------------------------------------------------------------------------------
# The table


class Report:
    """Sections of rows and a list of checks, written as Markdown and JSON after every part."""

    def __init__(self, out: Path, title: str):
        self.out, self.title = out, title
        self.lines: list[str] = []  # lines under the title: machine, versions
        self.checks: list[dict] = []
        self.sections: dict[str, dict] = {}
        self.timings: dict[str, float] = {}

    def table(self, name: str, columns: list[str], note: str = "") -> list[list]:
        self.sections[name] = {"columns": columns, "rows": [], "note": note}
        return self.sections[name]["rows"]

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})
        print(f"{'PASS' if ok else 'FAIL'}: {name}: {detail}", flush=True)
        return ok

    @property
    def passed(self) -> bool:
        return all(c["ok"] for c in self.checks)

    def markdown(self) -> str:
        out = [f"# {self.title}", "", *self.lines, ""]
        failed = sum(not c["ok"] for c in self.checks)
        out += [f"## Checks: {len(self.checks) - failed} passed, {failed} failed", "",
                "| check | result | detail |", "| --- | --- | --- |"]
        out += [f"| {c['check']} | {'pass' if c['ok'] else '**FAIL**'} | {c['detail']} |"
                for c in self.checks]
        for name, section in self.sections.items():
            out += ["", f"## {name}", ""]
            if section["note"]:
                out += [section["note"], ""]
            out += ["| " + " | ".join(section["columns"]) + " |",
                    "|" + " --- |" * len(section["columns"])]
            out += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in section["rows"]]
        out += ["", "## Time per part", "", "| part | seconds |", "| --- | --- |"]
        out += [f"| {part} | {seconds:.1f} |" for part, seconds in self.timings.items()]
        out.append(f"| total | {sum(self.timings.values()):.1f} |")
        return "\n".join(out) + "\n"

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu-check.md").write_text(self.markdown())
        (self.out / "gpu-check.json").write_text(json.dumps(
            {"title": self.title, "lines": self.lines, "checks": self.checks,
             "sections": self.sections, "timings": self.timings, "passed": self.passed},
            indent=1))


# ---------------------------------------------------------------------------------------------
# Device helpers


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def gib(size: float) -> str:
    return f"{size / 2**30:.2f} GiB"


@contextlib.contextmanager
def peak_memory(device: str, into: dict):
    """``into["peak"]``: the most GPU memory this process's tensors held inside the block."""
    import torch

    if not device.startswith("cuda"):
        into["peak"] = "n/a (cpu)"
        yield
        return
    synchronize()
    torch.cuda.reset_peak_memory_stats()
    yield
    synchronize()
    into["peak"] = gib(torch.cuda.max_memory_allocated())


class DeviceMemoryPoller:
    """The most memory used on the GPU (by every process, as the driver counts it) while a
    subprocess runs, less what was in use before: polled ten times a second."""

    def __init__(self, device: str):
        self.device, self.peak, self.base = device, 0, 0
        self._stop = threading.Event()

    def _used(self) -> int:
        import torch

        free, total = torch.cuda.mem_get_info()
        return total - free

    def _poll(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, self._used())

    def __enter__(self):
        if self.device.startswith("cuda"):
            self.base = self.peak = self._used()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.startswith("cuda"):
            self._stop.set()
            self._thread.join()

    def text(self) -> str:
        return gib(self.peak - self.base) if self.device.startswith("cuda") else "n/a (cpu)"


def cai(args: list[str], work: Path, log: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    """The ``cai`` command line, as a user runs it (from another directory): the project as
    installed (PYTHONPATH first), else this checkout. Its output goes to ``log``."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", COLUMNS="200")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(ROOT)) if p)
    result = subprocess.run([sys.executable, "-m", "cai_cli", *map(str, args)], cwd=work, env=env,
                            capture_output=True, text=True, timeout=timeout)
    with log.open("a") as handle:
        handle.write(f"$ cai {' '.join(map(str, args))}\n{result.stdout}{result.stderr}"
                     f"(exit code {result.returncode})\n\n")
    return result


def tail(result: subprocess.CompletedProcess, lines: int = 3) -> str:
    text = (result.stderr or result.stdout).strip().splitlines()
    return " / ".join(line.strip() for line in text[-lines:]).replace("|", "\\|")


# ---------------------------------------------------------------------------------------------
# Setup


def versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "peft", "accelerate", "pydantic",
                 "tokenizers", "safetensors", "pyarrow", "fsspec", "typing_extensions",
                 "huggingface_hub", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def device_line(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return (f"{torch.cuda.get_device_name(0)} ({gib(props.total_memory)}, "
                f"{props.multi_processor_count} SMs, compute capability {props.major}.{props.minor},"
                f" bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}), CUDA "
                f"{torch.version.cuda}")
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


def build_shaped_model(shape: str, tokenizer_dir: Path, out: Path, device: str,
                       init_std: float) -> dict:
    """A random Qwen2 model of ``shape`` with the tiny model's tokenizer, saved in fp32."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes = dict(SHAPES[shape])
    sizes["vocab_size"] = max(sizes["vocab_size"], len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2Config(**sizes, tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6,
                         max_position_embeddings=32768, use_sliding_window=False,
                         initializer_range=init_std,
                         bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds, not a minute of CPU
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=False)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": params, "vocab": sizes["vocab_size"], "tokenizer": len(tokenizer),
            "rope_theta": (config.rope_parameters or {}).get("rope_theta")}


# ---------------------------------------------------------------------------------------------
# Correctness


class KVCalls:
    """Counts calls into ``cai_cli.engines.kv`` while active: attention steps that met keys
    tagged with shared prefixes (decoding steps and prefills: the cascade path), batch caches
    built with shared-prefix groups, and those of them in cascade mode."""

    def __init__(self):
        self.counts: Counter = Counter()

    def __enter__(self):
        from transformers import AttentionInterface

        from cai_cli.engines import kv

        self.kv, self.register = kv, AttentionInterface.register
        attention, batch_cache = kv.shared_prefix_attention, kv.PrefixStore.batch_cache
        counts = self.counts

        def counting_attention(module, query, key, *args, **kwargs):
            if getattr(key, kv._PREFIXES, None) is None:
                counts["attention without prefixes"] += 1
            else:
                counts["cascade prefill" if query.shape[2] > 1 else "cascade decode"] += 1
            return attention(module, query, key, *args, **kwargs)

        def counting_batch_cache(store, groups, rows, capacity, cascade):
            cache = batch_cache(store, groups, rows, capacity, cascade)
            if groups:
                counts["batches with shared prefixes"] += 1
            if any(getattr(layer, "cascade", False) for layer in cache.layers):
                counts["cascade caches"] += 1
            return cache

        self._restore = (attention, batch_cache)
        self.register(kv.ATTENTION, counting_attention)
        kv.PrefixStore.batch_cache = counting_batch_cache
        return self

    def __exit__(self, *exc_info) -> None:
        attention, batch_cache = self._restore
        self.register(self.kv.ATTENTION, attention)
        self.kv.PrefixStore.batch_cache = batch_cache


@contextlib.contextmanager
def ids_as_text(tokenizer):
    """The backend returns text; while this is on, its tokenizer "decodes" new tokens to their
    ids ("12 7 9"), so its greedy output can be compared token for token."""
    tokenizer.decode = lambda ids, **kwargs: " ".join(str(int(i)) for i in ids)
    try:
        yield
    finally:
        del tokenizer.decode


def check_correctness(report: Report, rows: list, dtype: str, model_dir: Path, device: str,
                      conversations: list, comparisons: list, new_tokens: int) -> None:
    """The hf backend in ``dtype`` against plain transformers: greedy turns token for token,
    then judged by an exact forward pass; option log-probabilities likewise (module docstring).

    "Exact" is a plain forward pass of the whole sequence with the same weights in fp32 (for
    fp32, the model itself). In fp32 the backend must agree with it within ``FP32_TOLERANCE``.
    In bf16 both the backend and plain transformers round; the backend passes when its error is
    within twice plain transformers' own bf16 error on the same sequences (measured here):
    every greedy token's logit at most ``2 n`` below the largest exact logit, where ``n`` is
    the largest difference between plain bf16 and exact logits (a backend as accurate as plain
    transformers picks, at a near tie, a token at most ``2 n`` short), and option
    log-probabilities at most twice as far from exact as plain bf16's, plus ``FP32_TOLERANCE``.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from cai_cli.config import HFModelConfig
    from cai_cli.engines.base import SamplingParams, common_prefix
    from cai_cli.engines.hf import HFBackend

    config = HFModelConfig(name_or_path=str(model_dir), device=device, dtype=dtype,
                           forward_batch_size=len(conversations))
    with HFBackend(config, "models.policy") as backend:
        model, tokenizer = backend.model, backend.tokenizer
        backend.stop_token_ids = []  # every turn exactly new_tokens long, on both sides
        model.generation_config.eos_token_id = None
        cascade = backend.prefixes.cascade
        params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0)
        with KVCalls() as generation_calls, ids_as_text(tokenizer):
            ours = [[int(t) for t in r.text.split()] for r in backend.generate(conversations, params)]
        exact = model
        if dtype != "float32":  # the same (rounded) weights, computed in fp32
            exact = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
            exact = exact.float().to(model.device).eval()
            exact.set_attn_implementation("sdpa")

        def logits(which, ids: list[int], keep: int):
            """Plain forward pass, fp32 logits at the positions that predict the last
            ``keep`` tokens of ``ids``."""
            full = torch.tensor([ids], device=model.device)
            return which(input_ids=full, logits_to_keep=keep + 1).logits[0, :-1].float()

        encoded = backend.encode_many(conversations)
        pad = tokenizer.pad_token_id
        reference, deficits, noise = [], [], 0.0
        with torch.inference_mode(), backend.plain_attention():
            for ids, mine in zip(encoded, ours):
                prompt = torch.tensor([ids], device=model.device)
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=pad)
                # the backend leaves padding out of a turn that did not stop: so does this side
                reference.append([t for t in out[0, len(ids):].tolist() if t != pad])
                # How far below the largest exact logit each token the backend chose lies.
                right = logits(exact, ids + mine, len(mine))
                chosen = right.gather(-1, torch.tensor(mine, device=model.device)[:, None])[:, 0]
                deficits += (right.max(-1).values - chosen).tolist()
                if exact is not model:
                    noise = max(noise, float((logits(model, ids + mine, len(mine)) - right)
                                             .abs().max()))
        same = sum(a == b for a, b in zip(ours, reference))
        lengths_ok = all(len(t) == new_tokens for t in ours)
        diverged = [next(i for i, (a, b) in enumerate(zip(x, y + [None])) if a != b)
                    for x, y in zip(ours, reference) if x != y]
        worst = max(deficits)
        tolerance = FP32_TOLERANCE if exact is model else 2 * noise + FP32_TOLERANCE
        report.check(f"greedy = plain generate, {dtype}", worst <= tolerance and lengths_ok,
                     f"{same}/{len(ours)} turns identical ({new_tokens} tokens each)"
                     + (f", first divergences at tokens {sorted(diverged)[:5]}" if diverged else "")
                     + f"; every chosen token's exact logit within {worst:.2g} of the largest "
                       f"(tolerance {tolerance:.2g}"
                     + (f" = 2 x plain bf16's logit error {noise:.2g}" if exact is not model
                        else "") + ")"
                     + ("" if lengths_ok else "; a turn came back short (pad token generated)"))
        counts = generation_calls.counts
        report.check(f"cascade path taken, {dtype}",
                     cascade and counts["cascade decode"] > 0 and counts["cascade prefill"] > 0
                     and counts["cascade caches"] > 0,
                     f"attention {backend.model.config._attn_implementation}; "
                     f"{counts['cascade caches']} cascade caches, {counts['cascade prefill']} "
                     f"prefill and {counts['cascade decode']} decoding attention calls against "
                     "shared prefixes")

        # Option log-probabilities: one-token options (one forward pass over the prompt) and
        # several-token ones (each prompt+option scored), against plain forward passes.
        ours_error, plain_error, scoring_calls = 0.0, 0.0, Counter()
        for options in (("A", "B"), ("A) yes", "B) no")):
            with KVCalls() as calls:
                scored = backend.score_options(comparisons, list(options))
            scoring_calls.update(calls.counts)
            with torch.inference_mode(), backend.plain_attention():
                for prompt, values in zip(comparisons, scored):
                    text, special = backend.render(prompt)
                    prompt_ids = backend.tokenize(text, special)
                    for option, value in zip(options, values):
                        ids = backend.tokenize(text + option, special)
                        start = common_prefix(prompt_ids, ids)

                        def logprob(which) -> float:
                            table = logits(which, ids, len(ids) - start).log_softmax(-1)
                            return sum(float(table[k, t]) for k, t in enumerate(ids[start:]))

                        right = logprob(exact)
                        ours_error = max(ours_error, abs(value - right))
                        if exact is not model:
                            plain_error = max(plain_error, abs(logprob(model) - right))
        if exact is not model:
            del exact
        tolerance_options = 2 * plain_error + FP32_TOLERANCE
        report.check(f"option log-probs = plain forward, {dtype}",
                     ours_error <= tolerance_options and scoring_calls["batches with shared prefixes"] > 0,
                     f"{len(comparisons)} comparison prompts x 2 option sets: largest difference "
                     f"from exact {ours_error:.2g} (tolerance {tolerance_options:.2g}"
                     + (f" = 2 x plain bf16's {plain_error:.2g}" if plain_error else "") + "); "
                     f"{scoring_calls['batches with shared prefixes']} batches shared a prefix")
        rows.append([dtype, f"{same}/{len(ours)}", f"{worst:.2g} (<= {tolerance:.2g})",
                     f"{ours_error:.2g} (<= {tolerance_options:.2g})",
                     counts["cascade decode"], counts["cascade prefill"],
                     scoring_calls["batches with shared prefixes"]])


def comparison_prompts(constitution, count: int) -> list:
    """Judge-style questions: a worked comparison, then one about two helpful answers."""
    from smollm2 import helpful_answers

    from cai_cli.engines.prompts import comparison_prompt

    answers = helpful_answers()
    examples = constitution.comparison_examples[:1]
    principles = constitution.principles
    return [comparison_prompt(f"Question {i}: how do I do this safely?",
                              principles[i % len(principles)].comparison,
                              answers[i % len(answers)], answers[(i + 1) % len(answers)],
                              examples, "chat") for i in range(count)]


# ---------------------------------------------------------------------------------------------
# The pipeline


def run_pipeline(report: Report, args, work: Path, tiny: Path, log: Path) -> Path:
    run_dir = work / "pipeline"
    overrides = pipeline_overrides(args, run_dir, tiny) + args.size["pipeline"]
    rows = report.table("Pipeline: cai run (configs/tiny.yaml)",
                        ["stage", "state", "seconds", "training precision", "counts"],
                        note=f"tiny model (`cai tiny-model`), device {args.pipeline_device}")
    memory = DeviceMemoryPoller(args.device)
    with memory:
        started = time.perf_counter()
        result = cai(["run", "--config", ROOT / "configs" / "tiny.yaml", *sets(overrides)], work, log)
        seconds = time.perf_counter() - started
    report.check("cai run", result.returncode == 0,
                 f"exit code {result.returncode} in {seconds:.0f} s, GPU memory peak "
                 f"{memory.text()}" + ("" if result.returncode == 0 else f": {tail(result)}"))
    status = cai(["status", "--config", ROOT / "configs" / "tiny.yaml", *sets(overrides)], work, log)
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()
              if len(line.split()) > 1 and line.split()[0] in STAGES}
    report.check("cai status: every stage done",
                 all(states.get(stage) == "done" for stage in STAGES),
                 ", ".join(f"{stage} {states.get(stage, 'absent')}" for stage in STAGES))
    for stage in STAGES:
        manifest = read_json(run_dir / STAGE_DIRS[stage] / "manifest.json") or {}
        stats = manifest.get("stats", {})
        precision = stats.get("precision", "")
        counts = ", ".join(f"{k} {v}" for k, v in list(manifest.get("counts", {}).items())[:3])
        rows.append([stage, states.get(stage, manifest.get("status", "absent")),
                     manifest.get("timings", {}).get("seconds", ""), precision, counts])
    if args.device.startswith("cuda"):
        import torch

        if torch.cuda.is_bf16_supported():
            trained = [stage for stage in ("finetune", "optimize")
                       if (read_json(run_dir / STAGE_DIRS[stage] / "manifest.json") or {})
                       .get("stats", {}).get("precision") == "bf16"]
            report.check("device auto took the GPU (bf16 training)",
                         len(trained) == 2, f"bf16 training in: {', '.join(trained) or 'none'}")
    load_artifacts(report, run_dir, args.device)
    return run_dir


def pipeline_overrides(args, run_dir: Path, tiny: Path) -> list[str]:
    """configs/tiny.yaml from any directory, on this run's model and device."""
    resources = ROOT / "cai_cli" / "resources"
    return [f"run_dir={run_dir}", f"constitution={ROOT / 'constitutions' / 'harmless.yaml'}",
            f"data.red_team.path={resources / 'red_team_prompts.jsonl'}",
            f"data.helpful.path={resources / 'helpful.jsonl'}",
            f"models.policy.name_or_path={tiny}", f"models.feedback.name_or_path={tiny}",
            f"models.policy.device={args.pipeline_device}",
            f"models.feedback.device={args.pipeline_device}"]


def sets(overrides: list[str]) -> list[str]:
    return [item for override in overrides for item in ("--set", override)]


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_artifacts(report: Report, run_dir: Path, device: str) -> None:
    """Every artifact of the run loads: the JSONL records, the report, and the three checkpoints,
    each running one forward pass on the device."""
    import torch
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification,
                              AutoTokenizer)

    problems, loaded = [], []
    for name, keys in (("sl/chains.jsonl", {"id", "prompt", "initial", "rounds", "final"}),
                       ("prefs/pairs.jsonl", {"id", "prompt", "chosen", "rejected", "p_chosen",
                                              "judgments"})):
        try:
            records = [json.loads(line) for line in (run_dir / name).read_text().splitlines()
                       if line.strip()]
            missing = set().union(*(keys - r.keys() for r in records)) if records else keys
            if not records or missing:
                problems.append(f"{name}: {len(records)} records, missing {sorted(missing)}")
            else:
                loaded.append(f"{name} ({len(records)})")
        except (OSError, ValueError) as exc:
            problems.append(f"{name}: {exc}")
    if read_json(run_dir / "eval" / "report.json") is None:
        problems.append("eval/report.json does not load")
    else:
        loaded.append("eval/report.json")
    for directory, auto in (("sft", AutoModelForCausalLM), ("policy", AutoModelForCausalLM),
                            ("rm", AutoModelForSequenceClassification)):
        try:
            tokenizer = AutoTokenizer.from_pretrained(run_dir / directory)
            model = auto.from_pretrained(run_dir / directory).to(device).eval()
            with torch.inference_mode():
                out = model(**tokenizer(["Hello there"], return_tensors="pt").to(device)).logits
            if not torch.isfinite(out).all():
                problems.append(f"{directory}/: non-finite outputs")
            else:
                loaded.append(f"{directory}/ ({model.dtype})")
            del model
        except Exception as exc:  # noqa: BLE001 -- any failure to load is the finding
            problems.append(f"{directory}/: {type(exc).__name__}: {exc}".splitlines()[0])
    report.check("artifacts load", not problems,
                 "; ".join(problems) if problems else ", ".join(loaded))


# ---------------------------------------------------------------------------------------------
# Speed


def measure_speed(report: Report, args, model_dir: Path, conversations: list) -> None:
    from smollm2 import TEMPERATURE, TOP_P, GenerationWork, model_floor

    from cai_cli.config import HFModelConfig
    from cai_cli.engines.base import SamplingParams
    from cai_cli.engines.hf import HFBackend

    work_size = args.size
    config = HFModelConfig(name_or_path=str(model_dir), device=args.device, dtype="auto",
                           forward_batch_size=work_size["batch_size"])
    with HFBackend(config, "models.policy") as backend:
        dtype = str(backend.model.dtype).removeprefix("torch.")
        params = SamplingParams(max_new_tokens=work_size["new_tokens"], temperature=TEMPERATURE,
                                top_p=TOP_P, seed=0)
        work = GenerationWork(backend, conversations, params, work_size["batch_size"])
        lengths = work.prompt_lengths
        backend.generate(conversations[:2], params)  # warm-up
        work.plain_batched(2)
        sides = {"our hf backend": work.ours, "plain batched model.generate": work.plain_batched,
                 "one at a time": work.one_at_a_time}
        best: dict[str, tuple] = {}
        for repeat in range(work_size["repeats"]):
            for name, side in sides.items():
                if name == "one at a time" and repeat:  # the slow baseline once
                    continue
                memory: dict = {}
                with peak_memory(args.device, memory):
                    tokens, seconds = side()
                print(f"  run {repeat + 1}, {name}: {tokens} tokens in {seconds:.2f} s",
                      flush=True)
                if name not in best or seconds < best[name][1]:
                    best[name] = (tokens, seconds, memory["peak"])
        first = {name: min(side(1)[1] for _ in range(work_size["repeats"]))
                 for name, side in (("ours", work.ours), ("plain", work.plain_batched))}
        floor = model_floor(backend, conversations, work_size["new_tokens"])
    rows = report.table(
        "Generation speed (benchmarks/smollm2.py's work)",
        ["engine", "tokens", "seconds", "tokens/s", "ours vs this", "peak GPU memory"],
        note=f"{len(conversations)} critique turns sharing a worked example, prompt tokens mean "
             f"{sum(lengths) / len(lengths):.0f} (min {min(lengths)}, max {max(lengths)}), "
             f"{work_size['new_tokens']} new tokens each, batch {work_size['batch_size']}, "
             f"temperature {TEMPERATURE}, top-p {TOP_P}, {dtype}, {args.shape}-shaped random "
             f"model; best of {work_size['repeats']}")
    ours_rate = best["our hf backend"][0] / best["our hf backend"][1]
    for name, (tokens, seconds, peak) in best.items():
        rate = tokens / seconds
        rows.append([name, tokens, f"{seconds:.2f}", f"{rate:,.1f}", f"{ours_rate / rate:.2f}x",
                     peak])
    plain_all = best["plain batched model.generate"][1]
    ours_all = best["our hf backend"][1]
    rows.append(["(prefill and first token: ours / plain)", "", f"{first['ours']:.2f} / "
                 f"{first['plain']:.2f}", "", f"{first['plain'] / first['ours']:.2f}x", ""])
    rest_ours, rest_plain = max(ours_all - first["ours"], 1e-9), max(plain_all - first["plain"], 1e-9)
    rows.append([f"(the other {work_size['new_tokens'] - 1} tokens: ours / plain)", "",
                 f"{rest_ours:.2f} / {rest_plain:.2f}", "", f"{rest_plain / rest_ours:.2f}x", ""])
    rows.append(["(floor: forward passes alone, no cache)", "", f"{floor:.2f}", "",
                 f"plain / floor {plain_all / floor:.2f}x", ""])
    ratio = plain_all / ours_all
    goal = args.goal
    line = f"{ratio:.2f}x plain batched generate (goal >= {goal:g}x on a GPU), " \
           f"{best['one at a time'][1] / ours_all:.1f}x one at a time"
    if args.device.startswith("cuda"):
        report.check("hf backend vs plain batched generate", ratio >= goal, line)
    else:  # the goal is a GPU's; on a CPU the figure is for information
        report.lines.append(f"Speed on this CPU: {line}.")


# ---------------------------------------------------------------------------------------------
# Training steps


def training_steps(report: Report, args, work: Path, model_dir: Path, pipeline_dir: Path,
                   log: Path) -> None:
    steps = args.size["train_steps"]
    rows = report.table(
        "Training steps (cai finetune, cai optimize)",
        ["run", "steps", "s/step (median)", "tokens/step", "precision", "trainable parameters",
         "peak GPU memory", "whole command s"],
        note=f"{args.shape}-shaped random model, configs/tiny.yaml's training settings, "
             f"{steps} steps each; s/step is the median gap between logged steps after the "
             "first (TensorBoard wall times)")
    per_run = [f"{stage}.training.{key}" for stage in ("finetune", "optimize") for key in (
        "logging_steps=1", "report_to=[tensorboard]", f"max_steps={steps}", "save_steps=100000")]
    per_run += args.size["training"]
    for name, command, extra, run_name in (
            ("finetune, full", "finetune", [], "train-full"),
            ("finetune, LoRA", "finetune", ["finetune.lora.enabled=true"], "train-lora"),
            ("optimize, dpo (DPOTrainer)", "optimize", [], "train-full")):
        run_dir = work / run_name
        for directory in ("sl", "prefs"):
            if not (run_dir / directory).exists() and (pipeline_dir / directory).exists():
                shutil.copytree(pipeline_dir / directory, run_dir / directory)
        output = run_dir / ("sft" if command == "finetune" else "policy")
        memory = DeviceMemoryPoller(args.device)
        with memory:
            started = time.perf_counter()
            result = cai([command, "--config", ROOT / "configs" / "tiny.yaml",
                          *sets(pipeline_overrides(args, run_dir, model_dir) + per_run + extra)],
                         work, log)
            seconds = time.perf_counter() - started
        manifest = read_json(output / "manifest.json") or {}
        stats = manifest.get("stats", {})
        step_time, tokens = step_times(output / "logs", manifest, steps)
        ok = report.check(f"training: {name}", result.returncode == 0 and step_time is not None,
                          f"exit code {result.returncode}" + (f", {step_time:.3f} s/step"
                                                              if step_time else "")
                          + ("" if result.returncode == 0 else f": {tail(result)}"))
        rows.append([name, manifest.get("counts", {}).get("steps", ""),
                     f"{step_time:.3f}" if ok else "failed", tokens,
                     stats.get("precision", ""), stats.get("trainable_parameters", ""),
                     memory.text(), f"{seconds:.0f}"])


def step_times(logs: Path, manifest: dict, steps: int) -> tuple[float | None, str]:
    """Median seconds between consecutive logged steps after the first (which holds the
    warm-up), from the TensorBoard event files; without them, the whole training time over
    the steps. Also the tokens per step where the trainer logs them (SFT's num_tokens)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        events = EventAccumulator(str(logs))
        events.Reload()
        losses = sorted((e.step, e.wall_time) for e in events.Scalars("train/loss"))
        gaps = [b[1] - a[1] for a, b in zip(losses[1:], losses[2:])] or \
               [b[1] - a[1] for a, b in zip(losses, losses[1:])]
        tokens = ""
        if "train/num_tokens" in events.Tags()["scalars"]:
            counts = sorted((e.step, e.value) for e in events.Scalars("train/num_tokens"))
            if len(counts) > 1:
                tokens = f"{(counts[-1][1] - counts[0][1]) / (counts[-1][0] - counts[0][0]):.0f}"
        if gaps:
            return statistics.median(gaps), tokens
    except Exception as exc:  # noqa: BLE001 -- no tensorboard, no events: fall back
        print(f"  no step times from TensorBoard in {logs}: {exc}", flush=True)
    seconds = manifest.get("timings", {}).get("train_seconds")
    return (seconds / steps if seconds else None), "(incl. warm-up)"


# ---------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda (default where there is one) or cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None,
                        help="the shaped model: qwen2.5-0.5b (default on cuda) or small (cpu)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated, of {', '.join(PARTS)} (training needs pipeline)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu-check"),
                        help="where the table goes (default: $OUT, else runs/gpu-check)")
    parser.add_argument("--work", default=None,
                        help="scratch directory for models and runs (default: a fresh one under "
                             "/tmp, removed at the end)")
    parser.add_argument("--goal", type=float, default=3.0,
                        help="ratio to plain batched generate the hf backend must reach on a GPU")
    parser.add_argument("--budget", type=float, default=480,
                        help="seconds: parts that would start after this are skipped")
    parser.add_argument("--dtypes", default="bfloat16,float32",
                        help="the correctness part's dtypes")
    for name, kind in (("init-std", float), ("turns", int), ("greedy-tokens", int),
                       ("new-tokens", int), ("batch-size", int), ("repeats", int),
                       ("train-steps", int)):
        parser.add_argument(f"--{name}", type=kind, default=None,
                            help=f"instead of the shape's {name} (WORK)")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # fp32 means fp32 here (torch's default; said aloud, since TF32 would miss the fp32 tolerance)
    torch.set_float32_matmul_precision("highest")
    torch.backends.cudnn.allow_tf32 = False
    args.shape = args.shape or ("qwen2.5-0.5b" if args.device.startswith("cuda") else "small")
    args.pipeline_device = "auto" if args.device.startswith("cuda") else args.device
    args.size = dict(WORK[args.shape])
    for key in args.size:
        if getattr(args, key, None) is not None:
            args.size[key] = getattr(args, key)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    if "training" in parts and "pipeline" not in parts:
        parts.insert(parts.index("training"), "pipeline")  # its data and pairs come from there
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no CUDA device")

    out = Path(args.out).resolve()
    keep_work = args.work is not None
    if keep_work:
        work = Path(args.work).resolve()
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
    else:
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="cai-gpu-check-"))
    log = out / "gpu-check-cai.log"
    out.mkdir(parents=True, exist_ok=True)
    log.write_text("")

    report = Report(out, f"cai_cli GPU check, {args.device}")
    started = time.perf_counter()
    report.lines.append(f"{datetime.datetime.now():%Y-%m-%d %H:%M}, {device_line(args.device)}")
    report.lines.append(", ".join(f"{k} {v}" for k, v in versions().items()))
    import cai_cli

    report.lines.append(f"cai_cli from {Path(cai_cli.__file__).parent}; shape {args.shape}; "
                        f"parts {', '.join(parts)}")
    print("\n".join(report.lines), flush=True)

    def part(name: str, function, *arguments):
        elapsed = time.perf_counter() - started
        if elapsed > args.budget:
            report.check(f"{name}: run", False, f"skipped: {elapsed:.0f} s spent, budget "
                                                f"{args.budget:.0f} s")
            return None
        print(f"\n== {name} (at {elapsed:.0f} s)", flush=True)
        begun = time.perf_counter()
        try:
            return function(*arguments)
        except Exception as exc:  # noqa: BLE001 -- a part that breaks is a finding, not the end
            import traceback

            traceback.print_exc()
            report.check(f"{name}: run", False, f"{type(exc).__name__}: {exc}".splitlines()[0]
                         .replace("|", "\\|")[:300])
            return None
        finally:
            report.timings[name] = time.perf_counter() - begun
            print(f"== {name}: {report.timings[name]:.1f} s", flush=True)
            report.write()

    try:
        tiny, shaped = work / "tiny-model", work / f"{args.shape}-model"

        def setup():
            result = cai(["tiny-model", tiny, *args.size["tiny_model"]], work, log)
            if result.returncode:
                raise RuntimeError(f"cai tiny-model failed: {tail(result)}")
            info = build_shaped_model(args.shape, tiny, shaped, args.device,
                                      args.size["init_std"])
            report.lines.append(
                f"Shaped model: {args.shape}, {info['parameters'] / 1e6:.0f}M parameters, "
                f"initializer range {args.size['init_std']:g}, "
                f"vocabulary {info['vocab']} (tokenizer: the tiny model's byte-level BPE, "
                f"{info['tokenizer']} tokens), rope theta {info['rope_theta']:g}; random weights")
            return info

        if part("setup", setup) is None:
            return finish(report, work, keep_work)

        from cai_cli.constitution import load_constitution
        from smollm2 import critique_conversations

        from cai_cli.config import load_config

        config = load_config(ROOT / "configs" / "tiny.yaml",
                             [f"data.red_team.path={ROOT / 'cai_cli/resources/red_team_prompts.jsonl'}",
                              f"constitution={ROOT / 'constitutions/harmless.yaml'}",
                              f"data.helpful.path={ROOT / 'cai_cli/resources/helpful.jsonl'}"])
        constitution = load_constitution(config.constitution_paths)
        turns = args.size["turns"]
        conversations = critique_conversations(config, constitution, turns)
        if "correctness" in parts:
            rows = report.table(
                "Correctness (hf backend against plain transformers)",
                ["dtype", "greedy turns identical", "largest chosen-token logit shortfall",
                 "largest option log-prob difference", "cascade decoding calls",
                 "cascade prefill calls", "scoring batches with a shared prefix"],
                note=f"{turns} critique turns sharing a worked example, "
                     f"{args.size['greedy_tokens']} greedy tokens each; "
                     f"{turns} judge comparison prompts with a worked comparison")
            comparisons = comparison_prompts(constitution, turns)
            for dtype in args.dtypes.split(","):
                part(f"correctness {dtype}", check_correctness, report, rows, dtype, shaped,
                     args.device, conversations, comparisons, args.size["greedy_tokens"])
        pipeline_dir = None
        if "pipeline" in parts:
            pipeline_dir = part("pipeline", run_pipeline, report, args, work, tiny, log)
        if "speed" in parts:
            part("speed", measure_speed, report, args, shaped, conversations)
        if "training" in parts and pipeline_dir is not None:
            part("training", training_steps, report, args, work, shaped, pipeline_dir, log)
        return finish(report, work, keep_work)
    finally:
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)


def finish(report: Report, work: Path, keep_work: bool) -> int:
    report.write()
    print("\n" + report.markdown(), flush=True)
    print(f"written: {report.out / 'gpu-check.md'}" + (f"; scratch kept in {work}" if keep_work
                                                       else ""), flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
