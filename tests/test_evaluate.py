"""``cai evaluate``: the report's shape and numbers, and the inputs it refuses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from fake_openai import MODEL, PREFERENCE, FakeServer, longer, shorter
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
    result, _ = verdict(config, report, classified)
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
    # what decides the answers is recorded in the manifest, not in a progress file left behind
    assert not (tmp_path / "run" / "eval" / ".answers.jsonl.progress.json").exists()
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
    """Three judges (two servers serving a model of the same name, then the feedback model),
    killed while the third judges: the rerun reads every judge's judgments back, judges the rest
    and writes the judgments and report of an uninterrupted run, byte for byte, though the two
    runs sit in different directories; every judgment is a line a user can read back (its
    judge, a pair's p and principles, a model's p(yes))."""
    runs = {}
    with FakeServer(prefer=shorter) as short, FakeServer(prefer=longer) as long:
        judges = [{"backend": "openai", "base_url": server.url, "model": MODEL}
                  for server in (short, long)] + ["feedback"]
        for name in ("ref", "int"):
            (tmp_path / name).mkdir()
            runs[name] = write_config(tmp_path / name, tiny_model_dir, ["base", str(other_model)],
                                      benign_limit=2, prompts_per_checkpoint=2, judges=judges)
        assert cai("evaluate", "--config", runs["ref"]).returncode == 0
        out = tmp_path / "int" / "run" / "eval"
        # 5 red-team and 2 benign prompts, 2 models: per pair 3 + 1 checkpoints, per model
        # 3 + 1: 12 a judge; the third judge starts after 24
        kill_after_batches(["evaluate", "--config", runs["int"]],
                           out / ".judgments.jsonl.progress.json", 26)
        assert not (out / "report.json").exists() and not (out / "judgments.jsonl").exists()
        judged = len((out / "judgments.jsonl.partial").read_text().splitlines())

        result = cai("evaluate", "--config", runs["int"])
    assert result.returncode == 0, result.stderr
    assert re.search(r"resuming the judging after (2[6-9]|3[0-5]) of 36 checkpoints",
                     result.stdout + result.stderr)
    reference = tmp_path / "ref" / "run" / "eval"
    for name in ("judgments.jsonl", "answers.jsonl", "report.json"):
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not (out / ".judgments.jsonl.progress.json").exists()
    assert not (out / ".answers.jsonl.progress.json").exists()

    records = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    per_judge = 5 + 2 + 2 * 5 + 2 * 2
    assert 2 * per_judge <= judged < len(records) == 3 * per_judge
    assert [r["judge"] for r in records[::per_judge]] == ["fake-judge", "fake-judge #2",
                                                          "feedback"]
    kinds = {r["kind"]: r for r in records}
    assert set(kinds) == {"harmlessness", "helpfulness", "harmful", "refusal"}
    assert kinds["harmlessness"]["models"] == ["base", str(other_model)]
    assert set(kinds["harmlessness"]["principles"]) and 0.0 <= kinds["harmlessness"]["p"] <= 1.0
    assert kinds["refusal"]["model"] in ("base", str(other_model)) and 0.0 <= kinds["refusal"]["p"] <= 1.0
    report = json.loads((out / "report.json").read_text())
    assert [j["name"] for j in report["judges"]] == ["fake-judge", "fake-judge #2", "feedback"]
    assert [j.get("base_url") for j in report["judges"]] == [short.url, long.url, None]


# ---------------------------------------------------------------------------------------------
# A jury: judges of known tastes served over the OpenAI API, judging the tiny model's answers


def terse_policy(run_dir: Path, model: Path) -> None:
    """``<run_dir>/policy``, as if optimize had made it: the tiny model with every token an end
    of turn, so its answers are empty, shorter than any other."""
    import shutil

    target = run_dir / "policy"
    shutil.copytree(model, target)
    settings = json.loads((target / "generation_config.json").read_text())
    settings["eos_token_id"] = list(range(json.loads((target / "config.json").read_text())
                                          ["vocab_size"]))
    (target / "generation_config.json").write_text(json.dumps(settings))
    (target / "manifest.json").write_text(json.dumps({"stage": "optimize", "status": "complete",
                                                      "config_hash": "0" * 16}))


def jury_config(tmp_path: Path, base: Path, feedback: FakeServer, other: FakeServer) -> Path:
    """base against a terse policy trained on the labels of ``feedback`` (a server), judged by
    the feedback model and by ``other``."""
    path = write_config(tmp_path, base, ["base", "policy"], limit=6, benign_limit=3,
                        reward_model=False, judges=[
                            "feedback", {"backend": "openai", "base_url": other.url,
                                         "model": MODEL, "max_retries": 1}])
    config = yaml.safe_load(path.read_text())
    config["models"]["feedback"] = {"backend": "openai", "base_url": feedback.url, "model": MODEL,
                                    "max_retries": 1}
    config["judge_check"] = {"pairs": {"path": str(ROOT / "cai_cli/resources/judge_pairs.jsonl"),
                                       "limit": 8}}
    path.write_text(yaml.safe_dump(config))
    terse_policy(tmp_path / "run", base)
    return path


def test_the_verdict_names_a_preference_only_the_feedback_model_has(tmp_path, tiny_model_dir):
    """The feedback model prefers shorter answers and the policy learned to answer short; the
    other judge prefers longer ones. The verdict says so first, in words, with exit 0; the
    tables fit 80 columns and mark the feedback model judge-check found below chance; the
    jury's figures are the mean of the judges' probabilities."""
    with FakeServer(prefer=shorter) as feedback, FakeServer(prefer=longer) as other:
        path = jury_config(tmp_path, tiny_model_dir, feedback, other)
        checked = cai("judge-check", "--config", path, env={"COLUMNS": "80"})
        assert checked.returncode == 0 and "below chance" in checked.stderr
        assert all(len(line) <= 80 for line in checked.stdout.splitlines()), checked.stdout
        assert "…" not in checked.stdout
        result = cai("evaluate", "--config", path, env={"COLUMNS": "80"})
    assert result.returncode == 0, result.stderr
    verdict_line = next(line for line in result.stderr.splitlines() if "verdict:" in line)
    assert verdict_line.startswith("warning: verdict: policy learned the feedback model's "
                                   "preference, which the other judge does not share: check it "
                                   "with cai judge-check")
    assert "By the other judge (fake-judge): policy is less harmless than base" in verdict_line
    # the tables at 80 columns: nothing cut, the judges in a legend, judge-check's mark
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    assert "…" not in result.stdout and "feedback*" in result.stdout
    assert "*: judge-check measured" in result.stdout
    assert f"feedback = {MODEL} (openai, {feedback.url}; the feedback model" in \
        " ".join(result.stdout.split())

    out = tmp_path / "run" / "eval"
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"]["disagreement"] == "feedback model only"
    assert report["verdict"]["judges"] == ["fake-judge"] and report["verdict"]["independent"]
    assert report["verdict"]["harmlessness"] == "worse"
    assert report["judges"][0]["feedback_model"] and report["judges"][0]["judge_check"]["at_chance"]
    assert not report["judges"][1]["feedback_model"] and report["judges"][1]["judge_check"] is None
    by_judge = report["by_judge"]
    assert by_judge["feedback"]["win_rates"][1]["ci95"][0] > 0.5  # policy over base
    assert by_judge["fake-judge"]["win_rates"][1]["ci95"][1] < 0.5
    # no absolute path of the run directory: a moved run writes the same bytes
    assert report["models"]["policy"] == "<run_dir>/policy"
    assert str(tmp_path / "run") not in (out / "report.json").read_text()

    # the jury's figures, by hand: per prompt the mean of the two judges' probabilities
    lines = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert {line["judge"] for line in lines} == {"feedback", "fake-judge"}
    per_prompt: dict = {}
    for line in lines:
        task = (line["kind"], tuple(line.get("models") or [line["model"]]), line["id"])
        per_prompt.setdefault(task, []).append(line["p"])
    assert all(len(values) == 2 for values in per_prompt.values())
    mean = {task: sum(values) / 2 for task, values in per_prompt.items()}
    for kind, entries in (("harmlessness", report["win_rates"]),
                          ("helpfulness", report["helpfulness"]["win_rates"])):
        base_wins = [p for (k, _, _), p in mean.items() if k == kind]
        policy = next(w for w in entries if w["model"] == "policy")
        assert policy["win_rate"] == pytest.approx(1 - sum(base_wins) / len(base_wins), abs=1e-4)
    for kind, rates in (("harmful", report["harmful_compliance"]),
                        ("refusal", report["helpfulness"]["over_refusal"])):
        for model, entry in rates.items():
            values = [p for (k, models, _), p in mean.items() if (k, models) == (kind, (model,))]
            assert entry["rate"] == pytest.approx(sum(p > 0.5 for p in values) / len(values))
            assert entry["mean_p_yes"] == pytest.approx(sum(values) / len(values), abs=1e-4)


def test_judges_of_the_same_taste_report_the_gain(tmp_path, tiny_model_dir):
    from cai_cli.stages import evaluate

    with FakeServer(prefer=shorter) as feedback, FakeServer(prefer=shorter) as other:
        evaluate.Evaluate().run(load_config(jury_config(tmp_path, tiny_model_dir, feedback, other)))
    result = json.loads((tmp_path / "run" / "eval" / "report.json").read_text())["verdict"]
    assert result["harmlessness"] == "better" and result["disagreement"] is None
    assert result["text"].startswith("by the other judge (fake-judge): policy is more harmless "
                                     "than base") and "no less helpful" in result["text"]
    assert result["caveats"] == []


def test_judge_check_finds_a_feedback_model_inside_the_run_directory(tmp_path, tiny_model_dir):
    """judge-check's manifest names a checkpoint of the run as ``<run_dir>/...``: the feedback
    model there is still the judge it measured."""
    from cai_cli.reports.jury import judge_check_of, jury
    from cai_cli.stages import judge_check

    path = write_config(tmp_path, tiny_model_dir, ["base", "policy"])
    settings = yaml.safe_load(path.read_text())
    settings["models"]["feedback"] = {"name_or_path": str(tmp_path / "run" / "sft"),
                                      "device": "cpu"}
    path.write_text(yaml.safe_dump(settings))
    (tmp_path / "run" / "sft").mkdir(parents=True)
    config = load_config(path)
    spec = judge_check.stage_spec(config, judge_check.source(config))
    assert spec.settings["models.feedback"]["name_or_path"] == "<run_dir>/sft"
    config.layout.judge.mkdir(parents=True)
    (config.layout.judge / "manifest.json").write_text(json.dumps(
        {"stage": "judge-check", "status": "complete", "config": spec.settings}))
    config.layout.judge_report.write_text(json.dumps(
        {"pairs": 40, "agreement": 0.3, "ci95": [0.18, 0.45], "ties": 0, "verdict": "..."}))
    assert judge_check_of(config, jury(config)) == [
        {"agreement": 0.3, "ci95": [0.18, 0.45], "pairs": 40, "below_chance": True,
         "at_chance": True}]


def test_the_jury_leaves_out_a_comparison_a_judge_could_not_read():
    """A judge that could not read a comparison (too long for its context) records a tie with
    no principles: the jury's figure is the other judges'; identical answers, a tie for every
    judge, stay a tie."""
    from cai_cli.reports.jury import pool

    def judged(first: dict, second: dict) -> dict:
        return {"comparisons": [{"models": ["a", "b"], "rows": [first, second]}],
                "helpful_comparisons": [], "harmful": {}, "refusal": {}}

    tie = {"p": 0.5, "principles": {}}
    pooled = pool([judged({"id": "1", "p": 0.9, "principles": {"x": 0.9}}, {"id": "2", **tie}),
                   judged({"id": "1", **tie}, {"id": "2", **tie}),
                   judged({"id": "1", "p": 0.7, "principles": {"x": 0.6, "y": 0.8}},
                          {"id": "2", **tie})])
    first, second = pooled["comparisons"][0]["rows"]
    assert first["p"] == pytest.approx(0.8)
    assert first["principles"] == pytest.approx({"x": 0.75, "y": 0.8})
    assert second == {"id": "2", "p": 0.5, "principles": {}}


@pytest.mark.parametrize("second, same", [
    ({"base_url": "http://127.0.0.1:9/v1"}, False),  # the same name served elsewhere
    ({"base_url": "http://127.0.0.1:8000/v1/"}, True),
    ({"backend": "hf", "device": "cpu"}, False),
])
def test_the_same_judge_is_the_same_engine_model_revision_and_server(tmp_path, tiny_model_dir,
                                                                      second, same):
    from cai_cli.errors import UserError
    from cai_cli.reports.jury import jury

    path = write_config(tmp_path, tiny_model_dir, ["base", "policy"],
                        judge={"backend": "openai", "name_or_path": "judge", **second})
    config = yaml.safe_load(path.read_text())
    config["models"]["feedback"] = {"backend": "openai", "model": "judge"}
    path.write_text(yaml.safe_dump(config))
    (judge,) = jury(load_config(path))
    assert judge.feedback is same and (judge.name == "feedback") is same
    config["evaluate"]["judges"] = ["feedback", config["evaluate"].pop("judge")]
    path.write_text(yaml.safe_dump(config))
    if same:
        with pytest.raises(UserError, match=r"evaluate.judges\[1\]: the same judge as "
                                            "models.feedback"):
            jury(load_config(path))
    else:
        assert [j.feedback for j in jury(load_config(path))] == [True, False]


def test_one_judge_named_either_way_is_the_same_evaluation(tmp_path, tiny_model_dir):
    """``judge: X`` is ``judges: [X]``, and ``judges: [feedback]`` is the default: the same
    stage, so a finished run stays done."""
    from cai_cli.stages import evaluate

    def fingerprint(**settings) -> str:
        path = write_config(tmp_path, tiny_model_dir, ["base", "x/y"], **settings)
        return evaluate.Evaluate().spec(load_config(path)).fingerprint

    other = {"backend": "openai", "model": "judge"}
    assert fingerprint() == fingerprint(judges=["feedback"])
    assert fingerprint(judge=other) == fingerprint(judges=[other]) != fingerprint()
    assert fingerprint(judges=["feedback", other]) != fingerprint(judges=[other, "feedback"])


@pytest.mark.parametrize("judges", [1, 2, 3, 6])
def test_the_tables_fit_80_columns_and_cut_no_figure(monkeypatch, judges):
    """Long model and judge names are abbreviated with a legend; where a row of figures is too
    wide the intervals go under them, then each judge gets rows of its own."""
    import io

    from fake_run import eval_report, jury_report
    from rich.console import Console

    from cai_cli import ui
    from cai_cli.reports.evaluation import print_report

    long_name = "/data/checkpoints/a-rather-long-model-name/step-12000"
    report = json.loads(json.dumps(jury_report() if judges > 1 else eval_report(True))
                        .replace('"policy"', json.dumps(long_name)))
    if judges > 1:
        first = report["by_judge"].pop("big/judge")
        report["judges"] = report["judges"][:1]
        for number in range(1, judges):
            name = f"org/a-judge-model-of-some-size-{number}"
            report["judges"].append({"name": name, "model": name, "backend": "openai",
                                     "base_url": "http://judges.example/v1",
                                     "feedback_model": False, "judge_check": None})
            report["by_judge"][name] = first
    shown = io.StringIO()
    monkeypatch.setattr(ui, "stdout", Console(file=shown, width=80, highlight=False))
    print_report(report)
    text = shown.getvalue()
    assert all(len(line.rstrip()) <= 80 for line in text.splitlines()), text
    assert "…" not in text
    assert "0.60" in text and "[0.50, 0.70]" in text  # sft over base, whole
    assert f"M3 = {long_name}" in text
    if judges > 1:
        assert "feedback*" in text and "*: judge-check measured" in text
        assert "J2 = org/a-judge-model-of-some-size-1" in " ".join(text.split())
