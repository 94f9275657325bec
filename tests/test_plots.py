"""Plots: each stage's PNGs from what it recorded, drawn when it completes (a failure only
warns), listed by ``cai status``, never making a finished stage stale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_run import finished_run, write_json, write_jsonl
from helpers import cai

from cai_cli.config import load_config
from cai_cli.reports import plots
from cai_cli.run.artifacts import load_manifest, model_fingerprint
from cai_cli.run.layout import RunLayout

EXPECTED = {
    "label-prefs": ["p_chosen.png", "position_bias.png"],
    "finetune": ["training.png"],
    "train-rm": ["training.png", "calibration.png"],
    "optimize": ["training.png"],
    "evaluate": ["win_rates.png", "rates.png", "per_principle.png"],
    "judge-check": ["agreement.png", "calibration.png"],
}


@pytest.fixture(autouse=True)
def drawing(monkeypatch):
    monkeypatch.setenv("CAI_PLOTS", "1")  # the suite turns plots off elsewhere


def image_size(path: Path) -> tuple[int, int]:
    """Width and height of a PNG, decoded in full (a broken file raises)."""
    from matplotlib.image import imread

    pixels = imread(path)
    return pixels.shape[1], pixels.shape[0]


def test_every_stage_draws_readable_pngs(tmp_path):
    _, run = finished_run(tmp_path)
    layout = RunLayout.of(run)
    for command, names in EXPECTED.items():
        written = plots.draw(layout, command)
        assert [p.name for p in written] == names, command
        for path in written:
            assert path.parent == layout.stage_dir(command) / "plots"
            width, height = image_size(path)
            assert width > 300 and height > 200, path
        assert plots.listed(layout, command) == written  # listed in the same order


def test_a_jury_s_plots_show_each_judge_beside_the_jury(tmp_path):
    from cai_cli.reports.plots import evaluate

    _, run = finished_run(tmp_path, stages=("evaluate",), jury=True)
    layout = RunLayout.of(run)
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels = {name: [tick.get_text() for ax in figure.axes for tick in ax.get_yticklabels()]
              for name, figure in evaluate(layout, plt).items()}
    plt.close("all")
    # each pair (later over earlier) by the jury, then by each judge; each model's rates likewise
    assert labels["win_rates.png"][:3] == ["sft over base, jury (n=20)",
                                           "sft over base, feedback (n=20)",
                                           "sft over base, big/judge (n=20)"]
    assert "policy, big/judge (n=20)" in labels["rates.png"]
    assert [p.name for p in plots.draw(layout, "evaluate")] == EXPECTED["evaluate"]


def test_only_what_was_recorded_is_drawn(tmp_path):
    """A run made before train-rm kept its reliability table and the trainers their log
    history, and an evaluation report without the harmful-compliance and helpfulness figures:
    those plots are left out, the rest drawn; an old plot that no longer applies goes."""
    _, run = finished_run(tmp_path, recorded=False, new_report=False)
    layout = RunLayout.of(run)
    (layout.plots("evaluate")).mkdir(parents=True)
    (layout.plots("evaluate") / "rates.png").write_bytes(b"old")
    for command in ("finetune", "train-rm", "optimize"):
        assert plots.draw(layout, command) == []
    assert [p.name for p in plots.draw(layout, "evaluate")] == ["win_rates.png",
                                                                "per_principle.png"]
    assert not (layout.plots("evaluate") / "rates.png").exists()


def test_status_lists_the_plots(tmp_path):
    config, run = finished_run(tmp_path)
    for command in EXPECTED:
        plots.draw(RunLayout.of(run), command)
    result = cai("status", "--config", config)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 120
    for command, names in EXPECTED.items():
        folder = RunLayout.of(Path(".")).plots(command).as_posix() + "/"  # relative to the run
        assert f"  {folder:<15} {', '.join(names)}" in lines


def test_plots_do_not_change_a_model_fingerprint(tmp_path):
    """Drawing into sft/plots after the stages that read sft/ ran must leave them fresh."""
    _, run = finished_run(tmp_path)
    before = model_fingerprint(str(run / "sft"))
    assert plots.draw(RunLayout.of(run), "finetune")
    assert model_fingerprint(str(run / "sft")) == before


def test_a_failing_plot_warns_and_the_stage_completes(tmp_path, monkeypatch, capsys):
    from cai_cli.run.spec import StageSpec
    from cai_cli.stages.common import StageRun

    def broken(layout, plt):
        raise ValueError("no data to draw")

    monkeypatch.setitem(plots.DRAWERS, "label-prefs", [broken])
    config = load_config(finished_run(tmp_path, stages=())[0])
    run = StageRun(StageSpec("label-prefs", config.layout.prefs, {"x": 1}), config,
                   resuming=False)
    run.complete()
    assert load_manifest(config.layout.prefs)["status"] == "complete"
    err = capsys.readouterr().err
    assert "warning: label-prefs: could not draw its plots (ValueError: no data to draw)" in err


def test_a_plot_lost_to_a_kill_between_plots_is_drawn_by_the_rerun(tmp_path, monkeypatch,
                                                                  capsys):
    """Killed after it marked label-prefs complete and drew p_chosen.png, before it drew
    position_bias.png: the next run finds the stage complete and draws what is missing."""
    from matplotlib.figure import Figure

    from cai_cli.run.spec import StageSpec
    from cai_cli.stages.common import StageRun, begin

    config = load_config(finished_run(tmp_path, stages=("label-prefs",))[0])
    (config.layout.prefs / "manifest.json").unlink()  # label-prefs' records, not yet complete
    spec = StageSpec("label-prefs", config.layout.prefs, {"x": 1})
    save = Figure.savefig

    def killed_at_the_second(figure, path, **kwargs):
        if "position_bias" in str(path):
            raise KeyboardInterrupt  # as a kill between two plots
        save(figure, path, **kwargs)

    monkeypatch.setattr(Figure, "savefig", killed_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        StageRun(spec, config, resuming=False).complete()
    monkeypatch.setattr(Figure, "savefig", save)
    assert load_manifest(config.layout.prefs)["status"] == "complete"
    assert [p.name for p in plots.listed(config, "label-prefs")] == ["p_chosen.png"]

    capsys.readouterr()
    assert begin(spec, config, force=False) is None  # complete: nothing to run
    assert "drawing the plots the run that completed it did not finish" in capsys.readouterr().err
    assert [p.name for p in plots.listed(config, "label-prefs")] == EXPECTED["label-prefs"]
    assert not plots.pending(config, "label-prefs")
    assert begin(spec, config, force=False) is None
    assert "drawing" not in capsys.readouterr().err  # drawn once


def test_a_training_stage_keeps_its_log_and_draws_its_curves(tmp_path, tiny_model_dir):
    """The real finetune stage: its log history outlives the checkpoints, and its loss curve is
    drawn when it completes."""
    run = tmp_path / "run"
    write_jsonl(run / "sl" / "sft.jsonl", [
        {"id": str(n), "prompt": [{"role": "user", "content": f"Question {n}?"}],
         "completion": [{"role": "assistant", "content": f"A careful answer {n}."}]}
        for n in range(4)])
    write_json(run / "sl" / "manifest.json", {"stage": "generate-sl", "status": "complete",
                                              "config_hash": "", "config": {}, "inputs": {}})
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "run_dir": str(run), "constitution": str(Path(__file__).parents[1] / "constitutions"
                                                 / "harmless.yaml"),
        "data": {"red_team": {"path": str(Path(__file__).parents[1] / "cai_cli" / "resources"
                                          / "red_team_prompts.jsonl"), "limit": 4}},
        "models": {"policy": {"name_or_path": str(tiny_model_dir), "device": "cpu"}},
        "finetune": {"training": {"max_steps": 2, "per_device_batch_size": 2, "max_length": 64,
                                  "logging_steps": 1, "save_steps": 100}}}))
    from cai_cli.stages import finetune

    finetune.Finetune().run(load_config(config))
    history = json.loads((run / "sft" / "logs" / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "loss" in entry] == [1, 2]
    assert not (run / "sft" / ".checkpoints").exists()
    (plot,) = plots.listed(RunLayout.of(run), "finetune")
    assert plot.name == "training.png" and image_size(plot)[0] > 300
