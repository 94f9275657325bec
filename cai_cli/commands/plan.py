"""``cai plan``: what a run will do and roughly how long it will take, before it starts.

For each stage that would run (as ``cai run`` decides; ``--from``, ``--to`` and ``--force`` as
there), plan counts from the data, the config and the tokenizer what the stage will do: prompts,
generations, judge passes, prompt tokens (the real conversations rendered with the model's chat
template, with the model-written parts at their ``max_new_tokens`` bound), generated tokens (at
the same bound), training examples, tokens and optimiser steps. It reads no weights: a model's
size comes from its ``config.json`` and the JSON headers of its safetensors files. When an
earlier stage's output is complete and will not be redone, the counts come from that output.

Time is a roofline-style estimate; every figure it rests on is printed, and can be changed with
``--assume KEY=VALUE``:

    prompt processing  2 * N * (prompt tokens, a prefix shared by a batch counted once) / FLOP/s
    decoding           per step of a batch: weights' bytes / bandwidth
                       + rows * 2 * N / decode FLOP/s + per-layer overhead
    training           k * N * (tokens, padded per micro-batch) / training FLOP/s, where k = 6
                       (full), 4 (LoRA: no weight gradients), +2 with gradient checkpointing,
                       +2 for the reference pass of DPO and GRPO / RLOO
    fixed              model loads, engine start-up, trainer set-up

N is the parameters a token passes through (the output head only where logits are needed).
``--calibrate`` loads the models and times real batches (a generation, a scoring pass, a training
step) with the configured engines, and scales the device figures to what it measured; it prints
them as ``--assume`` options to reuse, and writes nothing.

Only the tokenizer is loaded (transformers), never weights, unless ``--calibrate``; hub models
and datasets are read from the local cache only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import struct
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from cai_cli import ui
from cai_cli.engines.base import ChatPrompts, PromptInput
from cai_cli.config import AnyModelConfig, Config, LoraConfig, TrainingConfig
from cai_cli.errors import UserError

# ---------------------------------------------------------------------------------------------
# Assumptions: every figure the estimate rests on, with the key that changes it

# key -> (default, meaning). Device figures are effective rates of this code on the device, not
# data-sheet peaks. The CPU figures are fitted to the demo's stage times (SmolLM2-135M, fp32) on
# an idle 2-core AMD EPYC without AVX-512, and agree with what --calibrate measures there.
DEFAULTS: dict[str, tuple[Any, str]] = {
    "device": (None, "device the local models run on: cpu, gpu, or a GPU name (h100, a100, "
                     "l4, ...); default: each model's device setting, auto as found here"),
    "cpu_gflops": (300.0, "CPU: GFLOP/s of prompt processing (long forward passes)"),
    "cpu_decode_gflops": (150.0, "CPU: GFLOP/s of the per-row work of a decoding step"),
    "cpu_bandwidth_gbs": (16.0, "CPU: GB/s at which a decoding step reads the weights and the "
                               "KV cache"),
    "cpu_train_gflops": (95.0, "CPU: GFLOP/s of training (forward and backward)"),
    "layer_overhead_ms": (1.0, "framework overhead per layer per forward pass of the hf engine "
                               "(CPU; on a GPU half of it)"),
    "gpu_tflops": (None, "GPU: peak dense bf16 TFLOP/s; default from its name"),
    "gpu_bandwidth_tbs": (None, "GPU: memory bandwidth in TB/s (70% of it is reached); default "
                                "from its name"),
    "mfu": (0.4, "GPU: share of peak FLOP/s reached by prompt processing"),
    "train_mfu": (0.3, "GPU: share of peak FLOP/s reached by training"),
    "decode_scale": (1.0, "factor on every decoding step's time (--calibrate sets it)"),
    "answer_fraction": (1.0, "share of max_new_tokens a generation really writes (1: the "
                             "bound; a model that stops early takes less)"),
    "prompt_tokens": (60, "tokens of a prompt from a dataset plan cannot read here"),
    "world_size": (None, "training processes (torchrun / accelerate); default: WORLD_SIZE or 1"),
    "load_s": (1.0, "seconds to load a model, plus its bytes at 1 GB/s"),
    "engine_step_ms": (8.0, "vLLM and servers: overhead of each decoding step (scheduling, "
                            "sampling)"),
    "engine_start_s": (60.0, "seconds vLLM takes to start (graph capture, compilation; a "
                             "third with enforce_eager)"),
    "train_efficiency": (0.67, "--calibrate: the training stages' rate over a bare training "
                               "step's (data, metrics, checkpoints; fitted on the demo)"),
    "trainer_setup_s": (1.5, "seconds to set up a training stage (trainer, tokenising), besides "
                             "loading and saving the model"),
}
ASSUMED_GPU = "a100"  # a GPU whose name is not in GPUS
# name (as in torch.cuda.get_device_name, lower case) -> (dense bf16 TFLOP/s, TB/s), data sheets
GPUS = {
    "h200": (989.0, 4.8), "h100 pcie": (756.0, 2.0), "h100": (989.0, 3.35),
    "a100": (312.0, 2.0), "a10": (125.0, 0.6), "l40s": (362.0, 0.86), "l4": (121.0, 0.3),
    "4090": (165.0, 1.0), "3090": (71.0, 0.94), "v100": (125.0, 0.9), "t4": (65.0, 0.32),
}
VLLM_BATCH = 256  # sequences vLLM decodes at once (its max_num_seqs)


class Assumptions:
    """The defaults, overridden by ``--assume KEY=VALUE``; remembers what the estimate used."""

    def __init__(self, overrides: Sequence[str] = ()):
        self.values: dict[str, Any] = {key: default for key, (default, _) in DEFAULTS.items()}
        self.given: set[str] = set()
        self.params: dict[str, float] = {}  # --assume params.<role or name>=1.5e9
        for item in overrides:
            key, sep, raw = item.partition("=")
            key, raw = key.strip(), raw.strip()
            if not sep or not raw:
                raise UserError(f"--assume {item!r}: expected KEY=VALUE, e.g. --assume "
                                "cpu_gflops=80; keys: " + ", ".join([*DEFAULTS, "params.ROLE"]))
            if key.startswith("params."):
                self.params[key.removeprefix("params.")] = _number(raw, key)
                continue
            if key not in DEFAULTS:
                import difflib

                close = difflib.get_close_matches(key, list(DEFAULTS), n=1)
                hint = f"did you mean '{close[0]}'?" if close else "keys: " + ", ".join(DEFAULTS)
                raise UserError(f"--assume {key}: unknown key; {hint}")
            self.values[key] = raw.lower() if key == "device" else _number(raw, key)
            self.given.add(key)

    def __getitem__(self, key: str) -> Any:
        return self.values[key]


def _number(raw: str, key: str) -> float:
    match = re.fullmatch(r"([0-9.]+(?:e[+-]?\d+)?)\s*([kmbt]?)", raw.strip().lower())
    if not match:
        raise UserError(f"--assume {key}={raw}: not a number (e.g. 80, 1.5e9 or 1.5B)")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[match.group(2)]
    return float(match.group(1)) * scale


# ---------------------------------------------------------------------------------------------
# Models: size from config.json and safetensors headers, never the weights


@dataclass
class ModelSize:
    name: str
    params: float  # all parameters
    body: float  # parameters a token passes through before the output head
    head: float  # the output head (vocabulary x hidden), tied or not
    layers: int
    kv_width: int  # keys and values a token keeps per layer (2 x kv heads x head dim); 0: unknown
    context: int | None
    source: str  # where the figures come from, for the assumptions list


WEIGHTS = ("model.safetensors", "model.safetensors.index.json")


def _local_file(name_or_path: str, filename: str, revision: str | None) -> Path | None:
    """A model file in a local directory or the Hugging Face cache; never downloads."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path / filename if (path / filename).is_file() else None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return None
    try:
        found = try_to_load_from_cache(name_or_path, filename, revision=revision)
    except Exception:  # not a valid repo id: nothing cached under that name
        return None
    return Path(found) if isinstance(found, str) else None


def safetensors_params(file: Path) -> int:
    """Parameters in one safetensors file, from its JSON header alone."""
    with file.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    return sum(math.prod(entry["shape"]) for name, entry in header.items()
               if name != "__metadata__")


def model_size(name_or_path: str, revision: str | None, role: str, key: str,
               assume: Assumptions) -> ModelSize:
    """A model's size without its weights: ``--assume params.ROLE``, else its config.json (and
    safetensors headers for the exact count), else the size in its name ("1.5B", "135M")."""
    config_file = _local_file(name_or_path, "config.json", revision)
    adapter = _local_file(name_or_path, "adapter_config.json", revision)
    if config_file is None and adapter is not None:  # a LoRA adapter: the base model's size
        from cai_cli.engines.models import recorded_base

        base = recorded_base(adapter.parent)  # "../sft": relative to the adapter
        if base:
            return model_size(base, None, role, key, assume)
    given = assume.params.get(role, assume.params.get(name_or_path))
    cfg: dict = {}
    if config_file is not None:
        cfg = json.loads(config_file.read_text())
        cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's
    hidden = cfg.get("hidden_size") or cfg.get("n_embd") or cfg.get("d_model")
    layers = cfg.get("num_hidden_layers") or cfg.get("n_layer") or cfg.get("num_layers")
    vocab = cfg.get("vocab_size")
    context = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    head = float(vocab * hidden) if hidden and vocab else 0.0
    tied = cfg.get("tie_word_embeddings", True)
    total, source = None, None
    if given is not None:
        total, source = given, f"--assume params.{role}"
    elif config_file is not None:
        counted = 0
        for name in WEIGHTS:
            file = _local_file(name_or_path, name, revision)
            if file is None:
                continue
            if name.endswith(".json"):
                shards = sorted(set(json.loads(file.read_text())["weight_map"].values()))
                files = [_local_file(name_or_path, s, revision) for s in shards]
                if all(files):
                    counted = sum(safetensors_params(f) for f in files)
            else:
                counted = safetensors_params(file)
            if counted:
                total, source = float(counted), "safetensors headers"
                break
        if total is None and hidden and layers and vocab:
            total, source = _params_from_config(cfg, hidden, layers, vocab, tied), "config.json"
    if total is None:
        named = re.search(r"(?<![\d.])(\d+(?:\.\d+)?)\s*([bm])(?![a-z])", name_or_path.lower())
        if named:
            total = float(named.group(1)) * (1e9 if named.group(2) == "b" else 1e6)
            source = "its name"
    if total is None:
        raise UserError(f"{key}: unknown size of '{name_or_path}': no config.json here or in the "
                        "local Hugging Face cache, and no size in its name; give it, e.g. "
                        f"--assume params.{role}=1.5e9")
    embeddings = head * (1 if tied else 2)
    body = max(total - embeddings, total * 0.5) if head else total
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    head_dim = cfg.get("head_dim") or (hidden // heads if hidden and heads else 0)
    kv_width = 2 * (cfg.get("num_key_value_heads") or heads or 0) * head_dim
    if not layers:
        source += " (layers, vocabulary and attention unknown: 24 layers assumed, no output head, "\
                  "no KV-cache reads)"
    return ModelSize(name_or_path, total, body, head, int(layers or 24), kv_width,
                     int(context) if context else None, source)


def _params_from_config(cfg: dict, hidden: int, layers: int, vocab: int, tied: bool) -> float:
    """Decoder-only transformer: attention (grouped-query aware) and a gated MLP per layer."""
    heads = cfg.get("num_attention_heads") or cfg.get("n_head") or max(hidden // 64, 1)
    head_dim = cfg.get("head_dim") or hidden // heads
    kv_heads = cfg.get("num_key_value_heads") or heads
    inter = cfg.get("intermediate_size") or cfg.get("n_inner") or 4 * hidden
    gated = "gpt2" not in str(cfg.get("model_type", ""))
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    mlp = (3 if gated else 2) * hidden * inter
    return float(layers * (attention + mlp) + vocab * hidden * (1 if tied else 2))


# ---------------------------------------------------------------------------------------------
# Devices


@dataclass
class Device:
    name: str  # "cpu" or a GPU's name
    gpu: bool
    flops: float  # prompt processing, FLOP/s
    decode_flops: float  # per-row work of a decoding step, FLOP/s
    bandwidth: float  # bytes/s reading the weights
    train_flops: float
    layer_overhead: float  # seconds per layer per forward pass (hf engine)
    why: str


def gpu_device(name: str, assume: Assumptions, why: str) -> Device:
    known = next((k for k in GPUS if k in name.lower()), None)
    peak, bandwidth = GPUS[known or ASSUMED_GPU]
    if known is None:
        why += f"; not a GPU plan knows: assumed {ASSUMED_GPU.upper()}-class"
    peak = assume["gpu_tflops"] or peak
    bandwidth = assume["gpu_bandwidth_tbs"] or bandwidth
    flops = assume["mfu"] * peak * 1e12
    return Device(name, True, flops, flops, 0.7 * bandwidth * 1e12,
                  assume["train_mfu"] * peak * 1e12, assume["layer_overhead_ms"] / 2e3,
                  f"{why}: {peak:g} TFLOP/s peak x {assume['mfu']:.2g} (mfu) for prompts, "
                  f"x {assume['train_mfu']:.2g} (train_mfu) for training; {bandwidth:g} TB/s "
                  "x 0.7 for decoding")


def cpu_device(assume: Assumptions, why: str) -> Device:
    return Device("cpu", False, assume["cpu_gflops"] * 1e9, assume["cpu_decode_gflops"] * 1e9,
                  assume["cpu_bandwidth_gbs"] * 1e9, assume["cpu_train_gflops"] * 1e9,
                  assume["layer_overhead_ms"] / 1e3,
                  f"{why}: {assume['cpu_gflops']:.3g} GFLOP/s prompts, "
                  f"{assume['cpu_decode_gflops']:.3g} GFLOP/s decoding rows, "
                  f"{assume['cpu_bandwidth_gbs']:.3g} GB/s, {assume['cpu_train_gflops']:.3g} "
                  "GFLOP/s training" + (f", decoding steps x {assume['decode_scale']:.3g}"
                                        if assume["decode_scale"] != 1 else ""))


_found_gpu: list = []


def local_gpu() -> str | None:
    """The name of the first GPU here, or None (torch is imported once for this)."""
    if not _found_gpu:
        try:
            import torch

            _found_gpu.append(torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
        except Exception:
            _found_gpu.append(None)
    return _found_gpu[0]


def device_for(model: AnyModelConfig, assume: Assumptions) -> Device:
    """Where a model runs: the --assume device, else its device setting (auto: what is here);
    a model behind a server is assumed on a GPU like this machine's, else an A100-class one."""
    forced = assume["device"]
    if forced:
        if forced == "cpu":
            return cpu_device(assume, "--assume device=cpu")
        return gpu_device(forced, assume, f"--assume device={forced}")
    if model.remote:
        here = local_gpu()
        where = f"like this machine's ({here})" if here else "of its own"
        return gpu_device(here or ASSUMED_GPU, assume,
                          f"behind a server: assumed on a GPU {where}")
    device = getattr(model, "device", "auto")
    if device == "cpu":
        return cpu_device(assume, "device: cpu")
    here = local_gpu()
    if here is None:
        return cpu_device(assume, f"device: {device}, and no GPU is visible here (plan for "
                                  "one with --assume device=h100)")
    return gpu_device(here, assume, f"device: {device} ({here})")


def bytes_per_param(model: AnyModelConfig, device: Device) -> int:
    dtype = getattr(model, "dtype", "auto")
    if dtype == "float32" or (dtype == "auto" and not device.gpu):
        return 4
    return 2


# ---------------------------------------------------------------------------------------------
# Token counting: the engines' own rendering, with a tokenizer only


class TokenCounter(ChatPrompts):
    """Renders and tokenises prompts as the hf and vLLM engines do (``ChatPrompts``), with the
    model's tokenizer and chat template alone."""

    approximate = False

    def __init__(self, tokenizer, name: str):
        self.tokenizer, self.name = tokenizer, name
        self.has_chat_template = bool(tokenizer.chat_template)

    def count(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def conversation_tokens(self, messages: list[dict]) -> int:
        """Tokens of a whole conversation, as a trainer sees it."""
        if not self.has_chat_template:
            return self.count("".join(f"{m['role']}: {m['content']}\n\n" for m in messages))
        return len(self.tokenize(self.tokenizer.apply_chat_template(messages, tokenize=False),
                                 False))


class ApproxCounter:
    """No tokenizer here (a hub model not in the cache, a server's model): about four
    characters a token, each message as a line of a transcript. Chunks of text stand for
    tokens, so prompts that share a beginning still share their first "tokens"."""

    approximate = True
    has_chat_template = True

    def __init__(self, name: str):
        self.name = name

    @staticmethod
    def _chunks(text: str) -> list[str]:
        return [text[i:i + 4] for i in range(0, len(text), 4)]

    def _text(self, prompt: PromptInput) -> str:
        if isinstance(prompt, str):
            return prompt
        return "".join(f"<{m['role']}>{m['content']}\n" for m in prompt)

    def encode_many(self, prompts: Sequence[PromptInput]) -> list[list]:
        return [self._chunks(self._text(p)) for p in prompts]

    def conversation_tokens(self, messages: list[dict]) -> int:
        return len(self._chunks(self._text(messages)))


def token_counter(name_or_path: str, revision: str | None, what: str, cache: dict):
    """The tokenizer of a model (local directory or the hub cache), or an approximation."""
    if name_or_path in cache:
        return cache[name_or_path]
    counter: Any = ApproxCounter(name_or_path)
    if _local_file(name_or_path, "tokenizer_config.json", revision) is not None or \
            _local_file(name_or_path, "tokenizer.json", revision) is not None:
        from cai_cli.config import HFModelConfig
        from cai_cli.engines.models import load_tokenizer, quiet_transformers

        quiet_transformers()
        try:
            tokenizer = load_tokenizer(HFModelConfig(name_or_path=name_or_path, revision=revision),
                                       what)
            counter = TokenCounter(tokenizer, name_or_path)
        except UserError:
            pass
    cache[name_or_path] = counter
    return counter


# ---------------------------------------------------------------------------------------------
# Work: what a stage asks of an engine, in units the cost model prices


@dataclass
class Engine:
    """One model as an engine runs it (a role in a stage): its size, device and batching."""

    role: str  # e.g. "policy", "feedback", "sft"
    name: str
    config: AnyModelConfig
    size: ModelSize
    device: Device
    counter: Any
    bytes_per_param: int

    @property
    def kind(self) -> str:
        return self.config.backend

    @property
    def batch(self) -> int:
        """Rows decoded (or scored) together."""
        if self.kind == "hf":
            return self.config.forward_batch_size
        if self.kind == "openai":
            return self.config.max_concurrency
        return VLLM_BATCH

    @property
    def weight_bytes(self) -> float:
        return self.size.params * self.bytes_per_param

    @property
    def context(self) -> int | None:
        return getattr(self.config, "max_context", None) or self.size.context


@dataclass
class Cost:
    """Seconds of a stage, by where they go."""

    load: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    train: float = 0.0
    setup: float = 0.0

    @property
    def total(self) -> float:
        return self.load + self.prefill + self.decode + self.train + self.setup


@dataclass
class Tally:
    prompt_tokens: int = 0  # every prompt token, as a server would bill them
    computed_tokens: int = 0  # after prefixes a batch shares are counted once
    generated_tokens: int = 0  # upper bound: rows x max_new_tokens
    decode_steps: int = 0
    train_tokens: int = 0
    too_long: int = 0  # conversations that may not fit the model's context at their bound


class Pricer:
    """Turns engine calls and training into seconds on the assumed devices."""

    def __init__(self, assume: Assumptions):
        self.assume = assume
        self.decode_scale = assume["decode_scale"]

    def load(self, engine: Engine) -> float:
        seconds = self.assume["load_s"] + engine.weight_bytes / 1e9
        if engine.kind == "vllm":
            start = self.assume["engine_start_s"]
            seconds += start / 3 if engine.config.enforce_eager else start
        return 0.0 if engine.config.remote else seconds

    def prefill(self, engine: Engine, tokens: int) -> float:
        return 2 * engine.size.body * tokens / engine.device.flops

    def decode_step(self, engine: Engine, rows: int, cached: int = 0) -> float:
        """One decoding step of ``rows`` rows whose KV cache holds ``cached`` tokens in all
        (a prefix the rows share counted once: the hf engine's cascade attention and vLLM's
        prefix cache read it once)."""
        device, size = engine.device, engine.size
        per_row = 2 * (size.body + size.head) / device.decode_flops
        kv_bytes = cached * size.layers * size.kv_width * engine.bytes_per_param
        memory = (engine.weight_bytes + kv_bytes) / device.bandwidth
        if engine.kind == "hf":
            overhead = size.layers * device.layer_overhead
        else:
            overhead = self.assume["engine_step_ms"] / 1e3
        compute = rows * per_row
        step = (max(memory, compute) if device.gpu else memory + compute) + overhead
        return step * self.decode_scale

    def calls(self, engine: Engine, prompts: list[PromptInput], bounds: list[int],
              max_new_tokens: int, tally: Tally, cost: Cost) -> None:
        """One engine call: ``prompts`` rendered with the model-written parts empty, each with
        ``bounds[i]`` more tokens for those parts; ``max_new_tokens`` to generate (0: score)."""
        from cai_cli.engines.hf import _prefix_groups, batch_order

        if not prompts:
            return
        ids = engine.counter.encode_many(prompts)
        if engine.context:
            room = engine.context - max(max_new_tokens, 1)
            tally.too_long += sum(len(row) + bound > room for row, bound in zip(ids, bounds))
        order = batch_order(list(range(len(ids))), ids)
        new = round(max_new_tokens * self.assume["answer_fraction"])
        for start in range(0, len(order), engine.batch):
            batch = order[start:start + engine.batch]
            rows = [ids[i] for i in batch]
            fraction = self.assume["answer_fraction"]
            total = sum(len(r) + round(bounds[i] * fraction) for r, i in zip(rows, batch))
            shared = sum(length * (len(members) - 1)
                         for members, length in _prefix_groups(rows, [1] * len(rows)))
            tally.prompt_tokens += total
            tally.computed_tokens += total - shared
            cost.prefill += self.prefill(engine, total - shared)
            if max_new_tokens:
                tally.generated_tokens += new * len(batch)
                tally.decode_steps += new
                cached = total - shared + len(batch) * new // 2  # on average over the steps
                cost.decode += new * self.decode_step(engine, len(batch), cached)


# ---------------------------------------------------------------------------------------------
# The plan of each stage


@dataclass
class StagePlan:
    name: str
    runs: bool  # false: fresh, skipped
    why: str  # why it runs or not
    counts: dict[str, int] = field(default_factory=dict)
    tally: Tally = field(default_factory=Tally)
    steps: int = 0
    cost: Cost = field(default_factory=Cost)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"stage": self.name, "runs": self.runs, "why": self.why, "counts": self.counts,
                **asdict(self.tally), "steps": self.steps,
                "seconds": round(self.cost.total, 1),
                "seconds_by_part": {k: round(v, 1) for k, v in asdict(self.cost).items()},
                "notes": self.notes}


class Planner:
    """Builds every stage's plan; remembers what earlier stages will produce."""

    def __init__(self, config: Config, assume: Assumptions, running: set[str]):
        self.config, self.assume, self.running = config, assume, running
        self.price = Pricer(assume)
        self.counters: dict = {}
        self.engines: dict[tuple, Engine] = {}
        self.roles: dict[tuple, list[str]] = {}
        self.world = 1
        self.devices: dict[str, list[str]] = {}  # how a device was assumed -> models on it
        self.used: list[str] = []  # lines for the assumptions list, once each
        self.unread: dict[str, list[str]] = {}  # dataset not here -> "N prompts (stage)"
        self.training: list[str] = []  # "finetune 4 x N (LoRA)"
        self.sl_prompts: list = []  # the prompts generate-sl answers
        self.pairs_by_prompt: dict[str, int] = {}  # label-prefs: prompt id -> pairs (bound)
        self.pair_tokens: list[tuple[int, int]] = []  # (chosen, rejected) sequence tokens
        from cai_cli.constitution import load_constitution

        self.constitution = load_constitution(config.constitution_paths)

    def note(self, line: str) -> None:
        if line not in self.used:
            self.used.append(line)

    # Models --------------------------------------------------------------------------------

    def base_of(self, path: str) -> str:
        """A checkpoint this run makes (<run_dir>/sft, rm, policy) has its base model's size
        and tokenizer; anything else is itself."""
        layout = self.config.layout
        resolved = Path(path).expanduser()
        if resolved == layout.sft or resolved == layout.rm:
            from cai_cli.stages import finetune, train_rm

            module = finetune if resolved == layout.sft else train_rm
            return module.base_model(self.config)[0].name_or_path
        if resolved == layout.policy:
            return self.base_of(self.config.optimize.model or str(layout.sft))
        return path

    def engine(self, role: str, model: AnyModelConfig, key: str) -> Engine:
        """A model as its engine runs it in some role; sized, placed and tokenised once."""
        name = self.base_of(model.name_or_path)
        cache_key = (name, model.backend, getattr(model, "device", None))
        if cache_key in self.engines:
            engine = self.engines[cache_key]
            if role not in self.roles[cache_key]:
                self.roles[cache_key].append(role)
            return dataclasses.replace(engine, role=role, config=model)
        revision = getattr(model, "revision", None)
        policy = self.base_of(self.config.models.policy.name_or_path)
        feedback = self.base_of(self.config.feedback_model.name_or_path)
        known_as = "policy" if name == policy else "feedback" if name == feedback else name
        size = model_size(name, revision, known_as, key, self.assume)
        device = device_for(model, self.assume)
        counter = token_counter(name, revision, key, self.counters)
        if counter.approximate:  # a server's model: the policy's tokenizer is the best guess
            policy_name = self.base_of(self.config.models.policy.name_or_path)
            other = token_counter(policy_name, None, key, self.counters)
            if not other.approximate:
                counter = other
                self.note(f"tokens of {name}: counted with {policy_name}'s tokenizer (its own "
                          "is not here)")
            else:
                self.note(f"tokens of {name}: about 4 characters a token (no tokenizer here)")
        engine = Engine(role, name, model, size, device, counter, bytes_per_param(model, device))
        self.engines[cache_key] = engine
        self.roles[cache_key] = [role]
        self.devices.setdefault(device.why, []).append(name)
        return engine

    def lines(self) -> list[str]:
        """The assumptions list: each model once, then what the stages assumed."""
        out, names = [], {}
        for key, engine in self.engines.items():
            where = ("behind a server" if engine.config.remote
                     else f"{engine.kind} on {engine.device.name} ({engine.bytes_per_param} "
                          "bytes a weight)")
            names.setdefault(engine.name, []).append(f"{', '.join(self.roles[key])}: {where}")
        for name, uses in names.items():
            size = next(e.size for e in self.engines.values() if e.name == name)
            shape = "" if "unknown" in size.source else f", {size.layers} layers"
            out.append(f"{name}: {_human(size.params)} parameters from {size.source}{shape}; "
                       + "; ".join(uses))
        for what, counts in self.unread.items():
            out.append(f"{what} is not on this machine: its limit taken as the count, "
                       f"{', '.join(counts)} prompts of {int(self.assume['prompt_tokens'])} tokens "
                       "(prompt_tokens)")
        for why, models in self.devices.items():
            out.append(f"device of {', '.join(dict.fromkeys(models))}: {why}")
        out += self.used
        if self.training:
            world = self.world
            out.append(f"training FLOPs a token: {', '.join(self.training)}; micro-batches padded "
                       f"to their longest example; {world} training process"
                       f"{'es' if world > 1 else ''} (world_size)")
        return out

    def needs(self, stage: StagePlan, command: str) -> None:
        """Say so when the stage reads an earlier stage's output that neither exists nor will."""
        if command not in self.running and not _complete(self.config, command):
            stage.notes.append(f"needs the output of {command}, which is missing: the run "
                               "would stop here")

    def fmt(self, setting: str, engine: Engine, key: str) -> str:
        from cai_cli.engines.prompts import resolve_format

        return resolve_format(setting, engine.counter, key)

    # Data -----------------------------------------------------------------------------------

    def prompts(self, what: str, load: Callable[[], list], source, limit: int | None,
                stage: str) -> list:
        """Prompts from ``load()``; a dataset that is not on this machine: ``limit`` prompts of
        the assumed length (placeholders with distinct ids)."""
        from cai_cli.data.sources import Prompt

        if self.generated(source):
            return self.generated_stand_ins(what, limit, stage)
        try:
            return load()
        except UserError as exc:
            if source is None or source.dataset is None or "cannot load" not in str(exc):
                raise
        if not limit:
            raise UserError(f"{what}: plan cannot read '{source.dataset}' here (not in the local "
                            f"cache) and {what}.limit is not set, so it cannot count the prompts; "
                            "set a limit, or download the dataset once")
        length = int(self.assume["prompt_tokens"])
        counts = self.unread.setdefault(f"{what}: '{source.dataset}'", [])
        if f"{limit:,} ({stage})" not in counts:
            counts.append(f"{limit:,} ({stage})")
        text = " ".join(["word"] * length)
        return [Prompt(f"{what}-{i}", f"{text} {i}") for i in range(limit)]

    def generated(self, source) -> bool:
        """Whether ``source`` names generate-prompts' output and that output is not there yet
        (or will be made again): its prompts are then what the stage will make."""
        layout = self.config.layout
        path = getattr(source, "path", None)
        if path is None or Path(path).expanduser().resolve() != layout.generated_prompts.resolve():
            return False
        return "generate-prompts" in self.running or not layout.generated_prompts.is_file()

    def generated_stand_ins(self, what: str, limit: int | None, stage: str) -> list:
        """The prompts generate-prompts will write, at most: ``num_prompts`` new ones (and the
        seeds ``mix_seeds`` mixes in), as long as the seed prompts (cycled), up to ``limit``."""
        from cai_cli.data.sources import Prompt
        from cai_cli.stages.generate_prompts import load_seeds, seed_source

        settings = self.config.generate_prompts
        source = seed_source(self.config)
        seeds = self.prompts("generate_prompts.seeds" if settings.seeds else "data.red_team",
                             lambda: load_seeds(self.config), source, source.limit, stage)
        total = settings.num_prompts + min(round(settings.num_prompts * settings.mix_seeds),
                                           len(seeds))
        count = min(limit, total) if limit else total
        self.note(f"{what}: generate-prompts' output, not made yet: {settings.num_prompts} new "
                  "prompts at most (before its filters), each as long as a seed prompt")
        return [Prompt(f"generated-{i}", seeds[i % len(seeds)].text) for i in range(count)]

    # Stages ----------------------------------------------------------------------------------

    def generate_prompts(self, stage: StagePlan) -> None:
        from cai_cli.engines.prompts import classification_prompt
        from cai_cli.stages import generate_prompts as stage_module
        from cai_cli.stages.common import checkpoint_batches

        config, settings = self.config, self.config.generate_prompts
        source = stage_module.seed_source(config)
        seeds = self.prompts("generate_prompts.seeds" if settings.seeds else "data.red_team",
                             lambda: stage_module.load_seeds(config), source, source.limit,
                             stage.name)
        engine = self.engine("generate-prompts", config.models.policy, "models.policy")
        fmt = self.fmt(settings.prompt_format, engine, "generate_prompts.prompt_format")
        requests = stage_module.requests(config)
        stage.cost.load += self.price.load(engine)
        for batch in checkpoint_batches(requests, settings.prompts_per_checkpoint):
            asks = [stage_module.request_prompt(
                config, stage_module.shown_seeds(config, seeds, number), count, fmt)
                for number, count in batch]
            self.price.calls(engine, asks, [0] * len(asks), settings.sampling.max_new_tokens,
                             stage.tally, stage.cost)
        questions = 0
        if settings.feedback_filter:
            feedback = self.engine("generate-prompts feedback filter", config.feedback_model,
                                   "models.feedback" if config.models.feedback
                                   else "models.policy")
            stage.cost.load += self.price.load(feedback)
            # Every new prompt asked for, each at its share of its reply's tokens.
            bound = -(-settings.sampling.max_new_tokens // settings.per_request)
            fmt = self.fmt(config.label_prefs.prompt_format, feedback,
                           "label_prefs.prompt_format")
            asks = [classification_prompt("", None, settings.feedback_question, yes_first, fmt)
                    for yes_first in (True, False)]  # both orders of the options
            for start in range(0, settings.num_prompts, settings.prompts_per_checkpoint):
                rows = min(settings.prompts_per_checkpoint, settings.num_prompts - start)
                self.price.calls(feedback, asks * rows, [bound] * 2 * rows, 0, stage.tally,
                                 stage.cost)
                questions += 2 * rows
        stage.counts = {"seeds": len(seeds), "requests": len(requests),
                        "prompts_asked": settings.num_prompts, "feedback_passes": questions}
        stage.notes.append("new prompts at most num_prompts: the filters drop some")

    def generate_sl(self, stage: StagePlan) -> None:
        from cai_cli.data.sources import load_prompts
        from cai_cli.engines.prompts import answer_prompt, critique_prompt, revision_prompt
        from cai_cli.stages.common import checkpoint_batches
        from cai_cli.stages.generate_sl import Plan

        config, settings = self.config, self.config.generate_sl
        prompts = self.prompts("data.red_team",
                               lambda: load_prompts(config.data.red_team, config.seed),
                               config.data.red_team, config.data.red_team.limit, stage.name)
        self.sl_prompts = prompts
        if self.generated(config.data.red_team):
            self.needs(stage, "generate-prompts")
        engine = self.engine("generate-sl", config.models.policy, "models.policy")
        fmt = self.fmt(settings.prompt_format, engine, "generate_sl.prompt_format")
        system, new = settings.system_prompt, settings.sampling.max_new_tokens
        rounds = settings.num_revisions
        plans = {p.id: Plan(config, self.constitution, p) for p in prompts}
        stage.cost.load += self.price.load(engine)
        for batch in checkpoint_batches(prompts, settings.prompts_per_checkpoint):
            self.price.calls(engine, [answer_prompt(p.text, fmt, system) for p in batch],
                             [0] * len(batch), new, stage.tally, stage.cost)
            for k in range(rounds):
                self.price.calls(engine, [critique_prompt(p.text, "", plans[p.id].principles[k],
                                                          plans[p.id].examples, fmt, system)
                                          for p in batch], [new] * len(batch), new,
                                 stage.tally, stage.cost)
                self.price.calls(engine, [revision_prompt(p.text, "", plans[p.id].principles[k],
                                                          "", plans[p.id].examples, fmt, system)
                                          for p in batch], [2 * new] * len(batch), new,
                                 stage.tally, stage.cost)
        stage.counts = {"prompts": len(prompts), "generations": len(prompts) * (1 + 2 * rounds),
                        "critiques": len(prompts) * rounds, "revisions": len(prompts) * rounds}

    def finetune(self, stage: StagePlan) -> None:
        from cai_cli.stages import finetune

        config, settings = self.config, self.config.finetune
        model, key = finetune.base_model(config)
        engine = self.engine("finetune", model, key)
        self.needs(stage, "generate-sl")
        sl_out = config.layout.sft_data
        new = config.generate_sl.sampling.max_new_tokens
        if "generate-sl" not in self.running and _complete(config, "generate-sl"):
            sl = finetune.sl_conversations(config)
            lengths = [engine.counter.conversation_tokens(c) for c in sl]
            stage.notes.append(f"SL examples from {sl_out}")
        else:
            prompts = self.sl_prompts or self._red_team()
            lengths = [engine.counter.conversation_tokens(
                [{"role": "user", "content": p.text}, {"role": "assistant", "content": ""}]) + new
                for p in prompts]
            stage.notes.append("SL examples: one per prompt, the revision at max_new_tokens")
        helpful = self._helpful(settings.helpful_ratio, len(lengths), engine,
                                settings.training.max_length)
        examples = [min(n, settings.training.max_length) for n in lengths + helpful]
        stage.counts = {"sl_examples": len(lengths), "helpful_examples": len(helpful),
                        "train_examples": len(examples)}
        self._train(stage, engine, settings.training, settings.lora, examples, extra=0)

    def _red_team(self) -> list:
        from cai_cli.data.sources import load_prompts

        source = self.config.data.red_team
        return self.prompts("data.red_team", lambda: load_prompts(source, self.config.seed),
                            source, source.limit, "generate-sl")

    def _helpful(self, ratio: float, sl: int, engine: Engine, max_length: int) -> list[int]:
        """Token lengths of the helpful conversations mixed in (``ratio`` per SL example)."""
        config = self.config
        if ratio == 0 or config.data.helpful is None:
            return []
        from cai_cli.stages import finetune

        count = round(ratio * sl)
        try:
            pool = finetune.helpful_conversations(config)
        except UserError as exc:
            if config.data.helpful.dataset is None or "cannot load" not in str(exc):
                raise
            self.note(f"data.helpful: '{config.data.helpful.dataset}' is not on this machine: "
                      f"each helpful conversation assumed {max_length} tokens (max_length)")
            return [max_length] * count
        lengths = [engine.counter.conversation_tokens(c) for c in pool]
        rng = random.Random(f"{config.seed}:helpful")
        return [lengths[rng.randrange(len(lengths))] for _ in range(count)] if lengths else []

    def _train(self, stage: StagePlan, engine: Engine, training: TrainingConfig, lora: LoraConfig,
               examples: list[int], *, extra: float, rows_per_example: int = 1,
               head: bool = True) -> None:
        """Steps and time of one training run over examples of these token lengths (each
        example ``rows_per_example`` sequences of that length: 2 for a preference pair)."""
        world = int(self.assume["world_size"] or os.environ.get("WORLD_SIZE") or 1)
        batch, accumulate = training.per_device_batch_size, training.gradient_accumulation_steps
        per_process = math.ceil(len(examples) / world)
        micro = math.ceil(per_process / batch)
        per_epoch = max(micro // accumulate + int(micro % accumulate > 0), 1)
        steps = training.max_steps or math.ceil(training.epochs * per_epoch)
        # Padded tokens: each micro-batch is as long as its longest example (seeded shuffle).
        order = list(examples)
        random.Random(self.config.seed).shuffle(order)
        batches = [order[i:i + batch] for i in range(0, len(order), batch)] or [[0]]
        padded_epoch = sum(max(b) * len(b) for b in batches) * rows_per_example
        epochs = steps / per_epoch
        tokens = round(padded_epoch * epochs)
        factor = (4 if lora.enabled else 6) + (2 if training.gradient_checkpointing else 0) + extra
        size = engine.size
        body = size.body + (size.head if head else 0)
        stage.steps = steps
        stage.tally.train_tokens += tokens
        stage.cost.train += factor * body * tokens / engine.device.train_flops
        stage.cost.setup += self.assume["trainer_setup_s"] + engine.weight_bytes / 1e9  # + saving
        stage.cost.load += self.price.load(engine)
        if extra and not lora.enabled:  # TRL loads a separate reference model
            stage.cost.load += self.price.load(engine)
        self.training.append(f"{stage.name} {factor:g} x N ({'LoRA' if lora.enabled else 'full'}"
                             f"{', checkpointing' if training.gradient_checkpointing else ''}"
                             f"{', reference pass' if extra else ''})")
        self.world = world

    def label_prefs(self, stage: StagePlan) -> None:
        from cai_cli.engines.judge import Judge
        from cai_cli.engines.prompts import answer_prompt
        from cai_cli.stages import label_prefs
        from cai_cli.stages.common import checkpoint_batches

        config, settings = self.config, self.config.label_prefs
        prompts = self.prompts("data.red_team", lambda: label_prefs.select_prompts(config),
                               config.data.red_team,
                               settings.limit or config.data.red_team.limit, stage.name)
        policy = self.engine("label-prefs answers", label_prefs.policy_model(config),
                             "label_prefs.policy")
        fmt = self.fmt(config.generate_sl.prompt_format, policy, "generate_sl.prompt_format")
        n, new = settings.responses_per_prompt, settings.sampling.max_new_tokens
        if settings.policy is None:
            self.needs(stage, "finetune")
        self.pairs_by_prompt = {}
        stage.cost.load += self.price.load(policy)
        for batch in checkpoint_batches(prompts, settings.prompts_per_checkpoint):
            self.price.calls(policy, [answer_prompt(p.text, fmt, config.generate_sl.system_prompt)
                                      for p in batch for _ in range(n)],
                             [0] * (len(batch) * n), new, stage.tally, stage.cost)
        feedback = self.engine("label-prefs judge", config.feedback_model,
                               "models.feedback" if config.models.feedback else "models.policy")
        stage.cost.load += self.price.load(feedback)
        records = [{"id": p.id, "prompt": p.text, "responses": [f"answer {j}" for j in range(n)]}
                   for p in prompts]
        judge = Judge(config, self.constitution, feedback.counter,
                      principles_per_pair=settings.principles_per_pair,
                      pairs_per_prompt=settings.pairs_per_prompt)
        passes = 0
        for group in checkpoint_batches(records, settings.prompts_per_checkpoint):
            pairs, jobs = judge.plan(group)
            for _, record, _, _ in pairs:
                self.pairs_by_prompt[record["id"]] = self.pairs_by_prompt.get(record["id"], 0) + 1
            passes += self._judge(feedback, judge, jobs, 2 * new, stage)
        pairs = sum(self.pairs_by_prompt.values())
        self.pair_tokens = self._pair_tokens(policy, prompts, new)
        stage.counts = {"prompts": len(prompts), "answers": len(prompts) * n, "pairs": pairs,
                        "judge_passes": passes}
        stage.notes.append("pairs at most: two identical answers make no pair")

    def _judge(self, feedback: Engine, judge, jobs: list, answer_bound: int,
               stage: StagePlan) -> int:
        """The judge's forward passes over ``jobs`` (its reasoning first with chain of thought);
        returns the number of scoring passes."""
        settings = self.config.label_prefs
        cot = settings.chain_of_thought
        if not jobs:
            return 0
        questions = [_blank(job).prompt_input(judge.fmt, cot) for job in jobs]
        if cot:
            self.price.calls(feedback, questions, [answer_bound] * len(jobs),
                             settings.cot_max_new_tokens, stage.tally, stage.cost)
            reasoning = settings.cot_max_new_tokens
            questions = [_blank(job).prompt_input(judge.fmt, True, "") for job in jobs]
            self.price.calls(feedback, questions, [answer_bound + reasoning] * len(jobs), 0,
                             stage.tally, stage.cost)
        else:
            self.price.calls(feedback, questions, [answer_bound] * len(jobs), 0, stage.tally,
                             stage.cost)
        return len(jobs)

    def _pair_tokens(self, engine: Engine, prompts: list, new: int) -> list[tuple[int, int]]:
        """Tokens of (prompt + chosen, prompt + rejected) of each pair, answers at their bound."""
        out = []
        for p in prompts:
            length = engine.counter.conversation_tokens(
                [{"role": "user", "content": p.text}, {"role": "assistant", "content": ""}]) + new
            out += [(length, length)] * self.pairs_by_prompt.get(p.id, 0)
        return out

    def _pairs(self, stage: StagePlan, engine: Engine) -> list[dict]:
        """The labelled pairs a training stage reads: from prefs/pairs.jsonl when it is complete
        and label-prefs will not run, else label-prefs' planned pairs (at most)."""
        config = self.config
        if "label-prefs" not in self.running and _complete(config, "label-prefs"):
            from cai_cli.run import records
            from cai_cli.run.records import Pair, conversation

            out = []
            for pair in records.read(config.layout.pairs, Pair):
                prompt = conversation(pair.prompt)
                tokens = tuple(engine.counter.conversation_tokens(prompt + conversation(answer))
                               for answer in (pair.chosen, pair.rejected))
                out.append({"group": pair.prompt_id or pair.id, "p_chosen": pair.p_chosen,
                            "tokens": tokens})
            stage.notes.append(f"pairs from {config.layout.pairs}")
            return out
        if not self.pairs_by_prompt:  # label-prefs is not planned: plan it for its counts
            self.label_prefs(StagePlan("label-prefs", False, ""))
        stage.notes.append("pairs: as label-prefs will make them, at most")
        groups = [g for g, n in self.pairs_by_prompt.items() for _ in range(n)]
        return [{"group": g, "p_chosen": 1.0, "tokens": t}
                for g, t in zip(groups, self.pair_tokens)]

    def train_rm(self, stage: StagePlan) -> None:
        from cai_cli.stages import train_rm

        config, settings = self.config, self.config.train_rm
        model, key = train_rm.base_model(config)
        engine = self.engine("train-rm", model, key)
        self.needs(stage, "label-prefs")
        pairs = self._pairs(stage, engine)
        train, held = train_rm.split(config, pairs) if pairs else ([], [])
        kept = [p for p in train if abs(p["p_chosen"] - 0.5) >= settings.min_confidence]
        mixed = math.floor(settings.mix_ratio * len(kept)) if settings.mix is not None else 0
        if mixed:
            try:
                mixed = len(train_rm.mixed_pairs(config, mixed))
            except UserError as exc:
                if settings.mix.dataset is None or "cannot load" not in str(exc):
                    raise
                self.note(f"train_rm.mix: '{settings.mix.dataset}' is not on this machine: "
                          f"assumed {mixed} pairs of max_length tokens")
        lengths = [max(p["tokens"]) for p in kept] + [settings.training.max_length] * mixed
        lengths = [min(n, settings.training.max_length) for n in lengths]
        stage.counts = {"ai_pairs": len(pairs), "train_pairs": len(kept),
                        "held_out_pairs": len(held),
                        "mixed_pairs": mixed}
        # The reward head is one output: no vocabulary-sized head to pass through.
        self._train(stage, engine, settings.training, settings.lora, lengths, extra=0,
                    rows_per_example=2, head=False)
        measured = sum(sum(p["tokens"]) for p in pairs)  # accuracy and calibration afterwards
        stage.cost.prefill += self.price.prefill(engine, measured)
        stage.tally.computed_tokens += measured

    def optimize(self, stage: StagePlan) -> None:
        from cai_cli.stages import optimize

        config, settings = self.config, self.config.optimize
        engine = self.engine("optimize", optimize.policy_model(config), "optimize.model")
        limit = settings.training.max_length
        if settings.model is None:
            self.needs(stage, "finetune")
        self.needs(stage, "label-prefs" if settings.method == "dpo" else "train-rm")
        if settings.method == "dpo":
            pairs = self._pairs(stage, engine)
            lengths = [min(max(p["tokens"]), limit) for p in pairs
                       if abs(p["p_chosen"] - 0.5) >= settings.min_confidence]
            stage.counts = {"pairs": len(pairs), "train_pairs": len(lengths)}
            self._train(stage, engine, settings.training, settings.lora, lengths, extra=2,
                        rows_per_example=2)
            return
        # GRPO / RLOO: each optimiser step samples per_device_batch_size x
        # gradient_accumulation_steps completions (num_generations per prompt), scores them with
        # the reward model and trains on them.
        from cai_cli.data.sources import load_prompts

        prompts = list(self.sl_prompts or self._red_team())
        if settings.include_helpful and config.data.helpful is not None:
            helpful = config.data.helpful
            prompts += self.prompts("data.helpful", lambda: load_prompts(helpful, config.seed,
                                                                          "data.helpful"),
                                    helpful, helpful.limit, stage.name)
        group, new = settings.num_generations, settings.max_completion_length
        lengths = [engine.counter.conversation_tokens(
            [{"role": "user", "content": p.text}, {"role": "assistant", "content": ""}]) + new
            for p in prompts for _ in range(group)]
        stage.counts = {"prompts": len(prompts), "completions": len(lengths)}
        self._train(stage, engine, settings.training, settings.lora, lengths,
                    extra=2 if settings.beta > 0 else 0)
        training = settings.training
        rows = training.per_device_batch_size * training.gradient_accumulation_steps
        stage.tally.generated_tokens += stage.steps * rows * new
        stage.tally.decode_steps += stage.steps * new
        context = sum(lengths) // max(len(lengths), 1) - new // 2
        step = self.price.decode_step(engine, rows, rows * context)
        stage.cost.decode += stage.steps * new * step
        from cai_cli.stages import train_rm

        rm = self.engine("optimize reward", train_rm.base_model(config)[0], "train_rm.model")
        stage.cost.prefill += self.price.prefill(rm, stage.tally.train_tokens)
        stage.cost.load += self.price.load(rm)
        stage.notes.append(f"{new} tokens a completion (max_completion_length); TRL generates "
                           "with transformers unless its vLLM options are set")

    def evaluate(self, stage: StagePlan) -> None:
        from cai_cli.engines.judge import Judge
        from cai_cli.engines.prompts import answer_prompt, classification_prompt
        from cai_cli.stages import evaluate

        config, settings = self.config, self.config.evaluate
        prompts = self.prompts("data.red_team", lambda: evaluate.select_prompts(config),
                               config.data.red_team,
                               settings.limit + settings.helpful_limit + settings.benign_limit,
                               stage.name)
        try:
            red_count = len(evaluate.prompt_sets(config)[0])
        except UserError:  # placeholders for a dataset that is not here: red-team ones first
            red_count = settings.limit
        red, benign = prompts[:red_count], prompts[red_count:]
        paths = evaluate.model_paths(config)
        for name in paths:
            if name in evaluate.RUN_MODELS:
                self.needs(stage, evaluate.RUN_MODELS[name])
        new = settings.sampling.max_new_tokens
        for name, path in paths.items():
            engine = self.engine(f"evaluate {name}", config.models.policy.model_copy(
                update={"name_or_path": path}), f"evaluate.models ({name})")
            fmt = self.fmt(config.generate_sl.prompt_format, engine, "generate_sl.prompt_format")
            stage.cost.load += self.price.load(engine)
            self.price.calls(engine, [answer_prompt(p.text, fmt, config.generate_sl.system_prompt)
                                      for p in prompts], [0] * len(prompts), new, stage.tally,
                             stage.cost)
        feedback = self.engine("evaluate judge", *evaluate.judge_model(config))
        stage.cost.load += self.price.load(feedback)
        judge = Judge(config, self.constitution, feedback.counter,
                      principles_per_pair=settings.principles_per_pair, pairs_per_prompt=None)
        # helpfulness: one question per pair of answers to a benign prompt
        helpful = evaluate.helpfulness_judge(config, self.constitution, feedback.counter)
        model_pairs = len(paths) * (len(paths) - 1) // 2
        passes = 0
        for asking, those in ((judge, red), (helpful, benign)):
            records = [{"id": p.id, "prompt": p.text, "responses": ["a", "b"]} for p in those]
            for _ in range(model_pairs):
                passes += self._judge(feedback, asking, asking.plan(records)[1], 2 * new, stage)
        # the yes/no questions: each answer, both orders of the options
        questions = self.constitution.evaluation
        asked = [classification_prompt(p.text, "", question, yes_first, judge.fmt)
                 for question, those in ((questions.harmful, red), (questions.refusal, benign))
                 for p in those for yes_first in (True, False)] * len(paths)
        self.price.calls(feedback, asked, [new] * len(asked), 0, stage.tally, stage.cost)
        passes += len(asked)
        scored = 0
        if settings.reward_model and ("train-rm" in self.running or _complete(config, "train-rm")):
            from cai_cli.stages import train_rm

            rm = self.engine("evaluate reward", train_rm.base_model(config)[0], "train_rm.model")
            lengths = [rm.counter.conversation_tokens(
                [{"role": "user", "content": p.text}, {"role": "assistant", "content": ""}]) + new
                for p in prompts]
            scored = sum(lengths) * len(paths)
            stage.cost.load += self.price.load(rm)
            stage.cost.prefill += self.price.prefill(rm, scored)
            stage.tally.computed_tokens += scored
        stage.counts = {"models": len(paths), "prompts": len(red), "benign_prompts": len(benign),
                        "answers": len(paths) * len(prompts), "judge_passes": passes,
                        "reward_scores": len(paths) * len(prompts) if scored else 0}
        stage.notes.append("judge passes at most: identical answers are a tie, not judged")


def _blank(job):
    """A judge's question with the two answers left empty (their tokens are added as a bound)."""
    return dataclasses.replace(job, first="", second="")


def _complete(config: Config, command: str) -> bool:
    from cai_cli.run.artifacts import load_manifest

    manifest = load_manifest(config.layout.stage_dir(command))
    return bool(manifest and manifest.get("status") == "complete")


def _human(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


# ---------------------------------------------------------------------------------------------
# Calibration: time real batches, scale the device figures


def calibrate(planner: Planner) -> list[str]:
    """Load the policy with its engine, time a scoring pass over critique-sized prompts and a
    short generation, load finetune's model through transformers and time a training step, and
    set the device figures to what they measured (``planner.assume``). Returns lines for the
    report, the last one the ``--assume`` options that reproduce the figures."""
    from cai_cli.engines import load_backend
    from cai_cli.engines.base import SamplingParams
    from cai_cli.engines.prompts import critique_prompt
    from cai_cli.stages.generate_sl import Plan as Draws

    config, assume, price = planner.config, planner.assume, planner.price
    if config.models.policy.remote:
        raise UserError("--calibrate times models on this machine, and models.policy is behind a "
                        "server; leave --calibrate out, or set the figures with --assume")
    policy = planner.engine("generate-sl", config.models.policy, "models.policy")
    prompts = planner._red_team()
    rows = min(policy.batch, 8)
    sample = (prompts * rows)[:rows]
    ui.info(f"calibrating: loading {policy.name} ({policy.kind} on {policy.device.name})")
    started = time.perf_counter()
    backend = load_backend(config.models.policy, "models.policy")
    loaded = time.perf_counter() - started
    fmt = planner.fmt(config.generate_sl.prompt_format, policy, "generate_sl.prompt_format")
    draws = Draws(config, planner.constitution, sample[0])
    answer = "I can help with that. " * 16
    long = [critique_prompt(p.text, answer, draws.principles[0], draws.examples, fmt)
            for p in sample]
    # Prompt processing: a scoring pass over critique-sized prompts (shared prefixes once).
    tally = Tally()
    price.calls(policy, long, [0] * len(long), 0, tally, Cost())
    backend.score_options(long[:2], ("A", "B"))  # warm-up
    started = time.perf_counter()
    backend.score_options(long, ("A", "B"))
    scored = time.perf_counter() - started
    flops = 2 * policy.size.body * tally.computed_tokens / scored
    # Decoding: 16 sampled tokens after the same prompts (a critique turn's context), the prompts
    # priced at the rate just measured.
    started = time.perf_counter()
    results = backend.generate(long, SamplingParams(max_new_tokens=16, temperature=1.0),
                               seeds=list(range(len(long))))
    generated = time.perf_counter() - started
    backend.close()
    steps = max(getattr(r, "tokens", 0) for r in results) or 1
    prefill = 2 * policy.size.body * tally.computed_tokens / flops
    step = max(generated - prefill, 1e-3) / steps
    price.decode_scale = 1.0
    scale = step / price.decode_step(policy, rows, tally.computed_tokens + rows * steps // 2)
    bare = _time_training(planner)
    train_flops = bare * assume["train_efficiency"]
    # The measured figures replace the assumed ones for every model on this device.
    device, options = policy.device, []
    load = max(loaded - policy.weight_bytes / 1e9, 0.2)
    if device.gpu:
        peak = device.flops / assume["mfu"]
        updates = {"mfu": flops / peak, "train_mfu": train_flops / peak}
    else:
        updates = {"cpu_gflops": flops / 1e9, "cpu_train_gflops": train_flops / 1e9}
    updates["decode_scale"] = scale
    if policy.kind == "vllm":  # the load was mostly vLLM starting: graph capture, compilation
        start = load - assume["load_s"]
        updates["engine_start_s"] = max(start * 3 if config.models.policy.enforce_eager
                                        else start, 0.0)
    else:
        updates["load_s"] = load
    for key, value in updates.items():
        if key not in assume.given:
            assume.values[key] = value
            assume.given.add(key)
            options.append(f"--assume {key}={value:.3g}")
    price.decode_scale = assume["decode_scale"]
    planner.engines.clear()
    planner.roles.clear()
    planner.devices.clear()
    planner.used.clear()
    return [f"model load {loaded:.1f} s",
            f"prompt processing: {tally.computed_tokens:,} tokens in {scored:.1f} s = "
            f"{flops / 1e9:.0f} GFLOP/s",
            f"decoding: {steps} steps of {rows} rows in {generated - prefill:.1f} s = "
            f"{step * 1e3:.0f} ms a step ({scale:.2f}x the assumed figures)",
            f"training: a bare step {bare / 1e9:.0f} GFLOP/s, x {assume['train_efficiency']:g} "
            f"(train_efficiency) = {train_flops / 1e9:.0f} GFLOP/s in a stage",
            "reuse these figures without --calibrate: " + " ".join(options)]


def _time_training(planner: Planner) -> float:
    """FLOP/s of a training step of finetune's model at its micro-batch size and LoRA settings
    (the second of two steps, so start-up is not counted), on 128-token rows."""
    import torch

    from cai_cli.engines import models
    from cai_cli.stages import training
    from cai_cli.stages import finetune

    config, settings = planner.config, planner.config.finetune
    model_config, key = finetune.base_model(config)
    engine = planner.engine("finetune", model_config, key)
    device = models.check_device(model_config, key)
    ui.info(f"calibrating: a training step of {engine.name}")
    model = models.load_causal_lm(model_config, key, device).train()
    if settings.lora.enabled:
        import peft

        model = peft.get_peft_model(model, training.peft_config(settings.lora, "CAUSAL_LM"))
    batch, length = settings.training.per_device_batch_size, min(128, settings.training.max_length)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=generator).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-9)
    seconds = 0.0
    for _ in range(2):
        started = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    del model, optimizer
    models.free_device_memory()
    factor = 4 if settings.lora.enabled else 6
    return factor * (engine.size.body + engine.size.head) * batch * length / seconds


# ---------------------------------------------------------------------------------------------
# The command


@dataclass
class Plan:
    run_dir: str
    stages: list[StagePlan]
    assumptions: list[str]
    calibration: list[str] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return sum(s.cost.total for s in self.stages if s.runs)

    def to_json(self) -> dict:
        return {"run_dir": self.run_dir, "stages": [s.to_json() for s in self.stages],
                "total_seconds": round(self.seconds, 1), "assumptions": self.assumptions,
                "calibration": self.calibration}


def build_plan(config: Config, *, first: str | None = None, last: str | None = None,
               force: bool = False, assume: Sequence[str] = (),
               calibrate_now: bool = False) -> Plan:
    """The plan of ``cai run`` with these options; reads nothing but the data, the tokenizers,
    model configs and the run directory's manifests (and with ``calibrate_now``, the models)."""
    from cai_cli.stages.pipeline import select, statuses

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # plan never downloads
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    assumptions = Assumptions(assume)
    selected = select(first, last, config)
    states = {s.name: s for s in statuses(config)}
    running = {name for name in selected if force or states[name].state != "done"}
    planner = Planner(config, assumptions, running)
    stages = []
    for name in selected:
        status = states[name]
        why = ("--force" if force else f"{status.state}: {status.reason}") if name in running \
            else "up to date, skipped"
        stages.append(StagePlan(name, name in running, why))
    calibration = calibrate(planner) if calibrate_now else []
    builders = {"generate-prompts": planner.generate_prompts, "generate-sl": planner.generate_sl, "finetune": planner.finetune,
                "label-prefs": planner.label_prefs, "train-rm": planner.train_rm,
                "optimize": planner.optimize, "evaluate": planner.evaluate}
    for stage in stages:
        if stage.runs:
            builders[stage.name](stage)
            if stage.tally.too_long:
                stage.notes.append(f"{stage.tally.too_long:,} conversations may not fit their "
                                   "model's context at their bound: those that do not are "
                                   "skipped with a warning")
    lines = planner.lines()
    lines.append(f"generated tokens: max_new_tokens x {assumptions['answer_fraction']:g} "
                 "(answer_fraction): an upper bound, as decoding runs until every row of a batch "
                 "stops")
    lines.append("prompt tokens: the conversations rendered with the chat template, each "
                 "model-written part at its max_new_tokens bound; a prefix the rows of a batch "
                 "share (worked examples, system prompt) is computed once")
    lines.append(f"fixed costs: {assumptions['load_s']:.3g} s + 1 s a GB to load a model "
                 f"(load_s), {assumptions['trainer_setup_s']:.3g} s + 1 s a GB to set up a "
                 "training stage and save its model (trainer_setup_s), vLLM start-up "
                 f"{assumptions['engine_start_s']:.3g} s (engine_start_s)")
    if assumptions.given:
        lines.append("given or measured: " + ", ".join(
            f"{k}={_short(assumptions[k])}" for k in sorted(assumptions.given)))
    return Plan(config.run_dir, stages, lines, calibration)


def print_plan(config: Config, *, first: str | None = None, last: str | None = None,
               force: bool = False, assume: Sequence[str] = (), calibrate_now: bool = False,
               as_json: bool = False) -> None:
    plan = build_plan(config, first=first, last=last, force=force, assume=assume,
                      calibrate_now=calibrate_now)
    if as_json:
        print(json.dumps(plan.to_json(), indent=2))
        return
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE, title=f"plan for {config.run_dir}", title_justify="left")
    table.add_column("stage", no_wrap=True)
    table.add_column("time", justify="right", no_wrap=True)
    table.add_column("prompt\ntokens", justify="right", no_wrap=True)
    table.add_column("generated\ntokens ≤", justify="right", no_wrap=True)
    table.add_column("trained\ntokens", justify="right", no_wrap=True)
    table.add_column("steps", justify="right", no_wrap=True)
    table.add_column("time in", ratio=1)
    for stage in plan.stages:
        if not stage.runs:
            table.add_row(stage.name, "", "", "", "", "", f"[dim]{stage.why}[/]")
            continue
        parts = sorted(((getattr(stage.cost, name), name) for name in
                        ("load", "setup", "prefill", "decode", "train")), reverse=True)
        split = ", ".join(f"{name} {ui.duration(sec)}" for sec, name in parts if sec >= 0.5)
        tally = stage.tally
        table.add_row(stage.name, ui.duration(stage.cost.total), _count(tally.prompt_tokens),
                      _count(tally.generated_tokens), _count(tally.train_tokens),
                      _count(stage.steps), split)
    table.add_row("[bold]total[/]", f"[bold]{ui.duration(plan.seconds)}[/]", "", "", "", "", "")
    ui.stdout.print(table)
    if not any(stage.runs for stage in plan.stages):
        ui.stdout.print("Work: none, every stage is up to date (--force plans them again)",
                        markup=False)
    else:
        ui.stdout.print("Work:", markup=False)
    for stage in plan.stages:
        if stage.runs:
            work = ", ".join(f"{v:,} {k.replace('_', ' ')}" for k, v in stage.counts.items())
            notes = f" ({'; '.join(stage.notes)})" if stage.notes else ""
            ui.stdout.print(f"  - {stage.name}: {work}{notes}", markup=False, soft_wrap=True)
    ui.stdout.print("Assumptions (change any with --assume KEY=VALUE):", markup=False)
    for line in plan.assumptions:
        ui.stdout.print(f"  - {line}", markup=False, soft_wrap=True)
    if plan.calibration:
        ui.stdout.print("Calibration (measured here, now):", markup=False)
        for line in plan.calibration:
            ui.stdout.print(f"  - {line}", markup=False, soft_wrap=True)


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _count(value: int) -> str:
    if not value:
        return ""
    return _human(value) if value >= 10_000 else f"{value:,}"
