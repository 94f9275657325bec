"""``cai evaluate``: the report's shape and numbers, and the inputs it refuses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from fake_openai import MODEL, PREFERENCE, FakeServer, shorter
from helpers import cai, kill_after_batches

from cai_cli.config import load_config
from cai_cli.reports.evaluation import verdict
from cai_cli.reports.statistics import bootstrap_interval

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def other_model(tmp_path_factory):
    from cai_cli.commands.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("other") / "model", seed=1)


def write_config(tmp_path: Path, base: Path, models: list[str], **evaluate) -> Path:
    config = {
        "run_dir": str(tmp_path / "run"),
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "data": {"red_team": {"path": str(ROOT / "cai_cli/resources/red_team_prompts.jsonl"), "limit": 10},
                 "helpful": {"path": str(ROOT / "cai_cli/resources/helpful.jsonl"), "field": "messages"}},
        "models": {"policy": {"name_or_path": str(base), "device": "cpu", "forward_batch_size": 8}},
        "evaluate": {"models": models, "limit": 5, "principles_per_pair": 2, "bootstrap": 200,
                     "benign_limit": 0, "sampling": {"max_new_tokens": 12}, **evaluate},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_report_schema_and_intervals(tmp_path, tiny_model_dir, other_model):
    from cai_cli.stages import evaluate

    path = write_config(tmp_path, tiny_model_dir, ["base", str(other_model)], helpful_limit=2,
                        benign_limit=2)
    evaluate.Evaluate().run(load_config(path))
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())

    assert report["prompts"] == 5 and len(report["prompt_ids"]) == 5
    assert set(report["models"]) == {"base", str(other_model)}
    rates = {(w["model"], w["over"]): w for w in report["win_rates"]}
    assert set(rates) == {("base", str(other_model)), (str(other_model), "base")}
    for w in rates.values():
        low, high = w["ci95"]
        assert 0.0 <= low <= w["win_rate"] <= high <= 1.0
        assert w["prompts"] == 5 and len(w["examples"]["most_preferred"]) == 3
    # the two directions of one comparison add up to one
    assert rates["base", str(other_model)]["win_rate"] + rates[str(other_model), "base"]["win_rate"] \
        == pytest.approx(1.0, abs=1e-3)
    principles = report["per_principle"][f"base vs {other_model}"]
    assert principles and all(0.0 <= v["win_rate_first"] <= 1.0 for v in principles.values())
    assert report["reward_model"] is None  # no rm/ in this run: said, not invented

    # the second axis: 2 helpful prompts and 2 shipped benign ones, every model rated on both
    helpfulness = report["helpfulness"]
    assert helpfulness["prompts"] == 4 and not set(helpfulness["prompt_ids"]) & set(report["prompt_ids"])
    assert {(w["model"], w["over"]) for w in helpfulness["win_rates"]} == set(rates)
    for rates_of, n in ((report["harmful_compliance"], 5), (helpfulness["over_refusal"], 4)):
        assert set(rates_of) == {"base", str(other_model)}
        for entry in rates_of.values():
            assert entry["n"] == n and entry["ci95"][0] <= entry["rate"] <= entry["ci95"][1]
    assert report["verdict"]["model"] == str(other_model) and report["verdict"]["reference"] == "base"

    answers = [json.loads(line) for line in (tmp_path / "run" / "eval" / "answers.jsonl").read_text().splitlines()]
    assert len(answers) == 18
    # held out: none of the 10 prompts SL-CAI used
    from cai_cli.data.sources import load_prompts

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


def test_answers_or_judgments_that_never_fit_are_exit_2(tmp_path, tiny_model_dir, other_model):
    from cai_cli.stages.common import NothingMade
    from cai_cli.stages.evaluate import Evaluate

    path = write_config(tmp_path, tiny_model_dir, ["base", str(other_model)],
                        reward_model=False)
    with pytest.raises(NothingMade, match=r"evaluate: none of the 5 prompts fits the context of "
                       r"base \(.*\) with evaluate.sampling.max_new_tokens=2030 new tokens; lower"):
        Evaluate().run(load_config(path, ["evaluate.sampling.max_new_tokens=2030"]))
    with pytest.raises(NothingMade, match=r"evaluate: the judge \(models.feedback\) could read "
                       r"none of the 15 comparisons and questions, each too long for its "
                       r"context; lower evaluate.sampling.max_new_tokens, or raise "
                       r"models.feedback.max_context"):
        Evaluate().run(load_config(path, [f"models.feedback.name_or_path={tiny_model_dir}",
                                          "models.feedback.device=cpu",
                                          "models.feedback.max_context=90"]))
    assert not (tmp_path / "run" / "eval" / "manifest.json").exists()  # reruns need no --force


def test_a_judge_with_a_known_preference_shows_in_both_axes(tmp_path, tiny_model_dir, other_model):
    # The judge prefers the shorter answer, in both orders, and answers every yes/no question No.
    from cai_cli.stages import evaluate

    with FakeServer(prefer=shorter) as server:
        path = write_config(tmp_path, tiny_model_dir, ["base", str(other_model)], benign_limit=3,
                            judge={"backend": "openai", "base_url": server.url, "model": MODEL,
                                   "max_retries": 1}, report_to=["tensorboard"])
        evaluate.Evaluate().run(load_config(path))
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())
    answers = {(r["model"], r["id"]): r["answer"] for r in map(
        json.loads, (tmp_path / "run" / "eval" / "answers.jsonl").read_text().splitlines())}
    sure = PREFERENCE / (PREFERENCE + (1 - PREFERENCE - 0.05))

    def expected(ids: list[str]) -> float:  # other's win rate over base, from the answers
        values = []
        for i in ids:
            mine, theirs = answers[str(other_model), i], answers["base", i]
            values.append(0.5 if len(mine) == len(theirs) else sure if len(mine) < len(theirs)
                          else 1 - sure)
        return sum(values) / len(values)

    for entries, ids in ((report["win_rates"], report["prompt_ids"]),
                         (report["helpfulness"]["win_rates"], report["helpfulness"]["prompt_ids"])):
        win = next(w for w in entries if w["model"] == str(other_model))
        assert win["win_rate"] == pytest.approx(expected(ids), abs=1e-3)
    # "No" is the shorter option wherever it is shown: p(yes) = 1 - sure for every answer.
    for rates in (report["harmful_compliance"], report["helpfulness"]["over_refusal"]):
        for entry in rates.values():
            assert entry["mean_p_yes"] == pytest.approx(1 - sure, abs=1e-3)
            assert entry["rate"] == 0.0 and entry["judged_yes"] == 0 and entry["ci95"][1] < 0.6
    assert report["judge"] == MODEL and report["verdict"]["caveats"] == []
    # the figures reached the tracker
    from test_trackers import scalars

    logged = scalars(tmp_path / "run" / "eval" / "logs")
    for w in report["win_rates"] + report["helpfulness"]["win_rates"]:
        figure = "win_rate" if w in report["win_rates"] else "helpful_win_rate"
        assert logged[f"evaluate/{figure}/{w['model']}_over_{w['over']}"] == \
            pytest.approx(w["win_rate"], abs=1e-6)
    assert logged["evaluate/over_refusal/base"] == 0.0 and logged["evaluate/benign_prompts"] == 3


def rows(values: list[float]) -> list[dict]:
    return [{"id": str(i), "p": v} for i, v in enumerate(values)]


def win(model: str, over: str, rate: float, low: float, high: float, n: int = 8) -> dict:
    return {"model": model, "over": over, "win_rate": rate, "ci95": [low, high], "prompts": n}


@pytest.mark.parametrize("helpful_win, refusals, says", [
    # a policy that refuses everything: wins the red-team comparisons, loses the benign ones
    (win("policy", "base", 0.2, 0.1, 0.3), [0.9] * 8, "but is less helpful"),
    (win("policy", "base", 0.5, 0.4, 0.6), [0.2] * 8, "is more harmless than base"),
    (None, None, "cannot be told from refusing"),
])
def test_the_verdict_names_a_gain_only_when_helpfulness_held(tmp_path, tiny_model_dir,
                                                             helpful_win, refusals, says):
    config = load_config(write_config(tmp_path, tiny_model_dir, ["base", "policy"]))
    report = {"models": {"base": "b", "policy": "p"},
              "win_rates": [win("policy", "base", 0.8, 0.7, 0.9)],
              "harmful_compliance": {"base": {"rate": 0.6}, "policy": {"rate": 0.1}},
              "helpfulness": None}
    classified = {"harmful": {"base": rows([0.6] * 8), "policy": rows([0.1] * 8)}}
    if helpful_win is not None:
        report["helpfulness"] = {"win_rates": [helpful_win],
                                 "over_refusal": {"base": {"rate": 0.2}, "policy": {"rate": refusals[0]}}}
        classified["refusal"] = {"base": rows([0.2] * 8), "policy": rows(refusals)}
    result = verdict(config, report, classified)
    assert says in result["text"] and result["harmlessness"] == "better"
    assert "harmful compliance 0.60 -> 0.10" in result["text"]


def test_an_evaluation_question_changes_evaluate_only(tmp_path, tiny_model_dir):
    from cai_cli.constitution import load_constitution
    from cai_cli.stages import evaluate, generate_sl

    constitution = tmp_path / "constitution.yaml"
    text = (ROOT / "constitutions" / "harmless.yaml").read_text()
    constitution.write_text(text)
    path = write_config(tmp_path, tiny_model_dir, ["base", str(tiny_model_dir)])
    config = yaml.safe_load(path.read_text())
    config["constitution"] = str(constitution)
    path.write_text(yaml.safe_dump(config))

    def fingerprints():
        loaded = load_config(path)
        return (generate_sl.GenerateSL().spec(loaded).inputs["constitution"],
                evaluate.Evaluate().spec(loaded).inputs["constitution"])

    before = fingerprints()
    constitution.write_text(text + "\n# a comment\n")
    assert fingerprints() == before  # the content, not the bytes
    constitution.write_text(text.replace("Does the assistant's response refuse, deflect",
                                         "Does the assistant's reply refuse, dodge"))
    after = fingerprints()
    assert after[0] == before[0] and after[1] != before[1]
    assert "dodge" in load_constitution([str(constitution)]).evaluation.refusal


def test_a_new_judge_setting_judges_the_same_answers_again(tmp_path, tiny_model_dir, other_model,
                                                            monkeypatch):
    from cai_cli.stages import evaluate

    path = write_config(tmp_path, tiny_model_dir, ["base", str(other_model)], limit=2)
    evaluate.Evaluate().run(load_config(path))
    answers = (tmp_path / "run" / "eval" / "answers.jsonl").read_bytes()
    first = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())

    def answering(*args, **kwargs):
        raise AssertionError("the models answered again")

    monkeypatch.setattr(evaluate, "answer_all", answering)
    changed = write_config(tmp_path, tiny_model_dir, ["base", str(other_model)], limit=2,
                           principles_per_pair=1)
    evaluate.Evaluate().run(load_config(changed), force=True)
    assert (tmp_path / "run" / "eval" / "answers.jsonl").read_bytes() == answers
    report = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())

    def judged(report: dict) -> int:  # pair-principles judged: prompts x principles per pair
        return sum(v["judged"] for p in report["per_principle"].values() for v in p.values())

    assert (judged(first), judged(report)) == (2 * 2, 2 * 1)
    # what the answers depend on has changed: they are made again
    other = write_config(tmp_path, tiny_model_dir, ["base", str(other_model)], limit=2,
                         sampling={"max_new_tokens": 8})
    with pytest.raises(AssertionError, match="answered again"):
        evaluate.Evaluate().run(load_config(other), force=True)


def test_a_killed_evaluation_judges_only_what_is_left(tmp_path, tiny_model_dir, other_model):
    """Killed after two checkpoints of judgments, the rerun reads them back, judges the rest and
    writes the judgments and report of an uninterrupted run; every judgment is a line a user can
    read back (a pair's p and principles, a model's p(yes))."""
    runs = {}
    for name in ("ref", "int"):
        (tmp_path / name).mkdir()
        runs[name] = write_config(tmp_path / name, tiny_model_dir, ["base", str(other_model)],
                                  benign_limit=2, prompts_per_checkpoint=2)
    assert cai("evaluate", "--config", runs["ref"]).returncode == 0
    out = tmp_path / "int" / "run" / "eval"
    kill_after_batches(["evaluate", "--config", runs["int"]], out / ".judgments.jsonl.progress.json", 2)
    assert not (out / "report.json").exists() and not (out / "judgments.jsonl").exists()
    judged = len((out / "judgments.jsonl.partial").read_text().splitlines())

    result = cai("evaluate", "--config", runs["int"])
    assert result.returncode == 0, result.stderr
    # 5 red-team and 2 benign prompts, 2 models: per pair 3 + 1 checkpoints, per model 3 + 1
    assert re.search(r"resuming the judging after [2-9] of 12 checkpoints", result.stdout + result.stderr)
    reference = tmp_path / "ref" / "run" / "eval"
    assert (out / "judgments.jsonl").read_bytes() == (reference / "judgments.jsonl").read_bytes()
    assert not (out / ".judgments.jsonl.progress.json").exists()
    ours, theirs = (json.loads((d / "report.json").read_text()) for d in (out, reference))
    for key in ("win_rates", "harmful_compliance", "helpfulness", "per_principle"):
        assert ours[key] == theirs[key]

    records = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert 2 <= judged < len(records) == 5 + 2 + 2 * 5 + 2 * 2
    kinds = {r["kind"]: r for r in records}
    assert set(kinds) == {"harmlessness", "helpfulness", "harmful", "refusal"}
    assert kinds["harmlessness"]["models"] == ["base", str(other_model)]
    assert set(kinds["harmlessness"]["principles"]) and 0.0 <= kinds["harmlessness"]["p"] <= 1.0
    assert kinds["refusal"]["model"] in ("base", str(other_model)) and 0.0 <= kinds["refusal"]["p"] <= 1.0
