"""``cai train-rm``: a reward (preference) model on the AI-labelled pairs, with TRL's RewardTrainer.

The training set is ``prefs/pairs.jsonl`` (made by ``cai label-prefs``), optionally mixed with
other preference data (``train_rm.mix``, at most ``mix_ratio`` pairs per AI pair, label 1.0). The
model is ``train_rm.model`` (default: the base policy) under a one-output sequence classification
head; a pair's reward difference d = r(chosen) - r(rejected) is trained with

    soft labels:  loss = -(p * logsigmoid(d) + (1 - p) * logsigmoid(-d)),  p = p_chosen
    hard labels:  loss = -logsigmoid(d)  (the same formula with p = 1)

so with soft labels sigmoid(d) learns the feedback model's confidence, not just its choice.

Before training, ``eval_fraction`` of the AI pairs is held out, whole prompts at a time (pairs of
one prompt share answers, so splitting them would leak), drawn with the seed and before
``min_confidence`` filters the training pairs: the held-out set stays the same whatever the
filter, so runs with different filters compare. After training, on the held-out pairs:

    accuracy  share of pairs with r(chosen) > r(rejected), chosen as the AI labelled it
    ECE       expected calibration error of q = sigmoid(d) against the AI label p_chosen (in both
              label modes): 10 equal-width bins of q over [0, 1],
              ECE = sum over bins |bin| / N * |mean q - mean p_chosen|

and the accuracy on the training pairs (AI and mixed). ``<run_dir>/rm`` is a ``save_pretrained``
checkpoint that loads with ``AutoModelForSequenceClassification`` (pad token set, so batched
scoring works), with its tokenizer. Resume, reruns and refusing another config's output work as
for ``cai finetune`` (shared helpers in ``cai_cli.stages.training``).
"""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

from cai_cli import ui
from cai_cli.config import Config, ModelConfig
from cai_cli.data.sources import preference_pair, read_records
from cai_cli.engines import models
from cai_cli.engines.prompts import transcript_pair
from cai_cli.engines.work import Forward, Train, Work
from cai_cli.errors import UserError
from cai_cli.reports.statistics import expected_calibration_error, reliability_table
from cai_cli.run import records
from cai_cli.run.artifacts import source_fingerprint
from cai_cli.run.records import Pair, conversation
from cai_cli.run.spec import StageSpec
from cai_cli.stages import training
from cai_cli.stages.base import Stage
from cai_cli.stages.common import Need, begin, require_complete
from cai_cli.stages.label_prefs import LabelPrefs, training_pairs

# The AI-labelled pairs this stage trains on.
PAIRS = Need(LabelPrefs(), stale_use="training on it as is")

TARGET = "p_chosen"  # the training target column: p_chosen, or 1.0 for hard and mixed labels
ECE_BINS = 10
# LoRA may not target the reward head: peft trains it in full beside the adapters (SEQ_CLS).
REWARD_HEAD = {"score": "the reward head, which is always trained in full"}


def base_model(config: Config) -> tuple[ModelConfig, str]:
    """The model under the reward head and the config key that names it."""
    return training.model_for(config, config.train_rm.model, "train_rm.model")


# ---------------------------------------------------------------------------------------------
# Data


def ai_pairs(config: Config) -> list[dict]:
    """The pairs of a finished ``cai label-prefs``: prompt, chosen, rejected, p_chosen, group."""
    require_complete(config, PAIRS)
    path = config.layout.pairs
    pairs = [{"prompt": conversation(pair.prompt), "chosen": conversation(pair.chosen),
              "rejected": conversation(pair.rejected), TARGET: float(pair.p_chosen),
              "group": pair.prompt_id or pair.id}
             for pair in records.read(path, Pair)]
    if not pairs:
        raise UserError(f"{path}: no pairs (every prompt was skipped); see `cai inspect "
                        f"{ui.shell(config.run_dir)}` and rerun `cai label-prefs`")
    return pairs


def split(config: Config, pairs: list[dict]) -> tuple[list[dict], list[dict]]:
    """``(train, held_out)``: about ``eval_fraction`` of the pairs held out, whole prompts at a
    time, drawn with the seed; at least one prompt always stays for training."""
    fraction = config.train_rm.eval_fraction
    groups: dict[str, list[dict]] = {}
    for pair in pairs:
        groups.setdefault(pair["group"], []).append(pair)
    if fraction == 0:
        return pairs, []
    if len(groups) < 2:
        ui.warn("train_rm.eval_fraction: all pairs come from one prompt, so none can be held "
                "out; accuracy and calibration are not measured")
        return pairs, []
    keys = sorted(groups)
    random.Random(f"{config.seed}:eval").shuffle(keys)
    wanted = max(1, round(fraction * len(pairs)))
    held: set[str] = set()
    count = 0
    for key in keys[:-1]:
        if count >= wanted:
            break
        held.add(key)
        count += len(groups[key])
    return ([p for p in pairs if p["group"] not in held],
            [p for p in pairs if p["group"] in held])


def confident(config: Config, pairs: list[dict]) -> list[dict]:
    """The pairs whose label is at least ``min_confidence`` away from a tie."""
    threshold = config.train_rm.min_confidence
    kept = [p for p in pairs if abs(p[TARGET] - 0.5) >= threshold]
    if not kept:
        top = max(abs(p[TARGET] - 0.5) for p in pairs)
        raise UserError(f"train_rm.min_confidence: no pairs left: all {len(pairs)} training pairs "
                        f"have |p_chosen - 0.5| below {threshold} (the most confident: "
                        f"{top:.3f}); lower train_rm.min_confidence")
    return kept


def mixed_pairs(config: Config, count: int) -> list[dict]:
    """At most ``count`` pairs from ``train_rm.mix``, drawn with the seed (capped by its limit)."""
    source, key = config.train_rm.mix, "train_rm.mix"
    if source is None or count == 0:
        return []
    pool = [pair for where, record in read_records(source, key)
            if (pair := preference_pair(record, where)) is not None]
    if not pool:
        raise UserError(f"{key}: no preference pairs in {source.path or source.dataset}")
    random.Random(f"{config.seed}:mix").shuffle(pool)
    return pool[: min(count, source.limit or len(pool))]


def rows(pairs: list[dict], fmt: str, soft: bool) -> list[dict]:
    """The trainer's columns: prompt, chosen, rejected and the target (1.0 for hard labels)."""
    out = []
    for pair in pairs:
        row = {name: pair[name] for name in ("prompt", "chosen", "rejected")}
        row[TARGET] = pair[TARGET] if soft else 1.0
        out.append(transcript_pair(row) if fmt == "transcript" else row)
    return out


# ---------------------------------------------------------------------------------------------
# Loss, collator and metrics


def preference_loss(chosen, rejected, target):
    """Mean binary cross-entropy of sigmoid(r_chosen - r_rejected) against the target
    probability that chosen is better: -(p logsigmoid(d) + (1 - p) logsigmoid(-d))."""
    import torch.nn.functional as F

    return F.binary_cross_entropy_with_logits(chosen - rejected, target.to(chosen.dtype))


class PreferenceCollator:
    """TRL's preference collator (chosen rows, then rejected rows, right-padded) plus the
    target column; module-level so data loader workers can pickle it."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        from trl.trainer.reward_trainer import DataCollatorForPreference

        self.base = DataCollatorForPreference(pad_token_id=pad_token_id,
                                              pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.base(examples)
        if TARGET in examples[0]:
            batch[TARGET] = torch.tensor([e[TARGET] for e in examples], dtype=torch.float32)
        return batch


@functools.cache
def trainer_class():
    """TRL's RewardTrainer with the soft-label loss; everything else (data preparation,
    metrics, checkpoints) is TRL's own."""
    from trl import RewardTrainer

    class SoftLabelRewardTrainer(RewardTrainer):
        def _set_signature_columns_if_needed(self):
            # With remove_unused_columns (the default) the data loader keeps only these columns.
            super()._set_signature_columns_if_needed()
            if TARGET not in self._signature_columns:
                self._signature_columns = [*self._signature_columns, TARGET]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            target = inputs.pop(TARGET)
            # TRL's pass gives the rewards and logs its metrics (accuracy, margin); its hard
            # loss is replaced by ours.
            _, outputs = super().compute_loss(model, inputs, return_outputs=True,
                                              num_items_in_batch=num_items_in_batch)
            chosen, rejected = outputs.logits.squeeze(-1).float().chunk(2)
            loss = preference_loss(chosen, rejected, target)
            if self.args.center_rewards_coefficient is not None:
                loss = loss + self.args.center_rewards_coefficient * ((chosen + rejected) ** 2).mean()
            return (loss, outputs) if return_outputs else loss

    return SoftLabelRewardTrainer


def pair_rewards(trainer, dataset, batch_size: int) -> list[tuple[float, float]]:
    """``(r_chosen, r_rejected)`` for each pair of a prepared (tokenised) dataset."""
    import torch

    model = trainer.model
    model.eval()
    columns = dataset.select_columns(["chosen_ids", "rejected_ids"])
    out: list[tuple[float, float]] = []
    for start in range(0, len(columns), batch_size):
        chunk = columns[start:start + batch_size]
        examples = [{"chosen_ids": c, "rejected_ids": r}
                    for c, r in zip(chunk["chosen_ids"], chunk["rejected_ids"])]
        batch = {k: v.to(trainer.args.device) for k, v in trainer.data_collator(examples).items()}
        with torch.no_grad(), trainer.autocast_smart_context_manager():
            logits = model(**batch, use_cache=False).logits.squeeze(-1).float()
        chosen, rejected = logits.chunk(2)
        out += zip(chosen.tolist(), rejected.tolist())
    return out


def accuracy(rewards: list[tuple[float, float]]) -> float:
    """Share of pairs whose chosen answer gets the higher reward (a tie counts as wrong)."""
    return sum(c > r for c, r in rewards) / len(rewards)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


# ---------------------------------------------------------------------------------------------
# The stage


def trainer_args(config: Config):
    """TRL's RewardConfig from our settings; UserError for anything TRL or we would reject."""
    from trl import RewardConfig

    model, _ = base_model(config)
    return training.trl_config(RewardConfig, config.train_rm.training, "train_rm.training",
                               seed=config.seed, output_dir=config.layout.rm,
                               cpu=training.use_cpu(model), stage_args={})


def measure(trainer, batch_size: int) -> dict:
    """Accuracy on the training pairs; accuracy and ECE on the held-out pairs (None without).
    Batches of the training batch size: what fits with gradients fits without."""
    stats = {"train_accuracy": round(accuracy(pair_rewards(trainer, trainer.train_dataset,
                                                           batch_size)), 4),
             "eval_accuracy": None, "eval_ece": None, "ece_bins": ECE_BINS}
    held_out = trainer.eval_dataset
    if held_out is not None and len(held_out):
        rewards = pair_rewards(trainer, held_out, batch_size)
        stats["eval_accuracy"] = round(accuracy(rewards), 4)
        predicted, target = [sigmoid(c - r) for c, r in rewards], list(held_out[TARGET])
        stats["eval_ece"] = round(expected_calibration_error(predicted, target), 4)
        # Per bin, for the reliability diagram (rm/plots/calibration.png).
        stats["eval_reliability"] = [
            {**row, "mean_predicted": round(row["mean_predicted"], 4),
             "mean_target": round(row["mean_target"], 4)}
            for row in reliability_table(predicted, target, ECE_BINS)]
    return stats


def build_trainer(config: Config, model_config: ModelConfig, key: str, tokenizer, args, train,
                  held_out):
    import datasets
    from transformers import AutoModelForSequenceClassification, set_seed
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    lora = config.train_rm.lora
    set_seed(config.seed)  # before loading: the new head and LoRA start from the global RNG
    with suppress_seqcls_warning():  # the new head and the unused LM head are expected
        model = models.load_model(model_config, key, lora, args,
                                    AutoModelForSequenceClassification, num_labels=1)
    # SEQ_CLS makes peft train the reward head in full beside the adapters.
    peft_config = training.peft_config(lora, "SEQ_CLS") if lora.enabled else None
    return trainer_class()(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(train),
        eval_dataset=datasets.Dataset.from_list(held_out) if held_out else None,
        processing_class=tokenizer, peft_config=peft_config,
        data_collator=PreferenceCollator(tokenizer.pad_token_id, args.pad_to_multiple_of))


class TrainRM(Stage):
    command = "train-rm"
    trains = True

    def needs(self, config: Config) -> list[Need]:
        return [PAIRS]

    def spec(self, config: Config) -> StageSpec:
        mix = config.train_rm.mix  # a setting of train_rm already; its content an input
        return training.stage_spec(config, self.command, "train_rm", {"prefs": config.layout.pairs},
                                   inputs={"mix": source_fingerprint(mix)} if mix else None)

    def preflight(self, config: Config) -> None:
        """What can be checked before any stage runs: the trainer arguments, and for a local model
        the LoRA targets."""
        trainer_args(config)
        model, _ = base_model(config)
        if Path(model.name_or_path).expanduser().is_dir():  # made already, or the user's own
            from transformers import AutoModelForSequenceClassification

            training.check_lora(config.train_rm.lora, model, "train_rm.lora",
                                AutoModelForSequenceClassification, forbidden=REWARD_HEAD, num_labels=1)

    def run(self, config: Config, *, force: bool = False, shard=None) -> Path | None:
        stage = self.spec(config)
        settings = config.train_rm
        # The pairs first, as they are the likeliest thing to be missing; then, still before the
        # heavy imports, whether there is anything to do at all.
        pairs = ai_pairs(config)
        run = begin(stage, config, force=force)  # "nothing to do", or refuses another config's output
        if run is None:
            return stage.directory
        # Everything else a user can get wrong is checked before rm/ is touched.
        train, held_out = split(config, pairs)
        kept = confident(config, train)
        mixed = mixed_pairs(config, math.floor(settings.mix_ratio * len(kept)))
        model, key = base_model(config)
        models.check_model(model, key)

        from transformers import AutoModelForSequenceClassification

        training.quiet_libraries()
        args = trainer_args(config)
        tokenizer = models.load_tokenizer(model, key)
        fmt = ("chat" if tokenizer.chat_template or "chat_template_path" in settings.training.trl_args
               else "transcript")
        training.check_lora(settings.lora, model, "train_rm.lora", AutoModelForSequenceClassification,
                            forbidden=REWARD_HEAD, num_labels=1)

        def build():
            # TRL tokenises when the trainer is built and drops pairs longer than max_length.
            trainer = build_trainer(config, model, key, tokenizer, args,
                                    rows(kept, fmt, settings.soft_labels) + rows(mixed, fmt, False),
                                    rows(held_out, fmt, True))
            if len(trainer.train_dataset) == 0:
                for made in (stage.directory / training.CHECKPOINTS, stage.directory):
                    if made.is_dir() and not any(made.iterdir()):  # made empty by the Trainer
                        made.rmdir()
                raise UserError(f"train_rm.training.max_length: every training pair is longer than "
                                f"{settings.training.max_length} tokens; raise it")
            return trainer

        trainer, result, checkpoint = training.fit(run, build, "train-rm")
        stats = measure(trainer, settings.training.per_device_batch_size)
        training.save(run, trainer, tokenizer, settings.lora, result, args, checkpoint)

        held = len(trainer.eval_dataset) if trainer.eval_dataset is not None else 0
        too_long = len(kept) + len(mixed) + len(held_out) - len(trainer.train_dataset) - held
        manifest = run.manifest
        manifest.counts = {"ai_pairs": len(pairs), "train_pairs": len(kept), "held_out_pairs": held,
                           "mixed_pairs": len(mixed), "steps": result.global_step}
        manifest.stats.update({**stats, "dropped_low_confidence": len(train) - len(kept),
                               "dropped_too_long": too_long, "soft_labels": settings.soft_labels,
                               "format": fmt})
        run.complete()
        if too_long:
            ui.warn(f"{too_long} pairs longer than train_rm.training.max_length "
                    f"({settings.training.max_length} tokens) were left out")
        measured = (f"held-out accuracy {stats['eval_accuracy']:.3f}, ECE {stats['eval_ece']:.3f} "
                    f"({held} {'pair' if held == 1 else 'pairs'})" if held else "no held-out pairs")
        what = "LoRA adapter" if settings.lora.enabled and not settings.lora.merge else "reward model"
        ui.info(f"train-rm: trained on {len(kept)} of {len(pairs)} AI pairs + {len(mixed)} mixed "
                f"{'pair' if len(mixed) == 1 else 'pairs'}, {result.global_step} steps, "
                f"loss {manifest.stats['final_loss']:.4f}; {measured}; train accuracy "
                f"{stats['train_accuracy']:.3f} -> {what} in {stage.directory}")
        return stage.directory

    def work(self, config: Config, ctx) -> Work:
        """One training run over the confident training pairs (two rows each) and the mixed
        pairs, then a forward pass over every pair to measure accuracy and calibration."""
        settings = config.train_rm
        model, key = base_model(config)
        counter = ctx.tokens(model, key)
        pairs, note = training_pairs(config, ctx, counter)
        train, held = split(config, pairs) if pairs else ([], [])
        kept = [p for p in train if abs(p["p_chosen"] - 0.5) >= settings.min_confidence]
        limit = settings.training.max_length
        mixed = math.floor(settings.mix_ratio * len(kept)) if settings.mix is not None else 0
        if mixed:
            pool = ctx.dataset("train_rm.mix", lambda: mixed_pairs(config, mixed), settings.mix,
                               f"assumed {mixed} pairs of max_length tokens")
            mixed = mixed if pool is None else len(pool)
        lengths = [min(n, limit) for n in [max(p["tokens"]) for p in kept] + [limit] * mixed]
        # The reward head is one output: no vocabulary-sized head to pass through.
        calls = [Train(key, model, lengths, settings.training, settings.lora, rows_per_example=2,
                       head=False),
                 Forward(key, model, [n for p in pairs for n in p["tokens"]])]
        return Work(calls, counts={"ai_pairs": len(pairs), "train_pairs": len(kept),
                                   "held_out_pairs": len(held), "mixed_pairs": mixed},
                    notes=[note])
