"""``cai finetune`` on the tiny model: the checkpoint it leaves, assistant-only labels, helpful
mixing, LoRA saved both ways, resume after an interruption, reruns and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cai, cai_main, interrupt_at_step, snapshot, trainer_capture, weights

from cai_cli.config import load_config
from cai_cli.errors import UserError
from cai_cli.stages import finetune, training

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
HELPFUL = ROOT / "cai_cli" / "resources" / "helpful.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
HH_SAMPLE = ROOT / "tests" / "data" / "hh_sample.jsonl"


def write_config(tmp_path: Path, model: Path, name: str = "config.yaml") -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 4},
                 "helpful": {"path": str(HELPFUL), "field": "messages"}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu", "forward_batch_size": 4}},
        "generate_sl": {"num_revisions": 1, "few_shot": 1, "prompts_per_checkpoint": 4,
                        "sampling": {"max_new_tokens": 8}},
        "finetune": {"training": {"max_steps": 4, "per_device_batch_size": 4, "max_length": 256,
                                  "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 100}},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def sl_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished ``sl/`` from the real generate-sl stage (4 prompts, one round), made once."""
    from cai_cli.stages import generate_sl

    tmp = tmp_path_factory.mktemp("sl")
    generate_sl.GenerateSL().run(load_config(write_config(tmp, tiny_model_dir)))
    return tmp / "run" / "sl"


@pytest.fixture
def config_path(tmp_path, tiny_model_dir, sl_dir) -> Path:
    """A config whose run directory holds a copy of the finished ``sl/``."""
    shutil.copytree(sl_dir, tmp_path / "run" / "sl")
    return write_config(tmp_path, tiny_model_dir)


def run_stage(path: Path, *overrides: str, force: bool = False):
    return finetune.Finetune().run(load_config(path, list(overrides)), force=force)


@pytest.fixture
def capture_trainer(monkeypatch):
    from trl import SFTTrainer

    return trainer_capture(monkeypatch, SFTTrainer, run_stage)


# ---------------------------------------------------------------------------------------------
# The checkpoint


def test_finetune_end_to_end(config_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = cai("finetune", "--config", config_path)
    assert result.returncode == 0, result.stderr
    sft = config_path.parent / "run" / "sft"
    # one progress line and one summary line: no tqdm bars, log dicts or library warnings
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr
    assert "4/4" in lines[0] and "loss" in lines[0] and "eta" in lines[0]
    assert lines[1].endswith(f"-> model in {sft}")

    model = AutoModelForCausalLM.from_pretrained(sft)
    tokenizer = AutoTokenizer.from_pretrained(sft)
    base = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.chat_template == base.chat_template
    assert "{% generation %}" in tokenizer.chat_template
    assert model.config.use_cache is True
    before, after = weights(tiny_model_dir), weights(sft)
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) == len(before)  # every tensor trained, embeddings included

    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["inputs"]) == {"sl", "model"}  # no helpful data at ratio 0
    assert manifest["counts"] == {"sl_examples": 4, "helpful_examples": 0, "train_examples": 4,
                                  "steps": 4}
    assert manifest["config"]["finetune"]["training"]["max_steps"] == 4
    assert not (sft / training.CHECKPOINTS).exists() and not (sft / training.STAGING).exists()

    # Rerun: nothing to do. Changed settings: refused, the checkpoint kept.
    files = snapshot(sft)
    again = cai("finetune", "--config", config_path)
    assert again.returncode == 0 and "nothing to do" in again.stderr
    with pytest.raises(UserError, match=r"changed: finetune\.training\.learning_rate\).*--force"):
        run_stage(config_path, "finetune.training.learning_rate=0.01")
    assert snapshot(sft) == files


# ---------------------------------------------------------------------------------------------
# What the trainer is fed


def test_loss_is_on_the_final_answer_only(config_path, capture_trainer):
    """The default: prompt-completion rows, whose prompt TRL masks itself (any chat template)."""
    trainer = capture_trainer(config_path)
    tokenizer = trainer.processing_class
    sft = [json.loads(line) for line in
           (config_path.parent / "run" / "sl" / "sft.jsonl").read_text().splitlines()]
    answers = {record["completion"][0]["content"] for record in sft}
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer.data_collator(examples)
    assert len(examples) == 4
    for row, example in enumerate(examples):
        ids = example["input_ids"]
        labels = batch["labels"][row].tolist()[:len(ids)]
        trained = [token for token, label in zip(ids, labels) if label != -100]
        assert trained == [label for label in labels if label != -100]  # labels are the ids
        # exactly the answer and its end-of-turn token; the user turn and role headers are not
        assert tokenizer.decode(trained).strip().removesuffix("<|im_end|>") in answers
        masked = tokenizer.decode([token for token, label in zip(ids, labels) if label == -100])
        assert masked.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in masked


def test_loss_on_assistant_turns_uses_generation_marks(config_path, capture_trainer):
    trainer = capture_trainer(config_path, "finetune.loss_on=assistant")
    tokenizer = trainer.processing_class
    sft = [json.loads(line) for line in
           (config_path.parent / "run" / "sl" / "sft.jsonl").read_text().splitlines()]
    answers = {record["completion"][0]["content"] for record in sft}
    examples = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    assert len(examples) == 4
    for example in examples:
        ids, labels = example["input_ids"], example["labels"]
        trained = [token for token, label in zip(ids, labels) if label != -100]
        assert trained == [label for label in labels if label != -100]  # labels are the ids
        # exactly the answer and its end-of-turn token; the user turn and role headers are not
        assert tokenizer.decode(trained).removesuffix("<|im_end|>") in answers
        masked = tokenizer.decode([token for token, label in zip(ids, labels) if label == -100])
        assert masked.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in masked

    # The collator the trainer uses pads the labels with -100 and keeps the masking.
    batch = trainer.data_collator(examples[:2])
    for row, example in enumerate(examples[:2]):
        labels = batch["labels"][row].tolist()
        assert labels[:len(example["labels"])] == example["labels"]
        assert all(label == -100 for label in labels[len(example["labels"]):])
        assert any(label == -100 for label in example["labels"])

    whole = capture_trainer(config_path, "finetune.loss_on=all")
    example = whole.train_dataset[0]
    assert example["labels"] == example["input_ids"]


def test_helpful_examples_are_mixed_at_the_ratio(config_path, capture_trainer):
    trainer = capture_trainer(config_path, "finetune.helpful_ratio=1.5")
    helpful = {json.dumps(json.loads(line)["messages"])
               for line in HELPFUL.read_text().splitlines()}
    conversations = [json.dumps(example["prompt"] + example["completion"])
                     for example in trainer.train_dataset]
    assert len(conversations) == 4 + 6
    drawn = [c for c in conversations if c in helpful]
    assert len(drawn) == 6 and len(set(drawn)) == 6  # distinct while the pool lasts

    # the draw follows the seed
    config = load_config(config_path, ["finetune.helpful_ratio=1.5"])
    sl = finetune.sl_conversations(config)
    assert finetune.mix(config, sl) == finetune.mix(config, sl)
    other = load_config(config_path, ["finetune.helpful_ratio=1.5", "seed=1"])
    assert finetune.mix(other, sl)[0][4:] != finetune.mix(config, sl)[0][4:]


def test_helpful_sources_in_other_layouts(tmp_path, config_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Name a colour.", "response": "Blue."}) + "\n")
    config = load_config(config_path, [f"data.helpful.path={pairs}", "data.helpful.field=prompt"])
    assert finetune.helpful_conversations(config) == [
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]]

    config = load_config(config_path, [f"data.helpful.path={HH_SAMPLE}",
                                       "data.helpful.field=chosen"])
    conversations = finetune.helpful_conversations(config)
    assert len(conversations) == 6
    first = next(c for c in conversations if "neighbor" in c[0]["content"])
    assert [m["role"] for m in first] == ["user", "assistant", "user", "assistant"]
    assert first[1]["content"].startswith("It's frustrating")

    bare = tmp_path / "bare.jsonl"
    bare.write_text(json.dumps({"prompt": "Name a colour."}) + "\n")
    config = load_config(config_path, [f"data.helpful.path={bare}", "data.helpful.field=prompt"])
    with pytest.raises(UserError, match="no response or completion column"):
        finetune.helpful_conversations(config)


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_saved_merged_and_as_an_adapter(tmp_path, config_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = config_path.parent / "run" / "sft"
    run_stage(config_path, "finetune.lora.enabled=true",
              "finetune.lora.target_modules=[q_proj,v_proj]", "finetune.training.max_steps=2")
    merged = AutoModelForCausalLM.from_pretrained(sft)
    assert not hasattr(merged, "peft_config") and not (sft / "adapter_config.json").exists()
    before, after = weights(tiny_model_dir), weights(sft)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)

    run_stage(config_path, "finetune.lora.enabled=true", "finetune.lora.merge=false",
              "finetune.training.max_steps=2", force=True)
    assert (sft / "adapter_config.json").is_file() and not (sft / "model.safetensors").exists()
    # a base outside the run directory stays where it is, by its absolute path
    base = json.loads((sft / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(tiny_model_dir.resolve())
    assert AutoTokenizer.from_pretrained(sft).chat_template
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), sft)
    assert any("lora_B" in name and param.abs().sum() > 0
               for name, param in adapted.named_parameters())
    assert json.loads((sft / "manifest.json").read_text())["stats"]["lora"] is True


# ---------------------------------------------------------------------------------------------
# Interrupted and repeated runs


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, config_path, monkeypatch,
                                                          capsys, tiny_model_dir, sl_dir):
    settings = ("finetune.training.max_steps=6", "finetune.training.save_steps=2")
    interrupt_at_step(monkeypatch, 4)  # Ctrl-C right after that checkpoint is written
    with pytest.raises(KeyboardInterrupt):
        run_stage(config_path, *settings)
    monkeypatch.undo()
    sft = config_path.parent / "run" / "sft"
    checkpoints = sft / training.CHECKPOINTS
    assert json.loads((sft / "manifest.json").read_text())["status"] == "running"
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-4"]
    assert not (sft / "model.safetensors").exists()
    (checkpoints / "checkpoint-6").mkdir()  # torn: a kill while it was written leaves this

    capsys.readouterr()
    run_stage(config_path, *settings)
    assert "continuing from checkpoint-4" in capsys.readouterr().err
    manifest = json.loads((sft / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["stats"]["resumed_from_step"] == 4 and manifest["counts"]["steps"] == 6
    assert not checkpoints.exists()

    # the same weights as a run that was never interrupted
    import torch

    reference = tmp_path / "reference"
    shutil.copytree(sl_dir, reference / "run" / "sl")
    run_stage(write_config(reference, tiny_model_dir), *settings)
    expected, resumed = weights(reference / "run" / "sft"), weights(sft)
    assert all(torch.allclose(expected[name], resumed[name], atol=1e-6) for name in expected)


class NotATensor:
    """What a checkpoint written by other code may hold, which weights-only loading refuses."""


def test_a_checkpoint_that_cannot_be_read_is_skipped_with_a_warning(
        tmp_path, config_path, monkeypatch, capsys, tiny_model_dir, sl_dir):
    import torch

    settings = ("finetune.training.max_steps=6", "finetune.training.save_steps=2",
                "finetune.training.trl_args.save_total_limit=2")  # keeps the one before too
    interrupt_at_step(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        run_stage(config_path, *settings)
    monkeypatch.undo()
    checkpoints = config_path.parent / "run" / "sft" / training.CHECKPOINTS
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2",
                                                                        "checkpoint-4"]
    torch.save({"python": NotATensor()}, checkpoints / "checkpoint-4" / "rng_state.pth")

    capsys.readouterr()
    run_stage(config_path, *settings)
    err = capsys.readouterr().err
    assert (f"warning: {checkpoints / 'checkpoint-4'} cannot be read: rng_state.pth is refused "
            "by weights-only loading: it holds objects that are not tensors; removed it, "
            "resuming from checkpoint-2 instead") in " ".join(err.split())
    assert "continuing from checkpoint-2" in err
    sft = config_path.parent / "run" / "sft"
    assert json.loads((sft / "manifest.json").read_text())["stats"]["resumed_from_step"] == 2

    reference = tmp_path / "reference"  # the same weights as a run never interrupted
    shutil.copytree(sl_dir, reference / "run" / "sl")
    run_stage(write_config(reference, tiny_model_dir), *settings)
    assert (sft / "model.safetensors").read_bytes() == \
        (reference / "run" / "sft" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("name", ["optimizer.pt", "model.safetensors", "trainer_state.json"])
def test_a_truncated_file_makes_a_checkpoint_unreadable(tmp_path, name):
    """``training.unreadable`` on a checkpoint whose file was cut short, as a full disk or a
    kill during the copy leaves it; an intact checkpoint reads."""
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    save_file({"weight": torch.ones(64, 64)}, str(checkpoint / "model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.zeros(64, 64)}}}, checkpoint / "optimizer.pt")
    assert training.unreadable(checkpoint) is None
    data = (checkpoint / name).read_bytes()
    (checkpoint / name).write_bytes(data[: len(data) // 2])
    assert training.unreadable(checkpoint).startswith(f"{name} is truncated or damaged (")


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, a message that says what to do, nothing written to sft/


def test_missing_sl_exits_2_via_the_cli(tmp_path, tiny_model_dir):
    result = cai("finetune", "--config", write_config(tmp_path, tiny_model_dir))
    assert result.returncode == 2
    assert "run/sl is missing: run `cai generate-sl --config" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "sft").exists()


def test_unknown_and_colliding_trainer_arguments_exit_2(config_path):
    result = cai("finetune", "--config", config_path,
                 "--set", "finetune.training.trl_args.lr_schedular_type=cosine",
                 "--set", "finetune.training.trl_args.num_train_epochs=3",
                 "--set", "finetune.training.trl_args.output_dir=elsewhere")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "3 problems" in result.stderr
    assert ("trl_args.lr_schedular_type: not an argument of TRL's SFTConfig; did you mean "
            "'lr_scheduler_type'?") in result.stderr
    assert ("trl_args.num_train_epochs: set it with finetune.training.epochs instead"
            in result.stderr)
    assert "trl_args.output_dir: set by cai itself" in result.stderr
    assert not (config_path.parent / "run" / "sft").exists()


def test_unfinished_sl_is_refused(config_path):
    manifest = config_path.parent / "run" / "sl" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "running"}))
    with pytest.raises(UserError, match=r"sl is unfinished: run `cai generate-sl"):
        run_stage(config_path)
    assert not (config_path.parent / "run" / "sft").exists()


@pytest.mark.parametrize("overrides, message", [
    (["finetune.lora.enabled=true", "finetune.lora.target_modules=[q_proj,query]"],
     ("finetune.lora.target_modules: the model has no module 'query'; its linear layers are "
      "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")),
    (["finetune.model=no/such/dir/model"], "finetune.model: no/such/dir/model does not exist"),
    (["finetune.helpful_ratio=1", "data.helpful=null"],
     "finetune.helpful_ratio is 1.0 but data.helpful is not set"),
    (["finetune.training.trl_args.lr_scheduler_type=sometimes"],
     "finetune.training: TRL's SFTConfig rejects these settings: sometimes is not a valid"),
])
def test_bad_input_leaves_a_finished_checkpoint_alone(config_path, overrides, message):
    sft = config_path.parent / "run" / "sft"
    sft.mkdir()
    (sft / "model.safetensors").write_text("an earlier model")
    before = snapshot(sft)
    with pytest.raises(UserError) as info:
        run_stage(config_path, *overrides)
    assert message in str(info.value)
    assert snapshot(sft) == before


def test_an_unknown_chat_role_in_helpful_data_is_refused_not_trained_on(tmp_path, config_path):
    helpful = tmp_path / "helpful.jsonl"
    helpful.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in (
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
        [{"role": "narrator", "content": "Once upon a time"},
         {"role": "assistant", "content": "there was a model."}])))
    with pytest.raises(UserError) as info:
        run_stage(config_path, "finetune.helpful_ratio=1", f"data.helpful.path={helpful}")
    assert str(info.value) == (f"{helpful}:2: field 'messages': message 1 has the role "
                               "'narrator', which is not a chat role (system, user, assistant); "
                               "rename it or leave the record out")
    assert not (config_path.parent / "run" / "sft" / "model.safetensors").exists()
    checked = cai_main("config", "validate", "--config", config_path, "--set",
                       "finetune.helpful_ratio=1", "--set", f"data.helpful.path={helpful}")
    assert checked.returncode == 2 and f"{helpful}:2: field 'messages': message 1" in checked.stderr


def test_chat_template_without_generation_marks(tmp_path, config_path, tiny_model_dir,
                                                capture_trainer):
    unmarked = tmp_path / "unmarked"
    shutil.copytree(tiny_model_dir, unmarked)
    template = unmarked / "chat_template.jinja"
    template.write_text(template.read_text().replace("{% generation %}", "")
                        .replace("{% endgeneration %}", ""))
    with pytest.raises(UserError, match=r"does not mark the assistant's tokens.*"
                                        r"finetune.loss_on: completion"):
        run_stage(config_path, f"finetune.model={unmarked}", "finetune.loss_on=assistant")
    assert not (config_path.parent / "run" / "sft").exists()
    # whole-conversation loss and the default completion loss need no marks
    trainer = capture_trainer(config_path, f"finetune.model={unmarked}", "finetune.loss_on=all")
    assert trainer.train_dataset[0]["labels"] == trainer.train_dataset[0]["input_ids"]
    trainer = capture_trainer(config_path, f"finetune.model={unmarked}")
    labels = trainer.train_dataset[0]["labels"]  # the prompt masked, the answer trained
    assert labels[0] == -100 and labels[-1] != -100


def test_spec_imports_no_heavy_library(config_path):
    code = ("import sys\nfrom cai_cli.config import load_config\n"
            "from cai_cli.stages import finetune\n"
            f"stage = finetune.Finetune().spec(load_config({str(config_path)!r}))\n"
            "print(stage.state(), sorted(m for m in ('torch', 'transformers', 'trl', 'datasets',"
            " 'peft') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True, cwd=ROOT)
    assert result.stdout.strip() == "missing []", result.stderr
