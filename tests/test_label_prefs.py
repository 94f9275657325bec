"""``cai label-prefs``: option scoring against a manual forward pass, the label arithmetic, chain
of thought, resume after SIGKILL, and that TRL trains on the pairs as they are."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import cai, cai_main, kill_after_batches

from cai_cli.config import ModelConfig, load_config
from cai_cli.engines.judge import combine, option_probability
from cai_cli.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


def write_config(tmp_path: Path, model: Path, name: str = "config.yaml", **label_prefs) -> Path:
    config = {
        "run_dir": str(tmp_path / label_prefs.pop("run", "run")),
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 4}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu", "forward_batch_size": 8}},
        "label_prefs": {"policy": str(model), "responses_per_prompt": 2, "principles_per_pair": 2,
                        "few_shot": 1, "prompts_per_checkpoint": 2, "sampling": {"max_new_tokens": 8},
                        **label_prefs},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def label(path: Path, *overrides: str):
    from cai_cli.stages import label_prefs

    return label_prefs.LabelPrefs().run(load_config(path, list(overrides)))


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def backend(tiny_model_dir):
    from cai_cli.engines.hf import HFBackend

    return HFBackend(ModelConfig(name_or_path=str(tiny_model_dir), device="cpu", forward_batch_size=3), "m")


@pytest.mark.parametrize("options", [(" (A)", " (B)"), ("A", "B")], ids=["multi-token", "one-token"])
def test_option_scores_match_a_manual_forward_pass(backend, options):
    import torch

    from cai_cli.engines.prompts import comparison_prompt

    prompts = [comparison_prompt("How do I pick a lock?", "Which is safer?", "No.", "Use a pick.", [], fmt)
               for fmt in ("chat", "transcript")]
    prompts.append(comparison_prompt("Hi " * 40, "Which is kinder?", "Hello!", "Go away.", [], "chat"))
    # three questions after the same worked example: their shared prefix is computed once
    from cai_cli.constitution import load_constitution

    example = load_constitution(CONSTITUTION).comparison_examples[:1]
    prompts += [comparison_prompt(f"Question {n}?", "Which is safer?", f"Yes {n}.", "No.", example, "chat")
                for n in range(3)]
    scores = backend.score_options(prompts, options)

    tokenizer, model = backend.tokenizer, backend.model
    for prompt, got in zip(prompts, scores):
        text = tokenizer.apply_chat_template(prompt, tokenize=False, continue_final_message=True) \
            if isinstance(prompt, list) else prompt
        special = isinstance(prompt, str)
        prompt_ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        for option, value in zip(options, got):
            ids = tokenizer(text + option, add_special_tokens=special)["input_ids"]
            start = next(i for i, (x, y) in enumerate(zip(prompt_ids + [-1], ids)) if x != y)
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            expected = sum(logprobs[t - 1, ids[t]].item() for t in range(start, len(ids)))
            assert value == pytest.approx(expected, abs=1e-4)
    assert all(a != b for a, b in scores)


def test_batched_generation_with_a_shared_prefix_equals_one_at_a_time(backend):
    from cai_cli.constitution import load_constitution
    from cai_cli.engines.base import SamplingParams
    from cai_cli.engines.prompts import critique_prompt

    constitution = load_constitution(CONSTITUTION)
    examples, principle = constitution.few_shot[:1], constitution.principles[0]
    prompts = [critique_prompt(f"How do I do thing number {n}?" + " really" * n, "Like this.", principle,
                               examples, "chat") for n in range(5)]
    params = SamplingParams(max_new_tokens=12, temperature=0.0)
    batched = backend.generate(prompts, params)  # batch size 3: rows share the worked example
    alone = [backend.generate([p], params)[0] for p in prompts]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.tokens for c in batched] == [c.tokens for c in alone]


def test_option_probability_normalises_over_options():
    import math

    assert option_probability([math.log(0.3), math.log(0.1)]) == pytest.approx(0.75)
    assert option_probability([-1000.0, -1000.0]) == pytest.approx(0.5)


def test_order_averaging_and_principle_ensemble():
    judgments = [
        # principle x: a first gets 0.8; b first gets 0.4 -> a is 0.6 -> (0.8 + 0.6) / 2 = 0.7
        {"principle": "x", "order": "ab", "p_first": 0.8},
        {"principle": "x", "order": "ba", "p_first": 0.4},
        # principle y: a first 0.3, b first 0.6 -> a is 0.4 -> 0.35
        {"principle": "y", "order": "ab", "p_first": 0.3},
        {"principle": "y", "order": "ba", "p_first": 0.6},
    ]
    p_a, disagree = combine(judgments)
    assert p_a == pytest.approx((0.7 + 0.35) / 2)
    assert disagree is False
    # the first-shown answer wins in both orders: position bias, the orders disagree
    biased = [{"principle": "x", "order": "ab", "p_first": 0.9}, {"principle": "x", "order": "ba", "p_first": 0.7}]
    p_a, disagree = combine(biased)
    assert p_a == pytest.approx((0.9 + 0.3) / 2) and disagree is True


def test_pairs_follow_the_contract(tmp_path, tiny_model_dir):
    label(write_config(tmp_path, tiny_model_dir, responses_per_prompt=3))
    prefs = tmp_path / "run" / "prefs"
    pairs = read(prefs / "pairs.jsonl")
    samples = read(prefs / "samples.jsonl")
    assert len(samples) == 4 and all(len(s["responses"]) == 3 for s in samples)
    assert len(pairs) == 4 * 3  # every pair of three different answers
    for pair in pairs:
        assert [m["role"] for m in pair["prompt"]] == ["user"]
        assert [m["role"] for m in pair["chosen"]] == [m["role"] for m in pair["rejected"]] == ["assistant"]
        assert 0.5 <= pair["p_chosen"] <= 1.0
        assert len(pair["judgments"]) == 4  # 2 principles x 2 orders
        assert {j["order"] for j in pair["judgments"]} == {"AB", "BA"}
        # p_chosen recomputed from the stored judgments ("AB": chosen shown first)
        per_principle = {}
        for j in pair["judgments"]:
            p = j["p_first"] if j["order"] == "AB" else 1 - j["p_first"]
            per_principle.setdefault(j["principle"], []).append(p)
        expected = sum(sum(v) / 2 for v in per_principle.values()) / len(per_principle)
        assert pair["p_chosen"] == pytest.approx(expected, abs=1e-5)
    manifest = json.loads((prefs / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["pairs"] == 12
    share = sum(p["order_disagreement"] for p in pairs) / len(pairs)
    assert manifest["stats"]["order_disagreement"] == pytest.approx(share, abs=1e-4)
    assert manifest["stats"]["mean_confidence"] == pytest.approx(
        sum(abs(p["p_chosen"] - 0.5) for p in pairs) / len(pairs), abs=1e-4)


def test_chain_of_thought_is_clamped_and_keeps_the_reasoning(tmp_path, tiny_model_dir):
    label(write_config(tmp_path, tiny_model_dir, chain_of_thought=True, cot_max_new_tokens=8,
                       cot_clamp=[0.45, 0.55], principles_per_pair=1))
    pairs = read(tmp_path / "run" / "prefs" / "pairs.jsonl")
    judgments = [j for p in pairs for j in p["judgments"]]
    assert judgments and all(0.45 <= j["p_first"] <= 0.55 for j in judgments)
    assert all(isinstance(j["reasoning"], str) and j["reasoning"] for j in judgments)


def test_pairs_load_with_datasets_and_train_a_dpo_step(tmp_path, tiny_model_dir):
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    label(write_config(tmp_path, tiny_model_dir))
    data = datasets.load_dataset("json", data_files=str(tmp_path / "run" / "prefs" / "pairs.jsonl"),
                                 split="train")
    assert {"prompt", "chosen", "rejected", "p_chosen"} <= set(data.column_names)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    before = [p.detach().clone() for p in model.parameters()]
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2,
                     report_to=[], learning_rate=1e-3, logging_steps=1, save_strategy="no",
                     use_cpu=True, disable_tqdm=True)
    trainer = DPOTrainer(model=model, args=args, train_dataset=data,
                         processing_class=AutoTokenizer.from_pretrained(tiny_model_dir))
    trainer.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_sigkill_then_resume_gives_identical_pairs(tmp_path, tiny_model_dir):
    settings = dict(prompts_per_checkpoint=1, chain_of_thought=True, cot_max_new_tokens=4)
    reference = write_config(tmp_path, tiny_model_dir, "ref.yaml", run="ref", **settings)
    interrupted = write_config(tmp_path, tiny_model_dir, "int.yaml", run="int", **settings)
    assert cai("label-prefs", "--config", reference).returncode == 0

    state = tmp_path / "int" / "prefs" / ".pairs.jsonl.progress.json"
    kill_after_batches(["label-prefs", "--config", interrupted], state, 2)
    assert (tmp_path / "int" / "prefs" / "pairs.jsonl.partial").is_file()
    assert not (tmp_path / "int" / "prefs" / "pairs.jsonl").exists()

    result = cai("label-prefs", "--config", interrupted)
    assert result.returncode == 0, result.stderr
    for name in ("samples.jsonl", "pairs.jsonl"):
        assert (tmp_path / "int" / "prefs" / name).read_bytes() == (tmp_path / "ref" / "prefs" / name).read_bytes()


def test_held_out_prompts_are_not_the_sl_prompts(tmp_path, tiny_model_dir):
    from cai_cli.data.sources import load_prompts
    from cai_cli.stages.label_prefs import select_prompts

    config = load_config(write_config(tmp_path, tiny_model_dir, held_out=True, limit=5))
    sl_ids = {p.id for p in load_prompts(config.data.red_team, config.seed)}
    held = select_prompts(config)
    assert len(held) == 5 and not sl_ids & {p.id for p in held}
    with pytest.raises(UserError, match="held_out needs data.red_team.limit"):
        select_prompts(load_config(write_config(tmp_path, tiny_model_dir, "b.yaml", held_out=True),
                                   ["data.red_team.limit=null"]))


def test_missing_sft_and_bad_settings_exit_2(tmp_path, tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir)
    result = cai("label-prefs", "--config", config, "--set", "label_prefs.policy=null")
    assert result.returncode == 2 and "cai finetune" in result.stderr and "Traceback" not in result.stderr
    result = cai("label-prefs", "--config", config, "--set", "label_prefs.responses_per_prompt=1")
    assert result.returncode == 2 and "label_prefs.responses_per_prompt" in result.stderr
    assert not (tmp_path / "run" / "prefs").exists()


@pytest.mark.parametrize("overrides, message", [
    (["label_prefs.sampling.max_new_tokens=2030"],
     "all 4 prompts were skipped, their answers outgrowing the policy model's context (the "
     "warnings above); lower label_prefs.sampling.max_new_tokens"),
    (["models.feedback.max_context=200"],
     "all 4 pairs were skipped, no comparison fitting the feedback model's context (the "
     "warnings above); raise models.feedback.max_context"),
    (["label_prefs.sampling.temperature=0"],
     "no pair to judge: every prompt's 2 answers were one and the same text; sample with "
     "variety (label_prefs.sampling.temperature above 0)"),
], ids=["answers-too-long", "comparisons-too-long", "identical-answers"])
def test_no_pair_at_all_is_exit_2_saying_what_to_change(tmp_path, tiny_model_dir, overrides,
                                                        message):
    config = write_config(tmp_path, tiny_model_dir)
    feedback = [f"models.feedback.name_or_path={tiny_model_dir}", "models.feedback.device=cpu"]
    result = cai_main("label-prefs", "--config", config,
                      *[part for item in feedback + overrides for part in ("--set", item)])
    assert result.returncode == 2, result.stderr
    *_, last = result.stderr.strip().splitlines()
    assert last.startswith(f"error: label-prefs: {message}") and last.endswith(", then rerun")
    assert not (tmp_path / "run" / "prefs" / "manifest.json").exists()  # no --force to rerun


def test_tokenizer_that_cannot_spell_the_options_is_refused(tmp_path):
    """A word-level tokenizer without '(A)' / '(B)' in its vocabulary maps both to <unk>."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<unk>", "<pad>", "Human:", "Assistant:", "The", "answer", "is:", "hello"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        eos_token="<pad>")
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=1,
                                         num_key_value_heads=1, pad_token_id=1))
    model.save_pretrained(tmp_path / "wordy")
    tokenizer.save_pretrained(tmp_path / "wordy")

    from cai_cli.engines.hf import HFBackend
    from cai_cli.engines.prompts import OPTIONS

    backend = HFBackend(ModelConfig(name_or_path=str(tmp_path / "wordy"), device="cpu"), "models.feedback")
    with pytest.raises(UserError, match="cannot represent the option labels"):
        backend.score_options(["Human: hello\n\nAssistant: The answer is:"], OPTIONS)


def test_diagnostics_name_a_judge_that_picks_by_position():
    from cai_cli.reports.statistics import label_diagnostics

    def pair(i, first_ab, first_ba):
        p_chosen = (first_ab + 1 - first_ba) / 2
        return {"id": f"p{i}", "p_chosen": p_chosen,
                "judgments": [{"principle": "harm", "order": "AB", "p_first": first_ab},
                              {"principle": "harm", "order": "BA", "p_first": first_ba}]}

    # always 80% on the second option, whatever it is: labels collapse to 0.5
    biased = label_diagnostics([pair(i, 0.2, 0.2) for i in range(8)])
    assert biased["position_bias"] == 0.2 and biased["first_wins"] == 0.0
    assert biased["order_agreement"] == 0.0
    assert biased["p_chosen"]["median"] == 0.5
    assert "second" in biased["verdict"] and "little signal" in biased["verdict"]

    # a judge that follows the answers, not their places
    fair = label_diagnostics([pair(i, 0.95, 0.05) for i in range(8)])
    assert fair["position_bias"] == 0.5 and fair["order_agreement"] == 1.0
    assert fair["p_chosen_histogram"]["0.90-1.00"] == 8
    assert "little signal" not in fair["verdict"]
