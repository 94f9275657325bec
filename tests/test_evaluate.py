"""``cai evaluate``: the report's shape and numbers, and the inputs it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from cai_cli.config import load_config
from cai_cli.stages.evaluate import bootstrap_interval
from helpers import cai

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from cai_cli.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


def write_config(tmp_path: Path, base: Path, models: list[str], **evaluate) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "data": {"red_team": {"path": str(ROOT / "cai_cli/resources/red_team_prompts.jsonl"), "limit": 10},
                 "helpful": {"path": str(ROOT / "cai_cli/resources/helpful.jsonl"), "field": "messages"}},
        "models": {"policy": {"name_or_path": str(base), "device": "cpu", "forward_batch_size": 8}},
        "evaluate": {"models": models, "limit": 5, "principles_per_pair": 2, "bootstrap": 200,
                     "sampling": {"max_new_tokens": 12}, **evaluate},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_report_schema_and_intervals(tmp_path, tiny_model_dir, other_model):
    from cai_cli.stages import evaluate

    path = write_config(tmp_path, tiny_model_dir, ["base", str(other_model)], helpful_limit=2)
    evaluate.run(load_config(path))
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())

    assert report["prompts"] == 7 and len(report["prompt_ids"]) == 7
    assert set(report["models"]) == {"base", str(other_model)}
    rates = {(w["model"], w["over"]): w for w in report["win_rates"]}
    assert set(rates) == {("base", str(other_model)), (str(other_model), "base")}
    for w in rates.values():
        low, high = w["ci95"]
        assert 0.0 <= low <= w["win_rate"] <= high <= 1.0
        assert w["prompts"] == 7 and len(w["examples"]["most_preferred"]) == 3
    # the two directions of one comparison add up to one
    assert rates["base", str(other_model)]["win_rate"] + rates[str(other_model), "base"]["win_rate"] \
        == pytest.approx(1.0, abs=1e-3)
    principles = report["per_principle"][f"base vs {other_model}"]
    assert principles and all(0.0 <= v["win_rate_first"] <= 1.0 for v in principles.values())
    assert report["reward_model"] is None  # no rm/ in this run: said, not invented

    answers = [json.loads(line) for line in (tmp_path / "run" / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 14
    # held out: none of the 10 prompts SL-CAI used
    from cai_cli.data import load_prompts

    config = load_config(path)
    assert not {p.id for p in load_prompts(config.data.red_team, 0)} & set(report["prompt_ids"])


def test_bootstrap_interval_brackets_the_mean():
    values = [0.2, 0.9, 0.4, 0.7, 0.55, 0.1, 0.8]
    low, high = bootstrap_interval(values, 500, seed=0)
    assert low < sum(values) / len(values) < high
    assert bootstrap_interval([0.5] * 5, 200, seed=0) == (0.5, 0.5)


def test_fewer_than_two_models_and_missing_checkpoints_exit_2(tmp_path, tiny_model_dir):
    result = cai("evaluate", "--config", write_config(tmp_path, tiny_model_dir, ["base"]))
    assert result.returncode == 2 and "two or more" in result.stderr and "Traceback" not in result.stderr
    result = cai("evaluate", "--config", write_config(tmp_path, tiny_model_dir, ["base", "base", "x/y"]))
    assert result.returncode == 2 and "base listed more than once" in result.stderr
    result = cai("evaluate", "--config", write_config(tmp_path, tiny_model_dir, ["base", "sft"]))
    assert result.returncode == 2 and "cai finetune" in result.stderr
    assert not (tmp_path / "run" / "eval").exists()
