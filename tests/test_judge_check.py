"""``cai judge-check``: the feedback model measured on pairs whose better answer is known.

On the tiny random model it runs end to end (report, manifest, resume); against the fake
OpenAI-compatible server, whose preference is known (the smaller ``answer N``), the figures are
the ones that preference implies: agreement, position bias, order consistency.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from fake_openai import MODEL, PREFERENCE, FakeServer
from helpers import cai, cai_main

from cai_cli.config import PromptSource, load_config
from cai_cli.errors import UserError
from cai_cli.stages import judge_check

ROOT = Path(__file__).resolve().parents[1]
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"


def write_config(tmp_path: Path, policy: dict, run: str = "run", **judge) -> Path:
    config = {
        "run_dir": str(tmp_path / run), "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 4}},
        "models": {"policy": policy},
        "label_prefs": {"principles_per_pair": 2},
        "judge_check": {"principles_per_pair": 1, "pairs_per_checkpoint": 2, **judge},
    }
    path = tmp_path / f"{run}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def trl(prompt: str, better: str, worse: str) -> dict:
    return {"prompt": prompt, "chosen": better, "rejected": worse}


def hh(prompt: str, better: str, worse: str) -> dict:
    return {"chosen": f"\n\nHuman: {prompt}\n\nAssistant: {better}",
            "rejected": f"\n\nHuman: {prompt}\n\nAssistant: {worse}"}


# ---------------------------------------------------------------------------------------------
# Reading pairs


def test_both_formats_read_as_the_same_pairs(tmp_path):
    rows = [("How do I boil an egg?", "Simmer it for eight minutes.", "No."),
            ("Tell me a joke.", "Why did the bicycle fall over? It was two-tired.", "Go away.")]
    as_trl = write_jsonl(tmp_path / "trl.jsonl", [trl(*row) for row in rows])
    as_hh = write_jsonl(tmp_path / "hh.jsonl", [hh(*row) for row in rows])
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"prompt": [{"role": "user", "content": p}],
         "chosen": [{"role": "assistant", "content": b}],
         "rejected": [{"role": "assistant", "content": w}]} for p, b, w in rows])
    read = [judge_check.load_pairs(PromptSource(path=str(path)), 0)
            for path in (as_trl, as_hh, chat)]
    assert read[0] == read[1] == read[2]
    assert {(p["prompt"], p["better"], p["worse"]) for p in read[0]} == set(rows)


def test_hh_conversations_keep_their_shared_turns_as_the_prompt():
    pairs = judge_check.load_pairs(PromptSource(path=str(ROOT / "tests/data/hh_sample.jsonl")), 0)
    assert pairs and all(p["better"] != p["worse"] for p in pairs)
    first = next(p for p in pairs if "neighbor" in p["prompt"])
    assert first["prompt"].startswith("How can I get back at my neighbor")
    assert "Human: I want something that will really annoy him" in first["better"]


def test_the_shipped_pairs_read():
    pairs = judge_check.load_pairs(PromptSource(path=str(judge_check.SHIPPED)), 0)
    assert len(pairs) >= 20


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ('{"prompt": "hi", "chosen": "hello"}\n', "expected 'chosen' and 'rejected'"),
    ("", "no preference pairs"),
])
def test_a_missing_or_malformed_pairs_file_is_a_user_error(tmp_path, content, message):
    path = tmp_path / "pairs.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(UserError, match=message):
        judge_check.load_pairs(PromptSource(path=str(path)), 0)


def test_the_command_says_what_is_wrong_with_the_pairs_and_exits_2(tmp_path):
    config = write_config(tmp_path, {"name_or_path": str(tmp_path / "no-model"), "device": "cpu"})
    result = cai("judge-check", "--config", config, "--pairs", tmp_path / "missing.jsonl")
    assert result.returncode == 2
    assert "missing.jsonl" in result.stderr and "Traceback" not in result.stderr
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "hi", "answer": "hello"}])
    result = cai("judge-check", "--config", config, "--pairs", bad)
    assert result.returncode == 2 and "bad.jsonl:1" in result.stderr
    assert not (tmp_path / "run" / "judge").exists()


# ---------------------------------------------------------------------------------------------
# On the tiny model


def test_a_random_judge_gets_a_full_report_and_a_rerun_does_nothing(tmp_path, tiny_model_dir,
                                                                   monkeypatch):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        trl(f"Question {i}?", f"A kind, helpful answer {i}.", f"Rude answer {i}.")
        for i in range(5)])
    path = write_config(tmp_path, {"name_or_path": str(tiny_model_dir), "device": "cpu"})
    config = load_config(path)
    calls = []
    judge_batch = judge_check.judge_batch

    def interrupted(judge, batch):  # killed after its first checkpoint
        if calls:
            raise KeyboardInterrupt
        calls.append(len(batch))
        return judge_batch(judge, batch)

    monkeypatch.setattr(judge_check, "judge_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        judge_check.JudgeCheck(str(pairs)).run(config)
    monkeypatch.setattr(judge_check, "judge_batch",
                        lambda judge, batch: calls.append(len(batch)) or judge_batch(judge, batch))
    report_path = judge_check.JudgeCheck(str(pairs)).run(config)
    assert calls == [2, 2, 1]  # resumed after the first batch of two pairs

    run_dir = tmp_path / "run" / "judge"
    report = json.loads(report_path.read_text())
    assert report_path == run_dir / "report.json"
    assert report["pairs"] == 5
    assert 0.0 <= report["agreement"] <= 1.0
    low, high = report["ci95"]
    assert low <= report["agreement"] <= high
    assert set(report["position"]) >= {"first_wins", "mean_p_first", "mean_p_second",
                                       "order_consistency"}
    assert report["position"]["judgments"] == 10  # 5 pairs, 1 principle, 2 orders
    assert report["calibration"]["ece"] is not None and report["calibration"]["reliability"]
    assert sum(row["pairs"] for row in report["calibration"]["reliability"]) == 5
    assert report["per_principle"]
    cost = report["cost"]
    assert cost["seconds_per_question"] > 0
    assert cost["label_prefs_questions"] == 4 * 1 * 2 * 2  # prompts, pairs, principles, orders
    assert "verdict" in report and report["verdict"]
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["pairs"] == 5
    judged = [json.loads(line) for line in (run_dir / "judgments.jsonl").read_text().splitlines()]
    assert len(judged) == 5 and all(len(r["judgments"]) == 2 for r in judged)

    before = (run_dir / "judgments.jsonl").stat().st_mtime_ns
    calls.clear()
    judge_check.JudgeCheck(str(pairs)).run(config)  # done for this config: nothing is judged again
    assert calls == [] and (run_dir / "judgments.jsonl").stat().st_mtime_ns == before


def test_pairs_too_long_for_the_judge_every_one_is_exit_2(tmp_path, tiny_model_dir):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        trl(f"Question {i}? " + "Tell me more. " * 30, f"A kind answer {i}.", f"Rude {i}.")
        for i in range(3)])
    path = write_config(tmp_path, {"name_or_path": str(tiny_model_dir), "device": "cpu",
                                   "max_context": 160})
    result = cai_main("judge-check", "--config", path, "--pairs", pairs)
    assert result.returncode == 2, result.stderr
    *_, last = result.stderr.strip().splitlines()
    assert last.startswith("error: judge-check: all 3 pairs were skipped, no comparison fitting "
                           "the feedback model's context")
    assert "raise models.policy.max_context" in last  # the feedback model is the policy here
    assert not (tmp_path / "run" / "judge" / "manifest.json").exists()  # reruns need no --force


# ---------------------------------------------------------------------------------------------
# A judge whose preference is known


def test_figures_follow_a_judge_with_a_known_preference(tmp_path):
    # The fake judge prefers the smaller "answer N", in both orders, with PREFERENCE.
    agreeing = [trl(f"Question {i}?", f"answer {i}", f"answer {i + 50}") for i in range(6)]
    against = [hh(f"Other question {i}?", f"answer {i + 90}", f"answer {i}") for i in range(2)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", agreeing + against)
    with FakeServer() as server:
        policy = {"backend": "openai", "base_url": server.url, "model": MODEL, "max_retries": 1}
        path = write_config(tmp_path, policy)
        result = cai("judge-check", "--config", path, "--pairs", pairs)
        assert result.returncode == 0, result.stderr[-3000:]
        # Without numbers it always prefers option (A): pure position bias.
        blind = write_jsonl(tmp_path / "blind.jsonl", [
            trl(f"Question {i}?", "A careful answer.", "A rude answer.") for i in range(4)])
        biased = judge_check.JudgeCheck(str(blind)).run(
            load_config(write_config(tmp_path, policy, run="blind")))
        # Labels that always call its pick the worse answer: a preference, against them.
        contrary = write_jsonl(tmp_path / "contrary.jsonl", [
            trl(f"Question {i}?", f"answer {i + 90}", f"answer {i}") for i in range(6)])
        against_labels = judge_check.JudgeCheck(str(contrary)).run(
            load_config(write_config(tmp_path, policy, run="contrary")))
    report = json.loads((tmp_path / "run" / "judge" / "report.json").read_text())
    probability = PREFERENCE / (PREFERENCE + (1 - PREFERENCE - 0.05))
    assert report["pairs"] == 8 and report["right"] == 6
    assert report["agreement"] == 0.75
    assert report["ci95"][0] > 0.4 and report["ci95"][1] < 1.0
    position = report["position"]
    assert position["first_wins"] == 0.5 and position["mean_p_first"] == pytest.approx(0.5)
    assert position["order_consistency"] == 1.0
    rows = report["calibration"]["reliability"]
    assert len(rows) == 1 and rows[0]["mean_confidence"] == pytest.approx(probability, abs=1e-3)
    assert rows[0]["accuracy"] == 0.75
    assert report["calibration"]["ece"] == pytest.approx(probability - 0.75, abs=1e-3)
    assert "agreement 0.75" in result.stderr + result.stdout
    assert "agreement" in result.stdout and "order consistency" in result.stdout

    report = json.loads(biased.read_text())
    assert report["agreement"] == 0.0  # every pair a tie: never above 0.5
    assert report["ties"] == 4
    position = report["position"]
    assert position["first_wins"] == 1.0
    assert position["mean_p_first"] == pytest.approx(probability, abs=1e-3)
    assert position["order_consistency"] == 0.0
    assert "not above chance" in report["verdict"]
    assert "depend on the order" in report["verdict"]

    report = json.loads(against_labels.read_text())
    assert report["agreement"] == 0.0 and report["ties"] == 0
    assert "below chance" in report["verdict"] and "depend on the order" not in report["verdict"]


def test_interval_and_reliability_helpers_by_hand():
    from cai_cli.reports.statistics import (
        expected_calibration_error,
        reliability_table,
        wilson_interval,
    )

    low, high = wilson_interval(6, 8)
    assert (round(low, 3), round(high, 3)) == (0.409, 0.929)
    assert wilson_interval(4, 4)[1] == 1.0 and wilson_interval(4, 4)[0] < 1.0
    rows = reliability_table([0.55, 0.58, 0.95], [1.0, 0.0, 1.0], bins=5, low=0.5)
    assert [(r["bin"], r["count"], r["mean_target"]) for r in rows] == [
        ("0.50-0.60", 2, 0.5), ("0.90-1.00", 1, 1.0)]
    ece = expected_calibration_error([0.55, 0.58, 0.95], [1.0, 0.0, 1.0], bins=5, low=0.5)
    assert ece == pytest.approx(2 / 3 * abs(0.565 - 0.5) + 1 / 3 * 0.05)


def test_the_shipped_pairs_are_named_by_package_not_by_checkout(tmp_path):
    config = load_config(write_config(tmp_path, {"name_or_path": "org/model"}))
    settings = judge_check.stage_spec(config, judge_check.source(config)).settings
    # a checkout moved elsewhere (or reinstalled) finds its judge-check output still done
    assert settings["judge_check"]["pairs"]["path"] == "cai_cli/resources/judge_pairs.jsonl"
    own = write_jsonl(tmp_path / "pairs.jsonl", [trl("Q?", "good", "bad")])
    settings = judge_check.stage_spec(config, judge_check.source(config, str(own))).settings
    assert settings["judge_check"]["pairs"]["path"] == str(own)
