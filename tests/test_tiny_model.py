"""``cai tiny-model``: a random Llama-style model whose directory loads like any real checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from cai_cli.errors import UserError
from cai_cli.commands.tiny_model import build_tiny_model

SMALL = {"hidden_size": 64, "layers": 2}
CONVERSATION = [{"role": "user", "content": "Is the sky green?"},
                {"role": "assistant", "content": "No, it is usually blue."}]


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("small") / "tiny", seed=0, **SMALL)


@pytest.fixture(scope="module")
def tokenizer(small_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(small_model_dir)


def test_loads_as_causal_lm_and_generates(small_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(small_model_dir)
    ids = tokenizer.apply_chat_template(CONVERSATION[:1], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    out = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] > ids.shape[1]


def test_loads_as_reward_model(small_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(small_model_dir, num_labels=1)
    batch = tokenizer(["short", "a somewhat longer text"], return_tensors="pt", padding=True)
    with torch.no_grad():
        scores = model(**batch).logits
    assert scores.shape == (2, 1) and torch.isfinite(scores).all()


def test_tokenizer_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.bos_token == "<|endoftext|>"
    assert tokenizer.model_max_length == 2048


def test_chat_template_renders_turns_and_generation_prompt(tokenizer):
    text = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nIs the sky green?<|im_end|>\n<|im_start|>assistant\n"
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert full.endswith("<|im_start|>assistant\nNo, it is usually blue.<|im_end|>\n")
    assert not full.endswith("<|im_start|>assistant\n")


def test_assistant_tokens_mask_covers_exactly_the_answer(tokenizer):
    out = tokenizer.apply_chat_template(CONVERSATION, return_dict=True, return_assistant_tokens_mask=True)
    mask = out["assistant_masks"]
    assert len(mask) == len(out["input_ids"]) and 0 < sum(mask) < len(mask)
    answer = [token for token, keep in zip(out["input_ids"], mask) if keep]
    # the loss covers the answer and its end-of-turn token, so the model learns to stop
    assert tokenizer.decode(answer) == "No, it is usually blue.<|im_end|>"


@pytest.mark.parametrize("text", [
    "plain ASCII, with punctuation: (a) [b] {c} ; ' \" ...",
    "Grüße aus Köln, ça va? ¿Qué tal? Ωμέγα",
    "日本語のテキスト 한국어 中文 العربية עברית हिन्दी",
    "emoji 🤖👍🏽 and flags 🇳🇿, zero\u200bwidth, combining e\u0301",
    "  leading and trailing spaces, tabs\tand\nnewlines\r\n  ",
    "hello , world don 't",  # no "clean up" of spaces before punctuation
    "\x00\x07 control characters \x7f",
])
def test_any_text_round_trips_through_the_tokenizer(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text


def test_same_seed_same_weights_other_seed_other_weights(tmp_path, small_model_dir):
    from safetensors.torch import load_file

    again = build_tiny_model(tmp_path / "again", seed=0, **SMALL)
    other = build_tiny_model(tmp_path / "other", seed=1, **SMALL)
    weights = (small_model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    # the tokenizer is rebuilt identically too, so token ids mean the same thing in every build
    assert (again / "tokenizer.json").read_bytes() == (small_model_dir / "tokenizer.json").read_bytes()

    a, b = load_file(small_model_dir / "model.safetensors"), load_file(other / "model.safetensors")
    assert a.keys() == b.keys()
    differing = [name for name in a if not a[name].equal(b[name])]
    assert "model.embed_tokens.weight" in differing


def test_default_size_is_a_few_million_parameters(tiny_model_dir):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert (config.hidden_size, config.num_hidden_layers) == (256, 4)
    with torch.device("meta"):  # count parameters without allocating them
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    assert 1e6 < params < 10e6


def test_build_prints_one_summary_line_and_no_progress_bars(tmp_path, capfd):
    from transformers.utils import logging

    # bars on, as in a fresh `cai tiny-model` process (another test may have switched them off)
    was_enabled = logging.is_progress_bar_enabled()
    logging.enable_progress_bar()
    try:
        build_tiny_model(tmp_path / "quiet", **SMALL)
    finally:
        (logging.enable_progress_bar if was_enabled else logging.disable_progress_bar)()
    out, err = capfd.readouterr()
    assert err == ""
    assert out.count("\n") == 1 and "parameters" in out and str(tmp_path / "quiet") in out


def test_rebuild_replaces_an_earlier_tiny_model(tmp_path):
    target = build_tiny_model(tmp_path / "tiny", seed=0, **SMALL)
    first = (target / "model.safetensors").read_bytes()
    build_tiny_model(target, seed=1, **SMALL)
    assert (target / "model.safetensors").read_bytes() != first
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]  # no staging directory left behind


def test_refuses_to_replace_a_directory_holding_other_files(tmp_path):
    target = tmp_path / "models"
    target.mkdir()
    (target / "my-notes.txt").write_text("precious")
    with pytest.raises(UserError, match="my-notes.txt"):
        build_tiny_model(target, **SMALL)
    assert (target / "my-notes.txt").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["models"]


def test_builds_into_an_empty_existing_directory(tmp_path):
    target = tmp_path / "empty"
    target.mkdir()
    assert (build_tiny_model(target, **SMALL) / "config.json").is_file()


def test_bad_options_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="multiple of 64"):
        build_tiny_model(tmp_path / "x", hidden_size=100, layers=1)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        build_tiny_model(tmp_path / "file", **SMALL)
