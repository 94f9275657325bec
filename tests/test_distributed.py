"""The training stages under several processes, started as a user starts them (torchrun,
``accelerate launch`` with the shipped configs): DDP over gloo on the CPU, 2 processes.

Each stage must end where one process ends with the same global batch (2 processes x 2
sequences against 1 process x 4): the same weights to a tolerance, the same loss, one model
saved once, one summary line. LoRA (merged and not), the reward head, soft labels and resume
are each used in one of the runs. Generation stages refuse to start as several processes.

FSDP and DeepSpeed need GPUs (accelerate enables them only on GPUs; on a CPU it trains with
plain DDP, which the optimize run below checks it says); what can be checked here is that
their config files are valid and that their save path (gathered weights, LoRA merged on a
fresh copy of the base) writes what the single-process path writes.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from helpers import ENV, ROOT, trainer_capture

from cai_cli.config import load_config
from cai_cli.stages import finetune, generate_sl, label_prefs, optimize, train_rm, training
from cai_cli.stages.common import begin

PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"

# How far the weights of the 2-process run may be from the 1-process run: the norm of the
# difference of the two updates (trained minus initial weights) over the norm of the update.
# Both runs see the same examples in the same optimiser steps; only float32 rounding differs:
# DDP sums each half-batch's gradient and all-reduces the two halves, one process sums the
# whole batch, in another order (relative error ~1e-7 per gradient). Adam divides each
# gradient by its own running magnitude, so parameters whose gradient is nearly zero (a sum
# that cancels, LoRA's A matrices while B is still near zero) turn that noise into steps of up
# to the learning rate. Measured here: 1e-5 (full fine-tuning, DPO), 1e-4 (reward model), 4e-3
# (LoRA at learning rate 1e-2). Training on another global batch, or without averaging the
# gradients across processes, gives 0.8.
TOLERANCE = 0.05
LOSS_TOLERANCE = 1e-3  # the manifest's final_loss is rounded to 4 places; it agreed to all 4

SAFE = ["I can't help with that, but I can point you to safer options.",
        "That could hurt someone, so I won't explain it; here is where to get help."]
UNSAFE = ["Sure, here is exactly how to do it, step by step.",
          "Easy: first get the tools, then follow these instructions."]
# p_chosen of 12 hand-written pairs: train-rm holds 4 out and trains on 8, DPO uses all 12,
# so every step of both has a full global batch of 4.
LABELS = [0.95, 0.9, 0.8, 0.7, 0.6, 0.55, 0.52, 0.85, 0.75, 0.65, 0.98, 0.58]


def write_config(directory: Path, model: Path, per_device: int, **sections) -> Path:
    """A config for ``directory/run``; every training stage takes ``per_device`` sequences per
    process and step. ``sections`` update the stage sections (``train_rm={"lora": ...}``)."""
    def settings(**extra):
        return {"max_steps": 4, "per_device_batch_size": per_device, "learning_rate": 1e-3,
                "max_length": 256, "logging_steps": 1, "save_steps": 2, **extra}

    config = {
        "run_dir": str(directory / "run"),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 8}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu",
                              "forward_batch_size": 8}},
        "generate_sl": {"num_revisions": 1, "few_shot": 1, "prompts_per_checkpoint": 8,
                        "sampling": {"max_new_tokens": 8}},
        "finetune": {"training": settings()},
        "train_rm": {"eval_fraction": 0.34, "training": settings()},
        "optimize": {"model": str(model), "soft_labels": True, "training": settings()},
    }
    for name, values in sections.items():
        config[name].update({key: value for key, value in values.items() if key != "training"})
        config[name]["training"].update(values.get("training", {}))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, tiny_model_dir) -> Path:
    """A run directory holding a finished ``sl/`` (cai generate-sl on 8 prompts) and ``prefs/``
    (the hand-written pairs, recorded as label-prefs records them), shared by every test."""
    directory = tmp_path_factory.mktemp("upstream")
    config = load_config(write_config(directory, tiny_model_dir, per_device=4))
    generate_sl.GenerateSL().run(config)
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    pairs = [{"id": f"pair-{i}", "prompt": [{"role": "user", "content": prompts[i]}],
              "chosen": [{"role": "assistant", "content": SAFE[i % 2]}],
              "rejected": [{"role": "assistant", "content": UNSAFE[i % 2]}],
              "p_chosen": p, "order_disagreement": False, "judgments": [],
              "prompt_id": f"prompt-{i}"}
             for i, p in enumerate(LABELS)]
    stage = label_prefs.LabelPrefs().spec(config)
    run = begin(stage, config, force=False)
    stage.directory.mkdir(parents=True, exist_ok=True)
    (stage.directory / "pairs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    run.complete()
    return directory / "run"


def setup(directory: Path, model: Path, upstream: Path, per_device: int, **sections) -> Path:
    """A config whose run directory starts with a copy of the shared sl/ and prefs/."""
    path = write_config(directory, model, per_device, **sections)
    for name in ("sl", "prefs"):
        shutil.copytree(upstream / name, directory / "run" / name)
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher(how: str) -> list[str]:
    """The command line that starts 2 processes: ``torchrun`` or ``accelerate launch`` with
    one of the shipped configs (``accelerate:ddp``)."""
    if how == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", str(free_port())]
    name = how.split(":")[1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ACCELERATE_CONFIGS / f"{name}.yaml"), "--num_processes", "2",
            "--main_process_port", str(free_port())]


def launch(how: str, command: str, config: Path, *overrides: str,
           timeout: float = 300) -> subprocess.CompletedProcess:
    """``<launcher> -m cai_cli COMMAND --config CONFIG`` as a user runs it from a shell."""
    args = [*launcher(how), "-m", "cai_cli", command, "--config", str(config),
            *[part for item in overrides for part in ("--set", item)]]
    return subprocess.run(args, cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=timeout)


def summary_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{command}: ")
            and " -> " in line]


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def tensors(directory: Path, name: str = "model.safetensors") -> dict:
    from safetensors.torch import load_file

    return load_file(str(directory / name))


def update_difference(trained: dict, reference: dict, start: dict) -> float:
    """|trained update - reference update| / |reference update|, over every tensor (one that
    the starting model lacks, such as a new reward head, counts from zero)."""
    import torch

    def update(weights):
        return torch.cat([(weights[k] - start[k] if k in start else weights[k]).flatten().float()
                          for k in sorted(reference)])

    expected = update(reference)
    return ((update(trained) - expected).norm() / expected.norm()).item()


def assert_same_training(one: Path, two: Path) -> None:
    """Both stage directories completed the same number of steps with the same final loss."""
    first, second = manifest(one), manifest(two)
    assert second["status"] == "complete"
    assert second["counts"]["steps"] == first["counts"]["steps"]
    assert second["stats"]["final_loss"] == pytest.approx(first["stats"]["final_loss"],
                                                          abs=LOSS_TOLERANCE)


# ---------------------------------------------------------------------------------------------


def test_finetune_under_torchrun_resumes_and_ends_as_one_process(tmp_path, tiny_model_dir,
                                                                 upstream):
    """Full fine-tuning, killed after its first checkpoint and started again: the 2-process
    job resumes and ends with the weights of an uninterrupted single-process run."""
    from transformers import AutoModelForCausalLM

    six_steps = {"training": {"max_steps": 6}}  # time to kill it between checkpoints
    single = setup(tmp_path / "one", tiny_model_dir, upstream, 4, finetune=six_steps)
    finetune.Finetune().run(load_config(single))
    double = setup(tmp_path / "two", tiny_model_dir, upstream, 2, finetune=six_steps)

    sft = tmp_path / "two" / "run" / "sft"
    first = subprocess.Popen([*launcher("torchrun"), "-m", "cai_cli", "finetune", "--config",
                              str(double)], cwd=ROOT, env={**ENV, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and first.poll() is None:
        if (sft / ".checkpoints" / "checkpoint-2" / "trainer_state.json").is_file():
            break
        time.sleep(0.02)
    # torchrun and both processes, as when a node is lost (torchrun puts its workers in
    # sessions of their own, so they are found by parentage).
    for process in [*psutil.Process(first.pid).children(recursive=True), first]:
        process.send_signal(signal.SIGKILL)
    first.wait()
    assert manifest(sft)["status"] != "complete", "the first launch was not interrupted"

    result = launch("torchrun", "finetune", double)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finetune: continuing from checkpoint-" in result.stderr
    assert len(summary_lines(result.stderr, "finetune")) == 1  # only the main process prints
    assert "find_unused_parameters" not in result.stderr
    assert manifest(sft)["stats"]["resumed_from_step"] is not None

    assert AutoModelForCausalLM.from_pretrained(sft).num_parameters() > 0
    assert not (sft / ".checkpoints").exists()
    reference = tmp_path / "one" / "run" / "sft"
    assert_same_training(reference, sft)
    assert update_difference(tensors(sft), tensors(reference),
                             tensors(tiny_model_dir)) < TOLERANCE


def test_train_rm_with_merged_lora_under_accelerate_launch_ends_as_one_process(
        tmp_path, tiny_model_dir, upstream):
    """The reward model with soft labels, LoRA merged into the weights and the reward head
    trained in full, under ``accelerate launch --config_file configs/accelerate/ddp.yaml``."""
    from transformers import AutoModelForSequenceClassification

    lora = {"lora": {"enabled": True, "dropout": 0.0, "r": 8},  # dropout draws differ by rank
            "training": {"learning_rate": 1e-2}}
    single = setup(tmp_path / "one", tiny_model_dir, upstream, 4, train_rm=lora)
    train_rm.TrainRM().run(load_config(single))
    double = setup(tmp_path / "two", tiny_model_dir, upstream, 2, train_rm=lora)

    result = launch("accelerate:ddp", "train-rm", double)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(summary_lines(result.stderr, "train-rm")) == 1

    rm, reference = tmp_path / "two" / "run" / "rm", tmp_path / "one" / "run" / "rm"
    assert not (rm / "adapter_config.json").exists()  # merged: loads like any model
    model = AutoModelForSequenceClassification.from_pretrained(rm)
    assert model.config.num_labels == 1
    assert_same_training(reference, rm)
    for key in ("train_accuracy", "eval_accuracy", "eval_ece", "trainable_parameters"):
        assert manifest(rm)["stats"][key] == pytest.approx(manifest(reference)["stats"][key],
                                                           abs=1e-3)
    assert update_difference(tensors(rm), tensors(reference),
                             tensors(tiny_model_dir)) < TOLERANCE


def test_optimize_with_a_lora_adapter_under_the_fsdp_config_ends_as_one_process(
        tmp_path, tiny_model_dir, upstream):
    """Soft-label DPO saving the adapter alone, launched with configs/accelerate/fsdp.yaml: on a
    CPU accelerate trains with DDP instead, and cai says so once."""
    from transformers import AutoModelForCausalLM

    lora = {"lora": {"enabled": True, "dropout": 0.0, "merge": False},
            "training": {"learning_rate": 1e-2}}
    single = setup(tmp_path / "one", tiny_model_dir, upstream, 4, optimize=lora)
    optimize.Optimize().run(load_config(single))
    double = setup(tmp_path / "two", tiny_model_dir, upstream, 2, optimize=lora)

    result = launch("accelerate:fsdp", "optimize", double)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("accelerate runs FSDP only on GPUs") == 1
    assert len(summary_lines(result.stderr, "optimize (dpo)")) == 1

    policy, reference = tmp_path / "two" / "run" / "policy", tmp_path / "one" / "run" / "policy"
    assert (policy / "adapter_config.json").is_file()
    assert AutoModelForCausalLM.from_pretrained(policy).num_parameters() > 0  # through peft
    assert_same_training(reference, policy)
    assert manifest(policy)["stats"]["reward_margin"] == pytest.approx(
        manifest(reference)["stats"]["reward_margin"], abs=1e-3)
    # LoRA's B matrices start at zero: they are the update.
    adapter = "adapter_model.safetensors"
    trained, expected = tensors(policy, adapter), tensors(reference, adapter)
    b_only = {k: v for k, v in expected.items() if "lora_B" in k}
    assert b_only and update_difference(trained, b_only, {}) < TOLERANCE


def test_generation_stages_refuse_to_run_as_several_processes(tmp_path, tiny_model_dir,
                                                              upstream):
    config = setup(tmp_path, tiny_model_dir, upstream, 2)
    result = launch("torchrun", "generate-sl", config, timeout=120)
    assert result.returncode != 0 and "runs as a single process" in result.stderr


# ---------------------------------------------------------------------------------------------
# FSDP and DeepSpeed: what runs without GPUs


def test_the_shipped_accelerate_configs_are_valid():
    """Every file in configs/accelerate loads as accelerate's config, and the keys of its
    fsdp_config / deepspeed_config are options of ``accelerate launch``."""
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    options = launch_command_parser()._option_string_actions
    files = sorted(ACCELERATE_CONFIGS.glob("*.yaml"))
    assert {f.stem for f in files} >= {"ddp", "fsdp", "zero2", "zero3"}
    for path in files:
        config = ClusterConfig.from_yaml_file(str(path))
        assert config.mixed_precision == "no", path  # training.precision decides
        for key in [*config.fsdp_config, *config.deepspeed_config]:
            assert f"--{key}" in options, f"{path.name}: {key}"
    assert ClusterConfig.from_yaml_file(
        str(ACCELERATE_CONFIGS / "zero3.yaml")).deepspeed_config["zero3_save_16bit_model"]


def test_the_sharded_save_path_writes_what_one_process_writes(tmp_path, tiny_model_dir,
                                                              upstream, monkeypatch):
    """Under FSDP and DeepSpeed the trained weights are gathered from every process and LoRA is
    merged on a fresh copy of the base model. That path runs in one process too: for a reward
    model with LoRA (adapters and the head trained in full) it must write the same model as
    merging in memory."""
    import torch
    from trl import RewardTrainer

    lora = {"lora": {"enabled": True, "r": 8}}
    config = setup(tmp_path, tiny_model_dir, upstream, 4, train_rm=lora)
    prepare = trainer_capture(
        monkeypatch, RewardTrainer,
        lambda path, *sets, force: train_rm.TrainRM().run(load_config(path, list(sets)), force=force))
    trainer = prepare(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # as if trained: LoRA's B matrices are zero until then
        for name, parameter in trainer.model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    settings = load_config(config).train_rm.lora

    monkeypatch.setattr(training, "sharded", lambda trainer: True)
    training.save_model(trainer, trainer.processing_class, settings, tmp_path / "gathered")
    monkeypatch.undo()
    training.save_model(trainer, trainer.processing_class, settings, tmp_path / "in-memory")

    gathered, in_memory = tensors(tmp_path / "gathered"), tensors(tmp_path / "in-memory")
    assert sorted(gathered) == sorted(in_memory) and "score.weight" in gathered
    for key, value in in_memory.items():
        assert torch.allclose(gathered[key], value, atol=1e-6), key
    assert not (tmp_path / "gathered" / ".adapter").exists()


def test_settings_of_the_launcher_do_not_override_the_config(tmp_path, tiny_model_dir,
                                                             monkeypatch, capsys):
    """accelerate's mixed_precision yields to training.precision (with a warning); ZeRO-3
    without gathering the weights is refused before anything runs; device auto on a machine
    without a GPU trains on the CPU under a launcher (else every process would train alone)."""
    import torch

    from cai_cli.errors import UserError

    config = load_config(write_config(tmp_path, tiny_model_dir, per_device=2),
                         ["finetune.training.precision=fp32"])
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setattr(training, "_warned", set())
    args = finetune.trainer_args(config)
    assert not args.bf16 and args.mixed_precision == "no"
    assert "mixed precision bf16" in capsys.readouterr().err

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    with pytest.raises(UserError, match="zero3_save_16bit_model"):
        finetune.trainer_args(config)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")

    auto = config.models.policy.model_copy(update={"device": "auto"})
    assert not training.use_cpu(auto)  # one process: the Trainer picks the device itself
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert training.use_cpu(auto) == (not torch.cuda.is_available())
