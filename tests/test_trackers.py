"""Experiment trackers (``report_to``): label-prefs' figures in TensorBoard, the training stages'
event files kept in their own ``logs/`` after the checkpoints are gone, nothing written without
a tracker, and a tracker that is not installed refused before anything runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from helpers import cai

from cai_cli.config import load_config
from cai_cli.stages import trackers

pytest.importorskip("tensorboard")  # a dev extra: the tests read the event files back

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"


def write_config(tmp_path: Path, model: Path, report_to: list[str]) -> Path:
    training = {"max_steps": 2, "per_device_batch_size": 4, "max_length": 128,
                "logging_steps": 1, "save_steps": 1, "report_to": report_to}
    config = {
        "run_dir": str(tmp_path / "run"),
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 4}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu"}},
        "label_prefs": {"policy": str(model), "principles_per_pair": 1,
                        "sampling": {"max_new_tokens": 8}, "report_to": report_to},
        "train_rm": {"eval_fraction": 0.0, "training": training},
        "optimize": {"model": str(model), "training": training},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def scalars(logs: Path) -> dict[str, float]:
    """The last value of each scalar in the event files under ``logs``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs))
    events.Reload()
    return {tag: events.Scalars(tag)[-1].value for tag in events.Tags()["scalars"]}


def test_label_prefs_figures_and_training_logs_reach_tensorboard(tmp_path, tiny_model_dir,
                                                                 monkeypatch):
    from cai_cli.stages import label_prefs, optimize, train_rm

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)  # the user's own, if any
    path = write_config(tmp_path, tiny_model_dir, ["none"])
    run = tmp_path / "run"
    label_prefs.LabelPrefs().run(load_config(path))
    assert not (run / "prefs" / "logs").exists()  # no tracker: nothing written

    # where the figures go does not make the labels stale
    config = load_config(path, ["label_prefs.report_to=[tensorboard]"])
    assert label_prefs.LabelPrefs().spec(config).state() == "done"
    label_prefs.LabelPrefs().run(config, force=True)
    manifest = json.loads((run / "prefs" / "manifest.json").read_text())
    logged = scalars(run / "prefs" / "logs")
    figures = {**manifest["counts"], **manifest["stats"]}
    for name in ("pairs", "judgments", "skipped_pairs", "mean_p_chosen", "order_disagreement",
                 "position_bias", "mean_confidence"):
        assert logged[f"label-prefs/{name}"] == pytest.approx(figures[name], abs=1e-6)
    assert logged["label-prefs/p_chosen/median"] == pytest.approx(figures["p_chosen"]["median"])
    assert logged["label-prefs/label_seconds"] == pytest.approx(manifest["timings"]["label_seconds"])

    # two training stages in one process: each keeps its own event files once its
    # checkpoints are deleted, and the labels they read stay done
    config = load_config(path, ["train_rm.training.report_to=[tensorboard]",
                                "optimize.training.report_to=[tensorboard]"])
    train_rm.TrainRM().run(config)
    optimize.Optimize().run(config)
    for stage in ("rm", "policy"):
        assert not (run / stage / ".checkpoints").exists()
        assert scalars(run / stage / "logs")["train/loss"] > 0
    assert label_prefs.LabelPrefs().spec(config).state() == "done"


def test_log_stage_takes_nested_figures_and_skips_text(tmp_path, tiny_model_dir):
    config = load_config(write_config(tmp_path, tiny_model_dir, ["none"]))
    directory = tmp_path / "run" / "eval"
    figures = {"n": 32, "win_rate": {"policy_vs_sft": 0.625}, "verdict": "better", "ok": True,
               "missing": None}
    assert trackers.log_stage(["none"], directory, "evaluate", figures, config) == []
    assert not directory.exists()
    assert trackers.log_stage(["tensorboard"], directory, "evaluate", figures,
                              config) == ["tensorboard"]
    assert scalars(directory / "logs") == {"evaluate/n": 32.0,
                                           "evaluate/win_rate/policy_vs_sft": 0.625}


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_a_tracker_that_is_not_installed_is_refused_before_anything_runs(tmp_path,
                                                                         tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir, ["wandb"])
    result = cai("label-prefs", "--config", path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "label_prefs.report_to: 'wandb' is not installed" in result.stderr
    assert not (tmp_path / "run" / "prefs").exists()
    typo = trackers.problems(["tensorbord"], "label_prefs.report_to")
    assert typo and "did you mean 'tensorboard'" in typo[0]
