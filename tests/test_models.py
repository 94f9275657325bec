"""Loading models (cai_cli/models.py): every way a model can fail to load is a one-line error
with exit 2 from the real command, before the stage writes anything; and every loader passes
the config's revision and trust_remote_code to transformers."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import ENV, ROOT, cai

from cai_cli.config import LoraConfig, ModelConfig
from cai_cli.errors import UserError

PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


def write_config(tmp_path: Path, model, **policy) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 2}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu", **policy}},
        "generate_sl": {"num_revisions": 1, "sampling": {"max_new_tokens": 4}},
        "evaluate": {"limit": 2},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """The command's error: exit 2, one line, no traceback."""
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def broken_copy(tiny_model_dir: Path, tmp_path: Path, how: str) -> Path:
    model = tmp_path / f"model-{how}"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    if how == "truncated":  # a download or copy cut off halfway
        with weights.open("r+b") as handle:
            handle.truncate(weights.stat().st_size // 2)
    else:
        weights.write_text("<html>Service unavailable</html>")
    return model


# ---------------------------------------------------------------------------------------------
# Through the command line


def unavailable_devices() -> list[str]:
    import torch

    devices = ["cuda:99"]
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        devices.append("mps")
    return devices


@pytest.mark.parametrize("device", ["banana", *unavailable_devices()])
def test_a_device_that_is_not_there_stops_generate_sl_before_it_writes(tmp_path, tiny_model_dir,
                                                                      device):
    config = write_config(tmp_path, tiny_model_dir)
    message = one_line_error(cai("generate-sl", "--config", config,
                                 "--set", f"models.policy.device={device}"))
    assert message.startswith(f"error: models.policy.device: {device}") or \
        message.startswith(f"error: models.policy.device: '{device}'")
    assert ("not a torch device" if device == "banana" else "use auto") in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("stage, overrides", [
    ("label-prefs", ["label_prefs.policy={model}"]),
    ("evaluate", ["evaluate.models=[base,{model}]"]),
    ("finetune", []),
    ("optimize", ["optimize.model={model}"]),
])
def test_every_stage_checks_the_device_before_it_writes(tmp_path, tiny_model_dir, stage,
                                                        overrides):
    config = write_config(tmp_path, tiny_model_dir)
    sets = [arg for o in overrides for arg in ("--set", o.format(model=tiny_model_dir))]
    message = one_line_error(cai(stage, "--config", config, *sets,
                                 "--set", "models.policy.device=banana"))
    assert "models.policy.device: 'banana' is not a torch device" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["truncated", "garbage"])
def test_broken_weights_name_the_file_and_how_to_fix_it(tmp_path, tiny_model_dir, how):
    model = broken_copy(tiny_model_dir, tmp_path, how)
    message = one_line_error(cai("generate-sl", "--config", write_config(tmp_path, model)))
    assert f"{model / 'model.safetensors'} is truncated or corrupt" in message
    assert "re-save the model with save_pretrained, or download it again" in message
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("layout, expected", [
    ("empty", "has no config.json; expected a directory written by save_pretrained"),
    ("no weights", "holds no model weights"),
    ("a file", "is a file; expected a directory written by save_pretrained"),
])
def test_a_path_that_is_not_a_model(tmp_path, tiny_model_dir, layout, expected):
    model = tmp_path / "not-a-model"
    if layout == "a file":
        model.write_text("name: x\n")
    else:
        model.mkdir()
        if layout == "no weights":  # config and tokenizer, but the weights never arrived
            for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
                shutil.copy(tiny_model_dir / name, model / name)
    message = one_line_error(cai("generate-sl", "--config", write_config(tmp_path, model)))
    assert f"models.policy.name_or_path: {model}" in message and expected in message
    assert not (tmp_path / "run").exists()


def cai_with(env: dict, *args) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "cai_cli", *map(str, args)], check=False,
                            capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    return result, time.perf_counter() - started


def test_a_hub_id_without_network_fails_at_once_with_a_hint(tmp_path):
    # A hub that refuses connections stands for a machine without network, whatever this one
    # has; an empty cache makes the model one that would have to be downloaded.
    env = {k: v for k, v in ENV.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path / "hf-home"))
    config = write_config(tmp_path, "someone/some-model")
    result, seconds = cai_with(env, "generate-sl", "--config", config)
    message = one_line_error(result)
    assert ("models.policy.name_or_path: cannot reach the Hugging Face hub for "
            "'someone/some-model'") in message
    assert "HF_HUB_OFFLINE=1" in message and "local directory" in message
    assert "Retrying" not in result.stderr
    assert seconds < 30  # loading retried each file for ~50 s; the check asks once
    assert not (tmp_path / "run").exists()


def test_a_hub_id_offline_and_not_cached_says_how_to_get_it(tmp_path):
    env = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    config = write_config(tmp_path, "someone/some-model", revision="v2")
    message = one_line_error(cai_with(env, "generate-sl", "--config", config)[0])
    assert "'someone/some-model' at revision 'v2' is not in the local Hugging Face cache" in message
    assert "hf download someone/some-model" in message
    assert not (tmp_path / "run").exists()


def test_an_adapter_whose_base_is_gone_says_where_it_was_and_what_to_do(tmp_path,
                                                                         tiny_model_dir):
    import peft
    from transformers import AutoModelForCausalLM

    from cai_cli.engines import models

    base, adapter = tmp_path / "base-model", tmp_path / "adapter"
    shutil.copytree(tiny_model_dir, base)
    lora = peft.LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    peft.get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(adapter)
    shutil.rmtree(base)  # e.g. the run directory taken to another machine
    message = one_line_error(cai("generate-sl", "--config", write_config(tmp_path, adapter)))
    assert f"models.policy.name_or_path: {adapter} is a LoRA adapter" in message
    assert f"its base model {base} is missing" in message and "lora.merge: true" in message
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="is a LoRA adapter"):  # the loader says the same
        models.load_causal_lm(ModelConfig(name_or_path=str(adapter), device="cpu"), "x")


# ---------------------------------------------------------------------------------------------
# The loaders themselves


def test_a_loader_names_the_broken_file_even_without_the_check(tmp_path, tiny_model_dir):
    from cai_cli.engines import models

    model = ModelConfig(name_or_path=str(broken_copy(tiny_model_dir, tmp_path, "truncated")),
                        device="cpu")
    with pytest.raises(UserError, match=r"model\.safetensors is truncated or corrupt"):
        models.load_causal_lm(model, "models.policy")


def test_sharded_weights_are_checked_shard_by_shard(tmp_path, tiny_model_dir):
    from cai_cli.engines import models

    model = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, model)
    (model / "model.safetensors").rename(model / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors",
                            "b": "model-00002-of-00002.safetensors"}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UserError, match=r"model-00002-of-00002\.safetensors, listed in "
                                        r"model\.safetensors\.index\.json, is missing"):
        models.check_weights(model, "models.policy.name_or_path")


@pytest.fixture
def recorded(monkeypatch):
    """Every ``from_pretrained`` of the Auto classes, as (class, name, revision, remote code)."""
    import transformers

    calls, depth = [], [0]
    for name in ("AutoTokenizer", "AutoConfig", "AutoModelForCausalLM",
                 "AutoModelForSequenceClassification"):
        cls = getattr(transformers, name)
        original = cls.from_pretrained.__func__

        def recording(klass, path, *args, _original=original, _name=name, **kwargs):
            if not depth[0]:  # our calls, not those transformers makes inside them
                calls.append((_name, str(path), kwargs.get("revision"),
                              kwargs.get("trust_remote_code")))
            depth[0] += 1
            try:
                return _original(klass, path, *args, **kwargs)
            finally:
                depth[0] -= 1

        monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    return calls


def test_revision_and_remote_code_reach_every_loader(tmp_path, tiny_model_dir, recorded):
    """A local directory ignores the revision, so the tiny model loads; what matters is that
    each call passes both settings on (to a hub id, or to the base of a LoRA adapter)."""
    from types import SimpleNamespace

    from cai_cli.config import load_config
    from cai_cli.engines import load_backend, models
    from cai_cli.stages import evaluate, optimize, training

    config = load_config(write_config(tmp_path, tiny_model_dir, revision="v1.0",
                                      trust_remote_code=True))
    policy = config.models.policy
    no_precision = SimpleNamespace(bf16=False, fp16=False)

    load_backend(policy, "models.policy").close()
    models.load_model(policy, "finetune.model", LoraConfig(), no_precision)
    training.check_lora(LoraConfig(enabled=True, target_modules=["q_proj"]), policy,
                        "finetune.lora")
    rm = Path(config.run_dir) / "rm"
    shutil.copytree(tiny_model_dir, rm)
    (rm / "manifest.json").write_text(json.dumps({"status": "complete"}))
    optimize.reward_tokenizer(config, rm)
    optimize.load_reward_model(config, rm, no_precision)
    prompt = SimpleNamespace(id="p", text="Hi.")
    assert evaluate.reward_scores(config, [prompt], ["base"], {("base", "p"): "Hello."})

    loaded = {(cls, Path(path).name) for cls, path, _, _ in recorded}
    base = tiny_model_dir.name
    assert loaded >= {("AutoTokenizer", base), ("AutoModelForCausalLM", base), ("AutoConfig", base),
                      ("AutoTokenizer", "rm"), ("AutoModelForSequenceClassification", "rm")}
    assert [call for call in recorded if call[2:] != ("v1.0", True)] == []
