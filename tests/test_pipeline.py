"""``cai run`` and ``cai status`` over the whole pipeline on the tiny model: skip what is fresh,
rerun what changed and everything after it, --from/--to, and the status table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import cai

ROOT = Path(__file__).resolve().parents[1]
STAGE_DIRS = {"generate-sl": "sl", "finetune": "sft", "label-prefs": "prefs", "train-rm": "rm",
              "optimize": "policy", "evaluate": "eval"}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model_dir):
    """A config for a fast end-to-end run, and its first full `cai run`."""
    root = tmp_path_factory.mktemp("pipeline")
    training = {"max_steps": 2, "per_device_batch_size": 4, "max_length": 256, "learning_rate": 1e-3,
                "logging_steps": 1, "save_steps": 2}
    config = {
        "run_dir": str(root / "run"),
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "data": {"red_team": {"path": str(ROOT / "cai_cli/resources/red_team_prompts.jsonl"), "limit": 4}},
        "models": {"policy": {"name_or_path": str(tiny_model_dir), "device": "cpu", "forward_batch_size": 8}},
        "generate_sl": {"num_revisions": 1, "few_shot": 0, "sampling": {"max_new_tokens": 8}},
        "finetune": {"training": training},
        "label_prefs": {"principles_per_pair": 1, "sampling": {"max_new_tokens": 8}},
        "train_rm": {"training": training, "eval_fraction": 0.25},
        "optimize": {"training": training},
        "evaluate": {"limit": 3, "benign_limit": 2, "principles_per_pair": 1, "bootstrap": 100,
                     "sampling": {"max_new_tokens": 8}},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    first = cai("run", "--config", path)
    return path, root / "run", first


def mtimes(run_dir: Path) -> dict[str, int]:
    return {stage: (run_dir / d / "manifest.json").stat().st_mtime_ns for stage, d in STAGE_DIRS.items()}


def test_first_run_makes_every_artifact(pipeline):
    path, run_dir, first = pipeline
    assert first.returncode == 0, first.stderr[-3000:]
    for stage, directory in STAGE_DIRS.items():
        manifest = json.loads((run_dir / directory / "manifest.json").read_text())
        assert manifest["status"] == "complete", stage
    assert (run_dir / "eval" / "report.json").is_file()
    assert "win rate" in first.stdout


def test_second_run_skips_everything(pipeline):
    path, run_dir, _ = pipeline
    before = mtimes(run_dir)
    result = cai("run", "--config", path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("up to date, skipped") == 6
    assert mtimes(run_dir) == before


def test_a_copied_run_directory_stays_done(pipeline, tmp_path):
    import shutil

    path, run_dir, _ = pipeline
    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy, symlinks=True)  # as `cp -a`
    status = cai("status", "--config", path, "--set", f"run_dir={copy}")
    assert status.returncode == 0
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()
              if line.strip() and line.split()[0] in STAGE_DIRS}
    assert states == dict.fromkeys(STAGE_DIRS, "done"), status.stdout


def test_changed_optimize_setting_reruns_optimize_and_evaluate_only(pipeline):
    path, run_dir, _ = pipeline
    before = mtimes(run_dir)
    status = cai("status", "--config", path, "--set", "optimize.beta=0.2")
    assert status.returncode == 0
    lines = {line.split()[0]: line for line in status.stdout.splitlines() if line.strip()
             and line.split()[0] in STAGE_DIRS}
    assert "done" in lines["label-prefs"] and "stale" in lines["optimize"] and "stale" in lines["evaluate"]
    assert "optimize.beta" in status.stdout

    result = cai("run", "--config", path, "--set", "optimize.beta=0.2")
    assert result.returncode == 0, result.stderr[-3000:]
    after = mtimes(run_dir)
    changed = {stage for stage in STAGE_DIRS if after[stage] != before[stage]}
    assert changed == {"optimize", "evaluate"}
    # the run directory alone is that run, as it was run: no --set repeated
    status = cai("status", run_dir)
    assert status.returncode == 0, status.stderr
    states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines()
              if line.strip() and line.split()[0] in STAGE_DIRS}
    assert states == dict.fromkeys(STAGE_DIRS, "done"), status.stdout
    # back to the original setting: optimize is stale again, the plan says why
    result = cai("run", "--config", path, "--to", "train-rm")
    assert result.returncode == 0 and result.stderr.count("up to date, skipped") == 4


def test_from_and_to_select_stages(pipeline):
    path, run_dir, _ = pipeline
    before = mtimes(run_dir)
    result = cai("run", "--config", path, "--from", "label-prefs", "--to", "train-rm", "--force")
    assert result.returncode == 0, result.stderr[-3000:]
    after = mtimes(run_dir)
    assert {s for s in STAGE_DIRS if after[s] != before[s]} == {"label-prefs", "train-rm"}
    bad = cai("run", "--config", path, "--from", "polish")
    assert bad.returncode == 2 and "stages in order" in bad.stderr


def test_status_states_and_no_heavy_imports(pipeline, tmp_path):
    path, run_dir, _ = pipeline
    code = ("import sys; from cai_cli.cli import main; sys.argv = ['cai', 'status', '--config', sys.argv[1]]\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('torch', 'transformers', 'trl', 'datasets') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=ROOT)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    # a fresh run dir: every stage missing
    config = yaml.safe_load(path.read_text())
    config["run_dir"] = str(tmp_path / "new")
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(yaml.safe_dump(config))
    result = cai("status", "--config", fresh)
    assert result.returncode == 0 and result.stdout.count("missing") == 6


def test_stale_reasons_say_which_settings_only_now_apply(tmp_path):
    import json

    from cai_cli.run.spec import StageSpec

    stage = tmp_path / "run" / "prefs"
    stage.mkdir(parents=True)
    old = {"label_prefs": {"chain_of_thought": False, "few_shot": 2, "gone": 1}}
    (stage / "manifest.json").write_text(json.dumps(
        {"stage": "label-prefs", "status": "complete", "config": old, "inputs": {"prompts": "a"}}))
    new = {"label_prefs": {"chain_of_thought": True, "few_shot": 2, "cot_clamp": [0.4, 0.6]}}
    spec = StageSpec("label-prefs", stage, new, {"prompts": "b"})
    assert spec.changes() == ["label_prefs.chain_of_thought", "label_prefs.cot_clamp (now used)",
                              "label_prefs.gone (no longer used)", "inputs.prompts"]


def test_library_warnings_go_to_the_run_log_not_the_terminal(tmp_path, capfd):
    """A library's notice (torch's pin_memory one, in every training stage on a machine without
    a GPU) is written to the run directory's .cai/warnings.log, naming the stage; the terminal
    shows only the stage. The stage's folder is left alone: one that failed before producing
    anything must stay absent (later stages read an existing folder as its output)."""
    import warnings

    from fake_run import write_config

    from cai_cli.config import load_config
    from cai_cli.stages.base import Stage
    from cai_cli.stages.pipeline import run_stage

    class Noisy(Stage):
        command = "judge-check"

        def run(self, config, *, force=False, shard=None):
            warnings.warn("'pin_memory' argument is set as true but no accelerator is found",
                          UserWarning)
            print("stage output")

    config = load_config(write_config(tmp_path, tmp_path / "run"))
    run_stage(Noisy(), config)
    log = tmp_path / "run" / ".cai" / "warnings.log"
    assert "judge-check: " in log.read_text()
    assert "UserWarning: 'pin_memory' argument" in log.read_text()
    assert not (tmp_path / "run" / "judge").exists()
    out, err = capfd.readouterr()
    assert out == "stage output\n" and "pin_memory" not in err
    with warnings.catch_warnings(record=True) as after:  # only while the stage runs
        warnings.simplefilter("always")
        warnings.warn("later", UserWarning)
    assert len(after) == 1
