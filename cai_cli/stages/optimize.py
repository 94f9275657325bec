"""``cai optimize``: optimise the policy against the AI feedback, the last training stage of RLAIF.

Three methods (``optimize.method``), all starting from the SL-CAI model in ``<run_dir>/sft`` (or
``optimize.model``), which is also the reference the policy is kept close to:

- ``dpo`` (default): TRL's DPOTrainer straight from the labelled pairs in ``prefs/pairs.jsonl``.
  Pairs closer to a tie than ``min_confidence`` are dropped. With ``soft_labels`` each pair's
  ``p_chosen`` is its target (conservative DPO with a per-pair label, see
  ``soft_label_dpo_trainer``) instead of "chosen is always better".
- ``grpo`` / ``rloo``: online RL. The policy samples ``num_generations`` completions per red-team
  prompt (and helpful prompt, with ``include_helpful``), the reward model in ``<run_dir>/rm``
  scores them, and TRL's GRPOTrainer / RLOOTrainer update the policy with a KL penalty ``beta``
  towards the reference. The paper used PPO with a value head; TRL 1.x has no such trainer any
  more, and GRPO and RLOO are its PPO-family trainers: the same clipped policy-gradient update,
  with the other completions of the same prompt as the baseline instead of a learned critic.

With ``models.policy.backend: vllm`` GRPO and RLOO sample through TRL's own vLLM integration
(``optimize.vllm``: an engine colocated in each training process, or a separate server), which
hands vLLM the new weights after every optimiser step; otherwise through transformers'
``generate``. DPO samples nothing.

Under LoRA the reference is the same model with its adapters switched off, so no second copy is
held in memory. The result in ``<run_dir>/policy`` loads like ``sft/`` (merged weights, or with
``lora.merge: false`` the adapter alone, with the tokenizer and chat template either way).
Trainer checkpoints go to the hidden ``policy/.checkpoints``; an interrupted run resumes from the
newest one when the same command is run again. Everything a user can get wrong is checked before
anything is written to ``policy/``.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

from cai_cli import ui
from cai_cli.config import Config, ModelConfig
from cai_cli.data.sources import load_prompts
from cai_cli.engines import models
from cai_cli.engines.work import Train, Work
from cai_cli.errors import UserError
from cai_cli.run import records
from cai_cli.run.artifacts import file_fingerprint, model_fingerprint, source_fingerprint
from cai_cli.run.records import Pair, conversation
from cai_cli.run.spec import StageSpec
from cai_cli.stages import training
from cai_cli.stages.base import Stage
from cai_cli.stages.common import Need, begin, require_complete
from cai_cli.stages.finetune import Finetune
from cai_cli.stages.label_prefs import LabelPrefs, training_pairs
from cai_cli.stages.train_rm import TrainRM
from cai_cli.stages.train_rm import base_model as reward_base_model

# Keys of the optimize section that only DPO or only the online methods read. Each method's
# fingerprint leaves the others out, so e.g. a new num_generations does not make a DPO policy stale.
DPO_ONLY = {"min_confidence", "soft_labels"}
ONLINE_ONLY = {"num_generations", "max_completion_length", "include_helpful"}
# How vLLM is reached and how much memory it takes do not change what is learned; which engine
# samples (``rollout_engine``) does, and stands in the fingerprint instead.
NOT_DECIDING = {"vllm"}
VLLM_VERSION_NOTICE = "TRL currently supports vLLM versions"
# DPOConfig fields that change the loss soft labels replace: they cannot be combined.
SOFT_LOSS_FIELDS = ("loss_type", "loss_weights", "label_smoothing", "ld_alpha",
                    "f_divergence_type", "use_weighting")


def policy_model(config: Config) -> ModelConfig:
    """The starting policy (``optimize.model``, by default the SL-CAI model in ``sft/``), with
    the policy's loading settings (revision, remote code, device)."""
    sft = str(config.layout.sft)
    return training.model_for(config, config.optimize.model or sft, "optimize.model")[0]


# ---------------------------------------------------------------------------------------------
# Inputs (no heavy imports: these run before anything is loaded)


def starting_policy(config: Config) -> Need:
    return Need(Finetune(), "or set optimize.model to the policy to optimise")


def labelled_pairs(config: Config) -> Need:
    return Need(LabelPrefs(), "optimize.method dpo learns from its labelled pairs",
                stale_use="optimising on its pairs as they are")


def reward_model_need(config: Config) -> Need:
    return Need(TrainRM(), f"optimize.method {config.optimize.method} samples completions and "
                "scores them with the reward model")


def check_policy(config: Config) -> None:
    """The starting policy: a finished ``sft/``, or the directory or hub id in optimize.model."""
    if config.optimize.model is None:
        require_complete(config, starting_policy(config))
    model = policy_model(config)
    path = Path(model.name_or_path).expanduser()
    if models.adapter_only(path):
        # TRL would build the full-weights reference from the adapter's base model, not from
        # the adapted model: the KL term would pull towards the wrong policy.
        raise UserError(f"optimize.model: {path} holds a LoRA adapter without merged weights; "
                        "rerun `cai finetune` with finetune.lora.merge: true (the default), or "
                        "point optimize.model at merged weights")
    models.check_model(model, "optimize.model")


def preference_pairs(config: Config) -> tuple[list[dict], int]:
    """The pairs DPO trains on, in TRL's conversational preference format (with ``p_chosen``
    when soft labels use it), and the number of near-ties ``min_confidence`` dropped."""
    settings = config.optimize
    prefs = require_complete(config, labelled_pairs(config))
    path = config.layout.pairs
    needs_label = settings.soft_labels or settings.min_confidence > 0
    pairs, total, dropped = [], 0, 0
    for pair in records.read(path, Pair):
        total += 1
        if needs_label and abs(pair.p_chosen - 0.5) < settings.min_confidence:
            dropped += 1
            continue
        row = {"prompt": conversation(pair.prompt), "chosen": conversation(pair.chosen),
               "rejected": conversation(pair.rejected)}
        if settings.soft_labels:
            row["p_chosen"] = float(pair.p_chosen)
        pairs.append(row)
    if total == 0:
        raise UserError(f"{path}: no pairs (every prompt was skipped); see `cai inspect "
                        f"{ui.shell(config.run_dir)}` and rerun `cai label-prefs --force`")
    if not pairs:
        raise UserError(f"optimize.min_confidence: all {total} pairs in {path} have "
                        f"|p_chosen - 0.5| below {settings.min_confidence}; lower it (the mean "
                        f"confidence is in {prefs / 'manifest.json'})")
    return pairs, dropped


def online_prompts(config: Config) -> tuple[list[dict], int]:
    """Conversational prompts for GRPO / RLOO: the red-team prompts, then the helpful ones with
    ``include_helpful``; and how many are helpful."""
    red_team = load_prompts(config.data.red_team, config.seed)
    helpful = []
    if config.optimize.include_helpful:
        if config.data.helpful is None:
            raise UserError("optimize.include_helpful is true but data.helpful is not set; add "
                            "data.helpful (e.g. {path: cai_cli/resources/helpful.jsonl, field: "
                            "messages}) or set optimize.include_helpful: false")
        helpful = load_prompts(config.data.helpful, config.seed, "data.helpful")
    rows = [{"prompt": [{"role": "user", "content": p.text}]} for p in red_team + helpful]
    return rows, len(helpful)


def reward_model_dir(config: Config) -> Path:
    return require_complete(config, reward_model_need(config))


# ---------------------------------------------------------------------------------------------
# Checks that need the libraries (still before anything is written)


def trainer_args(config: Config):
    """The TRL config of the method, from our settings; UserError for what TRL would reject."""
    with_vllm = config.optimize.method != "dpo" and rollout_engine(config) != "transformers"
    if with_vllm:
        quiet_vllm()  # before TRL first imports vLLM
    from trl import DPOConfig, GRPOConfig, RLOOConfig

    model = policy_model(config)
    settings = config.optimize
    method = settings.method
    stage_args = {"beta": (settings.beta, "optimize.beta"),
                  "trust_remote_code": (model.trust_remote_code, "models.policy.trust_remote_code")}
    if model.revision:  # TRL loads the full-weights reference itself, from the same revision
        stage_args["model_init_kwargs"] = ({"revision": model.revision}, "models.policy.revision")
    if method == "dpo":
        config_cls = DPOConfig
        if settings.beta == 0:
            raise UserError("optimize.beta: must be above 0 for method dpo (the loss scales the "
                            "log-probability ratios by it: at 0 nothing is learned)")
        clashes = [name for name in SOFT_LOSS_FIELDS if name in settings.training.trl_args]
        if settings.soft_labels and clashes:
            raise UserError(f"optimize.training.trl_args.{clashes[0]}: optimize.soft_labels uses "
                            "its own loss (DPO with each pair's p_chosen as its label); remove "
                            f"{', '.join(clashes)}, or set optimize.soft_labels: false")
    else:
        config_cls = GRPOConfig if method == "grpo" else RLOOConfig
        batch_size, group = settings.training.per_device_batch_size, settings.num_generations
        per_step = batch_size * settings.training.gradient_accumulation_steps
        if per_step % group:
            fitting = -(-batch_size // group) * group  # the next multiple of the group size
            raise UserError(
                f"optimize.training.per_device_batch_size x gradient_accumulation_steps = {per_step} "
                f"completions per optimiser step, which is not a multiple of "
                f"optimize.num_generations ({group}): each prompt's completions are compared "
                f"with each other, so they must be trained on together; e.g. set "
                f"optimize.training.per_device_batch_size: {fitting}")
        stage_args.update(
            num_generations=(group, "optimize.num_generations"),
            max_completion_length=(settings.max_completion_length,
                                   "optimize.max_completion_length"))
    training_settings = settings.training
    if with_vllm:
        # Passed as trl_args under the user's own, so that trl_args can still override them.
        trl_args = {**vllm_trl_args(config), **training_settings.trl_args}
        training_settings = training_settings.model_copy(update={"trl_args": trl_args})
    args = training.trl_config(config_cls, training_settings, "optimize.training",
                               seed=config.seed, output_dir=config.layout.policy,
                               cpu=training.use_cpu(model), stage_args=stage_args)
    if method != "dpo" and args.use_vllm:
        check_vllm_rollouts(config, args)
    return args


# ---------------------------------------------------------------------------------------------
# Rollouts through TRL's vLLM integration


def rollout_engine(config: Config) -> str:
    """What samples GRPO / RLOO's completions: ``vllm colocate`` or ``vllm server`` when the
    policy's backend is vllm (or ``trl_args.use_vllm`` says so), else ``transformers``. Cheap: no
    library is imported."""
    trl_args = config.optimize.training.trl_args
    if not trl_args.get("use_vllm", config.models.policy.backend == "vllm"):
        return "transformers"
    return f"vllm {trl_args.get('vllm_mode', config.optimize.vllm.mode)}"


def vllm_trl_args(config: Config) -> dict:
    """TRL's vLLM fields (GRPOConfig and RLOOConfig have the same) from ``optimize.vllm``."""
    settings = config.optimize.vllm
    args = {"use_vllm": True, "vllm_mode": settings.mode}
    if settings.mode == "server":
        args.update(vllm_server_timeout=settings.server_timeout)
        if settings.server_url is not None:
            args["vllm_server_base_url"] = settings.server_url
    else:
        args.update(vllm_gpu_memory_utilization=settings.gpu_memory_utilization,
                    vllm_tensor_parallel_size=settings.tensor_parallel_size,
                    vllm_enable_sleep_mode=settings.sleep_mode,
                    # the model's context, as in the stages that generate with it
                    vllm_max_model_length=config.models.policy.max_context)
    return args


def check_vllm_rollouts(config: Config, args) -> None:
    """What TRL's vLLM rollouts need, checked before anything loads: a server address for server
    mode, vLLM installed, and a CUDA GPU to train on."""
    method = config.optimize.method
    why = ("models.policy.backend: vllm" if config.models.policy.backend == "vllm"
           else "optimize.training.trl_args.use_vllm: true")
    trl_args = config.optimize.training.trl_args
    if args.vllm_mode == "server" and not (
            args.vllm_server_base_url or {"vllm_server_host", "vllm_server_port"} & set(trl_args)):
        raise UserError("optimize.vllm.server_url: required with optimize.vllm.mode: server: the "
                        "address of the rollout server, e.g. http://127.0.0.1:8000 (start it "
                        "with `trl vllm-serve --model MODEL`, see docs/commands/optimize.md)")
    if importlib.util.find_spec("vllm") is None:
        raise UserError(f"{why}, so optimize.method {method} samples its "
                        "completions with vLLM, but vLLM is not installed in this Python "
                        "environment; `pip install vllm` on a CUDA machine, or sample with "
                        "transformers: --set optimize.training.trl_args.use_vllm=false")
    problem = rollout_device_problem(args)
    if problem:
        raise UserError(f"{why}, so optimize.method {method} samples with "
                        "TRL's vLLM integration, which hands vLLM the new weights after every "
                        "step and needs CUDA GPUs for it (vLLM's CPU build cannot take them); "
                        f"{problem}. Sample with transformers instead: --set "
                        "optimize.training.trl_args.use_vllm=false")


def rollout_device_problem(args) -> str | None:
    """Why TRL's vLLM rollouts cannot run here, or None. Colocated, vLLM's CPU kernels repack
    the weights into a form new ones cannot be loaded into; served, the weights travel over
    NCCL from a CUDA device."""
    import torch

    if not torch.cuda.is_available():
        return "there is no CUDA GPU here"
    if args.vllm_mode == "server" and args.use_cpu:
        return "models.policy.device is cpu, and server mode sends the weights from a GPU"
    return None


def quiet_vllm() -> None:
    """No vLLM INFO lines or deprecation notices between the libraries, and not TRL's notice
    about vLLM's version, which it repeats at every check (``vllm_version_notice`` says it
    once); set before TRL imports vLLM."""
    import os
    import warnings

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    warnings.filterwarnings("ignore", message=VLLM_VERSION_NOTICE)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm\.")


def vllm_version_notice() -> None:
    """TRL's notice when the installed vLLM is outside the versions it was tested with, once."""
    import warnings

    from trl.import_utils import is_vllm_available

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        is_vllm_available()  # reads the version from the package metadata: no import of vLLM
    for message in dict.fromkeys(str(w.message) for w in caught):
        if message.startswith(VLLM_VERSION_NOTICE):
            ui.warn(message)


def describe_rollouts(args) -> str:
    """The line that says which engine samples the completions."""
    if not args.use_vllm:
        return "completions sampled by transformers (generate)"
    if args.vllm_mode == "server":
        where = args.vllm_server_base_url or f"{args.vllm_server_host}:{args.vllm_server_port}"
        return f"completions sampled by the vLLM server at {where}"
    return (f"completions sampled by vLLM, colocated in the training process "
            f"(gpu_memory_utilization {args.vllm_gpu_memory_utilization}, tensor_parallel_size "
            f"{args.vllm_tensor_parallel_size})")


def check_chat_template(tokenizer, name: str, what: str) -> None:
    if not tokenizer.chat_template:
        raise UserError(f"{what}: '{name}' has no chat template, and the prompts and answers are "
                        "conversations; optimise a chat model (cai finetune keeps the template)")


def reward_tokenizer(config: Config, rm: Path):
    models.check_model_source(reward_model_config(config, rm), str(rm))  # its weights, up front
    tokenizer = models.load_tokenizer(reward_model_config(config, rm), str(rm), padding_side=None,
                                      fix="rerun `cai train-rm --force`")
    # TRL renders prompt + completion with the reward model's template before scoring.
    check_chat_template(tokenizer, str(rm), "the reward model")
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The stage


def outcome(config: Config, trainer, result, examples: int, *, dropped: int, helpful: int,
            loss: float) -> tuple[dict, dict, str]:
    """Counts and the method's stats for the manifest, and the summary line. Metrics are the
    last logged values (the log history survives a resume)."""
    stats: dict = {}
    if config.optimize.method == "dpo":
        margins = training.logged(trainer, "rewards/margins")
        accuracies = training.logged(trainer, "rewards/accuracies")
        pairs = len(trainer.train_dataset)  # TRL drops pairs whose prompt fills max_length
        counts = {"pairs": examples + dropped, "below_min_confidence": dropped,
                  "train_pairs": pairs, "steps": result.global_step}
        stats.update(reward_margin=round(margins[-1], 4) if margins else None,
                     reward_accuracy=round(accuracies[-1], 4) if accuracies else None)
        summary = f"{pairs} pairs"
        if dropped:
            summary += f" ({dropped} near-ties dropped by min_confidence)"
        summary += f", {result.global_step} steps, loss {loss:.4f}"
        if margins:
            summary += f", reward margin {margins[-1]:+.4f}"
    else:
        rewards = training.logged(trainer, "reward")
        counts = {"red_team_prompts": examples - helpful, "helpful_prompts": helpful,
                  "steps": result.global_step}
        stats.update(first_reward=round(rewards[0], 4) if rewards else None,
                     last_reward=round(rewards[-1], 4) if rewards else None)
        summary = (f"{examples} prompts x {config.optimize.num_generations} completions, "
                   f"{result.global_step} steps")
        if rewards:
            summary += f", reward {rewards[0]:+.4f} to {rewards[-1]:+.4f}"
    return counts, stats, summary


def build_trainer(config: Config, model_config: ModelConfig, tokenizer, args, data: list[dict],
                  rm: Path | None, rm_tokenizer):
    import datasets
    from transformers import set_seed

    settings = config.optimize
    set_seed(config.seed)  # before loading: LoRA's initial weights come from the global RNG
    model = models.load_model(model_config, "optimize.model", settings.lora, args)
    peft_config = (training.peft_config(settings.lora, "CAUSAL_LM")
                   if settings.lora.enabled else None)
    dataset = datasets.Dataset.from_list(data)
    if settings.method == "dpo":
        from trl import DPOTrainer

        # No ref_model: TRL loads the starting policy again as the reference, or under LoRA
        # switches the adapters off.
        trainer_cls = soft_label_dpo_trainer() if settings.soft_labels else DPOTrainer
        trainer = trainer_cls(model=model, args=args, train_dataset=dataset,
                              processing_class=tokenizer, peft_config=peft_config)
    else:
        from trl import GRPOTrainer, RLOOTrainer

        reward_model = load_reward_model(config, rm, args)
        trainer_cls = GRPOTrainer if settings.method == "grpo" else RLOOTrainer
        trainer = trainer_cls(model=model, reward_funcs=reward_model, args=args,
                              train_dataset=dataset, processing_class=tokenizer,
                              reward_processing_classes=rm_tokenizer, peft_config=peft_config)
    return trainer


def reward_model_config(config: Config, rm: Path) -> ModelConfig:
    """The reward model train-rm saved, loaded with the policy's settings (remote code)."""
    return config.models.policy.transformers_config().model_copy(update={"name_or_path": str(rm)})


def load_reward_model(config: Config, rm: Path, args):
    """The reward model, frozen, so it may sit in the training precision."""
    import torch

    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return models.load_reward_model(reward_model_config(config, rm), str(rm), dtype=dtype,
                                    fix="rerun `cai train-rm --force`")


# ---------------------------------------------------------------------------------------------
# Soft-label DPO


class SoftLabelCollator:
    """TRL's preference collator plus each pair's ``p_chosen`` as a float tensor."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.collate(examples)
        batch["p_chosen"] = torch.tensor([e["p_chosen"] for e in examples], dtype=torch.float32)
        return batch


@functools.cache
def soft_label_dpo_trainer() -> type:
    """The DPOTrainer subclass for ``soft_labels`` (built on first use: TRL is a heavy import)."""
    from trl import DPOTrainer

    class SoftLabelDPOTrainer(DPOTrainer):
        """DPO with each pair's ``p_chosen`` as its label (conservative DPO, per pair)::

            loss = -(p * logsigmoid(beta * h) + (1 - p) * logsigmoid(-beta * h))

        where ``h`` is the chosen-minus-rejected difference of the policy/reference
        log-probability ratios. TRL 1.16's sigmoid loss takes no label: its ``label_smoothing``
        enters only the robust, EXO and AOT losses, as one number for every pair, so there is no
        hook to reuse. Since ``-logsigmoid(-x) = -logsigmoid(x) + x``, the soft loss is TRL's
        sigmoid loss plus ``(1 - p) * beta * h``: TRL still runs the forward passes and logs its
        metrics (rewards/margins, ...), and only that linear term is added here.
        """

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_collator = SoftLabelCollator(self.data_collator)

        def _set_signature_columns_if_needed(self):
            # The Trainer drops dataset columns the trainer does not name; keep the labels.
            super()._set_signature_columns_if_needed()
            if "p_chosen" not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, "p_chosen"]

        def _compute_loss(self, model, inputs, return_outputs):
            p_chosen = inputs.pop("p_chosen")
            if "ref_chosen_logps" not in inputs:
                # The reference log-probabilities, computed once here and read by TRL from the
                # batch as if precomputed (precompute_ref_log_probs puts them there already).
                reference = self.model if self.ref_model is None else self.ref_model
                inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = \
                    self.compute_ref_log_probs(reference, inputs)
            policy_outputs = []

            def policy(*args, **kwargs):  # keeps the policy's per-token log-probabilities
                policy_outputs.append(model(*args, **kwargs))
                return policy_outputs[-1]

            precomputed, self.precompute_ref_logps = self.precompute_ref_logps, True
            try:
                result = super()._compute_loss(policy, inputs, return_outputs)
            finally:
                self.precompute_ref_logps = precomputed
            sigmoid_loss = result[0] if return_outputs else result
            positions = inputs["completion_mask"].size(1) - 1  # log-probs of tokens 1..n
            logps = policy_outputs[0].log_probs[:, -positions:].sum(dim=1)
            chosen, rejected = logps.chunk(2, dim=0)  # the batch is [chosen..., rejected...]
            h = (chosen - inputs["ref_chosen_logps"]) - (rejected - inputs["ref_rejected_logps"])
            loss = sigmoid_loss + ((1 - p_chosen) * self.beta * h).mean()
            return (loss, result[1]) if return_outputs else loss

    return SoftLabelDPOTrainer


class Optimize(Stage):
    command = "optimize"
    trains = True

    def spec(self, config: Config) -> StageSpec:
        """What decides this stage's output: cheap to compute, no model loaded."""
        settings = config.optimize
        layout = config.layout
        online = settings.method != "dpo"
        model = policy_model(config)
        decides = training.fingerprint_settings(config, model, "optimize",
                                                (DPO_ONLY if online else ONLINE_ONLY) | NOT_DECIDING)
        inputs = {"policy": model_fingerprint(model.name_or_path)}
        if not online:
            inputs["pairs"] = file_fingerprint(layout.pairs)
        else:
            decides["data.red_team"] = config.data.red_team.model_dump(mode="json")
            inputs["prompts"] = source_fingerprint(config.data.red_team)
            inputs["reward_model"] = model_fingerprint(str(layout.rm))
            engine = rollout_engine(config)
            if engine != "transformers":
                decides["rollouts"] = engine.split()[0]
            if settings.include_helpful and config.data.helpful is not None:
                decides["data.helpful"] = config.data.helpful.model_dump(mode="json")
                inputs["helpful"] = source_fingerprint(config.data.helpful)
        return StageSpec(self.command, layout.policy, decides, inputs)

    def preflight(self, config: Config) -> None:
        """What can be checked before any stage runs: the trainer arguments (GRPO / RLOO batch
        divisibility included), and when the policy to optimise already exists locally, its chat
        template and the LoRA targets."""
        trainer_args(config)
        model = policy_model(config)
        path = Path(model.name_or_path).expanduser()
        # Made already, or the user's own. An sft/ that holds no model yet (a finetune killed
        # mid-way keeps its checkpoints there) is checked when optimize runs, after finetune.
        if models.saved_model(path):
            tokenizer = models.load_tokenizer(model, "optimize.model")
            check_chat_template(tokenizer, model.name_or_path, "optimize.model")
            training.check_lora(config.optimize.lora, model, "optimize.lora")

    def needs(self, config: Config) -> list[Need]:
        needs = [reward_model_need(config) if config.optimize.method != "dpo"
                 else labelled_pairs(config)]
        return needs + ([starting_policy(config)] if config.optimize.model is None else [])

    def run(self, config: Config, *, force: bool = False, shard=None) -> Path | None:
        stage = self.spec(config)
        settings = config.optimize
        model = policy_model(config)
        check_policy(config)
        rm, dropped, helpful = None, 0, 0
        if settings.method == "dpo":
            data, dropped = preference_pairs(config)
        else:
            rm = reward_model_dir(config)
            data, helpful = online_prompts(config)
        training.quiet_libraries()
        args = trainer_args(config)
        # TRL's collators pad on the right by themselves; the saved tokenizer keeps load_tokenizer's
        # left padding, which generation wants.
        tokenizer = models.load_tokenizer(model, "optimize.model")
        check_chat_template(tokenizer, model.name_or_path, "optimize.model")
        training.check_lora(settings.lora, model, "optimize.lora")
        rm_tokenizer = reward_tokenizer(config, rm) if rm else None

        run = begin(stage, config, force=force)
        if run is None:
            return stage.directory
        if settings.method != "dpo":
            ui.info(f"optimize ({settings.method}): {describe_rollouts(args)}")
            if args.use_vllm:
                vllm_version_notice()
        trainer, result, checkpoint = training.fit(
            run, lambda: build_trainer(config, model, tokenizer, args, data, rm, rm_tokenizer),
            f"optimize ({settings.method})")
        training.save(run, trainer, tokenizer, settings.lora, result, args, checkpoint)
        manifest = run.manifest
        manifest.counts, stats, summary = outcome(config, trainer, result, len(data),
                                                  dropped=dropped, helpful=helpful,
                                                  loss=manifest.stats["final_loss"])
        manifest.stats.update(stats)
        if settings.method != "dpo":
            manifest.stats["rollouts"] = f"vllm {args.vllm_mode}" if args.use_vllm else "transformers"
        run.complete()
        what = "LoRA adapter" if settings.lora.enabled and not settings.lora.merge else "model"
        ui.info(f"optimize ({settings.method}): {summary} -> {what} in {stage.directory}")
        return stage.directory

    def work(self, config: Config, ctx) -> Work:
        """DPO: one training run over the confident pairs (two rows each, and the reference's
        forward pass). GRPO / RLOO: each optimiser step samples per_device_batch_size x
        gradient_accumulation_steps completions, scores them with the reward model and trains
        on them."""
        settings = config.optimize
        model, key = policy_model(config), "optimize.model"
        counter = ctx.tokens(model, key)
        limit = settings.training.max_length
        if settings.method == "dpo":
            pairs, note = training_pairs(config, ctx, counter)
            lengths = [min(max(p["tokens"]), limit) for p in pairs
                       if abs(p["p_chosen"] - 0.5) >= settings.min_confidence]
            return Work([Train(key, model, lengths, settings.training, settings.lora,
                               rows_per_example=2, reference=True)],
                        counts={"pairs": len(pairs), "train_pairs": len(lengths)}, notes=[note])
        prompts = list(ctx.output("generate-sl")["prompts"])
        if settings.include_helpful and config.data.helpful is not None:
            helpful = config.data.helpful
            prompts += ctx.prompts("data.helpful", lambda: load_prompts(helpful, config.seed,
                                                                        "data.helpful"),
                                   helpful, helpful.limit)
        group, new = settings.num_generations, settings.max_completion_length
        lengths = [counter.conversation_tokens([{"role": "user", "content": p.text},
                                                {"role": "assistant", "content": ""}]) + new
                   for p in prompts for _ in range(group)]
        training_settings = settings.training
        rows = training_settings.per_device_batch_size * training_settings.gradient_accumulation_steps
        rm = reward_base_model(config)[0].model_copy(update={"name_or_path": str(config.layout.rm)})
        return Work([Train(key, model, lengths, training_settings, settings.lora,
                           reference=settings.beta > 0, completions_per_step=rows,
                           completion_tokens=new, reward_model=rm)],
                    counts={"prompts": len(prompts), "completions": len(lengths)},
                    notes=[f"{new} tokens a completion (max_completion_length); TRL generates "
                           "with transformers unless its vLLM options are set"])
