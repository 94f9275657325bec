"""Nothing lost: one writer per run directory, failed starts that leave no trace, forced runs
that fail, the user's files, uploads only on request, and checks that fail in seconds."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ENV, ROOT, cai, kill_after_batches, snapshot

from cai_cli.config import load_config

PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
HELPFUL = ROOT / "cai_cli" / "resources" / "helpful.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


def write_config(tmp_path: Path, model: Path, *, limit: int = 8, path: Path | None = None,
                 **extra) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": limit},
                 "helpful": {"path": str(HELPFUL), "field": "messages"}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu",
                              "forward_batch_size": 4}},
        "generate_sl": {"num_revisions": 1, "few_shot": 1, "prompts_per_checkpoint": 2,
                        "sampling": {"max_new_tokens": 8}},
        "finetune": {"training": {"max_steps": 4, "per_device_batch_size": 2, "max_length": 256,
                                  "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2}},
        **extra,
    }
    path = path or tmp_path / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


def chains(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "sl" / "chains.jsonl").read_text().splitlines()]


def stage_files(run: Path) -> dict | None:
    """Everything under the run directory but the tool's own lock folder."""
    found = snapshot(run)
    return None if found is None else {k: v for k, v in found.items() if not k.startswith(".cai")}


def start(*args) -> subprocess.Popen:
    # Ctrl-C reaches a command started from a terminal; a suite started in the background
    # (`make test &`) has SIGINT ignored, and its children would inherit that.
    return subprocess.Popen([sys.executable, "-m", "cai_cli", *map(str, args)], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for_lock(run: Path, process: subprocess.Popen, timeout: float = 60) -> None:
    holder = run / ".cai" / "lock.holder.json"
    deadline = time.time() + timeout
    while not holder.is_file() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert holder.is_file(), "the first command never took the lock"


@pytest.mark.parametrize("second", [["generate-sl"], ["run", "--to", "generate-sl"]])
def test_a_second_writer_is_refused_and_the_first_completes(tmp_path, tiny_model_dir, second):
    config = write_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    first = start("generate-sl", "--config", config)
    wait_for_lock(run, first)
    refused = cai(*second, "--config", config)
    out, err = first.communicate(timeout=600)

    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert f"pid {first.pid}" in refused.stderr and "generate-sl" in refused.stderr
    assert first.returncode == 0, err
    assert len(chains(run)) == 8  # nothing lost to the second writer
    # status and inspect never take the lock: they answer while a writer holds it
    assert cai("status", "--config", config).returncode == 0


def test_status_and_inspect_do_not_wait_for_a_writer(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, limit=16)
    run = tmp_path / "run"
    writer = start("generate-sl", "--config", config)
    try:
        wait_for_lock(run, writer)
        began = time.time()
        status = cai("status", "--config", config)
        assert status.returncode == 0 and "in use" in status.stdout
        assert time.time() - began < 30  # answered while the writer still runs
        assert writer.poll() is None
    finally:
        writer.kill()
        writer.communicate()


@pytest.mark.parametrize("device", ["banana", "cuda:0"])
def test_a_failed_start_leaves_no_trace_and_the_retry_needs_no_force(tmp_path, tiny_model_dir,
                                                                      device):
    config = write_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    failed = cai("generate-sl", "--config", config, "--set", f"models.policy.device={device}")
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "models.policy.device" in failed.stderr
    assert not stage_files(run)  # no stage directory, no manifest

    fixed = cai("generate-sl", "--config", config)
    assert fixed.returncode == 0, fixed.stderr
    assert len(chains(run)) == 8


def test_corrupt_weights_fail_before_anything_is_written(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 3])  # a download cut short
    config = write_config(tmp_path, model)
    failed = cai("generate-sl", "--config", config)
    assert failed.returncode == 2 and "Traceback" not in failed.stderr
    assert "model.safetensors" in failed.stderr
    assert not stage_files(tmp_path / "run")

    weights.write_bytes(good)  # fixed: the same command now runs, no --force
    assert cai("generate-sl", "--config", config).returncode == 0


def test_a_forced_run_that_dies_leaves_the_old_output_done(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    run = tmp_path / "run"
    assert cai("generate-sl", "--config", config).returncode == 0
    old = (run / "sl" / "chains.jsonl").read_bytes()

    change = ["--set", "generate_sl.sampling.max_new_tokens=6"]
    kill_after_batches(["generate-sl", "--config", config, *change, "--force"],
                       run / "sl" / ".chains.jsonl.progress.json", batches=1)
    assert (run / "sl" / "chains.jsonl").read_bytes() == old
    assert "done" in cai("status", "--config", config).stdout.split("generate-sl")[1][:40]
    partial = cai("status", "--config", config, *change).stdout
    assert "partial" in partial.split("generate-sl")[1][:40]

    resumed = cai("generate-sl", "--config", config, *change)  # no --force: it resumes
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert len(chains(run)) == 8 and (run / "sl" / "chains.jsonl").read_bytes() != old


def test_the_users_config_in_the_run_directory_is_never_overwritten(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    config = write_config(tmp_path, tiny_model_dir, path=run / "config.yaml")
    text = "# my notes: keep these\n" + config.read_text()
    config.write_text(text)
    result = cai("generate-sl", "--config", config, "--set", "generate_sl.few_shot=0")
    assert result.returncode == 0, result.stderr
    assert config.read_text() == text
    resolved = yaml.safe_load((run / ".cai" / "config.yaml").read_text())
    assert resolved["generate_sl"]["few_shot"] == 0  # the resolved config lives in .cai/


def test_temporary_files_of_killed_writers_are_removed(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    sl = tmp_path / "run" / "sl"
    sl.mkdir(parents=True)
    (sl / ".manifest.json.tmp-999999").write_text("{")
    assert cai("generate-sl", "--config", config).returncode == 0
    assert not list(sl.glob(".*.tmp-*"))


def test_nothing_is_published_by_a_config(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(config.read_text())
    data["finetune"]["training"]["trl_args"] = {"push_to_hub": True, "hub_token": "hf_x"}
    config.write_text(yaml.safe_dump(data))
    result = cai("config", "validate", "--config", config)
    assert result.returncode == 2
    assert "finetune.training.trl_args.push_to_hub" in result.stderr
    assert "--push-to-hub" in result.stderr and "hf_x" not in result.stderr


def test_secrets_never_reach_the_run_directory(tmp_path, tiny_model_dir):
    secret = "hf_SECRETvalue1234567890"
    config = write_config(tmp_path, tiny_model_dir, limit=2)
    env = {**ENV, "HF_TOKEN": secret, "OPENAI_API_KEY": secret}
    result = subprocess.run([sys.executable, "-m", "cai_cli", "generate-sl", "--config",
                             str(config)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert files and not [p for p in files if secret.encode() in p.read_bytes()]
    assert secret not in result.stdout + result.stderr


def test_push_to_hub_without_network_fails_fast_and_keeps_the_model(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, limit=2)
    assert cai("generate-sl", "--config", config).returncode == 0
    began = time.time()
    result = cai("finetune", "--config", config, "--push-to-hub", "someone/cai-test")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--push-to-hub someone/cai-test" in result.stderr
    assert time.time() - began < 300
    status = cai("status", "--config", config).stdout
    assert "done" in status.split("finetune")[1][:40]  # the model itself is complete


def test_push_to_hub_uploads_the_model_files_only(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """What upload_folder would send, through huggingface_hub's own pattern filter: the model,
    not the manifest (local paths), logs, plots or hidden checkpoints; an adapter on a local
    base model gets a warning."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    from cai_cli.commands import push as hub
    from cai_cli.stages.finetune import Finetune

    sent = []

    def upload_folder(self, *, folder_path, ignore_patterns, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*")
                 if p.is_file()]
        sent.append(sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns)))

    monkeypatch.setattr(HfApi, "create_repo", lambda self, *args, **kwargs: None)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    config = load_config(write_config(tmp_path, tiny_model_dir))
    sft = config.layout.sft
    shutil.copytree(tiny_model_dir, sft)
    for name in ("logs/events.out", "plots/loss.png", ".checkpoints/checkpoint-2/x", ".progress"):
        (sft / name).parent.mkdir(parents=True, exist_ok=True)
        (sft / name).write_text("x")
    (sft / "manifest.json").write_text(json.dumps({"stage": "finetune", "status": "complete"}))
    hub.push_stage(config, Finetune(), "me/model")
    assert sent == [sorted(p.name for p in tiny_model_dir.iterdir())]
    assert "warning" not in capsys.readouterr().err

    (sft / "config.json").rename(sft / "adapter_config.json")  # an adapter on the run's own base
    (sft / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "../base"}))
    hub.push_stage(config, Finetune(), "me/model")
    assert "adapter_config.json" in sent[-1] and "manifest.json" not in sent[-1]
    warning = " ".join(capsys.readouterr().err.split())
    assert f"is a LoRA adapter on the local model {sft.parent / 'base'}" in warning
    assert "finetune.lora.merge: true" in warning


@pytest.mark.parametrize("setting, message", [
    ("finetune.training.trl_args.warmup_step=3", "did you mean 'warmup_steps'"),
    ("optimize.method=grpo", "not a multiple of optimize.num_generations"),
    ("train_rm.training.report_to=[tensorboard_x]", "did you mean 'tensorboard'"),
])
def test_config_validate_finds_what_would_fail_hours_later(tmp_path, tiny_model_dir, setting,
                                                           message):
    config = write_config(tmp_path, tiny_model_dir)
    data = yaml.safe_load(config.read_text())
    data["optimize"] = {"num_generations": 3, "training": {"per_device_batch_size": 4}}
    config.write_text(yaml.safe_dump(data))
    result = cai("config", "validate", "--config", config, "--set", setting)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr
    # `cai run` refuses the same config before its first stage starts
    run = cai("run", "--config", config, "--set", setting)
    assert run.returncode == 2 and message in run.stderr
    assert not stage_files(tmp_path / "run")


def test_a_kill_after_the_final_save_does_not_train_again(tmp_path, tiny_model_dir, monkeypatch):
    from cai_cli.stages import finetune, generate_sl
    from cai_cli.stages.common import StageRun

    config = load_config(write_config(tmp_path, tiny_model_dir, limit=4))
    generate_sl.GenerateSL().run(config)
    original = StageRun.complete

    def killed(self):
        if self.spec.command == "finetune":
            raise KeyboardInterrupt  # as if killed between the save and the manifest
        original(self)

    monkeypatch.setattr(StageRun, "complete", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune.Finetune().run(config)
    monkeypatch.undo()
    assert (tmp_path / "run" / "sft" / "model.safetensors").is_file()
    finetune.Finetune().run(config)
    manifest = json.loads((tmp_path / "run" / "sft" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert manifest["stats"]["resumed_from_step"] == 4  # the last checkpoint: nothing retrained
    assert not (tmp_path / "run" / "sft" / ".checkpoints").exists()


def test_ctrl_c_after_force_says_how_to_resume(tmp_path, tiny_model_dir):
    # 20 checkpoints: on a busy machine the interrupt still comes long before the last one
    config = write_config(tmp_path, tiny_model_dir, limit=40)
    process = start("generate-sl", "--config", config, "--force")
    run = tmp_path / "run"
    progress = run / "sl" / ".chains.jsonl.progress.json"
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        if progress.is_file() and json.loads(progress.read_text() or "{}").get("batches", 0) >= 1:
            break
        time.sleep(0.05)
    assert process.poll() is None, "generate-sl ended before it could be interrupted"
    process.send_signal(signal.SIGINT)  # as Ctrl-C
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "without --force" in err


def under_timeout(args: list, ready, deadline: float = 300) -> subprocess.CompletedProcess:
    """``timeout -s TERM 900 cai ARGS`` from a shell, stopped once ``ready()``: ``timeout``
    passes the SIGTERM it gets on to cai, as it does its own at the time limit (the wait for
    ``ready`` replaces a guess of how long the machine takes to get there)."""
    process = subprocess.Popen(["timeout", "--preserve-status", "-s", "TERM", "900",
                                sys.executable, "-m", "cai_cli", *map(str, args)], cwd=ROOT,
                               env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    until = time.time() + deadline
    while process.poll() is None and time.time() < until and not ready():
        time.sleep(0.02)
    assert process.poll() is None, "the command ended before it could be stopped"
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(args, process.returncode, out, err)


def batches_done(progress: Path) -> int:
    try:
        return json.loads(progress.read_text() or "{}").get("batches", 0)
    except (OSError, ValueError):  # not there yet, or being replaced
        return 0


RESUME = "terminated (SIGTERM): rerun the same command to resume where it stopped"


def test_sigterm_stops_generate_sl_and_the_rerun_resumes_to_the_same_bytes(tmp_path,
                                                                          tiny_model_dir):
    from cai_cli.stages import generate_sl

    settings = dict(limit=10, path=tmp_path / "int.yaml")
    config = write_config(tmp_path, tiny_model_dir, **settings)  # 5 checkpoints of 2 prompts
    run = tmp_path / "run"
    progress = run / "sl" / ".chains.jsonl.progress.json"
    stopped = under_timeout(["generate-sl", "--config", config],
                            lambda: batches_done(progress) >= 1)
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == RESUME
    assert "Traceback" not in stopped.stderr
    assert not (run / ".cai" / "lock.holder.json").exists()  # nobody holds the directory
    assert 1 <= batches_done(progress) < 5 and not (run / "sl" / "chains.jsonl").exists()

    resumed = cai("generate-sl", "--config", config)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr

    reference = write_config(tmp_path, tiny_model_dir, run_dir=str(tmp_path / "ref"),
                             **{**settings, "path": tmp_path / "ref.yaml"})
    generate_sl.GenerateSL().run(load_config(reference))
    for name in ("chains.jsonl", "sft.jsonl"):
        assert (run / "sl" / name).read_bytes() == (tmp_path / "ref" / "sl" / name).read_bytes()


def test_sigterm_makes_finetune_save_the_step_it_is_on_and_the_rerun_resumes_there(
        tmp_path, tiny_model_dir):
    from cai_cli.stages import finetune, generate_sl

    training = {"training": {"max_steps": 20, "per_device_batch_size": 2, "max_length": 256,
                             "learning_rate": 1e-3, "logging_steps": 1, "save_steps": 2}}
    config = write_config(tmp_path, tiny_model_dir, limit=4, finetune=training)
    generate_sl.GenerateSL().run(load_config(config))
    reference = tmp_path / "ref"
    shutil.copytree(tmp_path / "run" / "sl", reference / "sl")

    sft = tmp_path / "run" / "sft"
    first = sft / ".checkpoints" / "checkpoint-2" / "trainer_state.json"
    stopped = under_timeout(["finetune", "--config", config], first.is_file)
    assert stopped.returncode == 143, stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == RESUME
    assert "Traceback" not in stopped.stderr
    assert not (tmp_path / "run" / ".cai" / "lock.holder.json").exists()
    (checkpoint,) = (sft / ".checkpoints").glob("checkpoint-*")
    step = int(checkpoint.name.split("-")[1])
    assert 2 <= step < 20  # the step under way when the signal came
    assert f"finetune: SIGTERM: saving a checkpoint of step {step}, then stopping" \
        in stopped.stderr
    assert json.loads((sft / "manifest.json").read_text())["status"] == "running"

    resumed = cai("finetune", "--config", config)
    assert resumed.returncode == 0, resumed.stderr
    assert f"finetune: continuing from checkpoint-{step}" in resumed.stderr

    finetune.Finetune().run(load_config(config, [f"run_dir={reference}"]))
    assert (sft / "model.safetensors").read_bytes() == \
        (reference / "sft" / "model.safetensors").read_bytes()


def test_a_full_disk_is_a_user_error(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import errno

    from cai_cli import cli
    from cai_cli.stages.generate_sl import GenerateSL

    config = write_config(tmp_path, tiny_model_dir)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x.partial"))

    monkeypatch.setattr(GenerateSL, "run", full)
    monkeypatch.setattr(sys, "argv", ["cai", "generate-sl", "--config", str(config)])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "No space left on device writing" in err and "x.partial" in err
    assert "Traceback" not in err


def test_config_validate_checks_lora_targets_of_a_local_model(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = cai("config", "validate", "--config", config, "--set", "finetune.lora.enabled=true",
                 "--set", "finetune.lora.target_modules=[q_projection]")
    assert result.returncode == 2 and "finetune.lora.target_modules" in result.stderr
    assert "q_projection" in result.stderr
