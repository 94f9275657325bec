"""Commands that read a run take its directory: ``cai status / report / plan RUN_DIR`` read the
config its last stage recorded in ``RUN_DIR/.cai/config.yaml`` (overrides included), with the
config's relative paths read from where the run was run, from any directory and after the
project moved.

The run here is written by hand: each stage's manifest made from the specs of the recorded
config, as a stage records it (``Manifest``, ``resolved_text``), so every stage is done for
that config and no model runs. A real ``cai run --set`` then ``cai status RUN_DIR`` is in
tests/test_pipeline.py."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from cai_cli.run.artifacts import Manifest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
STAGES = ("generate-sl", "finetune", "label-prefs", "train-rm", "optimize", "evaluate")


def cai(*args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cai_cli", *map(str, args)], check=False,
                          capture_output=True, text=True, timeout=120, env=ENV, cwd=cwd)


def states(result: subprocess.CompletedProcess) -> dict[str, str]:
    assert result.returncode == 0, result.stderr
    return {line.split()[0]: line.split()[1] for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in STAGES}


def run_as(work: Path, *overrides: str) -> Path:
    """In ``work``: a project whose config names everything by relative paths (a model
    directory, the constitution, the prompts), and its run, every stage done for the config
    with ``overrides``, as `cai run --config project/config.yaml --set ...` leaves it."""
    from cai_cli.config import load_config
    from cai_cli.run.resolved import resolved_text, working_directory
    from cai_cli.stages.pipeline import STAGES as PIPELINE

    project = work / "project"
    (project / "model").mkdir(parents=True)
    (project / "model" / "config.json").write_text('{"max_position_embeddings": 2048}')
    shutil.copy(ROOT / "constitutions" / "harmless.yaml", project / "constitution.yaml")
    shutil.copy(ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl", project / "prompts.jsonl")
    config = {"run_dir": "project/runs/x", "constitution": "project/constitution.yaml",
              "data": {"red_team": {"path": "project/prompts.jsonl", "limit": 4}},
              "models": {"policy": {"name_or_path": "project/model", "device": "cpu"}}}
    (project / "config.yaml").write_text(yaml.safe_dump(config))
    with working_directory(work):
        loaded = load_config("project/config.yaml", list(overrides))
        for name in STAGES:
            spec = PIPELINE[name].spec(loaded)
            Manifest(stage=name, config_hash=spec.fingerprint, config=spec.settings,
                     inputs=spec.inputs, status="complete").save(spec.directory)
        loaded.layout.tool_dir.mkdir(parents=True, exist_ok=True)
        loaded.layout.resolved_config.write_text(resolved_text(loaded))
    return project / "runs" / "x"


def test_status_of_a_run_directory_is_the_run_as_it_was_run(tmp_path):
    work = tmp_path / "work"
    run_as(work, "optimize.beta=0.2")
    # the run directory alone: its recorded config, --set included
    assert states(cai("status", "project/runs/x", cwd=work)) == dict.fromkeys(STAGES, "done")
    # the config file without the --set: what it would rerun
    found = states(cai("status", "--config", "project/config.yaml", cwd=work))
    assert found["train-rm"] == "done" and found["optimize"] == "stale"
    # RUN_DIR with --set: that run with a change, as `cai run` with it would see it
    found = states(cai("status", "project/runs/x", "--set", "optimize.beta=0.1", cwd=work))
    assert found["optimize"] == "stale" and found["evaluate"] == "stale"
    # the config's relative paths are read from where the run was run, wherever cai runs now
    elsewhere = cai("status", work / "project" / "runs" / "x", cwd=tmp_path)
    assert states(elsewhere) == dict.fromkeys(STAGES, "done")
    assert f"run directory: {work / 'project' / 'runs' / 'x'}" in elsewhere.stdout
    # ... and from the folder it was named from when the project moved as a whole
    work.rename(tmp_path / "moved")
    moved = cai("status", "moved/project/runs/x", cwd=tmp_path)
    assert states(moved) == dict.fromkeys(STAGES, "done")


def test_report_and_plan_take_the_run_directory(tmp_path):
    work = tmp_path / "work"
    run_dir = run_as(work, "evaluate.limit=3")
    report = cai("report", "project/runs/x", cwd=work)
    assert report.returncode == 0, report.stderr
    text = (run_dir / "report.md").read_text()
    assert "| finetune | done |" in text and "stale" not in text
    page = cai("report", work / "project" / "runs" / "x", "-o", "page.md", cwd=tmp_path)
    assert page.returncode == 0, page.stderr
    assert (tmp_path / "page.md").is_file()  # -o from where cai runs, not the run's folder
    plan = cai("plan", "project/runs/x", "--json", cwd=work)
    assert plan.returncode == 0, plan.stderr
    assert "evaluate" in plan.stdout


def test_a_directory_without_a_recorded_config_is_a_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "c.yaml").write_text("run_dir: x\n")
    for args, message in ((["status", "empty"], "has no .cai/config.yaml"),
                          (["status", "c.yaml"], "is a file, not a run directory; a config is "
                           "given with --config (--config c.yaml)"),
                          (["report", "nowhere"], "no such directory"),
                          (["plan"], "give a run directory")):
        result = cai(*args, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
