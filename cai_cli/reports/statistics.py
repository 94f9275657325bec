"""The statistics the reports share: what the labels say about the judge (position bias, order
agreement, how sure the labels are), calibration, and the intervals (Wilson, bootstrap).

A feedback model that picks by position (always the second option, say) gives each pair a label
near 0.5 once both orders are averaged: the labels then carry little signal, and the reward model
and DPO learn noise. label-prefs records these figures in its manifest and ``cai inspect`` shows
them, with what they mean.

No heavy imports here (``cai inspect`` uses it).
"""

from __future__ import annotations

import random
from statistics import fmean, median

# Bins of p_chosen (always >= 0.5): how sure the order-averaged labels are.
P_CHOSEN_BINS = (0.5, 0.55, 0.6, 0.7, 0.8, 0.9, 1.0)
BIASED = 0.15  # |mean p_first - 0.5| above this: the judge prefers a position
AGREEING = 0.6  # order agreement below this: the orders often disagree


def label_diagnostics(pairs: list[dict]) -> dict:
    """Figures over pair records (``records.Pair`` as dicts): ``position_bias`` (mean probability
    of the option shown first; 0.5 is none), ``first_wins`` (share of judgments the first option
    wins), ``order_agreement`` (share of pair-principles whose two orders pick the same answer),
    ``p_chosen`` quantiles and histogram, and a ``verdict`` in words."""
    judgments = [j for pair in pairs for j in pair.get("judgments", [])]
    firsts = [float(j["p_first"]) for j in judgments]
    both: dict[tuple[str, str], dict[str, float]] = {}
    for pair in pairs:
        for j in pair.get("judgments", []):
            both.setdefault((pair["id"], j["principle"]), {})[j["order"]] = float(j["p_first"])
    # AB: chosen shown first, so p_first is p(chosen); BA: p_first is p(rejected).
    agree = [(orders["AB"] > 0.5) == (orders["BA"] < 0.5) for orders in both.values()
             if len(orders) == 2]
    labels = sorted(float(pair["p_chosen"]) for pair in pairs)
    out = {
        "position_bias": round(fmean(firsts), 4) if firsts else None,
        "first_wins": round(sum(p > 0.5 for p in firsts) / len(firsts), 4) if firsts else None,
        "order_agreement": round(sum(agree) / len(agree), 4) if agree else None,
        "p_chosen": quantiles(labels),
        "p_chosen_histogram": histogram(labels),
    }
    out["verdict"] = verdict(out)
    return out


def quantiles(values: list[float]) -> dict | None:
    if not values:
        return None
    def at(q: float) -> float:
        return round(values[min(len(values) - 1, int(q * len(values)))], 4)
    return {"min": round(values[0], 4), "p25": at(0.25), "median": round(median(values), 4),
            "p75": at(0.75), "max": round(values[-1], 4)}


def histogram(values: list[float]) -> dict[str, int]:
    bins = list(zip(P_CHOSEN_BINS, P_CHOSEN_BINS[1:]))
    counts = {f"{low:.2f}-{high:.2f}": 0 for low, high in bins}
    for value in values:
        for low, high in bins:
            if low <= value < high or (high == 1.0 and value == 1.0):
                counts[f"{low:.2f}-{high:.2f}"] += 1
                break
    return counts


def verdict(figures: dict) -> str:
    """One or two sentences: can these labels be trusted, and what to do if not."""
    bias, agreement = figures["position_bias"], figures["order_agreement"]
    if bias is None:
        return "no judgments"
    problems = []
    if abs(bias - 0.5) > BIASED:
        side = "first" if bias > 0.5 else "second"
        problems.append(f"the feedback model favours the option shown {side} (mean probability "
                        f"of the first option {bias:.2f}; 0.50 is no bias)")
    if agreement is not None and agreement < AGREEING:
        problems.append(f"its two orders pick the same answer for only {agreement:.0%} of "
                        "pair-principles")
    if not problems:
        return "the feedback model's choices do not depend much on the order of the answers"
    median_label = (figures["p_chosen"] or {}).get("median")
    return ("; ".join(problems) + ": it picks largely by position, so after averaging both "
            f"orders the labels sit near 0.5 (median p_chosen {median_label}) and carry little "
            "signal. Use a larger or stronger feedback model (models.feedback), check it with "
            "more worked comparison examples (label_prefs.few_shot), or train on these labels "
            "only with train_rm.min_confidence / optimize.min_confidence filtering the near-ties.")


# ---------------------------------------------------------------------------------------------
# Against known labels (train-rm's held-out pairs, judge-check's labelled pairs)


def reliability_table(predicted: list[float], target: list[float], bins: int = 10,
                      low: float = 0.0) -> list[dict]:
    """Equal-width bins of the predicted probability over [``low``, 1]: per filled bin its
    range, ``count``, ``mean_predicted`` and ``mean_target`` (how often the prediction came
    true, for 0/1 targets)."""
    filled: dict[int, list[tuple[float, float]]] = {}
    width = (1.0 - low) / bins
    for q, p in zip(predicted, target):
        filled.setdefault(max(0, min(int((q - low) / width), bins - 1)), []).append((q, p))
    return [{"bin": f"{low + index * width:.2f}-{low + (index + 1) * width:.2f}",
             "count": len(items),
             "mean_predicted": fmean(q for q, _ in items),
             "mean_target": fmean(p for _, p in items)}
            for index, items in sorted(filled.items())]


def expected_calibration_error(predicted: list[float], target: list[float], bins: int = 10,
                               low: float = 0.0) -> float:
    """ECE over ``bins`` equal-width bins of the predicted probability in [``low``, 1]:
    sum over bins |bin| / N * |mean predicted - mean target|."""
    return sum(row["count"] / len(predicted) * abs(row["mean_predicted"] - row["mean_target"])
               for row in reliability_table(predicted, target, bins, low))


def wilson_interval(successes: float, total: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): unlike the normal
    approximation it stays inside [0, 1] and is honest at 0 or ``total`` successes."""
    if total == 0:
        return 0.0, 1.0
    share = successes / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    spread = (share * (1 - share) / total + z * z / (4 * total * total)) ** 0.5
    half = z * spread / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_interval(values: list[float], resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling the values with replacement."""
    rng = random.Random(seed)
    means = sorted(fmean(rng.choices(values, k=len(values))) for _ in range(resamples))
    return means[int(0.025 * (resamples - 1))], means[int(round(0.975 * (resamples - 1)))]
