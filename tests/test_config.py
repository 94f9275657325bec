"""The config: YAML loading, validation messages that name the dotted path, ``--set`` overrides,
and ``cai config show`` end to end."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cai_cli.config import Config, dump_config, load_config
from cai_cli.errors import UserError

MINIMAL = """\
constitution: constitutions/tiny.yaml
data:
  red_team: {path: prompts.jsonl}
models:
  policy: {name_or_path: runs/tiny-model}
"""


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def error_of(path: Path, overrides=()) -> str:
    with pytest.raises(UserError) as info:
        load_config(path, overrides)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# Loading valid configs


def test_minimal_config_loads_with_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL))
    assert config.constitution == "constitutions/tiny.yaml"
    assert config.data.red_team.path == "prompts.jsonl"
    assert config.data.red_team.field == "prompt" and config.data.red_team.limit is None
    assert config.data.helpful is None
    assert config.models.policy.name_or_path == "runs/tiny-model"
    assert config.models.policy.backend == "hf"
    assert config.generate_sl.num_revisions == 2
    assert config.run_dir == "runs/default" and config.seed == 0
    # no feedback model given: the policy labels preferences
    assert config.feedback_model == config.models.policy


def test_constitution_may_list_several_files(tmp_path):
    text = MINIMAL.replace("constitution: constitutions/tiny.yaml",
                           "constitution: [instructions.json, few_shot.json]")
    assert load_config(write(tmp_path, text)).constitution == ["instructions.json", "few_shot.json"]


def test_dump_round_trips(tmp_path):
    text = MINIMAL + "seed: 7\ngenerate_sl:\n  num_revisions: 3\n  system_prompt: 'Be kind: always.'\n"
    config = load_config(write(tmp_path, text), ["generate_sl.sampling.temperature=0.25"])
    dumped = write(tmp_path, dump_config(config), name="dumped.yaml")
    again = load_config(dumped)
    assert again == config
    assert again.generate_sl.system_prompt == "Be kind: always."
    assert again.generate_sl.sampling.temperature == 0.25


# ---------------------------------------------------------------------------------------------
# Files that are not a config


def test_missing_config_file(tmp_path):
    message = error_of(tmp_path / "nope.yaml")
    assert "not found" in message and "nope.yaml" in message


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    path = write(tmp_path, "constitution: c.yaml\ndata: [1, 2\nmodels: {}\n")
    message = error_of(path)
    assert f"{path}:3:" in message  # the parser notices on line 3
    assert "YAML syntax error" in message


def test_tab_indentation_is_a_syntax_error_with_position(tmp_path):
    path = write(tmp_path, MINIMAL + "generate_sl:\n\tnum_revisions: 3\n")
    assert f"{path}:7:1" in error_of(path)


@pytest.mark.parametrize("text, kind", [("- a\n- b\n", "list"), ("just a sentence\n", "str"),
                                        ("42\n", "int")])
def test_top_level_must_be_a_mapping(tmp_path, text, kind):
    message = error_of(write(tmp_path, text))
    assert "top level must be a mapping" in message and f"not a {kind}" in message


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_empty_file(tmp_path, text):
    message = error_of(write(tmp_path, text))
    assert "empty" in message and "constitution" in message


# ---------------------------------------------------------------------------------------------
# Validation messages


def test_unknown_top_level_key_suggests_the_close_one(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "seeed: 3\n"))
    assert "seeed: unknown key" in message and "did you mean 'seed'" in message


def test_unknown_nested_key_names_dotted_path_and_suggestion(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "generate_sl:\n  num_revison: 3\n"))
    assert "generate_sl.num_revison: unknown key" in message
    assert "did you mean 'num_revisions'" in message


def test_unknown_key_three_levels_deep(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "generate_sl:\n  sampling:\n    temprature: 1\n"))
    assert "generate_sl.sampling.temprature" in message and "did you mean 'temperature'" in message


def test_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "zzzzzz: 1\n"))
    assert "zzzzzz: unknown key" in message and "valid keys" in message and "generate_sl" in message


def test_wrong_type_names_dotted_path_and_value(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "generate_sl:\n  num_revisions: two\n"))
    assert "generate_sl.num_revisions" in message and "integer" in message and "'two'" in message


def test_out_of_range_names_dotted_path_and_bound(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "generate_sl:\n  num_revisions: 5\n"))
    assert "generate_sl.num_revisions" in message and "less than or equal to 4" in message
    assert "got 5" in message


def test_literal_field_lists_the_allowed_values(tmp_path):
    message = error_of(write(tmp_path, MINIMAL + "generate_sl:\n  prompt_format: chatml\n"))
    assert "generate_sl.prompt_format" in message
    assert all(choice in message for choice in ("'auto'", "'chat'", "'transcript'"))


def test_all_problems_reported_together(tmp_path):
    text = MINIMAL + "seed: x\nfoo: 1\ngenerate_sl:\n  num_revisions: 5\n  few_shot: -1\n"
    message = error_of(write(tmp_path, text))
    assert "4 problems" in message
    for where in ("seed:", "foo: unknown key", "generate_sl.num_revisions:", "generate_sl.few_shot:"):
        assert where in message
    assert "Traceback" not in message


def test_missing_required_keys(tmp_path):
    message = error_of(write(tmp_path, "run_dir: runs/x\n"))
    for key in ("constitution", "data", "models"):
        assert f"{key}: required but missing" in message


def test_missing_nested_required_key(tmp_path):
    text = MINIMAL.replace("policy: {name_or_path: runs/tiny-model}", "policy: {backend: hf}")
    assert "models.policy.name_or_path: required but missing" in error_of(write(tmp_path, text))


@pytest.mark.parametrize("red_team", ["{path: a.jsonl, dataset: org/prompts}", "{limit: 3}"])
def test_red_team_needs_exactly_one_of_path_or_dataset(tmp_path, red_team):
    text = MINIMAL.replace("{path: prompts.jsonl}", red_team)
    message = error_of(write(tmp_path, text))
    assert "data.red_team" in message and "exactly one of 'path'" in message and "'dataset'" in message


def test_red_team_from_dataset_is_valid(tmp_path):
    text = MINIMAL.replace("{path: prompts.jsonl}", "{dataset: Anthropic/hh-rlhf, data_dir: red-team-attempts}")
    source = load_config(write(tmp_path, text)).data.red_team
    assert (source.path, source.dataset, source.data_dir) == (None, "Anthropic/hh-rlhf", "red-team-attempts")


# ---------------------------------------------------------------------------------------------
# --set overrides


def test_the_judges_of_evaluate(tmp_path):
    """A list of the word feedback and model configs (any engine); one bad entry, one message
    that names it; judge and judges not both."""
    path = write(tmp_path, MINIMAL)
    judges = "evaluate.judges=[feedback, {backend: openai, model: big/judge}]"
    config = load_config(path, [judges])
    assert [key for key, _ in config.jury] == ["models.policy", "evaluate.judges[1]"]
    assert config.jury[1][1].base_url == "http://127.0.0.1:8000/v1"
    assert [key for key, _ in load_config(path).jury] == ["models.policy"]
    assert [key for key, _ in load_config(path, ["evaluate.judge={name_or_path: x}"]).jury] == \
        ["evaluate.judge"]
    assert error_of(path, ["evaluate.judges=[feedbak]"]).endswith(
        "evaluate.judges[0]: Input should be 'feedback' (got 'feedbak')")
    assert error_of(path, ["evaluate.judges=[{backend: openai, model: m, bas_url: x}]"]).endswith(
        "evaluate.judges[0].bas_url: unknown key; did you mean 'base_url'?")
    assert "a judge is the word feedback or a model config with backend hf, vllm, openai" in \
        error_of(path, ["evaluate.judges=[{backend: tgi, model: m}]"])
    assert "give evaluate.judge (one judge) or evaluate.judges (a list), not both" in \
        error_of(path, [judges, "evaluate.judge={name_or_path: x}"])
    assert "evaluate.judges: List should have at least 1 item" in \
        error_of(path, ["evaluate.judges=[]"])


def test_precedence_default_then_yaml_then_set(tmp_path):
    path = write(tmp_path, MINIMAL + "generate_sl:\n  num_revisions: 3\n  few_shot: 1\n")
    config = load_config(path, ["generate_sl.num_revisions=4"])
    assert config.generate_sl.num_revisions == 4  # --set beats YAML
    assert config.generate_sl.few_shot == 1  # YAML beats the default
    assert config.generate_sl.prompts_per_checkpoint == 32  # default where neither says


def test_set_values_are_typed_by_the_schema(tmp_path):
    path = write(tmp_path, MINIMAL.replace("{name_or_path: runs/tiny-model}",
                                           "{name_or_path: runs/tiny-model, max_context: 512}"))
    config = load_config(path, [
        "seed=42",
        "generate_sl.sampling.temperature=0.5",
        "generate_sl.sampling.top_p=1",
        "models.policy.trust_remote_code=true",
        "models.policy.max_context=null",  # null clears an Optional set in the YAML
        "models.policy.revision=007",  # a string field keeps digits as text
        "generate_sl.system_prompt=true",  # ... and "true" as text
        "run_dir=runs/a b",
    ])
    assert config.seed == 42
    assert config.generate_sl.sampling.temperature == 0.5
    assert config.models.policy.trust_remote_code is True
    assert config.models.policy.max_context is None
    assert config.models.policy.revision == "007"
    assert config.generate_sl.system_prompt == "true"
    assert config.run_dir == "runs/a b"


def test_set_value_may_contain_equals_and_colon(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["generate_sl.system_prompt=Rule: a=b"])
    assert config.generate_sl.system_prompt == "Rule: a=b"


def test_set_creates_a_missing_section(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["models.feedback.name_or_path=runs/judge",
                                                     "data.helpful.path=helpful.jsonl"])
    assert config.models.feedback.name_or_path == "runs/judge"
    assert config.feedback_model.name_or_path == "runs/judge"
    assert config.data.helpful.path == "helpful.jsonl"


def test_set_list_on_constitution(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["constitution=[a.yaml, b.json]"])
    assert config.constitution == ["a.yaml", "b.json"]


def test_set_bad_value_is_a_validation_error_naming_the_key(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["generate_sl.num_revisions=9"])
    assert "generate_sl.num_revisions" in message and "got 9" in message


def test_set_unknown_key_suggests_the_close_one(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["generate_sl.num_revison=3"])
    assert "--set generate_sl.num_revison" in message
    assert "did you mean 'generate_sl.num_revisions'" in message


def test_set_unknown_section(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["generat_sl.num_revisions=3"])
    assert "did you mean 'generate_sl'" in message


def test_set_below_a_plain_value(tmp_path):
    message = error_of(write(tmp_path, MINIMAL), ["seed.value=3"])
    assert "'seed' has no sub-keys" in message


@pytest.mark.parametrize("override", ["generate_sl.num_revisions", "=3", "generate_sl.num_revisions 3"])
def test_malformed_set(tmp_path, override):
    message = error_of(write(tmp_path, MINIMAL), [override])
    assert "--set" in message and "key.sub=value" in message


def test_config_model_forbids_unknown_keys_everywhere():
    # every section, not just the root, reports unknown keys instead of ignoring them
    def sections(model):
        yield model
        for field in model.model_fields.values():
            for arg in getattr(field.annotation, "__args__", (field.annotation,)):
                if isinstance(arg, type) and hasattr(arg, "model_fields"):
                    yield from sections(arg)

    found = {model.__name__: model for model in sections(Config)}
    assert {"PromptSource", "HFModelConfig", "GenerateSLConfig", "SamplingConfig"} <= set(found)
    assert [name for name, model in found.items() if model.model_config.get("extra") != "forbid"] == []


# ---------------------------------------------------------------------------------------------
# Command line


def cai(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cai_cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, check=False)


def test_cli_config_show_prints_resolved_yaml(tmp_path):
    path = write(tmp_path, MINIMAL)
    result = cai("config", "show", "--config", str(path), "--set", "generate_sl.num_revisions=3",
                 "--set", "seed=11", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shown = yaml.safe_load(result.stdout)
    assert shown["generate_sl"]["num_revisions"] == 3
    assert shown["seed"] == 11
    assert shown["generate_sl"]["few_shot"] == 2  # defaults are filled in
    assert shown["models"]["policy"]["name_or_path"] == "runs/tiny-model"
    # what is shown is itself a valid config that loads to the same thing
    shown_path = write(tmp_path, result.stdout, name="shown.yaml")
    assert load_config(shown_path) == load_config(path, ["generate_sl.num_revisions=3", "seed=11"])


@pytest.mark.parametrize("text, overrides, expected", [
    (MINIMAL + "generate_sl:\n  num_revison: 3\n", [], "did you mean 'num_revisions'"),
    ("data: [1, 2\n", [], ":2:"),
    (MINIMAL, ["--set", "generate_sl.num_revisions"], "key.sub=value"),
])
def test_cli_bad_config_exits_2_without_traceback(tmp_path, text, overrides, expected):
    path = write(tmp_path, text)
    result = cai("config", "show", "--config", str(path), *overrides, cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr
    assert str(path) in result.stderr or "--set" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stdout == ""


def test_cli_missing_config_file_exits_2(tmp_path):
    result = cai("config", "show", "--config", str(tmp_path / "absent.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "absent.yaml" in result.stderr and "Traceback" not in result.stderr


def test_set_integer_with_leading_zero_is_decimal(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["seed=010"])
    assert config.seed == 10


def test_set_reaches_inside_a_free_mapping(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), ["finetune.training.trl_args.warmup_ratio=0.1",
                                                    "finetune.training.trl_args.lr_scheduler_type=cosine"])
    assert config.finetune.training.trl_args == {"warmup_ratio": 0.1, "lr_scheduler_type": "cosine"}


def test_set_unknown_key_without_close_match_lists_valid_keys(tmp_path):
    with pytest.raises(UserError, match="valid keys: run_dir, seed"):
        load_config(write(tmp_path, MINIMAL), ["zzzz=1"])


def test_stage_defaults_survive_setting_one_key_of_the_section(tmp_path):
    # each of these sections has its own defaults; giving one key must not reset the others
    config = load_config(write(tmp_path, MINIMAL), [
        "optimize.training.max_steps=3", "train_rm.training.max_steps=3",
        "evaluate.sampling.max_new_tokens=9", "label_prefs.sampling.max_new_tokens=9"])
    assert config.optimize.training.learning_rate == 5e-7
    assert config.train_rm.training.learning_rate == 1e-5
    assert config.evaluate.sampling.temperature == 0.0
    assert config.label_prefs.sampling.temperature == 1.0


# ---------------------------------------------------------------------------------------------
# Configs that explode or lie


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """``levels`` anchors, each a list of ``width`` aliases of the one before: ``width **
    levels`` values once expanded, in a dozen lines."""
    lines = ["    trl_args:", f"      l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"      l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def cai_here(*args) -> subprocess.CompletedProcess:
    from helpers import cai_main

    return cai_main(*args)


@pytest.mark.parametrize("command", [["config", "show"], ["finetune"]])
def test_an_alias_bomb_is_refused_naming_the_key_before_any_lock(tmp_path, command):
    run_dir = tmp_path / "run"
    path = write(tmp_path, f"run_dir: {run_dir}\n" + MINIMAL + "finetune:\n  training:\n"
                 + alias_bomb())
    result = cai_here(*command, "--config", path)
    assert result.returncode == 2, result.stderr
    assert "finetune.training.trl_args.l5 expands to" in result.stderr  # 9**6 > 100,000
    assert f"{path}:" in result.stderr and "alias" in result.stderr
    assert not run_dir.exists()  # no lock, no .cai/, nothing


def test_a_small_alias_is_fine_and_an_alias_inside_itself_is_refused(tmp_path):
    ok = write(tmp_path, MINIMAL + "finetune:\n  training:\n" + alias_bomb(levels=3, width=3))
    assert load_config(ok).finetune.training.trl_args["l1"] == [["lol"] * 3] * 3
    looped = write(tmp_path, MINIMAL + "finetune:\n  training:\n    trl_args: &a {x: [*a]}\n",
                   "looped.yaml")
    assert "refers to the value it is inside" in error_of(looped)


def test_an_alias_bomb_in_a_set_value_is_refused(tmp_path):
    levels = ["&b0 [" + ", ".join(["x"] * 10) + "]"]  # each level: ten of the one before
    levels += [f"&b{i} [" + ", ".join([f"*b{i - 1}"] * 10) + "]" for i in range(1, 6)]
    nested = "[" + ", ".join(levels) + "]"
    message = error_of(write(tmp_path, MINIMAL), [f"finetune.training.trl_args.x={nested}"])
    assert "--set finetune.training.trl_args.x" in message and "expands to" in message


def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path):
    path = write(tmp_path, MINIMAL + "generate_sl:\n  few_shot: 1\n  num_revisions: 2\n"
                 "  few_shot: 3\n")
    message = error_of(path)
    assert "generate_sl.few_shot is given twice (lines 7 and 9)" in message
    assert f"{path}:9" in message
    top = write(tmp_path, "seed: 1\n" + MINIMAL + "seed: 2\n", "top.yaml")
    assert "seed is given twice (lines 1 and 7)" in error_of(top)


@pytest.mark.parametrize("depth, message", [
    (100, "finetune.training.trl_args.x is nested 100 levels deep; cai reads at most 64"),
    (5000, "nested too deeply to read"),  # past what the YAML parser can follow
])
def test_nesting_too_deep_is_one_message(tmp_path, depth, message):
    path = write(tmp_path, MINIMAL + "finetune:\n  training:\n    trl_args:\n      x: "
                 + "[" * depth + "]" * depth + "\n")
    result = cai_here("config", "show", "--config", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr


def local_model(tmp_path: Path, context: int) -> Path:
    """A model directory whose config.json says its context (no weights: none are read)."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(f'{{"model_type": "llama", "max_position_embeddings": '
                                       f'{context}}}')
    return model


def test_new_tokens_that_leave_no_room_for_a_prompt_are_refused(tmp_path):
    model = local_model(tmp_path, 2048)
    run_dir = tmp_path / "run"
    path = write(tmp_path, MINIMAL.replace("runs/tiny-model", str(model)) + f"run_dir: {run_dir}\n")
    assert load_config(path).models.policy.name_or_path == str(model)  # the defaults fit
    message = error_of(path, ["generate_sl.sampling.max_new_tokens=1000000000000"])
    assert "generate_sl.sampling.max_new_tokens: 1000000000000 new tokens leave no room" in message
    assert "2048-token context of models.policy" in message and "max_position_embeddings" in message
    assert "lower it to 2032 at most" in message
    # a context the config gives wins over the model's own; every stage's budget is checked
    message = error_of(path, ["models.policy.max_context=600", "evaluate.sampling.max_new_tokens=590",
                              "label_prefs.chain_of_thought=true",
                              "label_prefs.cot_max_new_tokens=5000"])
    assert "evaluate.sampling.max_new_tokens: 590 new tokens leave 10 tokens" in message
    assert "label_prefs.cot_max_new_tokens: 5000" in message and "models.policy.max_context" in message
    # the stage refuses before it takes the run directory's lock
    result = cai_here("generate-sl", "--config", path, "--set",
                      "generate_sl.sampling.max_new_tokens=4096")
    assert result.returncode == 2 and "no room for the prompt" in result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("where, why", [
    ("/", "is the file system's root"),
    ("~", "is your home directory"),
    ("project", "holds files that are not a cai run (notes.txt, src)"),
    ("project/notes.txt", "is a file, not a directory"),
])
def test_a_run_dir_that_is_not_a_run_is_refused(tmp_path, monkeypatch, where, why):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "notes.txt").write_text("mine")
    (tmp_path / "home").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # an empty home is refused all the same
    run_dir = {"/": "/", "~": "'~'"}.get(where, str(tmp_path / where))
    path = write(tmp_path, MINIMAL + f"run_dir: {run_dir}\n")
    result = cai_here("config", "validate", "--config", path)
    assert result.returncode == 2 and why in result.stderr, result.stderr
    assert "set run_dir to a new or empty directory" in result.stderr
    assert not (project / ".cai").exists()


def test_a_run_dir_may_hold_the_config_and_the_files_it_names(tmp_path):
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    (run / "data" / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (run / "constitution.yaml").write_text("kept beside the run")
    text = (MINIMAL.replace("constitutions/tiny.yaml", str(run / "constitution.yaml"))
            .replace("prompts.jsonl", str(run / "data" / "prompts.jsonl")) + f"run_dir: {run}\n")
    assert load_config(write(run, text)).run_dir == str(run)
    (run / "other.txt").write_text("not the run's")
    assert "holds files that are not a cai run (other.txt)" in error_of(run / "config.yaml")


def test_a_run_dir_that_cai_wrote_or_holds_only_stage_folders_is_a_run(tmp_path):
    ran = tmp_path / "ran"
    (ran / ".cai").mkdir(parents=True)
    (ran / "my-notes.md").write_text("kept by the user beside the stages")
    stages = tmp_path / "stages"
    for name in ("sl", "prefs", "eval"):
        (stages / name).mkdir(parents=True)
    (stages / "report.md").write_text("# report")
    for run_dir in (ran, stages, tmp_path / "empty", tmp_path / "new"):
        (tmp_path / "empty").mkdir(exist_ok=True)
        assert load_config(write(tmp_path, MINIMAL + f"run_dir: {run_dir}\n")).run_dir == str(run_dir)
