"""The command line as a whole: every command's --help, shipped configs, the config reference in
docs/config.md."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_cli.cli import app
from cai_cli.config import documented_keys, load_config
from helpers import cai

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["generate-sl"], ["finetune"], ["label-prefs"], ["train-rm"], ["optimize"], ["evaluate"],
            ["run"], ["status"], ["inspect"], ["tiny-model"], ["init"], ["plan"], ["judge-check"], ["generate-prompts"], ["merge"], ["import-gguf"],
            ["config", "validate"], ["config", "show"], ["report"]]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_of_every_command(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0
    assert "Usage:" in result.output and result.output.count("--") >= 2


def test_top_level_help_lists_the_commands_and_imports_no_torch():
    code = ("import sys, runpy; sys.argv = ['cai', '--help']\n"
            "try:\n    runpy.run_module('cai_cli', run_name='__main__')\n"
            "except SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'datasets', 'trl') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    for name in ("generate-sl", "finetune", "label-prefs", "train-rm", "optimize", "evaluate", "run",
                 "status", "inspect", "tiny-model", "config"):
        assert name in result.stdout
    assert "HEAVY []" in result.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.constitution and config.models.policy.name_or_path


def test_tiny_config_passes_config_validate(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "cai_cli", "config", "validate", "--config", "configs/tiny.yaml",
         "--set", f"models.policy.name_or_path={tiny_model_dir}",
         "--set", f"models.feedback.name_or_path={tiny_model_dir}"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "principles" in result.stderr and "prompts" in result.stderr and "config is valid" in result.stderr


def test_init_writes_a_starter_that_validates_from_another_directory(tmp_path, tiny_model_dir):
    """What a user who installed the package (no clone, no configs/) starts from."""
    def run(*args):
        return subprocess.run([sys.executable, "-m", "cai_cli", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})

    made = run("init", "project", "--model", tiny_model_dir)
    assert made.returncode == 0, made.stderr
    assert "cai run --config project/config.yaml" in made.stdout
    checked = run("config", "validate", "--config", "project/config.yaml")
    assert checked.returncode == 0, checked.stderr
    assert "18 principles" in checked.stderr and "config is valid" in checked.stderr
    (tmp_path / "project" / "constitution.yaml").write_text("mine")
    again = run("init", "project")
    assert again.returncode == 2 and "--force" in again.stderr
    assert (tmp_path / "project" / "constitution.yaml").read_text() == "mine"  # not overwritten


def test_a_missing_relative_path_says_where_it_was_looked_for(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cai_cli", "status", "--config", "nowhere.yaml"],
                            cwd=tmp_path, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    assert f"nowhere.yaml (relative to the current directory, {tmp_path})" in result.stderr


def test_config_validate_reports_every_missing_file_together(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cai_cli", "config", "validate", "--config", "configs/tiny.yaml",
         "--set", f"models.policy.name_or_path={tmp_path / 'nope'}",
         "--set", f"models.feedback.name_or_path={tmp_path / 'nada'}", "--set", "constitution=gone.yaml"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "3 problems" in result.stderr and "gone.yaml" in result.stderr
    assert "nope" in result.stderr and "nada" in result.stderr


def test_config_reference_documents_every_config_key():
    """docs/config.md's reference is what `cai config keys --markdown` prints from the field docs."""
    reference = (ROOT / "docs" / "config.md").read_text()
    block = reference.split("<!-- config-reference:start -->\n")[1].split("<!-- config-reference:end -->")[0]
    printed = cai("config", "keys", "--markdown")
    assert printed.returncode == 0, printed.stderr
    assert block.strip() == printed.stdout.strip(), "regenerate: cai config keys --markdown"
    documented = set(re.findall(r"^\| `([\w.]+)` \|", block, flags=re.MULTILINE))
    assert {key for key, _, _ in documented_keys()} == documented


def test_config_keys_and_schema(tmp_path):
    shown = cai("config", "keys", "finetune.training")
    assert shown.returncode == 0 and "per_device_batch_size" in shown.stdout
    assert "generate_sl" not in shown.stdout
    assert cai("config", "keys", "nope").returncode == 2
    schema = cai("config", "schema")
    assert schema.returncode == 0
    assert "prompts_per_checkpoint" in json.loads(schema.stdout)["$defs"]["GenerateSLConfig"]["properties"]
