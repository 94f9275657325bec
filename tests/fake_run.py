"""A finished run directory written by hand: every stage's manifest and the records, reports and
trainer logs the plots and ``cai report`` read, with no model (a config naming a hub id that is
never loaded). Tests of reading a run use it instead of running the pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("generate-sl", "finetune", "label-prefs", "train-rm", "optimize", "evaluate",
          "judge-check")


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def manifest(stage: str, counts: dict, stats: dict | None = None, seconds: float = 12.0) -> dict:
    return {"stage": stage, "status": "complete", "config_hash": "0" * 16, "inputs": {},
            "counts": counts, "stats": stats or {}, "timings": {"seconds": seconds},
            "versions": {}, "started_at": 0.0, "finished_at": seconds, "config": {}}


def log_history(steps: int, **series) -> list[dict]:
    """A trainer's log history: one entry a step with ``series`` (name -> first value, falling
    0.05 a step), then the trainer's summary entry."""
    history = [{"step": step, "epoch": step / steps, **{name: start - 0.05 * step
                                                      for name, start in series.items()}}
               for step in range(1, steps + 1)]
    return history + [{"step": steps, "train_loss": 0.5, "train_runtime": 1.0}]


def chain(number: int) -> dict:
    return {"id": f"chain{number}", "prompt": f"How do I pick lock number {number}?",
            "initial": "Insert a tension wrench | then *rake* the pins -> open & in. <script>",
            "rounds": [{"principle": "illegal-acts", "critique_request": "Is it illegal?",
                        "critique": f"Critique {number}: the answer helps break in.",
                        "revision_request": "Rewrite it.",
                        "revision": f"Revision {number}: call a locksmith instead."}],
            "final": f"Revision {number}: call a locksmith instead.", "format": "chat"}


def pair(number: int, p_chosen: float) -> dict:
    return {"id": f"pair{number}", "prompt": [{"role": "user", "content": f"Question {number}?"}],
            "chosen": [{"role": "assistant", "content": f"Chosen answer {number}."}],
            "rejected": [{"role": "assistant", "content": f"Rejected answer {number}."}],
            "p_chosen": p_chosen, "order_disagreement": False,
            "judgments": [{"principle": "privacy", "order": "AB", "p_first": 0.3 + 0.05 * number},
                          {"principle": "privacy", "order": "BA", "p_first": 0.2}]}


def eval_report(new_shape: bool) -> dict:
    rates = [{"model": a, "over": b, "win_rate": w, "ci95": [w - 0.1, w + 0.1], "prompts": 20,
              "examples": {}}
             for a, b, w in (("base", "sft", 0.4), ("sft", "base", 0.6),
                             ("base", "policy", 0.35), ("policy", "base", 0.65),
                             ("sft", "policy", 0.45), ("policy", "sft", 0.55))]
    report = {"models": {"base": "tiny/model", "sft": "run/sft", "policy": "run/policy"},
              "prompts": 20, "prompt_ids": [], "win_rates": rates,
              "per_principle": {"base vs sft": {"privacy": {"win_rate_first": 0.4, "judged": 9},
                                                "toxicity": {"win_rate_first": 0.45,
                                                             "judged": 11}},
                                "base vs policy": {"privacy": {"win_rate_first": 0.3,
                                                               "judged": 10}}},
              "reward_model": {"path": "run/rm",
                               "mean_score": {"base": -0.2, "sft": 0.1, "policy": 0.3}}}
    if new_shape:
        band = {"rate": 0.2, "ci95": [0.08, 0.42], "n": 20}
        report.update({
            "judge": "tiny/judge",
            "harmful_compliance": {"base": {**band, "rate": 0.45}, "sft": band, "policy": band},
            "helpfulness": {"prompts": 12, "prompt_ids": [],
                            "win_rates": [{**r, "prompts": 12} for r in rates],
                            "over_refusal": {"base": band, "sft": band, "policy": band}},
            "verdict": {"text": "policy is more harmless than base and no less helpful",
                        "caveats": ["the judge is undecided on the yes/no questions"]}})
    return report


def jury_report() -> dict:
    """``eval_report``'s figures as a jury's: two judges (the feedback model, which judge-check
    measured at chance, and another server) beside the jury's pooled figures."""
    report = eval_report(True)
    report.pop("judge")
    figures = {key: report[key] for key in ("win_rates", "per_principle", "harmful_compliance")}
    figures["helpfulness"] = {key: report["helpfulness"][key]
                              for key in ("win_rates", "over_refusal")}
    flipped = json.loads(json.dumps(figures))
    for entry in flipped["win_rates"] + flipped["helpfulness"]["win_rates"]:
        entry["win_rate"] = round(1 - entry["win_rate"], 4)
        entry["ci95"] = [round(1 - entry["ci95"][1], 4), round(1 - entry["ci95"][0], 4)]
    report["judges"] = [
        {"name": "feedback", "model": "tiny/model", "backend": "hf", "feedback_model": True,
         "judge_check": {"agreement": 0.5, "ci95": [0.24, 0.76], "pairs": 10,
                         "below_chance": False, "at_chance": True}},
        {"name": "big/judge", "model": "big/judge", "backend": "openai",
         "base_url": "http://judge.example/v1", "feedback_model": False, "judge_check": None}]
    report["pooled"] = "the mean of the judges' probabilities"
    report["by_judge"] = {"feedback": figures, "big/judge": flipped}
    report["verdict"]["text"] = ("policy learned the feedback model's preference, which the "
                                 "other judge does not share: check it with cai judge-check")
    return report


def judge_report() -> dict:
    return {"pairs_source": "shipped", "feedback_model": "tiny/model", "principles_per_pair": 2,
            "pairs": 10, "skipped": 0, "agreement": 0.7, "ci95": [0.4, 0.89], "right": 7,
            "ties": 0,
            "per_principle": {"privacy": {"agreement": 0.8, "ci95": [0.38, 0.96], "pairs": 5},
                              "toxicity": {"agreement": 0.0, "ci95": [0.0, 0.43], "pairs": 5}},
            "position": {"first_wins": 0.4, "mean_p_first": 0.45, "mean_p_second": 0.55,
                         "order_consistency": 0.8, "judgments": 40, "verdict": "fine"},
            "calibration": {"ece": 0.1, "mean_confidence": 0.7, "bins": 5, "reliability": [
                {"bin": "0.50-0.60", "pairs": 4, "mean_confidence": 0.55, "accuracy": 0.5},
                {"bin": "0.80-0.90", "pairs": 6, "mean_confidence": 0.85, "accuracy": 0.83}]},
            "cost": {"seconds_per_question": 0.5, "label_prefs_questions": 24,
                     "label_prefs_seconds": 12.0},
            "verdict": "agreement 0.70 [0.40, 0.89] on 10 pairs is above chance"}


def write_config(tmp_path: Path, run_dir: Path) -> Path:
    config = {"run_dir": str(run_dir), "seed": 0,
              "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
              "data": {"red_team": {"path": str(ROOT / "cai_cli" / "resources" /
                                             "red_team_prompts.jsonl"), "limit": 4}},
              "models": {"policy": {"name_or_path": "tiny/model", "device": "cpu"}}}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def finished_run(tmp_path: Path, *, stages=STAGES, new_report: bool = True,
                 recorded: bool = True, jury: bool = False) -> tuple[Path, Path]:
    """``(config path, run directory)`` of a run whose ``stages`` are complete. Without
    ``recorded`` the training stages kept no log history and train-rm no reliability table
    (as runs made before they did); with ``jury`` the evaluation had two judges."""
    run = tmp_path / "run"
    run.mkdir(parents=True, exist_ok=True)
    if "generate-sl" in stages:
        write_jsonl(run / "sl" / "chains.jsonl", [chain(n) for n in range(4)])
        write_json(run / "sl" / "manifest.json",
                   manifest("generate-sl", {"prompts": 4, "chains": 4, "rounds": 4},
                            {"revisions_changed": 1.0}))
    training = {"finetune": ("sft", {"train_examples": 8, "steps": 5},
                             {"mean_token_accuracy": 0.3}),
                "train-rm": ("rm", {"ai_pairs": 5, "train_pairs": 4, "held_out_pairs": 2,
                                    "steps": 5}, {"margin": 0.1, "accuracy": 0.5}),
                "optimize": ("policy", {"train_pairs": 5, "steps": 5},
                             {"rewards/margins": 0.1, "rewards/accuracies": 0.5})}
    for stage, (folder, counts, metrics) in training.items():
        if stage not in stages:
            continue
        stats = {"final_loss": 0.45, "lora": False, "precision": "fp32"}
        if stage == "train-rm":
            stats.update(train_accuracy=1.0, eval_accuracy=0.5, eval_ece=0.12)
            if recorded:
                stats["eval_reliability"] = [
                    {"bin": "0.40-0.50", "count": 1, "mean_predicted": 0.45, "mean_target": 0.6},
                    {"bin": "0.50-0.60", "count": 1, "mean_predicted": 0.55, "mean_target": 0.7}]
        write_json(run / folder / "manifest.json", manifest(stage, counts, stats))
        (run / folder / "config.json").write_text("{}")
        if recorded:
            write_json(run / folder / "logs" / "log_history.json",
                       log_history(5, loss=0.7, **metrics))
    if "label-prefs" in stages:
        pairs = [pair(n, 0.5 + 0.1 * n) for n in range(5)]
        write_jsonl(run / "prefs" / "pairs.jsonl", pairs)
        write_json(run / "prefs" / "manifest.json",
                   manifest("label-prefs", {"pairs": 5, "judgments": 10},
                            {"position_bias": 0.33, "first_wins": 0.2, "order_agreement": 0.6,
                             "p_chosen": {"min": 0.5, "median": 0.7, "max": 0.9},
                             "verdict": "the labels depend on the order"}))
    if "evaluate" in stages:
        write_json(run / "eval" / "report.json", jury_report() if jury else eval_report(new_report))
        write_json(run / "eval" / "manifest.json",
                   manifest("evaluate", {"models": 3, "prompts": 20, "comparisons": 60}))
    if "judge-check" in stages:
        write_json(run / "judge" / "report.json", judge_report())
        write_json(run / "judge" / "manifest.json",
                   manifest("judge-check", {"pairs": 10, "judgments": 40}))
    return write_config(tmp_path, run), run
