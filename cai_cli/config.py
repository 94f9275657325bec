"""The config: pydantic models (every field documented where it is declared), YAML loading,
``--set`` overrides typed by the schema, and error messages that name the dotted path.

Precedence: schema default < YAML < ``--set``. Every model forbids unknown keys, and all
validation errors are reported together, each with the closest valid name for a misspelt key.
"""

from __future__ import annotations

import difflib
import json
import re
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError,
                      field_validator, model_validator)

from cai_cli.errors import UserError, relative_note, watch_secret_variables
from cai_cli.run.layout import RunLayout
from cai_cli.validation import describe, nested_models, problem_list, unwrap


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, docstrings document fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True,
                              frozen=True)  # changed only through model_copy


# ---------------------------------------------------------------------------------------------
# Data


class PromptSource(Section):
    """Where prompts come from: a local file (``path``) or a dataset (``dataset``)."""

    path: Optional[str] = None
    """Local file with one prompt per record: .jsonl, .json, .csv or .parquet."""
    dataset: Optional[str] = None
    """Dataset id or local dataset directory, read with ``datasets.load_dataset``."""
    split: str = "train"
    """Split of ``dataset`` to read."""
    data_dir: Optional[str] = None
    """Optional ``data_dir`` passed to ``datasets.load_dataset`` (e.g. ``red-team-attempts``)."""
    field: str = "prompt"
    """Column holding the prompt. Strings that are Human:/Assistant: transcripts (Anthropic HH
    style) are reduced to the first human turn; a list of chat messages to its first user turn."""
    limit: Optional[int] = Field(None, ge=1)
    """Keep at most this many prompts (after de-duplication and the seeded shuffle)."""

    @model_validator(mode="after")
    def _one_source(self) -> "PromptSource":
        if (self.path is None) == (self.dataset is None):
            raise ValueError("give exactly one of 'path' (a local file) or 'dataset' (a dataset id)")
        return self


class DataConfig(Section):
    red_team: PromptSource
    """Red-team prompts: answered, critiqued and revised by SL-CAI."""
    helpful: Optional[PromptSource] = None
    """Optional helpfulness data, mixed into later stages so the model does not learn to refuse
    everything."""


# ---------------------------------------------------------------------------------------------
# Models


class BaseModelConfig(Section):
    """What every model has, whatever engine runs it. Each engine has a subclass with its own
    ``backend`` name and settings, listed in ``MODEL_CONFIGS``: a model's ``backend`` key picks
    the class its settings are checked against."""

    name_or_path: str
    """Hugging Face hub id or local directory (save_pretrained layout); for ``backend: openai``
    the model's name on the server."""
    backend: str
    """Inference engine: ``hf`` (transformers in this process, batched), ``vllm`` (offline vLLM
    in this process) or ``openai`` (any OpenAI-compatible server: vLLM, SGLang, TGI, llama.cpp,
    a hosted API)."""
    # "module:Class" of the engine (a ``cai_cli.engines.base.Backend``) that runs these models,
    # imported when one is loaded: engines import heavy libraries.
    engine: ClassVar[str]
    # Served by another process or machine: no local files, device or weights to check here.
    remote: ClassVar[bool] = False

    def transformers_config(self) -> "HFModelConfig":
        """The same model's weights loaded through transformers on this machine: what the
        training stages fine-tune and what loads a reward model from this model's settings."""
        fields = HFModelConfig.model_fields
        return HFModelConfig(**{k: v for k, v in self.model_dump().items()
                                if k in fields and k != "backend"})


class LocalModelConfig(BaseModelConfig):
    """A model whose weights are read on this machine (``hf`` and ``vllm``)."""

    device: str = "auto"
    """``auto`` (cuda, then mps, then cpu), or a torch device such as ``cpu`` or ``cuda:1``."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights dtype. ``auto``: bfloat16 on a GPU that supports it, else float32."""
    max_context: Optional[int] = Field(None, ge=16)
    """Longest prompt plus new tokens the model may see; default: the model's own limit.
    A conversation that does not fit is skipped with a warning, never truncated silently."""
    revision: Optional[str] = None
    """Hub revision (branch, tag or commit) to load."""
    trust_remote_code: bool = False
    """Allow model code from the hub repository to run."""


class HFModelConfig(LocalModelConfig):
    """A model run by transformers in this process (``backend: hf``)."""

    backend: Literal["hf"] = "hf"
    engine: ClassVar[str] = "cai_cli.engines.hf:HFBackend"
    forward_batch_size: int = Field(16, ge=1)
    """Rows per forward pass of the engine (prompts are sorted by length before batching;
    formerly ``batch_size``)."""

    def transformers_config(self) -> "HFModelConfig":
        return self


class VLLMModelConfig(LocalModelConfig):
    """A model run by vLLM's offline engine in this process (``backend: vllm``): continuous
    batching, paged attention and prefix caching; ``device`` and ``dtype`` also apply to the
    stages that train it with transformers."""

    backend: Literal["vllm"] = "vllm"
    engine: ClassVar[str] = "cai_cli.engines.vllm:VLLMBackend"
    tensor_parallel_size: int = Field(1, ge=1)
    """GPUs one copy of the model is split over (vLLM's tensor_parallel_size)."""
    gpu_memory_utilization: Optional[float] = Field(None, gt=0.0, le=1.0)
    """Share of the device's memory vLLM takes for weights and KV cache; default 0.9 on a
    GPU, 0.3 on a CPU (where it is a share of the machine's memory)."""
    enforce_eager: bool = False
    """Skip CUDA-graph capture and compilation: starts about 3x faster, decodes slower
    on a GPU (on a CPU the difference is small)."""


class OpenAIModelConfig(BaseModelConfig):
    """A model behind an OpenAI-compatible HTTP server (``backend: openai``): ``vllm serve``,
    SGLang, TGI, llama.cpp's server or a hosted API. ``name_or_path`` (alias ``model``) is the
    model's name on the server."""

    backend: Literal["openai"] = "openai"
    engine: ClassVar[str] = "cai_cli.engines.openai:OpenAIBackend"
    remote: ClassVar[bool] = True
    base_url: str = "http://127.0.0.1:8000/v1"
    """The server's OpenAI API root, ending in ``/v1``."""
    api_key_env: Optional[str] = None
    """Name of the environment variable that holds the API key (e.g.
    ``OPENAI_API_KEY``); the key is read from there only and never written anywhere. None: no
    key (a local server)."""
    max_concurrency: int = Field(8, ge=1)
    """Requests in flight at once."""
    timeout: float = Field(600.0, gt=0)
    """Seconds to wait for one response."""
    max_retries: int = Field(4, ge=0)
    """Retries of a request that failed to connect, timed out or got HTTP 408, 409, 429
    or 5xx, with exponential backoff (the ``openai`` client's own); then the stage stops with
    exit 2 and resumes where it stopped when rerun."""
    top_logprobs: int = Field(20, ge=1)
    """Alternatives per token asked for when reading option probabilities (OpenAI's
    API allows at most 20; vLLM up to its ``--max-logprobs``)."""
    max_context: Optional[int] = Field(None, ge=16)
    """The model's context, when the server does not say (vLLM does); a conversation
    the server refuses as too long is skipped with a warning."""

    @model_validator(mode="before")
    @classmethod
    def _model_alias(cls, data: Any) -> Any:
        """``model`` (the name OpenAI's API uses) is accepted for ``name_or_path``."""
        if isinstance(data, dict) and "model" in data:
            if "name_or_path" in data:
                raise ValueError("give the model's name once: name_or_path or model")
            data = {("name_or_path" if k == "model" else k): v for k, v in data.items()}
        return data


# Every model config class, one per engine. Adding an engine: a class here, with its
# ``backend`` name and ``engine``, and the engine's module under cai_cli/backends/.
MODEL_CONFIGS: tuple[type[BaseModelConfig], ...] = (HFModelConfig, VLLMModelConfig,
                                                    OpenAIModelConfig)
MODEL_BACKENDS: dict[str, type[BaseModelConfig]] = {
    cls.model_fields["backend"].default: cls for cls in MODEL_CONFIGS}
DEFAULT_BACKEND = "hf"  # a model without a backend key
AnyModelConfig = Union[MODEL_CONFIGS]  # type: ignore[valid-type]
# The settings of a model that loads through transformers (loading, training, checks).
ModelConfig = HFModelConfig


def _judge_kind(entry: Any) -> str:
    """Which kind of ``evaluate.judges`` entry: ``feedback`` (any text) or a model's engine."""
    if isinstance(entry, dict):
        return str(entry.get("backend", DEFAULT_BACKEND))
    return getattr(entry, "backend", "feedback")


# An entry of ``evaluate.judges``: the word ``feedback``, or a model config (one class per
# engine, picked by ``backend``); one discriminator, so a bad entry gets one message.
JudgeEntry = Annotated[Union[tuple(Annotated[cls, Tag(name)] for name, cls in MODEL_BACKENDS.items())
                             + (Annotated[Literal["feedback"], Tag("feedback")],)],
                       Discriminator(_judge_kind, custom_error_type="judge",
                                     custom_error_message="a judge is the word feedback or a model "
                                     "config with backend " + ", ".join(MODEL_BACKENDS))]


def model_identity(model: "BaseModelConfig | dict") -> tuple:
    """What makes two model configs the same model: the engine, ``name_or_path`` (a local
    directory by where it resolves), the revision and, for a server, its ``base_url``. Other
    settings (batch sizes, timeouts, the API key's variable) do not change the judge."""
    data = model.model_dump() if isinstance(model, BaseModel) else dict(model)
    backend = data.get("backend", DEFAULT_BACKEND)
    name = str(data.get("name_or_path") or "")
    cls = MODEL_BACKENDS.get(backend)
    if cls is not None and not cls.remote and name:
        path = Path(name).expanduser()
        if path.exists():
            name = str(path.resolve())
    base_url = data.get("base_url")
    if cls is not None and cls.remote:
        base_url = str(base_url or cls.model_fields["base_url"].default).rstrip("/")
    return backend, name, data.get("revision"), base_url


class ModelsConfig(Section):
    policy: AnyModelConfig = Field(discriminator="backend")
    """The helpful-only model that answers, critiques and revises."""
    feedback: Optional[AnyModelConfig] = Field(None, discriminator="backend")
    """The model that labels preferences; default: the same as ``policy``."""

    @model_validator(mode="before")
    @classmethod
    def _default_backend(cls, data: Any) -> Any:
        """``backend`` may be left out (the discriminated union needs it to pick the class)."""
        if isinstance(data, dict):
            data = {name: {"backend": DEFAULT_BACKEND, **value}
                    if name in cls.model_fields and isinstance(value, dict) else value
                    for name, value in data.items()}
        return data


# ---------------------------------------------------------------------------------------------
# Stages


class SamplingConfig(Section):
    max_new_tokens: int = Field(128, ge=1)
    """New tokens per turn at most."""
    temperature: float = Field(0.7, ge=0.0)
    """Sampling temperature; 0 means greedy decoding."""
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    top_k: int = Field(0, ge=0)
    """Keep only the k most likely tokens; 0 turns this off."""


class SampleSamplingConfig(SamplingConfig):
    """Sampling for label-prefs' answers: full temperature, for varied pairs."""

    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 means greedy decoding."""


class GreedySamplingConfig(SamplingConfig):
    """Sampling for evaluation: greedy by default, so comparisons are repeatable."""

    temperature: float = Field(0.0, ge=0.0)
    """Sampling temperature; 0 means greedy decoding."""


class GenerateSLConfig(Section):
    num_revisions: int = Field(2, ge=1, le=4)
    """Critique/revision rounds per prompt (1-4); a fresh principle is drawn each round."""
    few_shot: int = Field(2, ge=0)
    """Worked critique/revision examples from the constitution shown as earlier turns."""
    prompt_format: Literal["auto", "chat", "transcript"] = "auto"
    """``chat`` uses the tokenizer's chat template; ``transcript`` writes plain Human:/Assistant:/
    CritiqueRequest:/Critique:/RevisionRequest:/Revision: text for base models; ``auto`` picks
    chat when the tokenizer has a chat template."""
    system_prompt: Optional[str] = None
    """Optional system message put before every conversation (chat format only)."""
    prompts_per_checkpoint: int = Field(32, ge=1)
    """Prompts per checkpointed batch: an interrupted run resumes after the last whole batch.
    (Formerly ``batch_size``.)"""
    sampling: SamplingConfig = SamplingConfig()
    """Sampling for answers, critiques and revisions."""


class GeneratePromptsSamplingConfig(SamplingConfig):
    """Sampling for new prompts: full temperature, for variety."""

    max_new_tokens: int = Field(64, ge=1)
    """New tokens per turn at most."""
    temperature: float = Field(1.0, ge=0.0)
    """Sampling temperature; 0 means greedy decoding."""


class GeneratePromptsConfig(Section):
    enabled: bool = False
    """Include ``generate-prompts`` in ``cai run`` (``cai generate-prompts`` and
    ``cai run --from generate-prompts`` run it either way)."""
    seeds: Optional[PromptSource] = None
    """The seed prompts shown as examples; default: ``data.red_team``. Needed when
    ``data.red_team`` names this stage's output (``<run_dir>/prompts/red_team.jsonl``)."""
    include_helpful: bool = False
    """Also draw seed prompts from ``data.helpful``."""
    num_prompts: int = Field(64, ge=1)
    """New prompts asked for, before the filters."""
    per_request: int = Field(1, ge=1)
    """New prompts asked for in one request to the model (a numbered list)."""
    few_shot: int = Field(8, ge=1)
    """Seed prompts drawn for each request (seeded by the request), shown as a numbered list."""
    prompt_format: Literal["auto", "chat", "transcript"] = "auto"
    """``chat``: a user message asking for new requests; ``transcript``: a plain numbered list
    for a base model to continue; ``auto``: chat when the tokenizer has a chat template."""
    instruction: str = ("Here are some requests that people have sent to an AI assistant. Some "
                        "of them are harmful, unethical or tricky.")
    """Text above the examples."""
    sampling: GeneratePromptsSamplingConfig = GeneratePromptsSamplingConfig()
    """Sampling for the new prompts."""
    prompts_per_checkpoint: int = Field(32, ge=1)
    """Requests per checkpointed batch, and prompts per batch of the feedback filter: an
    interrupted run resumes after the last whole batch."""
    min_chars: int = Field(10, ge=1)
    """Drop new prompts shorter than this (characters)."""
    max_chars: int = Field(500, ge=1)
    """Drop new prompts longer than this (characters)."""
    min_readable: float = Field(0.8, ge=0.0, le=1.0)
    """Drop new prompts in which less than this share of the characters (spaces aside) are in
    plain words or numbers: letters of one script only (combining marks allowed), at most 40,
    with an ordinary shape of capitals, punctuation of any script around them allowed. Byte
    noise, run-together words (``coldWhydam``, ``x.x.X``), markup and addresses are not; a
    control or replacement character makes the whole prompt unreadable. 0 turns this off."""
    min_words: int = Field(3, ge=0)
    """Drop new prompts with fewer plain words than this (headings and fragments of a list); in
    scripts written without spaces (Chinese, Japanese, Thai...) each letter counts as a word."""
    ngram: int = Field(3, ge=1)
    """Word n-gram length of the near-duplicate filter."""
    max_overlap: float = Field(0.6, gt=0.0, le=1.0)
    """Drop a new prompt when more than this share of its word n-grams appear in the seeds and
    the prompts kept before it, taken together (near duplicates, stitched copies too)."""
    feedback_filter: bool = False
    """Ask the feedback model ``feedback_question`` about each new prompt (Yes/No, read from
    the options' log-probabilities, asked with Yes first and with No first and averaged, as
    ``label_prefs.prompt_format`` says; sampled verdicts, ``label_prefs.verdict_samples``,
    from a server without log-probabilities) and keep those it answers Yes."""
    feedback_question: str = "Is this a request that a careful assistant should handle with care?"
    """The yes/no question of ``feedback_filter``."""
    feedback_threshold: float = Field(0.5, ge=0.0, le=1.0)
    """Keep a prompt when the probability of Yes (the mean of both orders) is at least this.
    Changing it reuses the answers in ``prompts/feedback.jsonl``."""
    mix_seeds: float = Field(0.0, ge=0.0)
    """Seed prompts copied into the output per new prompt kept (drawn with ``seed``; 0: new
    prompts only), so ``data.red_team`` can name a mix of both."""

    @model_validator(mode="after")
    def _lengths(self) -> "GeneratePromptsConfig":
        if self.min_chars > self.max_chars:
            raise ValueError("min_chars must not be above max_chars")
        return self


class TrainingConfig(Section):
    """The training settings we type and check; anything else goes through ``trl_args``."""

    epochs: float = Field(1.0, gt=0)
    """Passes over the training data (ignored when ``max_steps`` is set)."""
    max_steps: Optional[int] = Field(None, ge=1)
    """Stop after this many optimiser steps; overrides ``epochs``."""
    learning_rate: float = Field(2e-5, gt=0)
    """Peak learning rate."""
    per_device_batch_size: int = Field(8, ge=1)
    """Training micro-batch: sequences per device per forward pass (TRL's
    ``per_device_train_batch_size``; formerly ``batch_size``)."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Forward passes per optimiser step."""
    max_length: int = Field(1024, ge=16)
    """Longest tokenised example; longer ones are cut at the end (an example left with no
    assistant tokens is dropped)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """Training precision (bf16 and fp16 are mixed precision). ``auto``: bf16 on a GPU that
    supports it, else fp32."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30% slower."""
    logging_steps: int = Field(10, ge=1)
    """Report the loss (progress bar, trackers) every this many steps."""
    save_steps: int = Field(100, ge=1)
    """Write a resumable checkpoint every this many steps (in a hidden ``.checkpoints``
    directory, deleted when training completes); a rerun resumes from the last one."""
    report_to: list[str] = ["none"]
    """Experiment trackers, e.g. ``[wandb]`` or ``[tensorboard]``; ``[none]`` for none."""
    trl_args: dict[str, Any] = {}
    """More arguments passed as is to TRL's trainer config (e.g. ``warmup_steps``, where a
    value below 1 is a share of all steps, ``lr_scheduler_type``, ``weight_decay``). Names are
    checked against TRL's fields; the settings above (and the seed, output directory,
    precision) must be set by their own keys."""


class RewardTrainingConfig(TrainingConfig):
    """Reward-model training: as TrainingConfig, with a lower default learning rate."""

    learning_rate: float = Field(1e-5, gt=0)
    """Peak learning rate."""


class PolicyTrainingConfig(TrainingConfig):
    """Policy optimisation: as TrainingConfig, with the small learning rate DPO/RL want."""

    learning_rate: float = Field(5e-7, gt=0)
    """Peak learning rate."""


class LoraConfig(Section):
    enabled: bool = False
    """Train LoRA adapters through peft instead of all weights."""
    r: int = Field(16, ge=1)
    """Adapter rank."""
    alpha: int = Field(32, ge=1)
    """Adapter scaling (lora_alpha)."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the adapter input."""
    target_modules: Union[list[str], Literal["all-linear"]] = "all-linear"
    """Module names to adapt (e.g. ``[q_proj, v_proj]``), or ``all-linear`` (every linear layer
    but the output head). Checked against the model's modules before training starts."""
    merge: bool = True
    """Save merged full weights (loads like any model); false saves the adapter alone (with
    the tokenizer), which loads through peft on top of the base model."""


class FinetuneConfig(Section):
    model: Optional[str] = None
    """Model to fine-tune (hub id or local directory); default: ``models.policy.name_or_path``.
    Revision and trust_remote_code come from ``models.policy``."""
    helpful_ratio: float = Field(0.0, ge=0.0)
    """Helpful examples from ``data.helpful`` per SL-CAI example (e.g. 1.0 mixes them 1:1),
    drawn with ``seed``, so the model does not learn to refuse everything. Needs
    ``data.helpful`` when above 0: its ``field`` holds a list of chat messages, a
    Human:/Assistant: transcript, or a prompt whose answer is in a ``response`` or
    ``completion`` column."""
    loss_on: Literal["completion", "assistant", "all"] = "completion"
    """Which tokens the loss is on. ``completion``: the final answer only (the revision, or the
    helpful example's last answer): examples go to TRL in its prompt-completion format, which
    masks the prompt itself, so any chat template works. ``assistant``: every assistant turn
    of whole conversations (TRL's ``assistant_only_loss``: needs a template that marks them with
    ``{% generation %}``, or one TRL knows how to mark). ``all``: whole conversations.
    (Replaces ``assistant_only_loss``: true is ``assistant``, false is ``all``.)"""
    training: TrainingConfig = TrainingConfig()
    """Optimisation settings."""
    lora: LoraConfig = LoraConfig()
    """Parameter-efficient fine-tuning."""


class LabelPrefsConfig(Section):
    policy: Optional[str] = None
    """Model that samples the answers to compare; default: ``<run_dir>/sft`` (made by
    ``cai finetune``)."""
    held_out: bool = False
    """Use red-team prompts that SL-CAI did not see (those after ``data.red_team.limit`` in the
    seeded order) instead of the same prompts."""
    limit: Optional[int] = Field(None, ge=1)
    """Label at most this many prompts."""
    responses_per_prompt: int = Field(2, ge=2)
    """Answers sampled per prompt (at least 2); pairs are formed from them."""
    pairs_per_prompt: Optional[int] = Field(None, ge=1)
    """Pairs per prompt; default: every pair of its answers."""
    sampling: SampleSamplingConfig = SampleSamplingConfig()
    """Sampling for the policy's answers."""
    principles_per_pair: int = Field(4, ge=1)
    """Comparison principles drawn per pair (the ensemble); each is scored in both orders."""
    few_shot: int = Field(0, ge=0)
    """Labelled comparison examples from the constitution shown before each question."""
    prompt_format: Literal["auto", "chat", "transcript"] = "auto"
    """How the feedback model is asked: ``chat`` (its chat template), ``transcript`` (plain
    Human:/Assistant: text for base models) or ``auto`` (chat when it has a template)."""
    chain_of_thought: bool = False
    """Let the feedback model reason ("Let's think step by step") before the probabilities
    of the options are read; the probabilities are then clamped to ``cot_clamp``."""
    cot_clamp: tuple[float, float] = (0.4, 0.6)
    """Range chain-of-thought probabilities are clamped to (CoT labels are over-confident)."""
    cot_max_new_tokens: int = Field(128, ge=1)
    """Longest reasoning the feedback model may write."""
    prompts_per_checkpoint: int = Field(16, ge=1)
    """Prompts per checkpointed batch: an interrupted run resumes after the last whole batch.
    (Formerly ``batch_size``.)"""
    verdict_samples: int = Field(1, ge=1)
    """For a feedback model behind a server that returns no log-probabilities (e.g. Anthropic's
    API): answers sampled per question, each naming an option. 1: one greedy answer, a hard
    0/1 label; more: sampled at temperature 1, the share naming each option. Each judgment
    records its ``label_source`` (``logprobs`` or ``verdict``)."""
    report_to: list[str] = ["none"]
    """Experiment trackers that receive the stage's figures (pairs, mean p_chosen, order
    disagreement, position bias, timings...) when it ends, e.g. ``[tensorboard]`` (event files
    in ``prefs/logs/``) or ``[wandb]``; ``[none]`` for none. As ``training.report_to``."""

    @model_validator(mode="after")
    def _clamp_range(self) -> "LabelPrefsConfig":
        low, high = self.cot_clamp
        if not 0.0 <= low <= 0.5 <= high <= 1.0:
            raise ValueError("cot_clamp must be [low, high] with 0 <= low <= 0.5 <= high <= 1")
        return self


class TrainRMConfig(Section):
    model: Optional[str] = None
    """Model under the reward head (hub id or local directory); default:
    ``models.policy.name_or_path``, the base the policy started from."""
    soft_labels: bool = True
    """Train on each pair's ``p_chosen`` as the target (binary cross-entropy on the reward
    difference); false: the usual hard loss, chosen always better."""
    min_confidence: float = Field(0.0, ge=0.0, le=0.5)
    """Drop pairs whose |p_chosen - 0.5| is below this (near-ties)."""
    mix: Optional[PromptSource] = None
    """Other preference data to mix in (e.g. helpfulness comparisons), any source the prompt
    loader reads, in TRL's preference format (prompt/chosen/rejected, conversational or
    plain, or chosen/rejected transcripts); its ``field`` is not used. Labels count as 1.0."""
    mix_ratio: float = Field(1.0, gt=0.0)
    """Mixed-in pairs per AI-labelled pair, at most (drawn with ``seed``)."""
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    """Share of the AI-labelled pairs held out to measure accuracy and calibration."""
    training: RewardTrainingConfig = RewardTrainingConfig()
    """Optimisation settings."""
    lora: LoraConfig = LoraConfig()
    """Parameter-efficient training (the reward head is always trained in full)."""


class RolloutVLLMConfig(Section):
    """How GRPO / RLOO sample their completions when ``models.policy.backend`` is ``vllm``: with
    TRL's own vLLM integration, which hands vLLM the new weights after every optimiser step. It
    needs CUDA GPUs. DPO samples nothing and ignores this section, as do the other backends
    (their completions come from transformers' ``generate``)."""

    mode: Literal["colocate", "server"] = "colocate"
    """``colocate``: a vLLM engine inside each training process, sharing its GPU.
    ``server``: a separate vLLM server on GPUs of its own (``trl vllm-serve``, see
    docs/commands/optimize.md), sent the new weights over NCCL."""
    server_url: Optional[str] = None
    """server: the root address of the rollout server, e.g. ``http://127.0.0.1:8000`` (no
    ``/v1``); required with ``mode: server``."""
    server_timeout: float = Field(240.0, gt=0)
    """server: seconds to wait for the server to answer before giving up."""
    gpu_memory_utilization: float = Field(0.3, gt=0.0, le=1.0)
    """colocate: share of each GPU's memory vLLM takes for weights and KV cache; the rest is
    left to training (``models.policy.gpu_memory_utilization`` is for the stages where vLLM
    has the GPU alone). For ``mode: server`` give it to the server's command instead."""
    tensor_parallel_size: int = Field(1, ge=1)
    """colocate: GPUs one vLLM copy is split over; must divide the number of training
    processes. For ``mode: server`` give it to the server's command instead."""
    sleep_mode: bool = False
    """colocate: offload vLLM's weights and KV cache while the optimiser steps (less GPU
    memory, slower steps)."""

    @field_validator("server_url")
    @classmethod
    def _server_root(cls, url: Optional[str]) -> Optional[str]:
        if url is not None:
            if not re.match(r"https?://[^/]", url):
                raise ValueError(f"must start with http:// or https:// (got '{url}')")
            if url.rstrip("/").endswith("/v1"):
                raise ValueError(f"the server's root, without /v1 (got '{url}'): TRL adds the "
                                 "paths it needs")
        return url


class OptimizeConfig(Section):
    method: Literal["dpo", "grpo", "rloo"] = "dpo"
    """``dpo``: TRL's DPOTrainer straight from the pairs. ``grpo`` / ``rloo``: online RL with
    TRL's GRPOTrainer / RLOOTrainer against the reward model in ``<run_dir>/rm`` (the paper used
    PPO; TRL 1.x has no PPO with a value head, and these are its PPO-style trainers, with a
    per-prompt group baseline instead of a critic)."""
    model: Optional[str] = None
    """Policy to optimise; default: ``<run_dir>/sft`` (made by ``cai finetune``)."""
    beta: float = Field(0.1, ge=0.0)
    """Strength of the pull towards the reference model (the starting policy): DPO's beta for
    ``dpo`` (must be above 0), the KL penalty coefficient for ``grpo`` / ``rloo`` (0: none)."""
    min_confidence: float = Field(0.0, ge=0.0, le=0.5)
    """dpo: drop pairs whose |p_chosen - 0.5| is below this."""
    soft_labels: bool = False
    """dpo: use each pair's ``p_chosen`` as its label (conservative DPO with a per-pair label
    smoothing of 1 - p_chosen); false: standard DPO."""
    num_generations: int = Field(4, ge=2)
    """grpo/rloo: completions sampled per prompt. ``training.per_device_batch_size`` counts
    completions, so it times ``gradient_accumulation_steps`` must be a multiple of this."""
    max_completion_length: int = Field(64, ge=1)
    """grpo/rloo: longest completion sampled."""
    include_helpful: bool = False
    """grpo/rloo: also train on the prompts of ``data.helpful``."""
    vllm: RolloutVLLMConfig = RolloutVLLMConfig()
    """grpo/rloo with ``models.policy.backend: vllm``: how vLLM samples the completions."""
    training: PolicyTrainingConfig = PolicyTrainingConfig()
    """Optimisation settings."""
    lora: LoraConfig = LoraConfig()
    """Parameter-efficient training; under LoRA the reference is the model with adapters off."""


class EvaluateConfig(Section):
    models: list[str] = ["base", "sft", "policy"]
    """Models to compare (two or more): ``base`` (``models.policy``), ``sft`` and ``policy``
    (this run's checkpoints), or any hub id or local directory."""
    held_out: bool = True
    """Use red-team prompts SL-CAI and label-prefs did not see (after ``data.red_team.limit``
    in the seeded order); false: the first prompts."""
    limit: int = Field(32, ge=1)
    """Red-team prompts to evaluate on."""
    helpful_limit: int = Field(0, ge=0)
    """Benign prompts from ``data.helpful`` for the helpfulness axis (win rates under the
    constitution's ``evaluation.helpful`` question, over-refusal rate)."""
    benign: Optional[PromptSource] = None
    """Benign prompts that merely sound risky ("How do I kill a Python process?"), for the
    helpfulness axis; default: the set shipped with cai_cli."""
    benign_limit: int = Field(16, ge=0)
    """Prompts of ``evaluate.benign`` to evaluate on; 0 for none."""
    judge: Optional[AnyModelConfig] = Field(None, discriminator="backend")
    """One judge: the same as ``judges: [this model]``."""
    judges: Optional[list[JudgeEntry]] = Field(None, min_length=1)
    """The jury: judges of the same answers, each the word ``feedback`` (the feedback model) or
    a model config (any engine), reported one by one and pooled (the mean of their
    probabilities); default: ``[feedback]``. Two entries are the same judge when engine,
    ``name_or_path``, revision and (for a server) ``base_url`` match. A gain counts only where
    the judges that did not label the training pairs see it: add a model other than the
    feedback model."""
    principles_per_pair: int = Field(4, ge=1)
    """Comparison principles per pair of answers to a red-team prompt, each judged in both
    orders."""
    sampling: GreedySamplingConfig = GreedySamplingConfig()
    """Sampling for the evaluated answers (greedy by default)."""
    reward_model: bool = True
    """Also score every answer with the reward model in ``<run_dir>/rm`` when it exists."""
    bootstrap: int = Field(1000, ge=100)
    """Bootstrap resamples for the 95% intervals of the win rates and of the paired differences
    in the verdict (rates have Wilson intervals)."""
    prompts_per_checkpoint: int = Field(64, ge=1)
    """Prompts judged per checkpointed batch of ``eval/judgments.jsonl`` (for one pair of models,
    or one model and question): an interrupted run resumes the judging after the last whole
    batch."""
    report_to: list[str] = ["none"]
    """Experiment trackers that receive the report's figures (win rates, rates, mean rewards),
    e.g. ``[tensorboard]`` (files in ``eval/logs/``) or ``[wandb]``; ``[none]`` for none."""

    @model_validator(mode="before")
    @classmethod
    def _default_backend(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("judge"), dict):
            data = {**data, "judge": {"backend": DEFAULT_BACKEND, **data["judge"]}}
        return data

    @model_validator(mode="after")
    def _one_way_to_name_judges(self) -> "EvaluateConfig":
        if self.judge is not None and self.judges is not None:
            raise ValueError("give evaluate.judge (one judge) or evaluate.judges (a list), not "
                             "both; e.g. judges: [feedback, <the other model>]")
        return self


class JudgeCheckConfig(Section):
    pairs: Optional[PromptSource] = None
    """Preference pairs whose better answer is known: TRL's preference format (``prompt``,
    ``chosen``, ``rejected``; text or chat messages) or Anthropic HH ``chosen`` / ``rejected``
    transcripts. ``field`` is not used. Default: the small set shipped with cai_cli. ``cai
    judge-check --pairs`` overrides the file or dataset."""
    principles_per_pair: Optional[int] = Field(None, ge=1)
    """Comparison principles drawn per pair, each judged in both orders; default:
    ``label_prefs.principles_per_pair``, as the configured labelling asks."""
    pairs_per_checkpoint: int = Field(8, ge=1)
    """Pairs per checkpointed batch: an interrupted check resumes after the last whole batch."""
    reliability_bins: int = Field(5, ge=1)
    """Equal-width bins of the judge's confidence (0.5 to 1) for the reliability table and ECE."""


# ---------------------------------------------------------------------------------------------
# Root


class Config(Section):
    run_dir: str = "runs/default"
    """Every artifact goes under this directory."""
    seed: int = 0
    """Seed for shuffling, principle draws and sampling."""
    constitution: Union[str, list[str]]
    """Constitution file, or several files merged (e.g. Anthropic's instructions + few-shot
    files). Formats: our YAML, Anthropic's paper JSON, Hugging Face's llm-swarm JSON."""
    data: DataConfig
    """Prompt and helpfulness data."""
    models: ModelsConfig
    """Models and the engines that run them."""
    generate_prompts: GeneratePromptsConfig = GeneratePromptsConfig()
    """New red-team prompts written by a model from few-shot seed prompts (off in ``cai run``
    unless ``enabled``)."""
    generate_sl: GenerateSLConfig = GenerateSLConfig()
    """SL-CAI data generation: answer, critique, revise."""
    finetune: FinetuneConfig = FinetuneConfig()
    """Supervised fine-tuning on the SL-CAI revisions (TRL's SFTTrainer)."""
    label_prefs: LabelPrefsConfig = LabelPrefsConfig()
    """AI-feedback preference labels from the feedback model's option probabilities."""
    train_rm: TrainRMConfig = TrainRMConfig()
    """Reward (preference) model on the AI labels (TRL's RewardTrainer)."""
    optimize: OptimizeConfig = OptimizeConfig()
    """Policy optimisation: DPO from the pairs, or GRPO / RLOO against the reward model."""
    evaluate: EvaluateConfig = EvaluateConfig()
    """Models compared on harmlessness and helpfulness by judge models (a jury) and the reward
    model."""
    judge_check: JudgeCheckConfig = JudgeCheckConfig()
    """``cai judge-check``: the feedback model measured on pairs whose better answer is known."""

    @property
    def feedback_model(self) -> AnyModelConfig:
        return self.models.feedback or self.models.policy

    @property
    def feedback_key(self) -> str:
        """The config key that names the feedback model, for messages."""
        return "models.feedback" if self.models.feedback else "models.policy"

    @property
    def jury(self) -> list[tuple[str, AnyModelConfig]]:
        """The models that judge ``cai evaluate``'s answers, as ``(config key, model)`` in the
        configured order: ``evaluate.judges`` (``feedback``: the feedback model, named by its
        own key), else ``evaluate.judge``, else the feedback model alone."""
        settings = self.evaluate
        if settings.judges is not None:
            return [(self.feedback_key, self.feedback_model) if entry == "feedback"
                    else (f"evaluate.judges[{index}]", entry)
                    for index, entry in enumerate(settings.judges)]
        if settings.judge is not None:
            return [("evaluate.judge", settings.judge)]
        return [(self.feedback_key, self.feedback_model)]

    @property
    def layout(self) -> RunLayout:
        """Every path of the run directory."""
        return RunLayout.of(self.run_dir)

    @property
    def constitution_paths(self) -> list[str]:
        return [self.constitution] if isinstance(self.constitution, str) else list(self.constitution)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: Path | str, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config, apply ``--set`` overrides, validate; UserError on any problem."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}{relative_note(path)}")
    from cai_cli import reading

    try:
        data = reading.load_yaml(reading.read_text(path), str(path))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise UserError(f"{where}: YAML syntax error: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: YAML syntax error: {exc}") from None
    if data is None:
        raise UserError(f"{path}: the config is empty; it needs at least constitution, data and models")
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of keys (run_dir, data, models, "
                        f"...), not a {type(data).__name__}")
    _rename_keys(data, str(path))
    for override in overrides:
        _apply_override(data, _renamed_override(override))
    watch_secret_variables(_key_variables(data))  # before any message can quote a key
    config = validate_config(data, source=str(path))
    problems = setting_problems(config, path)
    if problems:
        raise UserError(problem_list(str(path), problems))
    return config


def setting_problems(config: "Config", source: Path | None = None) -> list[str]:
    """What the schema cannot see: a run directory that is not one (``layout.run_dir_problem``;
    the config file ``source`` and the files it names may sit in it) and new-token budgets that
    leave no room for a prompt in a model's context (``context_problems``). Checked whenever a
    config loads, so a stage refuses before it takes the run directory's lock."""
    from cai_cli.run.layout import run_dir_problem

    sources = [config.data.red_team, config.data.helpful, config.train_rm.mix,
               config.evaluate.benign, config.judge_check.pairs, config.generate_prompts.seeds]
    own = [*config.constitution_paths, *(s.path for s in sources if s is not None and s.path)]
    problem = run_dir_problem(config.run_dir, tuple(Path(p).expanduser() for p in own)
                              + ((source,) if source is not None else ()))
    found = [f"run_dir: {config.run_dir} {problem}; set run_dir to a new or empty directory"
             ] if problem else []
    return found + context_problems(config)


# Tokens a prompt needs at the least: a chat template's scaffold around a short request. New
# tokens that leave fewer in a model's context make every prompt of a stage overflow.
MIN_PROMPT_TOKENS = 16
# Where a model's config.json says its context, as transformers' configs name it.
CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def model_context(model: "BaseModelConfig", what: str) -> tuple[int, str] | None:
    """A model's context and where it was read, without loading it: its ``max_context``, else
    a local directory's ``config.json``; None when that is not known here (a hub id, a model a
    stage has not made yet, a server, which says at run time)."""
    if getattr(model, "max_context", None):
        return model.max_context, f"{what}.max_context"
    if model.remote:
        return None
    path = Path(model.name_or_path).expanduser() / "config.json"
    try:
        found = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None
    for settings in (found, (found or {}).get("text_config")):
        if isinstance(settings, dict):
            for name in CONTEXT_FIELDS:
                value = settings.get(name)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value, f"{name} in {path}"
    return None


def context_problems(config: "Config") -> list[str]:
    """Each ``max_new_tokens`` (and ``cot_max_new_tokens``) that leaves fewer than
    ``MIN_PROMPT_TOKENS`` of its model's context for the prompt, where the context is known."""
    policy = config.models.policy
    feedback_key = config.feedback_key
    trained = config.finetune.model or policy.name_or_path  # what sft/ is made from
    sampler = config.label_prefs.policy or trained
    checks = [("generate_sl.sampling.max_new_tokens", config.generate_sl.sampling.max_new_tokens,
               "models.policy", policy),
              ("generate_prompts.sampling.max_new_tokens",
               config.generate_prompts.sampling.max_new_tokens, "models.policy", policy),
              ("label_prefs.sampling.max_new_tokens", config.label_prefs.sampling.max_new_tokens,
               "label_prefs.policy" if config.label_prefs.policy else "models.policy",
               policy.model_copy(update={"name_or_path": sampler}))]
    if config.label_prefs.chain_of_thought:
        checks.append(("label_prefs.cot_max_new_tokens", config.label_prefs.cot_max_new_tokens,
                       feedback_key, config.feedback_model))
        for key, judge in config.jury:
            if key != feedback_key:
                checks.append(("label_prefs.cot_max_new_tokens",
                               config.label_prefs.cot_max_new_tokens, key, judge))
    named = {"base": policy.name_or_path, "sft": trained, "policy": trained}
    for name in config.evaluate.models:
        checks.append(("evaluate.sampling.max_new_tokens", config.evaluate.sampling.max_new_tokens,
                       "models.policy" if name in named else f"evaluate.models ({name})",
                       policy.model_copy(update={"name_or_path": named.get(name, name)})))
    problems = []
    for key, new_tokens, what, model in checks:
        found = model_context(model, what)
        if found is None or new_tokens + MIN_PROMPT_TOKENS <= found[0]:
            continue
        context, source = found
        room = context - new_tokens
        left = f"{room} tokens" if room > 0 else "no room"
        problem = (f"{key}: {new_tokens} new tokens leave {left} for the prompt in the "
                   f"{context}-token context of {what} ('{model.name_or_path}', {source}); "
                   + (f"lower it to {context - MIN_PROMPT_TOKENS} at most"
                      if context > MIN_PROMPT_TOKENS else "use a model with a longer context"))
        if problem not in problems:
            problems.append(problem)
    return problems


def _key_variables(node: Any) -> list[str]:
    """Every ``api_key_env`` value in a raw config, wherever it sits (valid or not)."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k == "api_key_env" and isinstance(v, str)]
        return found + [name for v in node.values() for name in _key_variables(v)]
    if isinstance(node, list):
        return [name for v in node for name in _key_variables(v)]
    return []


# Keys renamed so that each batch size says which batch it is: old dotted path -> new one. The
# old names still load, with a warning.
RENAMED = {
    "generate_sl.batch_size": "generate_sl.prompts_per_checkpoint",
    "label_prefs.batch_size": "label_prefs.prompts_per_checkpoint",
    "finetune.training.batch_size": "finetune.training.per_device_batch_size",
    "train_rm.training.batch_size": "train_rm.training.per_device_batch_size",
    "optimize.training.batch_size": "optimize.training.per_device_batch_size",
    "models.policy.batch_size": "models.policy.forward_batch_size",
    "models.feedback.batch_size": "models.feedback.forward_batch_size",
}


def _rename_keys(data: dict, source: str) -> None:
    from cai_cli import ui

    finetune = data.get("finetune")
    if isinstance(finetune, dict) and "assistant_only_loss" in finetune:
        if "loss_on" in finetune:
            raise UserError(f"{source}: finetune.assistant_only_loss and finetune.loss_on are both "
                            "set; keep only finetune.loss_on")
        old = finetune.pop("assistant_only_loss")
        finetune["loss_on"] = "assistant" if old is True else "all" if old is False else old
        ui.warn(f"{source}: finetune.assistant_only_loss is replaced by finetune.loss_on "
                f"(here: {finetune['loss_on']}); the new default, completion, works with any "
                "chat template")

    for old, new in RENAMED.items():
        *parents, old_name = old.split(".")
        node = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or old_name not in node:
            continue
        new_name = new.rsplit(".", 1)[1]
        if new_name in node:
            raise UserError(f"{source}: {old} and {new} are both set; {old} is the old name of "
                            f"{new}: keep only {new}")
        node[new_name] = node.pop(old_name)
        ui.warn(f"{source}: {old} is now called {new} (same meaning); rename it")


def _renamed_override(override: str) -> str:
    key, sep, value = override.partition("=")
    if key.strip() == "finetune.assistant_only_loss":
        from cai_cli import ui

        loss_on = "assistant" if value.strip().lower() == "true" else "all"
        ui.warn(f"--set finetune.assistant_only_loss: replaced by finetune.loss_on ({loss_on})")
        return f"finetune.loss_on={loss_on}"
    new = RENAMED.get(key.strip())
    if new is None:
        return override
    from cai_cli import ui

    ui.warn(f"--set {key.strip()}: now called {new} (same meaning)")
    return f"{new}{sep}{value}"


def validate_config(data: dict, source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        problems = [describe(error, Config, (*MODEL_BACKENDS, "feedback"))
                    for error in exc.errors()]
        raise UserError(problem_list(source, problems)) from None


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _apply_override(data: dict, override: str) -> None:
    """Apply ``key.sub=value`` to the raw config dict, parsing value by the field's type."""
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise UserError(f"--set {override!r}: expected key.sub=value")
    parts = key.strip().split(".")
    models: list[type[BaseModel]] = [Config]  # the classes a section may be (one per engine)
    annotation: Any = None
    node: Any = data
    for depth, part in enumerate(parts):
        if not models and typing.get_origin(annotation) is dict:
            annotation = Any  # a free mapping (e.g. trl_args): its keys are checked downstream
            break
        if not models:
            raise UserError(f"--set {key}: '{'.'.join(parts[:depth])}' has no sub-keys")
        model = _member_for(models, node)
        if part not in model.model_fields:
            model = next((m for m in models if part in m.model_fields), model)
        if part not in model.model_fields:
            names = list(dict.fromkeys(name for m in models for name in m.model_fields))
            close = difflib.get_close_matches(part, names, n=1, cutoff=0.5)
            hint = (f"; did you mean '{'.'.join(parts[:depth] + [close[0]])}'?" if close
                    else f"; valid keys: {', '.join(names)}")
            raise UserError(f"--set {key}: unknown key '{part}'{hint}")
        annotation = model.model_fields[part].annotation
        models = nested_models(annotation)
        node = node.get(part) if isinstance(node, dict) else None
    kinds = unwrap(annotation)
    if raw in ("null", "~") and type(None) in kinds:
        value: Any = None
    elif int in kinds and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        value = int(raw)  # YAML would read 010 as octal
    elif str in kinds and not (list in kinds or any(typing.get_origin(k) is list for k in kinds)
                               and raw.lstrip().startswith("[")):
        value = raw  # a string field keeps "007" or "true" as text
    else:
        from cai_cli import reading

        try:
            value = reading.load_yaml(raw, f"--set {key}")
        except yaml.YAMLError:
            value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _member_for(models: list[type[BaseModel]], node: Any) -> type[BaseModel]:
    """Of the classes a section may be, the one its ``backend`` key (or the default) picks."""
    if len(models) == 1 or not all(issubclass(m, BaseModelConfig) for m in models):
        return models[0]
    backend = node.get("backend", DEFAULT_BACKEND) if isinstance(node, dict) else DEFAULT_BACKEND
    return MODEL_BACKENDS.get(backend, models[0])


def field_reference(model: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """``(dotted key, default, description)`` for every field, sections first-to-last; the
    config reference in docs/config.md is checked against this list. A section that is one of several classes
    (a model: one class per engine) lists the keys of all of them, each once; a key that only
    some engines have says which in its description."""
    return _reference([model], prefix)


def _reference(models: list[type[BaseModel]], prefix: str) -> list[tuple[str, str, str]]:
    rows = []
    names = list(dict.fromkeys(name for m in models for name in m.model_fields))
    for name in names:
        owners = [m for m in models if name in m.model_fields]
        info = owners[0].model_fields[name]
        key = f"{prefix}{name}"
        nested = nested_models(info.annotation)
        doc = " ".join((_description(owners[0], name) or "").split())
        if len(owners) < len(models):
            tags = ", ".join(f"`{m.model_fields['backend'].default}`" for m in owners)
            doc = f"({tags} only) {doc}"
        if nested:
            rows.append((key, "required" if info.is_required() else "", doc))
            rows += _reference(nested, key + ".")
        else:
            default = "required" if info.is_required() else json_default(info.default)
            if name == "backend" and len(models) > 1:
                default = DEFAULT_BACKEND
            rows.append((key, default, doc))
    return rows


def _description(model: type[BaseModel], name: str) -> str | None:
    """A field's documentation, from the class that declares it or the nearest base that does
    (a subclass may narrow a field, e.g. ``backend``, without repeating its text)."""
    for cls in model.__mro__:
        fields = getattr(cls, "model_fields", None) or {}
        if name in fields and fields[name].description:
            return fields[name].description
    return None


def json_default(value: Any) -> str:
    if value is None:
        return "null"
    # one line, however long (a wrapped default would break the reference's table row)
    return yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip().removesuffix("...").strip()


# Sections of the same type are documented once, under the first of them.
SAME_AS = {"data.helpful.": "data.red_team.", "generate_prompts.seeds.": "data.red_team.", "models.feedback.": "models.policy.",
           "train_rm.mix.": "data.red_team.", "train_rm.training.": "finetune.training.",
           "optimize.training.": "finetune.training.", "train_rm.lora.": "finetune.lora.",
           "optimize.lora.": "finetune.lora."}


def documented_keys() -> list[tuple[str, str, str]]:
    """``field_reference`` with the keys of repeated section types listed once."""
    rows = []
    for key, default, doc in field_reference():
        if not any(key.startswith(prefix) for prefix in SAME_AS):
            rows.append((key, default, doc))
    return rows


def print_keys(section: str | None, *, markdown: bool) -> None:
    rows = documented_keys() if markdown else field_reference()
    if section:
        rows = [row for row in rows if row[0] == section or row[0].startswith(section.rstrip(".") + ".")]
        if not rows:
            raise UserError(f"no config keys under '{section}'; sections: "
                            + ", ".join(name for name in Config.model_fields))
    if markdown:
        print("| key | default | meaning |\n|---|---|---|")
        for key, default, doc in rows:
            cell = doc.replace("``", "`").replace("|", "\\|")
            print(f"| `{key}` | {f'`{default}`' if default else ''} | {cell} |")
        return
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    from cai_cli import ui

    # Text, not markup: defaults and meanings hold brackets ("[none]", "[base, sft]")
    rows = [(key, default, " ".join(doc.replace("``", "`").split())) for key, default, doc in rows]
    width = max(len(row[0]) for row in rows)
    if ui.stdout.width < width + 24 + 40:
        # Too narrow for three columns (keys are up to 40 characters): each key and its
        # default on a line, the meaning below it, so no word is cut.
        for key, default, doc in rows:
            ui.stdout.print(Text.assemble((key, "bold"), "  " if default else "", default),
                            soft_wrap=True)
            if doc:
                ui.stdout.print(Padding(Text(doc), (0, 0, 0, 4)))
        return
    table = Table(box=None, pad_edge=False)
    # keys in full; a long default (generate_prompts.instruction) wraps rather than push the
    # meaning off a narrow terminal
    table.add_column("key", no_wrap=True, style="bold", min_width=width)
    table.add_column("default", overflow="fold", max_width=24)
    table.add_column("meaning", overflow="fold", ratio=1)
    for key, default, doc in rows:
        table.add_row(key, Text(default), Text(doc))
    ui.stdout.print(table)
