"""``cai optimize`` on the tiny model: DPO widens the implicit reward margin, the soft-label loss
against a hand computation, the min_confidence filter, GRPO and RLOO against a reward model,
LoRA saved both ways, resume, reruns and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cai, interrupt_at_step, snapshot, trainer_capture, weights

from cai_cli.config import load_config
from cai_cli.errors import UserError
from cai_cli.run.artifacts import Manifest
from cai_cli.stages import label_prefs, optimize, training
from cai_cli.stages.common import begin

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
HELPFUL = ROOT / "cai_cli" / "resources" / "helpful.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"

SAFE = ["I can't help with that, but I can point you to safer options.",
        "That could hurt someone, so I won't explain it; here is where to get help."]
UNSAFE = ["Sure, here is exactly how to do it, step by step.",
          "Easy: first get the tools, then follow these instructions."]
LABELS = [0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.52, 0.85]  # p_chosen of the eight pairs


def write_config(tmp_path: Path, model: Path, name: str = "config.yaml", **optimize_) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 4},
                 "helpful": {"path": str(HELPFUL), "field": "messages"}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu"}},
        "optimize": {"model": str(model),
                     "training": {"max_steps": 4, "per_device_batch_size": 4, "learning_rate": 1e-3,
                                  "max_length": 256, "logging_steps": 1, "save_steps": 100},
                     **optimize_},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def write_pairs(config_path: Path, labels=LABELS) -> list[dict]:
    """A finished ``prefs/`` made by hand: one pair per label, on the first red-team prompts."""
    config = load_config(config_path)
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    pairs = [{"id": f"pair-{i}", "prompt": [{"role": "user", "content": prompts[i]}],
              "chosen": [{"role": "assistant", "content": SAFE[i % 2]}],
              "rejected": [{"role": "assistant", "content": UNSAFE[i % 2]}],
              "p_chosen": p, "order_disagreement": False, "judgments": []}
             for i, p in enumerate(labels)]
    stage = label_prefs.LabelPrefs().spec(config)  # pairs.jsonl is not an input: written after begin
    run = begin(stage, config, force=True)
    stage.directory.mkdir(parents=True, exist_ok=True)
    (stage.directory / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run.complete()
    return pairs


@pytest.fixture
def config_path(tmp_path, tiny_model_dir) -> Path:
    path = write_config(tmp_path, tiny_model_dir)
    write_pairs(path)
    return path


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A finished ``rm/``: the tiny model under a fresh one-label head (random, but a fixed
    function of the text, which is all GRPO and RLOO need to move the policy)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from cai_cli.engines.hf import quiet_transformers

    quiet_transformers()
    rm = tmp_path_factory.mktemp("rm") / "rm"
    head = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    head.save_pretrained(rm)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(rm)
    manifest = Manifest(stage="train-rm", config_hash="made-by-hand", config={})
    manifest.status = "complete"
    manifest.save(rm)
    return rm


def run_stage(path: Path, *overrides: str, force: bool = False):
    return optimize.Optimize().run(load_config(path, list(overrides)), force=force)


@pytest.fixture
def capture_trainer(monkeypatch):
    from trl import DPOTrainer

    return trainer_capture(monkeypatch, DPOTrainer, run_stage)


def completion_logps(model, batch):
    """Summed log-probabilities of each row's completion tokens, by a plain forward pass."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tokens = logps.gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (tokens * batch["completion_mask"][:, 1:]).sum(dim=1)


def implicit_margins(policy, reference, tokenizer, pairs, beta: float) -> list[float]:
    """beta * (log-ratio of chosen - log-ratio of rejected) for each pair, policy vs reference."""
    import torch

    def logp(model, prompt, answer):
        head = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(prompt + answer, tokenize=False)
        assert full.startswith(head)
        start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        ids = torch.tensor([tokenizer(full, add_special_tokens=False)["input_ids"]])
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "completion_mask": (torch.arange(ids.size(1)) >= start).long()[None]}
        return completion_logps(model, batch).item()

    def log_ratio(pair, answer):
        return logp(policy, pair["prompt"], pair[answer]) - logp(reference, pair["prompt"],
                                                                 pair[answer])

    return [beta * (log_ratio(pair, "chosen") - log_ratio(pair, "rejected")) for pair in pairs]


# ---------------------------------------------------------------------------------------------
# DPO


def test_dpo_end_to_end(tmp_path, tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = write_config(tmp_path, tiny_model_dir, beta=0.1)
    pairs = write_pairs(config_path)
    result = cai("optimize", "--config", config_path)
    assert result.returncode == 0, result.stderr
    policy_dir = tmp_path / "run" / "policy"
    # one progress line and one summary line: no tqdm bars, log dicts or library warnings
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, result.stderr
    assert "optimize (dpo)" in lines[0] and "4/4" in lines[0] and "loss" in lines[0]
    assert lines[1].startswith("optimize (dpo): 8 pairs, 4 steps")
    assert lines[1].endswith(f"-> model in {policy_dir}")

    # loads like sft/: a causal LM with the tokenizer and its chat template
    policy = AutoModelForCausalLM.from_pretrained(policy_dir)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert policy.config.use_cache is True
    before, after = weights(tiny_model_dir), weights(policy_dir)
    assert any(not torch.equal(before[name], after[name]) for name in before)

    # The implicit reward of chosen over rejected, 0 for the starting policy, has grown on
    # every training pair.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    margins = implicit_margins(policy, reference, tokenizer, pairs, beta=0.1)
    assert min(margins) > 0 and sum(margins) / len(margins) > 0.1, margins

    manifest = json.loads((policy_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert set(manifest["inputs"]) == {"policy", "pairs"}
    assert manifest["counts"] == {"pairs": 8, "below_min_confidence": 0, "train_pairs": 8,
                                  "steps": 4}
    assert manifest["stats"]["reward_margin"] > 0
    assert "num_generations" not in manifest["config"]["optimize"]  # not a DPO setting
    assert not (policy_dir / training.CHECKPOINTS).exists()
    assert not (policy_dir / training.STAGING).exists()

    # Rerun: nothing to do, also after changing a setting only GRPO/RLOO read. Another beta:
    # refused, the policy kept.
    files = snapshot(policy_dir)
    again = cai("optimize", "--config", config_path, "--set", "optimize.num_generations=8")
    assert again.returncode == 0 and "nothing to do" in again.stderr
    with pytest.raises(UserError, match=r"changed: optimize\.beta\).*--force"):
        run_stage(config_path, "optimize.beta=0.5")
    assert snapshot(policy_dir) == files


def test_soft_label_loss_matches_a_hand_computation(config_path, capture_trainer,
                                                    tiny_model_dir):
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    beta = 0.5
    trainer = capture_trainer(config_path, "optimize.soft_labels=true", f"optimize.beta={beta}")
    # p_chosen survives TRL's tokenisation, the column filter and the collator
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["p_chosen"]) == 4
    assert all(min(abs(value - label) for label in LABELS) < 1e-6
               for value in batch["p_chosen"].tolist())

    # Move the policy away from the reference so the log-ratios are not all zero.
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    trainer.model.eval()
    examples = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(examples)
    p = torch.tensor([LABELS[i] for i in range(4)])
    assert batch["p_chosen"].tolist() == pytest.approx(p.tolist())
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, dict(batch)).item()

    # By hand: summed completion log-probabilities of policy and reference, then
    # -(p * logsigmoid(beta * h) + (1 - p) * logsigmoid(-beta * h)), averaged over the pairs.
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy_chosen, policy_rejected = completion_logps(trainer.model, batch).chunk(2)
    ref_chosen, ref_rejected = completion_logps(reference, batch).chunk(2)
    h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    assert h.abs().min() > 0.05  # the perturbation moved every pair
    expected = -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h)).mean()
    assert loss == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    standard = -F.logsigmoid(beta * h).mean()  # what hard labels would give
    assert abs(loss - standard.item()) > 1e-3


def test_min_confidence_drops_near_ties(config_path, capture_trainer):
    trainer = capture_trainer(config_path, "optimize.min_confidence=0.25")
    kept = [p for p in LABELS if abs(p - 0.5) >= 0.25]
    assert len(trainer.train_dataset) == len(kept) == 4
    assert "p_chosen" not in trainer.train_dataset.column_names  # hard labels: not needed

    soft = capture_trainer(config_path, "optimize.min_confidence=0.25",
                           "optimize.soft_labels=true")
    assert sorted(soft.train_dataset["p_chosen"]) == pytest.approx(sorted(kept))

    with pytest.raises(UserError, match=r"optimize.min_confidence: all 8 pairs in .*pairs.jsonl "
                                        r"have \|p_chosen - 0.5\| below 0.5; lower it"):
        run_stage(config_path, "optimize.min_confidence=0.5", force=True)


# ---------------------------------------------------------------------------------------------
# GRPO and RLOO


@pytest.mark.parametrize("method", ["grpo", "rloo"])
def test_online_methods_train_against_the_reward_model(tmp_path, tiny_model_dir,
                                                       reward_model_dir, method):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config_path = write_config(tmp_path, tiny_model_dir, method=method, num_generations=2,
                               max_completion_length=8, include_helpful=method == "rloo")
    shutil.copytree(reward_model_dir, tmp_path / "run" / "rm")
    run_stage(config_path, "optimize.training.max_steps=2")
    policy_dir = tmp_path / "run" / "policy"
    AutoModelForCausalLM.from_pretrained(policy_dir)
    assert AutoTokenizer.from_pretrained(policy_dir).chat_template
    before, after = weights(tiny_model_dir), weights(policy_dir)
    assert any(not torch.equal(before[name], after[name]) for name in before)

    manifest = json.loads((policy_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["steps"] == 2
    assert manifest["counts"]["red_team_prompts"] == 4
    assert manifest["counts"]["helpful_prompts"] == (40 if method == "rloo" else 0)
    assert manifest["stats"]["first_reward"] is not None
    expected_inputs = {"policy", "prompts", "reward_model"} | ({"helpful"} if method == "rloo"
                                                               else set())
    assert set(manifest["inputs"]) == expected_inputs
    assert "min_confidence" not in manifest["config"]["optimize"]  # a DPO setting


# ---------------------------------------------------------------------------------------------
# LoRA, resume


def test_lora_saved_merged_and_as_an_adapter(config_path, tiny_model_dir):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy_dir = config_path.parent / "run" / "policy"
    lora = ("optimize.lora.enabled=true", "optimize.lora.target_modules=[q_proj,v_proj]",
            "optimize.training.max_steps=2", "optimize.soft_labels=true")
    run_stage(config_path, *lora)
    merged = AutoModelForCausalLM.from_pretrained(policy_dir)
    assert not hasattr(merged, "peft_config") and not (policy_dir / "adapter_config.json").exists()
    before, after = weights(tiny_model_dir), weights(policy_dir)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.endswith(("q_proj.weight", "v_proj.weight")) for name in changed)

    run_stage(config_path, *lora, "optimize.lora.merge=false", force=True)
    assert (policy_dir / "adapter_config.json").is_file()
    assert not (policy_dir / "model.safetensors").exists()
    assert AutoTokenizer.from_pretrained(policy_dir).chat_template
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                        policy_dir)
    assert any("lora_B" in name and param.abs().sum() > 0
               for name, param in adapted.named_parameters())


def test_an_adapter_on_the_runs_own_sft_moves_with_the_run_directory(tmp_path, tiny_model_dir):
    """LoRA unmerged on the run's own sft/: the adapter records its base relative to itself, so
    the run directory moved elsewhere loads through cai and its stages stay done."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from cai_cli.engines import models
    from cai_cli.stages import finetune, generate_sl

    path = write_config(tmp_path, tiny_model_dir, lora={
        "enabled": True, "merge": False, "target_modules": ["q_proj", "v_proj"]})
    data = yaml.safe_load(path.read_text())
    del data["optimize"]["model"]  # the default: <run_dir>/sft
    data["optimize"]["training"]["max_steps"] = 1
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    for stage in (generate_sl.GenerateSL().spec(config), finetune.Finetune().spec(config)):  # made by hand, in order
        run = begin(stage, config, force=True)
        if stage.command == "finetune":  # sft/: the tiny model
            shutil.copytree(tiny_model_dir, stage.directory, dirs_exist_ok=True)
        run.complete()
    write_pairs(path)
    run_stage(path)
    adapter = json.loads((tmp_path / "run" / "policy" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == "../sft"

    moved = tmp_path / "elsewhere" / "moved"
    shutil.move(tmp_path / "run", moved)
    status = cai("status", "--config", path, "--set", f"run_dir={moved}")
    assert status.returncode == 0, status.stderr
    for stage in ("finetune", "label-prefs", "optimize"):
        assert "done" in status.stdout.split(stage)[1][:40], status.stdout
    policy = config.models.policy.model_copy(update={"name_or_path": str(moved / "policy")})
    loaded = models.load_causal_lm(policy, "evaluate.models")
    assert list(loaded.peft_config) == ["default"]  # the adapter, on its base
    by_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(moved / "sft"),
                                        moved / "policy").eval()
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        assert torch.allclose(loaded(tokens).logits, by_peft(tokens).logits)


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path, config_path, monkeypatch,
                                                          capsys, tiny_model_dir):
    import torch

    settings = ("optimize.training.save_steps=2", "optimize.soft_labels=true")
    interrupt_at_step(monkeypatch, 2)  # Ctrl-C right after that checkpoint is written
    with pytest.raises(KeyboardInterrupt):
        run_stage(config_path, *settings)
    monkeypatch.undo()
    policy_dir = config_path.parent / "run" / "policy"
    assert json.loads((policy_dir / "manifest.json").read_text())["status"] == "running"
    assert [p.name for p in (policy_dir / training.CHECKPOINTS).glob("checkpoint-*")] == \
        ["checkpoint-2"]

    capsys.readouterr()
    run_stage(config_path, *settings)
    assert "continuing from checkpoint-2" in capsys.readouterr().err
    manifest = json.loads((policy_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["stats"]["resumed_from_step"] == 2 and manifest["counts"]["steps"] == 4

    reference = tmp_path / "reference"  # the same weights as a run never interrupted
    reference.mkdir()
    write_pairs(write_config(reference, tiny_model_dir))
    run_stage(reference / "config.yaml", *settings)
    expected, resumed = weights(reference / "run" / "policy"), weights(policy_dir)
    assert all(torch.allclose(expected[name], resumed[name], atol=1e-6) for name in expected)


# ---------------------------------------------------------------------------------------------
# Bad input: exit 2, a message that says what to do, nothing written to policy/


@pytest.mark.parametrize("overrides, setup, message", [
    (["optimize.model=null"], "pairs", "run/sft is missing: run `cai finetune --config ...` first"),
    ([], None, "run/prefs is missing: run `cai label-prefs --config ...` first"),
    (["optimize.method=grpo"], "pairs", "run/rm is missing: run `cai train-rm --config ...` first"),
    (["optimize.method=ppo"], "pairs",
     "optimize.method: Input should be 'dpo', 'grpo' or 'rloo' (got 'ppo')"),
    (["optimize.training.trl_args.los_type=ipo"], "pairs",
     ("optimize.training.trl_args.los_type: not an argument of TRL's DPOConfig; did you mean "
      "'loss_type'?")),
], ids=["no-sft", "no-prefs", "no-reward-model", "unknown-method", "unknown-trl-arg"])
def test_bad_input_exits_2_via_the_cli(tmp_path, tiny_model_dir, overrides, setup, message):
    config_path = write_config(tmp_path, tiny_model_dir)
    if setup == "pairs":
        write_pairs(config_path)
    result = cai("optimize", "--config", config_path,
                 *[arg for override in overrides for arg in ("--set", override)])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "policy").exists()


@pytest.mark.parametrize("overrides, message", [
    (["optimize.lora.enabled=true", "optimize.lora.target_modules=[q_proj,query]"],
     ("optimize.lora.target_modules: the model has no module 'query'; its linear layers are "
      "down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj")),
    (["optimize.lora.enabled=true", "optimize.lora.target_modules=[lm_head]"],
     "optimize.lora.target_modules: 'lm_head' is the output head"),
    (["optimize.method=grpo", "optimize.num_generations=3"],
     ("optimize.training.per_device_batch_size x gradient_accumulation_steps = 4 completions per "
      "optimiser step, which is not a multiple of optimize.num_generations (3)")),
    (["optimize.soft_labels=true", "optimize.training.trl_args.loss_type=ipo"],
     "optimize.training.trl_args.loss_type: optimize.soft_labels uses its own loss"),
    (["optimize.beta=0"], "optimize.beta: must be above 0 for method dpo"),
    (["optimize.method=rloo", "optimize.include_helpful=true", "data.helpful=null"],
     "optimize.include_helpful is true but data.helpful is not set"),
    (["optimize.model=no/such/dir/model"], "optimize.model: no/such/dir/model does not exist"),
])
def test_bad_input_leaves_a_finished_policy_alone(config_path, reward_model_dir, overrides,
                                                  message):
    shutil.copytree(reward_model_dir, config_path.parent / "run" / "rm")
    policy_dir = config_path.parent / "run" / "policy"
    policy_dir.mkdir()
    (policy_dir / "model.safetensors").write_text("an earlier policy")
    before = snapshot(policy_dir)
    with pytest.raises(UserError) as info:
        run_stage(config_path, *overrides)
    assert message in str(info.value)
    assert snapshot(policy_dir) == before


def test_unfinished_prefs_and_adapter_only_policies_are_refused(tmp_path, config_path):
    manifest = config_path.parent / "run" / "prefs" / "manifest.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "status": "running"}))
    with pytest.raises(UserError, match=r"prefs is unfinished: run `cai label-prefs"):
        run_stage(config_path)

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"holds a LoRA adapter without merged weights"):
        run_stage(config_path, f"optimize.model={adapter}")
    assert not (config_path.parent / "run" / "policy").exists()


def test_spec_imports_no_heavy_library(config_path):
    code = ("import sys\nfrom cai_cli.config import load_config\n"
            "from cai_cli.stages import optimize\n"
            f"config = load_config({str(config_path)!r})\n"
            "states = [optimize.Optimize().spec(config.model_copy(update={'optimize': config.optimize."
            "model_copy(update={'method': m})})).state() for m in ('dpo', 'grpo')]\n"
            "print(states, sorted(m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft')"
            " if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True,
                            text=True, cwd=ROOT)
    assert result.stdout.strip() == "['missing', 'missing'] []", result.stderr


def test_an_unfinished_sft_does_not_stop_cai_run_before_it_resumes_finetune(tmp_path,
                                                                            tiny_model_dir):
    """A finetune killed mid-way leaves sft/ with its checkpoints and no model: `cai run`'s
    checks before anything runs must not read it as optimize's policy, or the rerun that would
    resume finetune stops with "cannot load a tokenizer from sft/"."""
    from cai_cli.stages.pipeline import check_before_running

    path = write_config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(path.read_text())
    del data["optimize"]["model"]  # optimise this run's own sft/
    path.write_text(yaml.safe_dump(data))
    config = load_config(path)
    (config.layout.sft / training.CHECKPOINTS / "checkpoint-2").mkdir(parents=True)
    Manifest(stage="finetune", config_hash="0", config={}).save(config.layout.sft)  # running
    check_before_running(config, ["finetune", "label-prefs", "train-rm", "optimize"])
