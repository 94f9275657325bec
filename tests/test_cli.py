"""The command line as a whole: every command's --help, shipped configs, the README's reference."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cai_cli.cli import app
from cai_cli.config import field_reference, load_config

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["generate-sl"], ["finetune"], ["label-prefs"], ["train-rm"], ["optimize"], ["evaluate"],
            ["run"], ["status"], ["inspect"], ["tiny-model"], ["config", "validate"], ["config", "show"]]


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


def test_demo_config_passes_config_validate(tiny_model_dir):
    result = subprocess.run(
        [sys.executable, "-m", "cai_cli", "config", "validate", "--config", "configs/demo.yaml",
         "--set", f"models.policy.name_or_path={tiny_model_dir}"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "principles" in result.stderr and "prompts" in result.stderr and "config is valid" in result.stderr


def test_config_validate_reports_every_missing_file_together(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "cai_cli", "config", "validate", "--config", "configs/demo.yaml",
         "--set", f"models.policy.name_or_path={tmp_path / 'nope'}", "--set", "constitution=gone.yaml"],
        capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "2 problems" in result.stderr and "gone.yaml" in result.stderr and "nope" in result.stderr


def test_readme_documents_every_config_key():
    readme = (ROOT / "README.md").read_text()
    documented = set(re.findall(r"^\| `([\w.]+)` \|", readme, flags=re.MULTILINE))
    # Sections of the same type are documented once (the README says so).
    same = {"data.helpful.": "data.red_team.", "models.feedback.": "models.policy.",
            "train_rm.mix.": "data.red_team.", "train_rm.training.": "finetune.training.",
            "optimize.training.": "finetune.training.", "train_rm.lora.": "finetune.lora.",
            "optimize.lora.": "finetune.lora."}
    keys = set()
    for key, _, _ in field_reference():
        for prefix, documented_as in same.items():
            key = key.replace(prefix, documented_as) if key.startswith(prefix) else key
        keys.add(key)
    assert sorted(keys - documented) == []
    assert sorted(documented - keys) == []
