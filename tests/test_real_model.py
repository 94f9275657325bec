"""The real-model tier: every stage on SmolLM2-135M-Instruct, its real tokenizer and chat
template, through the real command, small enough for a CPU (a few minutes).

A random tiny model hides template, tokenizer and judge problems; these tests assert what a user
would notice on a real one: English text, the template round trip, single-token option letters,
models that load and generate after training, and label diagnostics that tell the truth.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, cai

PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
HELPFUL = ROOT / "cai_cli" / "resources" / "helpful.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
COMMON_WORDS = {"the", "a", "to", "you", "i", "is", "and", "it", "of", "that", "in", "for", "can",
                "this", "be", "your", "not", "are", "with", "or", "have", "my"}
TRAINING = {"max_steps": 2, "per_device_batch_size": 2, "max_length": 256, "learning_rate": 1e-4,
            "logging_steps": 1, "save_steps": 2}


def looks_like_english(text: str) -> bool:
    """Words of the model's vocabulary, not byte noise: mostly letters, and common words."""
    words = re.findall(r"[A-Za-z']+", text.lower())
    if len(words) < 3:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in text) / max(len(text), 1)
    return letters > 0.8 and len(set(words) & COMMON_WORDS) >= 2


@pytest.fixture(scope="module")
def run(smollm2, tmp_path_factory) -> tuple[Path, Path]:
    """``(config, run directory)``: the whole pipeline on SmolLM2, each stage a real command."""
    _, model = smollm2
    tmp = tmp_path_factory.mktemp("real")
    lora = {"enabled": True, "r": 8, "alpha": 16}
    config = {
        "run_dir": str(tmp / "run"), "seed": 0, "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 2},
                 "helpful": {"path": str(HELPFUL), "field": "messages"}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu",
                              "forward_batch_size": 8}},
        "generate_sl": {"num_revisions": 1, "few_shot": 1,
                        "sampling": {"max_new_tokens": 32, "temperature": 0.2, "top_p": 0.9}},
        "finetune": {"helpful_ratio": 0.5, "lora": lora, "training": TRAINING},
        "label_prefs": {"responses_per_prompt": 2, "principles_per_pair": 1,
                        "sampling": {"max_new_tokens": 24, "temperature": 1.0}},
        "train_rm": {"eval_fraction": 0.0, "lora": lora, "training": {**TRAINING, "max_steps": 1}},
        "optimize": {"lora": lora, "training": {**TRAINING, "max_steps": 1}},
        "evaluate": {"limit": 2, "benign_limit": 2, "principles_per_pair": 1, "reward_model": True,
                     "sampling": {"max_new_tokens": 24}},
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    for stage in ("generate-sl", "finetune", "label-prefs", "train-rm", "optimize", "evaluate"):
        result = cai(stage, "--config", path, timeout=1200)
        assert result.returncode == 0, f"{stage}: {result.stderr[-2000:]}"
    return path, tmp / "run"


def test_critiques_and_revisions_are_english(run):
    _, run_dir = run
    chains = [json.loads(line) for line in (run_dir / "sl" / "chains.jsonl").read_text().splitlines()]
    assert len(chains) == 2
    for chain in chains:
        assert chain["format"] == "chat"  # SmolLM2 has a chat template; auto picked it
        for text in (chain["initial"], chain["rounds"][0]["critique"], chain["final"]):
            assert looks_like_english(text), text
            assert "<|im_start|>" not in text and "<|im_end|>" not in text  # stopped at end of turn


def test_the_chat_template_round_trips(smollm2):
    from transformers import AutoTokenizer

    _, model = smollm2
    tokenizer = AutoTokenizer.from_pretrained(model)
    messages = [{"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": "Hi! How can I help?"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert "<|im_start|>user\nHello there<|im_end|>" in text
    assert "<|im_start|>assistant\nHi! How can I help?<|im_end|>" in text
    ids = tokenizer.apply_chat_template(messages[:1], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_option_letters_are_single_tokens_after_the_prompt(smollm2):
    from transformers import AutoTokenizer

    from cai_cli.engines.prompts import ANSWER_PREFIX

    _, model = smollm2
    tokenizer = AutoTokenizer.from_pretrained(model)
    base = tokenizer(ANSWER_PREFIX, add_special_tokens=False)["input_ids"]
    for letter in ("A", "B"):
        ids = tokenizer(ANSWER_PREFIX + letter, add_special_tokens=False)["input_ids"]
        assert ids[:len(base)] == base and len(ids) == len(base) + 1, letter


def test_sft_trains_on_the_revision_with_its_template(run):
    _, run_dir = run
    sft = [json.loads(line) for line in (run_dir / "sl" / "sft.jsonl").read_text().splitlines()]
    assert all(set(example) == {"id", "prompt", "completion"} for example in sft)
    manifest = json.loads((run_dir / "sft" / "manifest.json").read_text())
    assert manifest["counts"]["train_examples"] == 3 and manifest["stats"]["lora"] is True


@pytest.mark.parametrize("stage", ["sft", "policy"])
def test_trained_models_load_and_generate(run, stage):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run_dir = run
    tokenizer = AutoTokenizer.from_pretrained(run_dir / stage)
    model = AutoModelForCausalLM.from_pretrained(run_dir / stage)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of "
                                          "France?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert looks_like_english(answer + " the a"), answer  # words, maybe few of them


def test_reward_model_scores_through_the_template(run):
    _, run_dir = run
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    scores = report["reward_model"]["mean_score"]
    assert set(scores) == {"base", "sft", "policy"}
    assert all(isinstance(v, float) for v in scores.values())


def test_the_evaluation_measures_both_axes_and_says_who_judged(run):
    _, run_dir = run
    report = json.loads((run_dir / "eval" / "report.json").read_text())
    assert report["helpfulness"]["prompts"] == 2 and set(report["harmful_compliance"]) == \
        set(report["helpfulness"]["over_refusal"]) == {"base", "sft", "policy"}
    assert report["verdict"]["model"] == "policy" and report["verdict"]["text"]
    # SmolLM2 judges the models trained on its own labels: the report must say so
    assert any("judged by the feedback model" in c for c in report["verdict"]["caveats"])


def test_label_diagnostics_tell_the_truth_about_the_judge(run):
    _, run_dir = run
    stats = json.loads((run_dir / "prefs" / "manifest.json").read_text())["stats"]
    assert 0.0 <= stats["position_bias"] <= 1.0
    assert stats["p_chosen"]["min"] >= 0.5 and stats["verdict"]
    # a 135M judge is weak: whatever it did, the verdict must match the figures it reports
    if abs(stats["position_bias"] - 0.5) > 0.15:
        assert "little signal" in stats["verdict"]
    shown = cai("inspect", run_dir / "prefs" / "pairs.jsonl")
    assert shown.returncode == 0 and "position bias" in shown.stdout


def test_generate_prompts_writes_new_readable_requests(smollm2, tmp_path):
    """Two few-shot requests to SmolLM2 as a chat model: numbered new prompts, parsed, filtered
    and counted; the kept ones are English, differ from the seeds and carry the seeds shown."""
    _, model = smollm2
    config = {
        "run_dir": str(tmp_path / "run"), "seed": 0, "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 12}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu"}},
        "generate_prompts": {"num_prompts": 6, "per_request": 3, "few_shot": 4,
                             "sampling": {"max_new_tokens": 64, "temperature": 0.7,
                                          "top_p": 0.9}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    result = cai("generate-prompts", "--config", path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = tmp_path / "run" / "prompts"
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    from cai_cli.stages.generate_prompts import FILTERS

    assert counts["generated"] == 6 and counts["requests"] == 2
    assert counts["generated"] == counts["kept"] + sum(counts[name] for name in FILTERS)
    records = [json.loads(line) for line in (out / "red_team.jsonl").read_text().splitlines()]
    seeds = {json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()}
    assert records and len(records) == counts["kept"]
    for record in records:
        assert looks_like_english(record["prompt"]), record["prompt"]
        assert record["prompt"] not in seeds and len(record["seed_ids"]) == 4
