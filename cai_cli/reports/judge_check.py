"""The report of ``cai judge-check``: agreement with known labels, per principle, position bias,
calibration and the cost of labelling, with a verdict in words; and its table.

No heavy imports here (``cai report`` reads it).
"""

from __future__ import annotations

from statistics import fmean

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.reports.statistics import (AGREEING, BIASED, expected_calibration_error,
                                        label_diagnostics, reliability_table, wilson_interval)

WEAK = 0.7  # agreement below this (but above chance): labels with a weak signal


def p_better(judgment: dict) -> float:
    """A judgment's probability of the better answer (``AB``: it was shown first)."""
    return judgment["p_first"] if judgment["order"] == "AB" else 1.0 - judgment["p_first"]


def build_report(config: Config, source: str, records: list[dict], timing: dict,
                 questions: int | None, principles: int, skipped: int = 0) -> dict:
    n = len(records)
    right = sum(r["p_better"] > 0.5 for r in records)
    ties = sum(r["p_better"] == 0.5 for r in records)
    low, high = wilson_interval(right, n)
    agreement = right / n if n else None

    by_principle: dict[str, dict[str, list[float]]] = {}
    for r in records:
        mine: dict[str, list[float]] = {}
        for j in r["judgments"]:
            mine.setdefault(j["principle"], []).append(p_better(j))
        for name, values in mine.items():
            by_principle.setdefault(name, {"p": []})["p"].append(fmean(values))
    per_principle = {}
    for name, entry in sorted(by_principle.items()):
        hits = sum(p > 0.5 for p in entry["p"])
        lo, hi = wilson_interval(hits, len(entry["p"]))
        per_principle[name] = {"agreement": round(hits / len(entry["p"]), 4),
                               "ci95": [round(lo, 4), round(hi, 4)], "pairs": len(entry["p"])}

    # As label-prefs would see these pairs: chosen = the judge's pick. Position figures and
    # order agreement do not depend on which answer is which.
    as_labels = [{"id": r["id"], "judgments": r["judgments"],
                  "p_chosen": max(r["p_better"], 1 - r["p_better"])} for r in records]
    figures = label_diagnostics(as_labels)
    firsts = [j["p_first"] for r in records for j in r["judgments"]]
    position = {
        "first_wins": figures["first_wins"],
        "mean_p_first": figures["position_bias"],
        "mean_p_second": round(1 - figures["position_bias"], 4) if firsts else None,
        "order_consistency": figures["order_agreement"],
        "judgments": len(firsts),
        "verdict": figures["verdict"],
    }

    bins = config.judge_check.reliability_bins
    confidence = [max(r["p_better"], 1 - r["p_better"]) for r in records]
    correct = [1.0 if r["p_better"] > 0.5 else 0.5 if r["p_better"] == 0.5 else 0.0
               for r in records]
    table = reliability_table(confidence, correct, bins, low=0.5) if records else []
    calibration = {
        "ece": round(expected_calibration_error(confidence, correct, bins, low=0.5), 4)
        if records else None,
        "mean_confidence": round(fmean(confidence), 4) if records else None,
        "bins": bins,
        "reliability": [{"bin": row["bin"], "pairs": row["count"],
                         "mean_confidence": round(row["mean_predicted"], 4),
                         "accuracy": round(row["mean_target"], 4)} for row in table],
    }

    per_question = (timing["seconds"] / timing["questions"]
                    if timing.get("seconds") and timing.get("questions") else None)
    cost = {
        "seconds_per_question": round(per_question, 4) if per_question else None,
        "label_prefs_questions": questions,
        "label_prefs_seconds": round(questions * per_question, 1)
        if questions is not None and per_question else None,
        "note": "the judging of label-prefs only (both orders of each principle of each pair), "
                "measured here on this machine; sampling the answers and loading models are not "
                "included",
    }
    report = {
        "pairs_source": source,
        "feedback_model": config.feedback_model.name_or_path,
        "principles_per_pair": principles,
        "pairs": n,
        "skipped": skipped,
        "agreement": round(agreement, 4) if agreement is not None else None,
        "ci95": [round(low, 4), round(high, 4)],
        "right": right,
        "ties": ties,
        "per_principle": per_principle,
        "position": position,
        "calibration": calibration,
        "cost": cost,
    }
    report["verdict"] = verdict(report)
    return report


def below_chance(report: dict) -> bool:
    """Whether the judge agrees with the labels below chance: its interval under 0.5, most pairs
    decided (not ties), so mostly against the labels."""
    n = report.get("pairs") or 0
    return bool(n) and report["ci95"][1] < 0.5 and report.get("ties", 0) < n / 2


def verdict(report: dict) -> str:
    """One honest sentence or two: do this judge's labels carry signal?"""
    n, agreement = report["pairs"], report["agreement"]
    if not n:
        return "no pairs were judged"
    low, high = report["ci95"]
    shown = f"agreement {agreement:.2f} [{low:.2f}, {high:.2f}] on {n} pairs"
    if below_chance(report):
        line = (f"{shown} is below chance: this judge consistently prefers the answers the labels "
                "call worse, a preference of its own that is not the one these pairs encode; "
                "check the constitution's comparison questions against the pairs, or use another "
                "feedback model (models.feedback)")
    elif low <= 0.5:
        line = (f"{shown} is not above chance: this judge's labels carry little signal; use a "
                "larger feedback model (models.feedback)")
        if n < 30:
            line += f" or judge more pairs ({n} give a wide interval)"
    elif agreement < WEAK:
        line = (f"{shown} is above chance but weak: many labels will be wrong; a larger feedback "
                "model (models.feedback) or worked examples (label_prefs.few_shot) should help")
    else:
        line = f"{shown}: this judge mostly picks the known better answer"
    position = report["position"]
    bias = position["mean_p_first"]
    consistency = position["order_consistency"]
    if bias is not None and (abs(bias - 0.5) > BIASED
                             or (consistency is not None and consistency < AGREEING)):
        line += (f". Its picks depend on the order the answers are shown in: the first option "
                 f"wins {position['first_wins']:.0%} of questions (mean probability "
                 f"{bias:.2f}) and its two orders pick the same answer for only "
                 f"{consistency or 0:.0%} of pair-principles")
    return line


def print_report(report: dict) -> None:
    from rich import box
    from rich.table import Table

    def ci(values: list[float]) -> str:
        return f"[{values[0]:.2f}, {values[1]:.2f}]"

    title = (f"judge-check: {report['feedback_model']} on {report['pairs']} labelled pairs "
             f"({report['pairs_source']}), {report['principles_per_pair']} principles per pair, "
             "both orders")
    table = Table(box=box.SIMPLE, show_header=True)
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("meaning")
    if report["agreement"] is not None:
        table.add_row("agreement", f"{report['agreement']:.2f} {ci(report['ci95'])}",
                      "picks the known better answer (95% Wilson interval; 0.50 is chance)")
    for name, entry in report["per_principle"].items():
        table.add_row(f"  {name}", f"{entry['agreement']:.2f} {ci(entry['ci95'])}",
                      f"{entry['pairs']} pair{'s' if entry['pairs'] != 1 else ''}")
    position = report["position"]
    if position["mean_p_first"] is not None:
        table.add_row("first option wins", f"{position['first_wins']:.2f}",
                      "share of questions (0.50 is no position bias)")
        table.add_row("mean p(first) / p(second)",
                      f"{position['mean_p_first']:.2f} / {position['mean_p_second']:.2f}",
                      "mean probability of each position")
        table.add_row("order consistency", f"{position['order_consistency'] or 0:.2f}",
                      "both orders pick the same answer (share of pair-principles)")
    calibration = report["calibration"]
    if calibration["ece"] is not None:
        table.add_row("ECE", f"{calibration['ece']:.3f}",
                      f"confidence vs accuracy, {calibration['bins']} bins over [0.5, 1]")
        for row in calibration["reliability"]:
            table.add_row(f"  confidence {row['bin']}",
                          f"{row['accuracy']:.2f}",
                          f"accuracy of {row['pairs']} pair{'s' if row['pairs'] != 1 else ''}, "
                          "mean confidence "
                          f"{row['mean_confidence']:.2f}")
    cost = report["cost"]
    if cost["seconds_per_question"]:
        table.add_row("seconds per question", f"{cost['seconds_per_question']:.3f}",
                      "measured here (one principle, one order)")
    if cost["label_prefs_seconds"] is not None:
        table.add_row("label-prefs judging", ui.duration(cost["label_prefs_seconds"]),
                      f"{cost['label_prefs_questions']:,} questions of the configured run")
    # The title is a line of its own, wrapped at the terminal's width (as the table's title it
    # would wrap at the table's width).
    ui.stdout.print(title, markup=False)
    ui.stdout.print(table)
    good = report["agreement"] is not None and report["ci95"][0] > 0.5 and \
        report["agreement"] >= WEAK and "depend on the order" not in report["verdict"]
    (ui.info if good else ui.warn)(report["verdict"])
