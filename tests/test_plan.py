"""``cai plan`` on the tiny model: every stage with the counts the stages really produce (checked
against counts derived here by hand and against a real generate-sl run's manifest), JSON output,
no run directory created, and short errors with exit 2."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from helpers import cai

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "cai_cli" / "resources" / "red_team_prompts.jsonl"
HELPFUL = ROOT / "cai_cli" / "resources" / "helpful.jsonl"
CONSTITUTION = ROOT / "constitutions" / "harmless.yaml"
STAGES = ["generate-sl", "finetune", "label-prefs", "train-rm", "optimize", "evaluate"]


def write_config(tmp_path: Path, model, **changes) -> Path:
    training = {"epochs": 2, "per_device_batch_size": 4, "max_length": 256}
    config = {
        "run_dir": str(tmp_path / "run"),
        "seed": 0,
        "constitution": str(CONSTITUTION),
        "data": {"red_team": {"path": str(PROMPTS), "limit": 5},
                 "helpful": {"path": str(HELPFUL), "field": "messages"}},
        "models": {"policy": {"name_or_path": str(model), "device": "cpu",
                              "forward_batch_size": 4}},
        "generate_sl": {"num_revisions": 2, "few_shot": 1, "prompts_per_checkpoint": 3,
                        "sampling": {"max_new_tokens": 6}},
        "finetune": {"helpful_ratio": 0.5, "training": training},
        "label_prefs": {"limit": 4, "responses_per_prompt": 3, "principles_per_pair": 2,
                        "sampling": {"max_new_tokens": 6}},
        "train_rm": {"eval_fraction": 0.25, "training": {**training, "epochs": 1}},
        "optimize": {"training": {**training, "per_device_batch_size": 2}},
        "evaluate": {"limit": 3, "helpful_limit": 1, "benign_limit": 2, "principles_per_pair": 2,
                     "sampling": {"max_new_tokens": 6}},
    }
    for key, value in changes.items():
        node = config
        *parents, last = key.split("__")
        for part in parents:
            node = node[part]
        node[last] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def plan_json(path: Path, *args) -> dict:
    result = cai("plan", "--config", path, "--json", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_plan_counts_what_every_stage_does_and_writes_nothing(tmp_path, tiny_model_dir):
    path = write_config(tmp_path, tiny_model_dir)
    plan = plan_json(path)
    stages = {s["stage"]: s for s in plan["stages"]}
    assert list(stages) == STAGES and all(s["runs"] for s in stages.values())
    assert not (tmp_path / "run").exists()  # planning writes nothing, not even the run dir

    # Counts derived here from the config alone.
    prompts, rounds, new = 5, 2, 6
    sl = stages["generate-sl"]
    assert sl["counts"]["prompts"] == prompts
    assert sl["counts"]["generations"] == prompts * (1 + 2 * rounds)
    assert sl["generated_tokens"] == prompts * (1 + 2 * rounds) * new  # the bound
    assert sl["prompt_tokens"] > 0 and sl["seconds"] > 0

    helpful = round(0.5 * prompts)
    ft = stages["finetune"]
    assert (ft["counts"]["sl_examples"], ft["counts"]["helpful_examples"]) == (prompts, helpful)
    assert ft["steps"] == math.ceil((prompts + helpful) / 4) * 2
    assert ft["train_tokens"] > 0

    labelled, answers = 4, 3
    pairs = labelled * math.comb(answers, 2)
    lp = stages["label-prefs"]
    assert lp["counts"] == {"prompts": labelled, "answers": labelled * answers, "pairs": pairs,
                            "judge_passes": pairs * 2 * 2}

    held = 3  # a quarter of 12 pairs, whole prompts (3 pairs each): one prompt's pairs
    rm = stages["train-rm"]
    assert (rm["counts"]["train_pairs"], rm["counts"]["held_out_pairs"]) == (pairs - held, held)
    assert rm["steps"] == math.ceil((pairs - held) / 4)
    assert stages["optimize"]["steps"] == math.ceil(pairs / 2) * 2

    ev = stages["evaluate"]["counts"]
    assert (ev["models"], ev["prompts"], ev["benign_prompts"], ev["answers"]) == (3, 3, 3, 18)
    # model pairs x (red-team prompts x principles + benign prompts x 1 question) x orders,
    # and each model's answers asked one yes/no question in both orders of the options
    assert ev["judge_passes"] == 3 * (3 * 2 + 3 * 1) * 2 + 3 * 6 * 2
    assert plan["total_seconds"] == pytest.approx(sum(s["seconds"] for s in plan["stages"]),
                                                  abs=0.5)
    assert any("safetensors" in line for line in plan["assumptions"])


def test_plan_matches_a_real_run_and_reads_its_output(tmp_path, tiny_model_dir):
    from cai_cli.commands.plan import build_plan
    from cai_cli.config import load_config
    from cai_cli.stages import generate_sl

    path = write_config(tmp_path, tiny_model_dir, generate_sl__num_revisions=1,
                        data__red_team__limit=3)
    planned = build_plan(load_config(path), last="generate-sl").to_json()["stages"][0]
    generate_sl.GenerateSL().run(load_config(path))
    manifest = json.loads((tmp_path / "run" / "sl" / "manifest.json").read_text())["counts"]
    assert manifest["chains"] == planned["counts"]["prompts"] == 3
    assert manifest["rounds"] == planned["counts"]["critiques"]
    assert manifest["chains"] * 3 == planned["counts"]["generations"]
    assert manifest["generated_tokens"] <= planned["generated_tokens"]

    # Now generate-sl is done: skipped, and finetune counts the real SL examples
    # (`cai run --dry-run` prints the same plan as `cai plan`).
    result = cai("run", "--dry-run", "--config", path, "--to", "finetune")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert any("generate-sl" in line and "up to date" in line for line in lines)
    assert any("finetune" in line and "sft.jsonl" in line for line in lines)
    assert "Assumptions" in result.stdout and not (tmp_path / "run" / "sft").exists()


@pytest.mark.parametrize("change, args, message", [
    ({"data__red_team__path": "missing.jsonl"}, [], "missing.jsonl: not found"),
    ({"models__policy__name_or_path": "someorg/mystery-model"}, [], "unknown size"),
    ({}, ["--assume", "cpu_gflop=5"], "did you mean 'cpu_gflops'"),
])
def test_plan_errors_are_short(tmp_path, tiny_model_dir, change, args, message):
    path = write_config(tmp_path, tiny_model_dir, **change)
    result = cai("plan", "--config", path, *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()


def test_plan_page_lists_every_assumption():
    from cai_cli.commands.costs import DEFAULTS

    page = (ROOT / "docs" / "commands" / "plan.md").read_text()
    assert all(f"| `{key}` |" in page for key in DEFAULTS)


def test_calibrate_times_the_tiny_model_and_says_how_to_reuse_it(tmp_path, tiny_model_dir):
    from cai_cli.commands.plan import build_plan
    from cai_cli.config import load_config

    plan = build_plan(load_config(write_config(tmp_path, tiny_model_dir)), last="finetune",
                      calibrate_now=True).to_json()
    assert plan["calibration"][-1].startswith("reuse these figures without --calibrate: ")
    assert "--assume cpu_gflops=" in plan["calibration"][-1]
    assert all(s["seconds"] > 0 for s in plan["stages"])
    assert not (tmp_path / "run").exists()


def test_plan_estimates_generate_prompts_and_what_reads_its_output(tmp_path, tiny_model_dir):
    """Enabled, generate-prompts is planned first: its requests, new tokens at their bound and
    the feedback filter's questions; generate-sl, reading its output before it exists, counts
    the prompts it will make (new ones and the seeds mixed in, up to data.red_team.limit)."""
    from cai_cli.commands.plan import build_plan
    from cai_cli.config import load_config

    generated = tmp_path / "run" / "prompts" / "red_team.jsonl"
    path = write_config(tmp_path, tiny_model_dir, data__red_team__path=str(generated),
                        data__red_team__limit=8, generate_prompts={
                            "enabled": True, "seeds": {"path": str(PROMPTS), "limit": 12},
                            "num_prompts": 6, "per_request": 4, "prompts_per_checkpoint": 1,
                            "mix_seeds": 0.5, "feedback_filter": True,
                            "sampling": {"max_new_tokens": 10}})
    plan = build_plan(load_config(path), last="generate-sl").to_json()
    stages = {s["stage"]: s for s in plan["stages"]}
    assert list(stages) == ["generate-prompts", "generate-sl"]
    prompts = stages["generate-prompts"]
    assert prompts["counts"] == {"seeds": 12, "requests": 2, "prompts_asked": 6,
                                 "feedback_passes": 12}  # both orders
    assert prompts["generated_tokens"] == 2 * 10 and prompts["seconds"] > 0
    assert prompts["prompt_tokens"] > 0
    assert stages["generate-sl"]["counts"]["prompts"] == 8  # 6 new + 3 seeds, limit 8
    assert not (tmp_path / "run").exists()
