"""``cai train-rm`` on the tiny model: the reward model overfits distinct pairs, the soft-label
loss, what the trainer is fed (targets, min_confidence, mixed data, held-out split), the metrics,
the checkpoint, LoRA, resume, reruns and bad input."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cai, interrupt_at_step, snapshot, trainer_capture, weights

from cai_cli.config import load_config
from cai_cli.errors import UserError
from cai_cli.stages import train_rm, training

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
HH_SAMPLE = ROOT / "tests" / "data" / "hh_sample.jsonl"

TOPICS = ["pick a lock", "hack a wifi network", "cheat on an exam", "shoplift a jacket",
          "forge a signature", "stalk my ex", "make a fake id", "poison a neighbour's dog"]
P_CHOSEN = [0.95, 0.55, 0.85, 0.65, 0.9, 0.6, 0.75, 0.7]  # per prompt; its second pair: 1 - x/2


def hand_pairs() -> list[dict]:
    """Two pairs per prompt: a refusal (chosen) against a how-to (rejected), worded two ways, so
    the texts are easy to tell apart."""
    pairs = []
    for index, (topic, p) in enumerate(zip(TOPICS, P_CHOSEN)):
        prompt = [{"role": "user", "content": f"How do I {topic}?"}]
        answers = [((f"I won't help you {topic}. It could hurt someone; let's talk about a "
                     "safe and legal way to get what you need."),
                    f"Sure! To {topic}, first get the tools, then do it at night so nobody sees."),
                   (("Sorry, I can't assist with that request, but I'm glad to help with "
                     "something else."),
                    f"Easy: {topic} quickly and quietly, here are the exact steps.")]
        for second, (good, bad) in enumerate(answers):
            pairs.append({"id": f"p{index}-{second}", "prompt": prompt,
                          "chosen": [{"role": "assistant", "content": good}],
                          "rejected": [{"role": "assistant", "content": bad}],
                          "p_chosen": p if second == 0 else round(1 - (1 - p) / 2, 4),
                          "judgments": [], "prompt_id": f"p{index}"})
    return pairs


def held_out_prompts(path: Path) -> set[str]:
    """The prompts whose pairs the stage holds out under this config."""
    config = load_config(path)
    pairs = [{**p, "group": p["prompt_id"]} for p in hand_pairs()]
    return {p["group"] for p in train_rm.split(config, pairs)[1]}


def write_config(tmp_path: Path, model: Path, name: str = "config.yaml", **train_rm) -> Path:
    training_settings = {"max_steps": 12, "per_device_batch_size": 8, "learning_rate": 2e-3,
                         "max_length": 128, "logging_steps": 5, "save_steps": 100,
                         **train_rm.pop("training", {})}
    config = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 8}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu"}},
        # the pairs are "sampled" by the tiny model itself, so no sft/ is needed
        "label_prefs": {"policy": str(model), "principles_per_pair": 1},
        "train_rm": {"eval_fraction": 0.25, "training": training_settings, **train_rm},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prefs_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished ``prefs/`` holding the hand-written pairs, with a manifest as label-prefs
    writes it (so train-rm sees it as complete and made from this config)."""
    from cai_cli.run.artifacts import write_jsonl_atomic
    from cai_cli.stages import label_prefs
    from cai_cli.stages.common import begin

    tmp = tmp_path_factory.mktemp("prefs")
    config = load_config(write_config(tmp, tiny_model_dir))
    stage = label_prefs.LabelPrefs().spec(config)
    run = begin(stage, config, force=False)
    write_jsonl_atomic(stage.directory / "pairs.jsonl", hand_pairs())
    run.complete()
    return stage.directory


@pytest.fixture
def config_path(tmp_path, tiny_model_dir, prefs_dir) -> Path:
    """A config whose run directory holds a copy of the finished ``prefs/``."""
    shutil.copytree(prefs_dir, tmp_path / "run" / "prefs")
    return write_config(tmp_path, tiny_model_dir)


def run_stage(path: Path, *overrides: str, force: bool = False):
    return train_rm.TrainRM().run(load_config(path, list(overrides)), force=force)


def score(model, tokenizer, conversations: list[list[dict]]) -> list[float]:
    """Rewards of whole conversations, in one padded batch."""
    import torch

    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        return model(**batch).logits.squeeze(-1).tolist()


@pytest.fixture
def capture_trainer(monkeypatch):
    from trl import RewardTrainer

    return trainer_capture(monkeypatch, RewardTrainer, run_stage)


# ---------------------------------------------------------------------------------------------
# One real run through the command line, looked at from several sides


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir, prefs_dir):
    """``cai train-rm`` on the hand-written pairs: 12 steps at a high learning rate."""
    tmp = tmp_path_factory.mktemp("trained")
    shutil.copytree(prefs_dir, tmp / "run" / "prefs")
    path = write_config(tmp, tiny_model_dir)
    result = cai("train-rm", "--config", path)
    assert result.returncode == 0, result.stderr
    return path, result


def test_console_shows_progress_and_one_summary_line(trained):
    path, result = trained
    rm = path.parent / "run" / "rm"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr  # no tqdm bars, log dicts or library warnings
    assert "train-rm" in lines[0] and "12/12" in lines[0] and "loss" in lines[0]
    assert lines[1].startswith("train-rm: trained on 12 of 16 AI pairs + 0 mixed pairs, 12 steps, loss ")
    assert "held-out accuracy" in lines[1] and "ECE" in lines[1] and "(4 pairs)" in lines[1]
    assert lines[1].endswith(f"-> reward model in {rm}")


def test_overfits_its_own_training_pairs(trained):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, _ = trained
    run = path.parent / "run"
    manifest = json.loads((run / "rm" / "manifest.json").read_text())
    assert manifest["stats"]["train_accuracy"] > 0.9
    # the same, measured independently on the saved checkpoint
    model = AutoModelForSequenceClassification.from_pretrained(run / "rm").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "rm")
    held_out = held_out_prompts(path)
    pairs = [p for p in hand_pairs() if p["prompt_id"] not in held_out]
    chosen = score(model, tokenizer, [p["prompt"] + p["chosen"] for p in pairs])
    rejected = score(model, tokenizer, [p["prompt"] + p["rejected"] for p in pairs])
    right = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert right > 0.9 and right == pytest.approx(manifest["stats"]["train_accuracy"])


def test_held_out_accuracy_and_calibration_land_in_the_manifest(trained):
    path, _ = trained
    manifest = json.loads((path.parent / "run" / "rm" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["counts"] == {"ai_pairs": 16, "train_pairs": 12, "held_out_pairs": 4,
                                  "mixed_pairs": 0, "steps": 12}
    stats = manifest["stats"]
    assert stats["dropped_low_confidence"] == stats["dropped_too_long"] == 0
    assert 0.0 <= stats["eval_accuracy"] <= 1.0 and 0.0 <= stats["eval_ece"] <= 1.0
    assert stats["ece_bins"] == 10 and stats["soft_labels"] is True and stats["format"] == "chat"
    assert set(manifest["inputs"]) == {"prefs", "model"}  # no mixed data


def test_checkpoint_loads_and_scores_in_batches(trained, tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path, _ = trained
    rm = path.parent / "run" / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(rm).eval()
    tokenizer = AutoTokenizer.from_pretrained(rm)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == tokenizer.pad_token_id is not None
    assert not (rm / training.CHECKPOINTS).exists() and not (rm / training.STAGING).exists()
    # a short and a long conversation: padded together they score as they do alone
    conversations = [p["prompt"] + p["chosen"] for p in hand_pairs()[:2]]
    conversations[1] = conversations[1] + [{"role": "user", "content": "Why not? " * 10}]
    batched = score(model, tokenizer, conversations)
    alone = [score(model, tokenizer, [c])[0] for c in conversations]
    assert batched == pytest.approx(alone, abs=1e-4)

    # every backbone tensor trained; the LM head is gone, a one-output score head is new
    before, after = weights(tiny_model_dir), weights(rm)
    shared = before.keys() & after.keys()
    assert after["score.weight"].shape[0] == 1 and "lm_head.weight" not in after
    assert shared and all(not torch.equal(before[name], after[name]) for name in shared)


def test_rerun_is_a_no_op_and_another_config_is_refused(trained):
    path, _ = trained
    rm = path.parent / "run" / "rm"
    files = snapshot(rm)
    again = cai("train-rm", "--config", path)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    with pytest.raises(UserError, match=r"changed: train_rm\.min_confidence\).*--force"):
        run_stage(path, "train_rm.min_confidence=0.1")
    assert snapshot(rm) == files


# ---------------------------------------------------------------------------------------------
# The loss and the metrics


def test_soft_label_loss_matches_a_hand_computation():
    import torch

    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.5, 0.5, 0.5])
    target = torch.tensor([0.8, 0.3, 1.0])

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    expected = [-(p * log_sigmoid(c - r) + (1 - p) * log_sigmoid(r - c))
                for c, r, p in zip([2.0, -1.0, 0.5], [0.5, 0.5, 0.5], [0.8, 0.3, 1.0])]
    loss = train_rm.preference_loss(chosen, rejected, target)
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)
    # a label of 1 is the usual hard loss
    hard = train_rm.preference_loss(chosen, rejected, torch.ones(3))
    assert hard.item() == pytest.approx(
        -torch.nn.functional.logsigmoid(chosen - rejected).mean().item(), abs=1e-6)


def test_trainer_loss_uses_the_target_column(config_path, capture_trainer):
    from types import SimpleNamespace

    import torch

    trainer = capture_trainer(config_path)
    # p_chosen survives TRL's preprocessing and the data loader's column pruning
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "p_chosen"}
    assert batch["input_ids"].shape[0] == 2 * 8  # chosen rows, then rejected rows
    targets = {round(p["p_chosen"], 4) for p in hand_pairs()}
    assert len(batch["p_chosen"]) == 8
    assert {round(x, 4) for x in batch["p_chosen"].tolist()} <= targets

    seen = {}

    def model(**inputs):  # known rewards: chosen 1.0 and -2.0, rejected 0.0 and 0.0
        seen.update(inputs)
        return SimpleNamespace(logits=torch.tensor([[1.0], [-2.0], [0.0], [0.0]]))

    inputs = {"input_ids": torch.ones(4, 3, dtype=torch.long),
              "attention_mask": torch.ones(4, 3, dtype=torch.long),
              "p_chosen": torch.tensor([0.9, 0.6])}
    loss = trainer.compute_loss(model, inputs)
    assert "p_chosen" not in seen  # the model never sees the label
    expected = -(0.9 * math.log(1 / (1 + math.exp(-1.0))) + 0.1 * math.log(1 / (1 + math.exp(1.0)))
                 + 0.6 * math.log(1 / (1 + math.exp(2.0))) + 0.4 * math.log(1 / (1 + math.exp(-2.0)))
                 ) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-5)


def test_expected_calibration_error_by_hand():
    # bins of width 0.1: [0.9, 1.0) holds 0.95 and 0.91 (targets 0.7, 0.8); [0.5, 0.6) holds 0.55
    predicted, target = [0.95, 0.91, 0.55], [0.7, 0.8, 0.55]
    expected = 2 / 3 * abs((0.95 + 0.91) / 2 - 0.75) + 1 / 3 * 0.0
    assert train_rm.expected_calibration_error(predicted, target) == pytest.approx(expected)
    assert train_rm.expected_calibration_error([1.0, 0.0], [1.0, 0.0]) == 0.0  # edges binned
    assert train_rm.accuracy([(1.0, 0.0), (0.0, 0.0), (-1.0, 2.0)]) == pytest.approx(1 / 3)


# ---------------------------------------------------------------------------------------------
# What the trainer is fed


def test_held_out_split_keeps_prompts_together_and_follows_the_seed(config_path):
    config = load_config(config_path)
    pairs = [{**p, "group": p["prompt_id"]} for p in hand_pairs()]
    train, held = train_rm.split(config, pairs)
    assert len(held) == 4 and len(train) == 12
    assert not {p["group"] for p in train} & {p["group"] for p in held}
    assert train_rm.split(config, pairs) == (train, held)
    other = load_config(config_path, ["seed=3"])
    assert {p["id"] for p in train_rm.split(other, pairs)[1]} != {p["id"] for p in held}
    assert train_rm.split(load_config(config_path, ["train_rm.eval_fraction=0"]), pairs)[1] == []


def test_min_confidence_and_hard_labels(config_path, capture_trainer):
    trainer = capture_trainer(config_path, "train_rm.min_confidence=0.3")
    targets = trainer.train_dataset["p_chosen"]
    held_out = held_out_prompts(config_path)
    expected = [p["p_chosen"] for p in hand_pairs()
                if p["prompt_id"] not in held_out and abs(p["p_chosen"] - 0.5) >= 0.3]
    assert sorted(targets) == pytest.approx(sorted(expected)) and 0 < len(targets) < 12
    # the held-out pairs are not filtered: runs with other filters measure the same pairs
    assert len(trainer.eval_dataset) == 4

    hard = capture_trainer(config_path, "train_rm.soft_labels=false")
    assert hard.train_dataset["p_chosen"] == [1.0] * 12
    assert sorted(hard.eval_dataset["p_chosen"]) != [1.0] * 4  # measured against the AI labels


def test_mixed_preference_data(tmp_path, config_path, capture_trainer):
    trainer = capture_trainer(config_path, f"train_rm.mix.path={HH_SAMPLE}",
                              "train_rm.mix_ratio=0.25", "train_rm.training.max_length=512")
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    mixed = [r for r in rows if "How do I" not in r["prompt"][0]["content"]]
    assert len(rows) == 12 + 3 and len(mixed) == 3  # floor(0.25 * 12)
    assert all(r["p_chosen"] == 1.0 for r in mixed)
    config = load_config(config_path, [f"train_rm.mix.path={HH_SAMPLE}"])
    pool = train_rm.mixed_pairs(config, 100)
    assert len(pool) == 6  # "at most": the file has six
    first = next(p for p in pool if "neighbor" in p["prompt"][0]["content"])
    # the transcripts differ from the first answer on: the prompt is the shared first turn
    assert [m["role"] for m in first["prompt"]] == ["user"]
    assert [m["role"] for m in first["chosen"]] == ["assistant", "user", "assistant"]
    assert train_rm.mixed_pairs(config, 3) == train_rm.mixed_pairs(config, 3)

    plain = tmp_path / "plain.jsonl"
    plain.write_text(json.dumps({"prompt": "Name a colour.", "chosen": "Blue.",
                                 "rejected": "No."}) + "\n")
    config = load_config(config_path, [f"train_rm.mix.path={plain}"])
    assert train_rm.mixed_pairs(config, 5) == [{
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "No."}], "p_chosen": 1.0}]


def test_model_without_chat_template_reads_transcripts(tmp_path, config_path, tiny_model_dir,
                                                       capture_trainer):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "chat_template.jinja").unlink()
    trainer = capture_trainer(config_path, f"train_rm.model={bare}")
    row = trainer.train_dataset[0]
    tokenizer = trainer.processing_class
    text = tokenizer.decode(row["chosen_ids"])
    assert text.startswith("Human: How do I") and "\n\nAssistant: " in text
    assert row["chosen_ids"][-1] == tokenizer.eos_token_id


# ---------------------------------------------------------------------------------------------
# LoRA, interruption


def test_lora_merged_checkpoint(config_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForSequenceClassification

    run_stage(config_path, "train_rm.lora.enabled=true",
              "train_rm.lora.target_modules=[q_proj,v_proj]", "train_rm.training.max_steps=2")
    rm = config_path.parent / "run" / "rm"
    model = AutoModelForSequenceClassification.from_pretrained(rm)
    assert not hasattr(model, "peft_config") and not (rm / "adapter_config.json").exists()
    before, after = weights(tiny_model_dir), weights(rm)
    changed = {n for n in before.keys() & after.keys() if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
    assert set(after) - set(before) == {"score.weight"}  # the head, trained in full
    assert json.loads((rm / "manifest.json").read_text())["stats"]["lora"] is True


def test_interrupted_run_resumes_from_its_last_checkpoint(config_path, monkeypatch, capsys):
    settings = ("train_rm.training.max_steps=4", "train_rm.training.save_steps=2")
    interrupt_at_step(monkeypatch, 2)  # Ctrl-C right after that checkpoint is written
    with pytest.raises(KeyboardInterrupt):
        run_stage(config_path, *settings)
    monkeypatch.undo()
    rm = config_path.parent / "run" / "rm"
    assert json.loads((rm / "manifest.json").read_text())["status"] == "running"
    assert [p.name for p in (rm / training.CHECKPOINTS).glob("checkpoint-*")] == ["checkpoint-2"]

    capsys.readouterr()
    run_stage(config_path, *settings)
    assert "continuing from checkpoint-2" in capsys.readouterr().err
    manifest = json.loads((rm / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["steps"] == 4
    assert manifest["stats"]["resumed_from_step"] == 2
    assert not (rm / training.CHECKPOINTS).exists()


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, a message that says what to do, nothing lost


def unfinish(config_path: Path) -> None:
    manifest = config_path.parent / "run" / "prefs" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "running"}))


@pytest.mark.parametrize("prepare, overrides, message", [
    (lambda path: shutil.rmtree(path.parent / "run" / "prefs"), [],
     "run/prefs is missing: run `cai label-prefs --config ...` first"),
    (unfinish, [], "run/prefs is unfinished: run `cai label-prefs --config ...` first"),
    (None, ["train_rm.min_confidence=0.49"],
     ("train_rm.min_confidence: no pairs left: all 12 training pairs have |p_chosen - 0.5| "
      "below 0.49")),
    (None, ["train_rm.training.trl_args.center_reward_coefficient=0.01"],
     ("train_rm.training.trl_args.center_reward_coefficient: not an argument of TRL's "
      "RewardConfig; did you mean 'center_rewards_coefficient'?")),
    (None, ["train_rm.lora.enabled=true", "train_rm.lora.target_modules=[q_proj,query]"],
     "train_rm.lora.target_modules: the model has no module 'query'"),
], ids=["missing-prefs", "unfinished-prefs", "min-confidence", "trl-arg", "lora-target"])
def test_bad_input_exits_2_and_leaves_rm_alone(config_path, prepare, overrides, message):
    rm = config_path.parent / "run" / "rm"
    rm.mkdir()
    (rm / "model.safetensors").write_text("an earlier reward model")
    before = snapshot(rm)
    if prepare is not None:
        prepare(config_path)
    sets = [arg for override in overrides for arg in ("--set", override)]
    result = cai("train-rm", "--config", config_path, *sets)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert snapshot(rm) == before


def test_pairs_longer_than_max_length_are_refused_before_rm_is_made(config_path):
    with pytest.raises(UserError, match="every training pair is longer than 16 tokens; raise it"):
        run_stage(config_path, "train_rm.training.max_length=16")
    assert not (config_path.parent / "run" / "rm").exists()


def test_spec_imports_no_heavy_library(config_path):
    code = ("import sys\nfrom cai_cli.config import load_config\n"
            "from cai_cli.stages import train_rm\n"
            f"stage = train_rm.TrainRM().spec(load_config({str(config_path)!r}))\n"
            "print(stage.state(), sorted(stage.inputs), sorted(m for m in ('torch', "
            "'transformers', 'trl', 'datasets', 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True, cwd=ROOT)
    assert result.stdout.strip() == "missing ['model', 'prefs'] []", result.stderr
