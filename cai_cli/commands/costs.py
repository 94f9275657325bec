"""The cost model of ``cai plan``: the assumptions (every figure the estimate rests on, each with
the ``--assume`` key that changes it), the devices, and the pricing of the stages' work
(``engines.work``) in seconds:

    prompt processing  2 * N * (prompt tokens, a prefix shared by a batch counted once) / FLOP/s
    decoding           per step of a batch: weights' bytes / bandwidth
                       + rows * 2 * N / decode FLOP/s + per-layer overhead
    training           k * N * (tokens, padded per micro-batch) / training FLOP/s, where k = 6
                       (full), 4 (LoRA: no weight gradients), +2 with gradient checkpointing,
                       +2 for the reference pass of DPO and GRPO / RLOO
    fixed              model loads, engine start-up, trainer set-up

N is the parameters a token passes through (the output head only where logits are needed).
The device figures are effective rates, not data-sheet peaks; ``--calibrate``
(``commands.calibrate``) measures them.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from cai_cli.config import AnyModelConfig, Config
from cai_cli.engines.base import PromptInput
from cai_cli.engines.sizes import ModelSize, model_size
from cai_cli.engines.work import Train, Work
from cai_cli.errors import UserError
from cai_cli.stages.pipeline import STAGES
from cai_cli.stages.planning import WorkContext

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
# Work: what a stage asks of an engine, in units the cost model prices


@dataclass
class Engine:
    """One model as an engine runs it (a role in a stage): its size, device and batching."""

    role: tuple[str, str]  # the stage and the config key that names the model in it
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
        from cai_cli.engines.hf import batch_order, prefix_groups

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
                         for members, length in prefix_groups(rows, [1] * len(rows)))
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
    """Prices the stages' work (``engines.work``) on the assumed devices; sizes and places each
    model once, and remembers what the assumptions list must say."""

    def __init__(self, config: Config, assume: Assumptions, ctx: WorkContext):
        self.config, self.assume, self.ctx = config, assume, ctx
        self.price = Pricer(assume)
        self.engines: dict[tuple, Engine] = {}
        self.roles: dict[tuple, list[str]] = {}
        self.world = 1
        self.devices: dict[str, list[str]] = {}  # how a device was assumed -> models on it
        self.training: list[str] = []  # "finetune 4 x N (LoRA)"

    def engine(self, role: tuple[str, str], model: AnyModelConfig, key: str) -> Engine:
        """A model as its engine runs it in some role (a stage and the config key that names
        the model there); sized, placed and tokenised once."""
        name = self.ctx.base_of(model.name_or_path)
        cache_key = (name, model.backend, getattr(model, "device", None))
        if cache_key in self.engines:
            engine = self.engines[cache_key]
            if role not in self.roles[cache_key]:
                self.roles[cache_key].append(role)
            return replace(engine, role=role, config=model)
        config, ctx = self.config, self.ctx
        policy = ctx.base_of(config.models.policy.name_or_path)
        feedback = ctx.base_of(config.feedback_model.name_or_path)
        known_as = "policy" if name == policy else "feedback" if name == feedback else name
        given = self.assume.params.get(known_as, self.assume.params.get(name))
        size = model_size(name, getattr(model, "revision", None), key, given=given,
                          given_as=f"--assume params.{known_as}",
                          hint=f"; give it, e.g. --assume params.{known_as}=1.5e9")
        device = device_for(model, self.assume)
        engine = Engine(role, name, model, size, device, ctx.tokens(model, key),
                        bytes_per_param(model, device))
        self.engines[cache_key] = engine
        self.roles[cache_key] = [role]
        self.devices.setdefault(device.why, []).append(name)
        return engine

    def stage(self, stage: StagePlan, work: Work) -> None:
        """Price one stage's work: each engine loaded once, each call, each training run."""
        loaded: set[tuple] = set()
        for call in work.calls:
            engine = self.engine((stage.name, call.role), call.model, call.role)
            if call.kind == "train":
                self.train(stage, engine, call)
                loaded.add((call.role, engine.name))
                continue
            if (call.role, engine.name) not in loaded:
                loaded.add((call.role, engine.name))
                stage.cost.load += self.price.load(engine)
            if call.kind == "forward":
                tokens = sum(call.tokens)
                stage.cost.prefill += self.price.prefill(engine, tokens)
                stage.tally.computed_tokens += tokens
            else:
                new = call.max_new_tokens if call.kind == "generate" else 0
                self.price.calls(engine, call.prompts, call.bounds, new, stage.tally, stage.cost)
        stage.counts = dict(work.counts)
        stage.notes += work.notes
        for need in STAGES[stage.name].needs(self.config):
            command = need.stage.command
            if need.required and not self.ctx.runs(command) and not self.ctx.complete(command):
                stage.notes.append(f"needs the output of {command}, which is missing: the run "
                                   "would stop here")
        if stage.tally.too_long:
            stage.notes.append(f"{stage.tally.too_long:,} conversations may not fit their "
                               "model's context at their bound: those that do not are skipped "
                               "with a warning")

    def train(self, stage: StagePlan, engine: Engine, call: Train) -> None:
        """Steps and time of one training run: FLOPs a token x tokens (each micro-batch padded
        to its longest example), the model's load, set-up and save; for online RL, sampling
        the completions and scoring them with the reward model."""
        world = int(self.assume["world_size"] or os.environ.get("WORLD_SIZE") or 1)
        training, lora = call.training, call.lora
        steps, per_epoch = call.steps(world), call.steps_per_epoch(world)
        order = list(call.examples)
        random.Random(self.config.seed).shuffle(order)
        batch = training.per_device_batch_size
        batches = [order[i:i + batch] for i in range(0, len(order), batch)] or [[0]]
        padded_epoch = sum(max(b) * len(b) for b in batches) * call.rows_per_example
        tokens = round(padded_epoch * steps / per_epoch)
        factor = ((4 if lora.enabled else 6) + (2 if training.gradient_checkpointing else 0)
                  + (2 if call.reference else 0))
        size = engine.size
        body = size.body + (size.head if call.head else 0)
        stage.steps = steps
        stage.tally.train_tokens += tokens
        stage.cost.train += factor * body * tokens / engine.device.train_flops
        stage.cost.setup += self.assume["trainer_setup_s"] + engine.weight_bytes / 1e9  # + saving
        stage.cost.load += self.price.load(engine)
        if call.reference and not lora.enabled:  # TRL loads a separate reference model
            stage.cost.load += self.price.load(engine)
        self.training.append(f"{stage.name} {factor:g} x N ({'LoRA' if lora.enabled else 'full'}"
                             f"{', checkpointing' if training.gradient_checkpointing else ''}"
                             f"{', reference pass' if call.reference else ''})")
        self.world = world
        if call.completions_per_step:
            rows, new = call.completions_per_step, call.completion_tokens
            stage.tally.generated_tokens += steps * rows * new
            stage.tally.decode_steps += steps * new
            context = sum(call.examples) // max(len(call.examples), 1) - new // 2
            stage.cost.decode += steps * new * self.price.decode_step(engine, rows, rows * context)
            rm = self.engine((stage.name, "reward"), call.reward_model, "train_rm.model")
            stage.cost.prefill += self.price.prefill(rm, stage.tally.train_tokens)
            stage.cost.load += self.price.load(rm)

    def lines(self) -> list[str]:
        """The assumptions list: each model once, then what the stages assumed."""
        out, names = [], {}
        for key, engine in self.engines.items():
            where = ("behind a server" if engine.config.remote
                     else f"{engine.kind} on {engine.device.name} ({engine.bytes_per_param} "
                          "bytes a weight)")
            names.setdefault(engine.name, []).append(f"{_roles(self.roles[key])}: {where}")
        for name, uses in names.items():
            size = next(e.size for e in self.engines.values() if e.name == name)
            shape = "" if "unknown" in size.source else f", {size.layers} layers"
            out.append(f"{name}: {human(size.params)} parameters from {size.source}{shape}; "
                       + "; ".join(uses))
        for what, counts in self.ctx.unread.items():
            out.append(f"{what} is not on this machine: its limit taken as the count, "
                       f"{', '.join(counts)} prompts of {int(self.assume['prompt_tokens'])} tokens "
                       "(prompt_tokens)")
        for why, models in self.devices.items():
            out.append(f"device of {', '.join(dict.fromkeys(models))}: {why}")
        out += self.ctx.notes
        if self.training:
            world = self.world
            out.append(f"training FLOPs a token: {', '.join(self.training)}; micro-batches padded "
                       f"to their longest example; {world} training process"
                       f"{'es' if world > 1 else ''} (world_size)")
        return out


def _roles(roles: list[tuple[str, str]]) -> str:
    """``generate-sl, label-prefs (label_prefs.policy, models.feedback), ...``: each stage once,
    with the config keys that name the model in it where there are several."""
    keys: dict[str, list[str]] = {}
    for stage, key in roles:
        keys.setdefault(stage, []).append(key)
    return ", ".join(stage if len(found) == 1 else f"{stage} ({', '.join(found)})"
                     for stage, found in keys.items())


def human(value: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.0f}"


# ---------------------------------------------------------------------------------------------
# The command


