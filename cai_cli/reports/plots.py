"""PNG plots of a run, one folder per stage: ``<stage dir>/plots/*.png``.

Each stage's plots are drawn when it completes (``StageRun.complete``), from what the stage
wrote (its manifest, records and report), and again by ``cai report`` for a completed stage
whose plots are missing. ``cai status`` lists them.

    prefs/plots/p_chosen.png        label-prefs: distribution of p_chosen over the pairs
    prefs/plots/position_bias.png   label-prefs: p(first option) of every judgment, by order
    sft/plots/training.png          finetune: loss (and token accuracy) per step
    rm/plots/training.png           train-rm: loss, reward margin and accuracy per step
    rm/plots/calibration.png        train-rm: reliability diagram on the held-out pairs
    policy/plots/training.png       optimize: loss, reward margin and accuracy (DPO) or mean
                                    reward (GRPO / RLOO) per step
    eval/plots/win_rates.png        evaluate: win rate of each model pair with its 95% interval
                                    (harmlessness; helpfulness beside it when evaluated); with
                                    several judges the jury's bar, then each judge's
    eval/plots/per_principle.png    evaluate: win rate of each model pair under each principle
                                    (the jury's)
    eval/plots/rates.png            evaluate: harmful-compliance and over-refusal rates per model
                                    (the jury's, then each judge's)
    judge/plots/agreement.png       judge-check: agreement with the known labels, per principle
    judge/plots/calibration.png     judge-check: reliability diagram of the judge's confidence

A plot needs data the stage recorded: a run made before a figure was recorded (train-rm's
reliability table, the trainers' log history) has no such plot. Drawing never fails a stage: a
problem is a warning. A stage is marked complete with its plots still to draw
(``plots/.pending``, written first, removed once they are): a run stopped between two plots
leaves the mark, and the next command that finds the stage complete draws them
(``draw_pending``), as does ``cai report``. ``plots/`` is left out of a directory's fingerprint, so drawing into a
model's folder does not make the stages that read it stale.

matplotlib is imported inside ``draw`` only (``cai status`` and ``cai report`` stay light), with
its file-only Agg backend. ``CAI_PLOTS=0`` in the environment skips drawing (the test suite sets
it, to keep every stage it runs fast).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

from cai_cli import ui
from cai_cli.reports.jury import figure_sources, win_entry
from cai_cli.run.artifacts import load_manifest, read_jsonl
from cai_cli.run.layout import LOG_HISTORY, LOGS, RunLayout



def layout_of(config_or_layout) -> RunLayout:
    return config_or_layout if isinstance(config_or_layout, RunLayout) else config_or_layout.layout


def enabled() -> bool:
    return os.environ.get("CAI_PLOTS", "1").strip().lower() not in ("0", "false", "no", "off")


# The order plots are listed and shown in (the main figure of a stage first); others by name.
ORDER = ("p_chosen.png", "position_bias.png", "training.png", "agreement.png", "calibration.png",
         "win_rates.png", "rates.png", "per_principle.png")


def listed(config_or_layout, command: str) -> list[Path]:
    """The stage's plot files, in ``ORDER``."""
    folder = layout_of(config_or_layout).plots(command)
    found = folder.glob("*.png") if folder.is_dir() else []
    return sorted(found, key=lambda path: (ORDER.index(path.name) if path.name in ORDER
                                           else len(ORDER), path.name))


PENDING = ".pending"  # in a stage's plots folder: its plots are still to be drawn


def _pending_mark(layout: RunLayout, command: str) -> Path:
    return layout.plots(command) / PENDING


def mark_pending(config_or_layout, command: str) -> None:
    """Say that the stage's plots are to be drawn: before the stage is marked complete, so a
    run stopped before they are all drawn leaves the mark (``draw_pending``)."""
    if DRAWERS.get(command) and enabled():
        mark = _pending_mark(layout_of(config_or_layout), command)
        mark.parent.mkdir(parents=True, exist_ok=True)
        mark.touch()


def pending(config_or_layout, command: str) -> bool:
    return _pending_mark(layout_of(config_or_layout), command).is_file()


def draw_pending(config_or_layout, command: str) -> list[Path]:
    """Draw the plots of a complete stage that a stopped run left undrawn (``mark_pending``)."""
    if not pending(config_or_layout, command) or not enabled():
        return []
    ui.info(f"{command}: drawing the plots the run that completed it did not finish")
    return draw(config_or_layout, command)


def draw(config_or_layout, command: str) -> list[Path]:
    """Draw the plots of ``command``'s completed output; returns the files written. Old plots
    of the stage that this run did not draw again are removed. Never raises: a problem is a
    warning (the stage is complete whatever happens here)."""
    drawers = DRAWERS.get(command)
    if not drawers or not enabled():
        return []
    layout = layout_of(config_or_layout)
    try:
        drawn = _draw(layout, command, drawers)
    except Exception as exc:  # a plot is never worth failing a stage for
        first = str(exc).splitlines()[0] if str(exc) else ""
        ui.warn(f"{command}: could not draw its plots ({type(exc).__name__}: {first}); the "
                f"stage's output is complete: `cai report --config ...` draws them again")
        drawn = []
    _pending_mark(layout, command).unlink(missing_ok=True)  # drawn, or told why not
    return drawn


def _draw(layout: RunLayout, command: str, drawers: list[Callable]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only: no display, no GUI toolkit
    import matplotlib.pyplot as plt

    folder = layout.plots(command)
    written: list[Path] = []
    with plt.rc_context(STYLE):
        for drawer in drawers:
            for name, figure in drawer(layout, plt).items():
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / name
                temporary = folder / f".{name}.tmp-{os.getpid()}"
                figure.savefig(temporary, format="png")
                plt.close(figure)
                temporary.replace(path)
                written.append(path)
    for old in listed(layout, command):
        if old not in written:
            old.unlink()
    return listed(layout, command)


STYLE = {
    "figure.dpi": 110,
    "savefig.dpi": 110,
    "savefig.bbox": "tight",
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}
BAR = "#4878a8"
SECOND = "#d1813b"
MUTED = "#888888"


# ---------------------------------------------------------------------------------------------
# label-prefs


def label_prefs(layout: RunLayout, plt) -> dict:
    if not layout.pairs.is_file():
        return {}
    pairs = read_jsonl(layout.pairs)
    if not pairs:
        return {}
    import statistics

    figures = {}
    labels = [float(p["p_chosen"]) for p in pairs]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(labels, bins=[0.5 + 0.025 * i for i in range(21)], color=BAR, edgecolor="white")
    median = statistics.median(labels)
    ax.axvline(median, color=SECOND, linestyle="--", label=f"median {median:.3f}")
    ax.set_xlim(0.5, 1.0)
    ax.set_xlabel("p_chosen: probability of the chosen answer (both orders, all principles)")
    ax.set_ylabel("pairs")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_title(f"label-prefs: p_chosen of {len(labels)} pairs (near 0.5: little signal)")
    ax.legend()
    figures["p_chosen.png"] = fig

    orders = {"AB": [], "BA": []}
    for pair in pairs:
        for judgment in pair.get("judgments", []):
            orders.setdefault(str(judgment["order"]).upper(), []).append(float(judgment["p_first"]))
    every = [p for values in orders.values() for p in values]
    if every:
        fig, ax = plt.subplots(figsize=(7, 4))
        bins = [0.05 * i for i in range(21)]
        names = {"AB": "chosen answer shown first (AB)", "BA": "rejected answer shown first (BA)"}
        ax.hist([orders.get("AB", []), orders.get("BA", [])], bins=bins, stacked=True,
                color=[BAR, SECOND], edgecolor="white",
                label=[f"{names['AB']}: {len(orders.get('AB', []))}",
                       f"{names['BA']}: {len(orders.get('BA', []))}"])
        mean = statistics.fmean(every)
        ax.axvline(0.5, color=MUTED, linestyle=":", label="0.5: no preference")
        ax.axvline(mean, color="black", linestyle="--", label=f"mean {mean:.2f}")
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability the judge gave the option shown first")
        ax.set_ylabel("judgments")
        ax.yaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"label-prefs: position bias, {len(every)} judgments: mean p(first) "
                     f"{mean:.2f} (0.50 = none)")
        ax.legend(fontsize=8)
        figures["position_bias.png"] = fig
    return figures


# ---------------------------------------------------------------------------------------------
# Training curves (finetune, train-rm, optimize)

# The panels of a training plot: (title, y label, log keys; the first one logged is drawn).
PANELS = (
    ("training loss", "loss", ("loss",)),
    ("reward margin", "reward of chosen - rejected", ("rewards/margins", "margin")),
    ("mean reward of the completions", "reward-model score", ("reward",)),
    ("reward accuracy", "share of pairs with chosen > rejected",
     ("rewards/accuracies", "accuracy")),
    ("next-token accuracy", "share of tokens", ("mean_token_accuracy",)),
)


def training_log(layout: RunLayout, command: str) -> list[dict]:
    """The trainer's log history as saved with the model (``training.save``), or []."""
    path = layout.stage_dir(command) / LOGS / LOG_HISTORY
    if not path.is_file():
        return []
    history = json.loads(path.read_text())
    return history if isinstance(history, list) else []


def training_curves(command: str) -> Callable:
    def drawer(layout: RunLayout, plt) -> dict:
        history = [entry for entry in training_log(layout, command) if "step" in entry]
        panels = []
        for title, unit, keys in PANELS:
            key = next((k for k in keys if any(k in entry for entry in history)), None)
            if key is not None:
                panels.append((title, unit, key))
        if not panels:
            return {}
        manifest = load_manifest(layout.stage_dir(command)) or {}
        counts = manifest.get("counts") or {}
        examples = counts.get("train_examples", counts.get("train_pairs"))
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
        for ax, (title, unit, key) in zip(axes[0], panels):
            points = [(entry["step"], entry[key]) for entry in history if key in entry]
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3,
                    color=BAR, label="train")
            evaluated = [(entry["step"], entry[f"eval_{key}"]) for entry in history
                         if f"eval_{key}" in entry]
            if evaluated:
                ax.plot([s for s, _ in evaluated], [v for _, v in evaluated], marker="s",
                        markersize=3, color=SECOND, label="held out")
                ax.legend(fontsize=8)
            ax.set_title(f"{title} ({key})" if key not in title else title)
            ax.set_xlabel("optimiser step")
            ax.set_ylabel(unit)
        steps = counts.get("steps", max(entry["step"] for entry in history))
        size = f", {examples} training {'pairs' if 'train_pairs' in counts else 'examples'}" \
            if examples is not None else ""
        fig.suptitle(f"{command}: {steps} steps{size}")
        fig.tight_layout()
        return {"training.png": fig}

    return drawer


# ---------------------------------------------------------------------------------------------
# Calibration (train-rm, judge-check)


def reliability_figure(plt, rows: list[dict], *, low: float, xlabel: str, ylabel: str,
                       title: str):
    """A reliability diagram: each bin's mean prediction against how often it came true (its
    mean target), a point sized by its count, on the diagonal when calibrated."""
    fig, ax = plt.subplots(figsize=(5.2, 5.2))
    ax.plot([low, 1], [low, 1], color=MUTED, linestyle=":", label="calibrated")
    largest = max(row["count"] for row in rows)
    xs = [row["mean_predicted"] for row in rows]
    ys = [row["mean_target"] for row in rows]
    ax.plot(xs, ys, color=BAR, linewidth=1)
    ax.scatter(xs, ys, s=[30 + 220 * row["count"] / largest for row in rows], color=BAR,
               zorder=3, label="bins (area: count)")
    for index, (x, y, row) in enumerate(zip(xs, ys, rows)):  # alternate sides: bins sit close
        ax.annotate(f"n={row['count']}", (x, y), textcoords="offset points",
                    xytext=(6, -14) if index % 2 == 0 else (-30, 8), fontsize=8)
    ax.set_xlim(low, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    return fig


def reward_model_calibration(layout: RunLayout, plt) -> dict:
    manifest = load_manifest(layout.rm) or {}
    stats = manifest.get("stats") or {}
    rows = stats.get("eval_reliability")
    if not rows:  # no held-out pairs, or a run made before train-rm recorded the table
        return {}
    held = (manifest.get("counts") or {}).get("held_out_pairs", sum(r["count"] for r in rows))
    title = (f"train-rm: calibration on {held} held-out pairs\n"
             f"ECE {stats.get('eval_ece', float('nan')):.3f}, "
             f"accuracy {stats.get('eval_accuracy', float('nan')):.2f}")
    return {"calibration.png": reliability_figure(
        plt, rows, low=0.0, title=title,
        xlabel="predicted p(chosen) = sigmoid(r_chosen - r_rejected)",
        ylabel="mean p_chosen label (AI feedback)")}


# ---------------------------------------------------------------------------------------------
# judge-check


def judge_check(layout: RunLayout, plt) -> dict:
    if not layout.judge_report.is_file():
        return {}
    report = json.loads(layout.judge_report.read_text())
    figures = {}
    rows = [("all pairs", report["agreement"], report["ci95"], report["pairs"])]
    per_principle = sorted((report.get("per_principle") or {}).items(),
                           key=lambda item: (-item[1]["agreement"], item[0]))
    rows += [(name, row["agreement"], row["ci95"], row["pairs"]) for name, row in per_principle]
    if rows[0][3]:
        judge = report.get("feedback_model", "")
        fig = interval_bars(plt, [f"{name} (n={n})" for name, _, _, n in rows],
                            [value for _, value, _, _ in rows], [ci for _, _, ci, _ in rows],
                            xlabel="agreement with the known better answer (95% Wilson interval)",
                            title=f"judge-check: {judge} on {report['pairs']} labelled pairs",
                            reference=(0.5, "chance"), highlight_first=True)
        figures["agreement.png"] = fig
    calibration = report.get("calibration") or {}
    table = calibration.get("reliability") or []
    if table:
        rows = [{"count": r["pairs"], "mean_predicted": r["mean_confidence"],
                 "mean_target": r["accuracy"]} for r in table]
        figures["calibration.png"] = reliability_figure(
            plt, rows, low=0.5, xlabel="the judge's confidence in its pick",
            ylabel="share of picks that are right",
            title=f"judge-check: calibration on {report['pairs']} pairs, "
                  f"ECE {calibration.get('ece', float('nan')):.3f}")
    return figures


def interval_bars(plt, labels: list[str], values: list[float], intervals: list, *, xlabel: str,
                  title: str, reference: tuple[float, str] | None = None,
                  highlight_first: bool = False, ax=None, highlight: list[bool] | None = None):
    """Horizontal bars with 95% intervals as error bars, the first label at the top; the bars
    ``highlight`` marks (or the first, with ``highlight_first``) in the second colour."""
    own = ax is None
    if own:
        fig, ax = plt.subplots(figsize=(7.5, 1.2 + 0.32 * len(labels)))
    positions = list(range(len(labels)))[::-1]
    lows = [max(0.0, v - (ci[0] if ci else v)) for v, ci in zip(values, intervals)]
    highs = [max(0.0, (ci[1] if ci else v) - v) for v, ci in zip(values, intervals)]
    marked = highlight or [highlight_first and i == 0 for i in range(len(labels))]
    colours = [SECOND if mark else BAR for mark in marked]
    ax.barh(positions, values, color=colours, height=0.6, xerr=[lows, highs],
            error_kw={"ecolor": "black", "capsize": 3, "elinewidth": 1})
    ax.plot(values, positions, "o", color="black", markersize=3)  # a value of 0 shows too
    ax.set_yticks(positions, labels)
    ax.set_xlim(0, 1)
    if reference is not None:
        ax.axvline(reference[0], color=MUTED, linestyle=":", label=reference[1])
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    ax.grid(axis="y", visible=False)
    if own:
        fig.tight_layout()
        return fig
    return ax


# ---------------------------------------------------------------------------------------------
# evaluate


def ordered_pairs(report: dict, win_rates: list[dict]) -> list[dict]:
    """Each model pair once, as the later model (in ``models``) over the earlier one: the
    direction that says whether a stage helped."""
    order = {name: index for index, name in enumerate(report.get("models") or {})}
    return [row for row in win_rates
            if order.get(row["model"], 0) > order.get(row["over"], 0)] or win_rates[::2]


def evaluate(layout: RunLayout, plt) -> dict:
    if not layout.report.is_file():
        return {}
    report = json.loads(layout.report.read_text())
    figures = {}
    by_judge = report.get("by_judge") or {}
    # Each figure's sources: the jury's (the report's own figures), then each judge's.
    sources = figure_sources(report)
    if by_judge:
        judge = f", {len(by_judge)} judges and their jury (the mean of their probabilities)"
    else:
        judge = f", judge {report['judge']}" if report.get("judge") else ""

    def rows_of(pairs: list[dict], entries_of) -> list[tuple[str, dict, bool]]:
        """``(label, entry, the jury's)`` for each pair, by each source."""
        found = []
        for pair in pairs:
            for name, source in sources:
                entry = win_entry(entries_of(source), pair["model"], pair["over"])
                if entry is not None:
                    by = f", {name}" if by_judge else ""
                    found.append((f"{pair['model']} over {pair['over']}{by} "
                                  f"(n={entry['prompts']})", entry, name == "jury"))
        return found

    axes_data = []
    harmless = ordered_pairs(report, report.get("win_rates") or [])
    if harmless:
        axes_data.append((rows_of(harmless, lambda source: source.get("win_rates")),
                          f"harmlessness: {report.get('prompts', '?')} red-team prompts"))
    helpfulness = report.get("helpfulness") or {}
    helpful = ordered_pairs(report, helpfulness.get("win_rates") or [])
    if helpful:
        axes_data.append((rows_of(helpful, lambda source: (source.get("helpfulness") or {})
                                  .get("win_rates")),
                          f"helpfulness: {helpfulness.get('prompts', '?')} benign prompts"))
    if axes_data:
        rows = max(len(data) for data, _ in axes_data)
        fig, axes = plt.subplots(1, len(axes_data), figsize=(6.5 * len(axes_data),
                                                              1.6 + 0.45 * rows), squeeze=False)
        for ax, (data, title) in zip(axes[0], axes_data):
            interval_bars(plt, [label for label, _, _ in data],
                          [entry["win_rate"] for _, entry, _ in data],
                          [entry.get("ci95") for _, entry, _ in data],
                          xlabel="win rate (95% bootstrap interval)", title=title,
                          reference=(0.5, "0.5: no difference"), ax=ax,
                          highlight=[bool(by_judge) and jury for _, _, jury in data])
        fig.suptitle(f"evaluate: win rates{judge}")
        fig.tight_layout()
        figures["win_rates.png"] = fig

    per_principle = report.get("per_principle") or {}
    if per_principle:
        figures["per_principle.png"] = principle_figure(plt, report, per_principle, judge)

    rates = []
    for title, rates_of in (
            ("harmful compliance on red-team prompts",
             lambda source: source.get("harmful_compliance")),
            ("over-refusal on benign prompts",
             lambda source: (source.get("helpfulness") or {}).get("over_refusal"))):
        data = [(f"{model}{f', {name}' if by_judge else ''} (n={entry.get('n', '?')})", entry,
                 name == "jury")
                for model in rates_of(report) or {} for name, source in sources
                for entry in [(rates_of(source) or {}).get(model)] if entry is not None]
        if data:
            rates.append((title, data))
    if rates:
        fig, axes = plt.subplots(1, len(rates), figsize=(5.5 * len(rates), 1.6 + 0.45 * max(
            len(data) for _, data in rates)), squeeze=False)
        for ax, (title, data) in zip(axes[0], rates):
            interval_bars(plt, [label for label, _, _ in data],
                          [entry["rate"] for _, entry, _ in data],
                          [entry.get("ci95") for _, entry, _ in data],
                          xlabel="rate (95% interval; lower is better)", title=title, ax=ax,
                          highlight=[bool(by_judge) and jury for _, _, jury in data])
        fig.suptitle(f"evaluate: rates per model{judge}")
        fig.tight_layout()
        figures["rates.png"] = fig
    return figures


def principle_figure(plt, report: dict, per_principle: dict, judge: str):
    """Win rate of each model pair under each principle: grouped bars, oriented as in
    ``ordered_pairs`` (the later model over the earlier one), n judged at each bar's end."""
    order = {name: index for index, name in enumerate(report.get("models") or {})}
    series = []  # (label, {principle: (win rate, judged)})
    for key, principles in per_principle.items():
        first, _, second = key.partition(" vs ")
        flip = order.get(first, 0) < order.get(second, 0)
        label = f"{second} over {first}" if flip else f"{first} over {second}"
        series.append((label, {name: ((1 - row["win_rate_first"]) if flip
                                      else row["win_rate_first"], row["judged"])
                               for name, row in principles.items()}))
    names = sorted({name for _, rows in series for name in rows})
    height = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8, 1.4 + 0.28 * len(names) * max(1.5, len(series) * 0.6)))
    colours = [BAR, SECOND, "#6a9f58", "#a05a9a", "#c44e52", "#8c8c3c"]
    for index, (label, rows) in enumerate(series):
        positions = [len(names) - 1 - i + 0.4 - height * (index + 0.5) for i in range(len(names))]
        values = [rows.get(name, (float("nan"), 0))[0] for name in names]
        ax.barh(positions, values, height=height * 0.9, color=colours[index % len(colours)],
                label=label)
        for y, name in zip(positions, names):
            if name in rows:
                ax.annotate(f"n={rows[name][1]}", (rows[name][0], y), xytext=(3, 0),
                            textcoords="offset points", va="center", fontsize=7)
    ax.set_yticks([len(names) - 1 - i for i in range(len(names))], names)
    ax.set_xlim(0, 1)
    ax.axvline(0.5, color=MUTED, linestyle=":")
    ax.set_xlabel("win rate under the principle (n: comparisons judged under it; no interval "
                  "recorded)")
    ax.set_title(f"evaluate: win rate per principle, {report.get('prompts', '?')} red-team "
                 f"prompts{judge}")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", visible=False)
    fig.tight_layout()
    return fig


# The plots of each command, in the order they are drawn.
DRAWERS: dict[str, list[Callable]] = {
    "label-prefs": [label_prefs],
    "finetune": [training_curves("finetune")],
    "train-rm": [training_curves("train-rm"), reward_model_calibration],
    "optimize": [training_curves("optimize")],
    "evaluate": [evaluate],
    "judge-check": [judge_check],
}
