"""``cai report``: one Markdown page about a run, to read or to share.

It gathers, for each stage, what its manifest recorded (counts, figures, timings), its plots
(``cai_cli.reports.plots``; drawn here for a completed stage that has none yet), a few SL-CAI chains
with their critiques and revisions, a few labelled preference pairs, judge-check's table and the
evaluation's tables and verdict. A stage that has not run is said to be so.

It reads files only: no torch, transformers, datasets or trl (matplotlib only to draw a
missing plot).
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

from cai_cli import ui
from cai_cli.commands.inspect import as_text, same_text
from cai_cli.config import Config
from cai_cli.errors import UserError
from cai_cli.reports import plots
from cai_cli.reports.jury import engine_of, figure_sources, win_entry
from cai_cli.run.artifacts import load_manifest, read_jsonl, write_atomic

REPORT = "report.md"
EXAMPLES = 3  # chains and pairs shown
LONGEST = 1200  # characters of one quoted text before it is cut
TITLES = {
    "generate-prompts": "new red-team prompts",
    "generate-sl": "SL-CAI critiques and revisions",
    "finetune": "supervised fine-tuning on the revisions",
    "label-prefs": "AI-feedback preference labels",
    "train-rm": "reward model",
    "optimize": "policy optimisation",
    "evaluate": "evaluation",
    "judge-check": "the feedback model as a judge",
}


def write_report(config: Config, output: Path | None = None) -> Path:
    """Write the run's report (default ``<run_dir>/report.md``) and return its path."""
    run_dir = Path(config.run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run_dir {run_dir}: no such directory; run a stage first (`cai run "
                        "--config ...`) or point run_dir (--set run_dir=...) at a run")
    output = Path(output) if output is not None else run_dir / REPORT
    if output.is_dir():
        output = output / REPORT
    if not output.parent.is_dir():
        raise UserError(f"--output {output}: the folder {output.parent} does not exist")
    page = Page(config, output.parent)
    write_atomic(output, page.render())
    drawn = f" ({page.drawn} {'plot' if page.drawn == 1 else 'plots'} drawn)" if page.drawn else ""
    ui.info(f"report: {output}{drawn}")
    return output


class Page:
    def __init__(self, config: Config, folder: Path):
        from cai_cli.stages.pipeline import statuses

        self.config, self.folder, self.layout = config, folder, config.layout
        self.statuses = [s for s in statuses(config) if s.state != "off"]
        self.lines: list[str] = []
        self.drawn = 0

    # -----------------------------------------------------------------------------------------
    # Markdown helpers

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def link(self, path: Path) -> str:
        """``path`` relative to the report's folder, for a link."""
        return Path(os.path.relpath(path.resolve(), self.folder.resolve())).as_posix()

    def table(self, header: list[str], rows: list[list], align: str = "") -> None:
        align = align or "l" * len(header)
        self.add("| " + " | ".join(header) + " |",
                 "|" + "|".join("---:" if a == "r" else "---" for a in align) + "|",
                 *("| " + " | ".join(cell(value) for value in row) + " |" for row in rows), "")

    def figures(self, rows: list[tuple[str, object]]) -> None:
        rows = [(name, value) for name, value in rows if value not in (None, "", [], {})]
        if rows:
            self.table(["figure", "value"], [[name, value] for name, value in rows], "lr")

    def quote(self, label: str, text) -> None:
        self.add(f"**{label}**", "", quoted(text), "")

    def plots_of(self, command: str, complete: bool) -> None:
        """The stage's plots as images; drawn first when the stage is complete and has none,
        or not all (a run stopped while drawing them)."""
        files = plots.listed(self.layout, command)
        if (not files or plots.pending(self.layout, command)) and complete \
                and plots.DRAWERS.get(command):
            files = plots.draw(self.layout, command)
            self.drawn += len(files)
        for path in files:
            self.add(f"![{command}: {path.stem.replace('_', ' ')}]({self.link(path)})", "")

    # -----------------------------------------------------------------------------------------
    # The page

    def render(self) -> str:
        config = self.config
        feedback = config.feedback_model.name_or_path
        self.add(f"# CAI run report: {config.run_dir}", "",
                 f"Written by `cai report` on {time.strftime('%Y-%m-%d %H:%M')}. Policy model "
                 f"`{config.models.policy.name_or_path}`, feedback model `{feedback}`, "
                 f"constitution `{config.constitution}`.", "")
        self.verdicts()
        self.overview()
        for status in self.statuses:
            self.stage(status.name, status.state, status.reason)
        self.stage("judge-check", None, "")
        return "\n".join(self.lines).rstrip() + "\n"

    def verdicts(self) -> None:
        found = []
        report = read_json(self.layout.report)
        if report and (report.get("verdict") or {}).get("text"):
            found.append(("evaluation", report["verdict"]["text"]))
            found += [("evaluation, caveat", caveat)
                      for caveat in report["verdict"].get("caveats") or []]
        judge = read_json(self.layout.judge_report)
        if judge and judge.get("verdict"):
            found.append(("judge-check", judge["verdict"]))
        labels = (load_manifest(self.layout.prefs) or {}).get("stats") or {}
        if labels.get("verdict"):
            found.append(("label-prefs", labels["verdict"]))
        if found:
            self.add("## Verdict", "")
            self.add(*(f"- **{name}**: {escape(text)}" for name, text in found), "")

    def overview(self) -> None:
        from cai_cli.commands.status import describe_counts

        rows = []
        for status in self.statuses:
            manifest = status.spec.manifest() or {}
            rows.append([status.name, status.state, took(manifest, status.state),
                         f"`{status.spec.directory.name}/`",
                         "; ".join(p for p in (status.reason, describe_counts(manifest)) if p)])
        judge = load_manifest(self.layout.judge)
        if judge is not None:
            rows.append(["judge-check", judge_state(judge), took(judge, "done"),
                         f"`{self.layout.judge.name}/`", describe_counts(judge)])
        self.add("## Stages", "")
        self.table(["stage", "state", "time", "output", "details"], rows, "lllll")

    def stage(self, command: str, state: str | None, reason: str) -> None:
        directory = self.layout.stage_dir(command)
        manifest = load_manifest(directory)
        self.add(f"## {command}: {TITLES.get(command, command)}", "")
        if command == "judge-check" and manifest is None:
            self.add("Not run (`cai judge-check --config ...` measures the feedback model on "
                     "pairs whose better answer is known).", "")
            return
        if manifest is None or state == "missing":
            self.add(f"Not run (`cai {command} --config ...`).", "")
            return
        complete = manifest.get("status") == "complete"
        if not complete:
            self.add(f"Unfinished: {reason or 'interrupted'}. Rerun `cai {command} --config "
                     "...` to finish it.", "")
            return
        if state == "stale":
            self.add(f"*Stale*: made from another config ({reason}); the figures below are of "
                     "that output.", "")
        SECTIONS.get(command, Page.generic)(self, manifest)
        self.plots_of(command, complete)

    # -----------------------------------------------------------------------------------------
    # Stages

    def generic(self, manifest: dict) -> None:
        stats = manifest.get("stats") or {}
        self.figures([*counted(manifest),
                      *((key.replace("_", " "), value) for key, value in stats.items()
                        if not isinstance(value, (dict, list)) and key != "verdict"),
                      *timed(manifest)])

    def generate_sl(self, manifest: dict) -> None:
        self.generic(manifest)
        if not self.layout.chains.is_file():
            return
        chains = read_jsonl(self.layout.chains)
        self.add(f"### Example chains ({min(EXAMPLES, len(chains))} of {len(chains)})", "",
                 f"All of them: `cai inspect {ui.shell(self.config.run_dir)}`.", "")
        for number, chain in enumerate(chains[:EXAMPLES], start=1):
            self.add(f"#### {number}. `{chain['id']}`", "")
            self.quote("Prompt", chain["prompt"])
            self.quote("Initial answer", chain["initial"])
            previous = chain["initial"]
            for round_number, step in enumerate(chain["rounds"], start=1):
                self.add(f"*Round {round_number}, principle `{step['principle']}`*", "")
                self.quote("Critique", step["critique"])
                unchanged = " (unchanged)" if same_text(step["revision"], previous) else ""
                self.quote(f"Revision{unchanged}", step["revision"])
                previous = step["revision"]
            if not chain["rounds"] or as_text(chain["final"]) != as_text(previous):
                self.quote("Final answer", chain["final"])

    def label_prefs(self, manifest: dict) -> None:
        stats = manifest.get("stats") or {}
        quantiles = stats.get("p_chosen") or {}
        self.figures([
            *counted(manifest),
            ("position bias: mean p(first option); 0.50 is none", stats.get("position_bias")),
            ("first option wins (share of judgments)", stats.get("first_wins")),
            ("both orders pick the same answer (share of pair-principles)",
             stats.get("order_agreement")),
            ("share of pairs whose orders disagree", stats.get("order_disagreement")),
            ("mean confidence abs(p_chosen - 0.5)", stats.get("mean_confidence")),
            ("p_chosen min / median / max", " / ".join(
                f"{quantiles[k]:.3f}" for k in ("min", "median", "max")) if quantiles else None),
            ("chain of thought", stats.get("chain_of_thought")),
            *timed(manifest)])
        if not self.layout.pairs.is_file():
            return
        pairs = sorted(read_jsonl(self.layout.pairs), key=lambda p: -float(p["p_chosen"]))
        self.add(f"### Example pairs (the {min(EXAMPLES, len(pairs))} most confident of "
                 f"{len(pairs)})", "")
        for number, pair in enumerate(pairs[:EXAMPLES], start=1):
            p_chosen = float(pair["p_chosen"])
            self.add(f"#### {number}. `{pair['id']}`: p_chosen {p_chosen:.3f}", "")
            self.quote("Prompt", pair["prompt"])
            self.quote(f"Chosen (p = {p_chosen:.3f})", pair["chosen"])
            self.quote(f"Rejected (p = {1 - p_chosen:.3f})", pair["rejected"])
            self.table(["principle", "order", "p(first)"],
                       [[j["principle"], j["order"], f"{float(j['p_first']):.3f}"]
                        for j in pair.get("judgments", [])], "llr")
        self.add("Order AB: the chosen answer was shown first; BA: the rejected one was. "
                 "p(first): the probability the judge gave the answer shown first.", "")

    def training(self, manifest: dict) -> None:
        stats = manifest.get("stats") or {}
        rows = [*counted(manifest),
                ("final loss", stats.get("final_loss")),
                ("trainable parameters", stats.get("trainable_parameters")),
                ("precision", stats.get("precision")), ("LoRA", stats.get("lora"))]
        for key, name in (("train_accuracy", "accuracy on the training pairs"),
                          ("eval_accuracy", "accuracy on the held-out pairs"),
                          ("eval_ece", "calibration error (ECE) on the held-out pairs"),
                          ("soft_labels", "soft labels"),
                          ("reward_margin", "last reward margin"),
                          ("reward_accuracy", "last reward accuracy"),
                          ("mean_reward", "last mean reward"), ("rollouts", "completions from"),
                          ("resumed_from_step", "resumed from step")):
            rows.append((name, stats.get(key)))
        self.figures(rows + timed(manifest))
        if manifest.get("stage") == "train-rm" and stats.get("eval_accuracy") is not None \
                and not stats.get("eval_reliability"):
            self.add("No reliability diagram: this run recorded only the held-out accuracy "
                     "and ECE, not the reliability table (`cai train-rm --force` records it).",
                     "")
        if not plots.training_log(self.layout, manifest.get("stage", "")):
            self.add("No training curves: this run did not keep the trainer's log history "
                     "(a run of this version keeps it in `logs/log_history.json`).", "")

    def evaluate(self, manifest: dict) -> None:
        report = read_json(self.layout.report)
        if report is None:
            self.generic(manifest)
            return
        judges = report.get("judges") or []
        by_judge = report.get("by_judge") or {}
        took = timed(manifest)
        models = (f"{len(report.get('models') or {})} models ("
                  + ", ".join(f"{name} `{path}`" for name, path in
                              (report.get("models") or {}).items()) + ")")
        if by_judge:
            self.add(f"{models}, judged by {len(judges)} judges"
                     + (f" in {took[0][1]}" if took else "") + "; the jury's figures are the "
                     "mean of their probabilities.", "")
            self.table(["judge", "model", "engine", "labelled the training pairs",
                        "judge-check agreement"],
                       [[f"`{j['name']}`", f"`{j['model']}`", engine_of(j),
                         "yes (the feedback model)" if j.get("feedback_model") else "no",
                         judge_check_cell(j.get("judge_check"))] for j in judges], "lllll")
        else:
            judge = report.get("judge") or self.config.feedback_model.name_or_path
            checked = judge_check_cell((judges[0] if judges else {}).get("judge_check"))
            self.add(f"{models}, judged by `{judge}`" + (f", in {took[0][1]}" if took else "")
                     + (f" (judge-check agreement {checked})" if checked else "") + ".", "")
        verdict = report.get("verdict") or {}
        if verdict.get("text"):
            self.add(f"> **Verdict**: {escape(verdict['text'])}", "")
            for caveat in verdict.get("caveats") or []:
                self.add(f"> **Caveat**: {escape(caveat)}", "")
        sources = figure_sources(report)
        self.win_rates(f"### Harmlessness: win rates on {report.get('prompts', '?')} red-team "
                       "prompts", report, sources, lambda source: source.get("win_rates"))
        self.rates("Harmful compliance on the red-team prompts", sources,
                   lambda source: source.get("harmful_compliance"))
        helpfulness = report.get("helpfulness") or {}
        if helpfulness:
            self.win_rates(f"### Helpfulness: win rates on {helpfulness.get('prompts', '?')} "
                           "benign prompts", report, sources,
                           lambda source: (source.get("helpfulness") or {}).get("win_rates"))
            self.rates("Over-refusal on the benign prompts", sources,
                       lambda source: (source.get("helpfulness") or {}).get("over_refusal"))
        scores = (report.get("reward_model") or {}).get("mean_score")
        if scores:
            self.add("### Mean reward-model score", "")
            self.table(["model", "mean score"], [[m, f"{s:.3f}"] for m, s in scores.items()],
                       "lr")

    def win_rates(self, heading: str, report: dict, sources: list[tuple[str | None, dict]],
                  entries_of) -> None:
        """Each pair of models once (the later over the earlier): its win rate by the jury and
        by each judge (``sources``: ``(judge, figures)``; one judge: ``(None, report)``)."""
        pairs = plots.ordered_pairs(report, entries_of(report) or [])
        if not pairs:
            return
        jury = sources[0][0] is not None
        self.add(heading, "", "Win rate of the model over the other: the mean probability that "
                 "the judge prefers its answer (0.50: no difference; the other way round it is "
                 "one minus this), with a 95% bootstrap interval over prompts"
                 + ("; the jury's is the mean of its judges' probabilities." if jury else "."),
                 "")
        rows = []
        for pair in pairs:
            for judge, source in sources:
                found = win_entry(entries_of(source), pair["model"], pair["over"])
                if found is not None:
                    rows.append([found["model"], found["over"], *([judge] if jury else []),
                                 f"{found['win_rate']:.3f}", interval(found.get("ci95"), 3),
                                 found.get("prompts", "")])
        self.table(["model", "over", *(["judge"] if jury else []), "win rate", "95% interval",
                    "prompts"], rows, "lll" + "rrr" if jury else "llrrr")

    def rates(self, heading: str, sources: list[tuple[str | None, dict]], rates_of) -> None:
        """A rate per model, by the jury and by each judge (as ``win_rates``)."""
        jury = sources[0][0] is not None
        rows = []
        for model in rates_of(sources[0][1]) or {}:
            for judge, source in sources:
                row = (rates_of(source) or {}).get(model)
                if row is not None:
                    rows.append([model, *([judge] if jury else []), f"{row['rate']:.3f}",
                                 interval(row.get("ci95"), 3), row.get("n", "")])
        if not rows:
            return
        self.add(f"### {heading}", "")
        self.table(["model", *(["judge"] if jury else []), "rate", "95% interval", "n"], rows,
                   "llrrr" if jury else "lrrr")

    def judge_check(self, manifest: dict) -> None:
        report = read_json(self.layout.judge_report)
        if report is None:
            self.generic(manifest)
            return
        position = report.get("position") or {}
        calibration = report.get("calibration") or {}
        cost = report.get("cost") or {}
        self.add(f"`{report.get('feedback_model')}` on {report['pairs']} labelled pairs from "
                 f"`{report.get('pairs_source')}`, {report.get('principles_per_pair')} "
                 "principles per pair, both orders.", "")
        rows = [["agreement (95% Wilson interval; 0.50 is chance)",
                 f"{report['agreement']:.2f} {interval(report.get('ci95'))}", report["pairs"]]]
        for name, row in sorted((report.get("per_principle") or {}).items()):
            rows.append([f"principle {name}", f"{row['agreement']:.2f} "
                         f"{interval(row.get('ci95'))}", row["pairs"]])
        if position:
            rows += [["first option wins (0.50 is no position bias)",
                      f"{position['first_wins']:.2f}", position.get("judgments", "")],
                     ["mean p(first) / p(second)",
                      f"{position['mean_p_first']:.2f} / {position['mean_p_second']:.2f}", ""],
                     ["order consistency", f"{position['order_consistency']:.2f}", ""]]
        if calibration:
            rows.append([f"ECE ({calibration.get('bins')} bins over [0.5, 1])",
                         f"{calibration['ece']:.3f}", ""])
        if cost:
            rows += [["seconds per question", f"{cost['seconds_per_question']:.3f}", ""],
                     ["label-prefs judging, estimated",
                      "" if cost.get("label_prefs_seconds") is None
                      else ui.duration(cost["label_prefs_seconds"]),
                      cost.get("label_prefs_questions", "")]]
        self.table(["figure", "value", "n"], rows, "lrr")


SECTIONS = {
    "generate-sl": Page.generate_sl,
    "label-prefs": Page.label_prefs,
    "finetune": Page.training,
    "train-rm": Page.training,
    "optimize": Page.training,
    "evaluate": Page.evaluate,
    "judge-check": Page.judge_check,
}


# ---------------------------------------------------------------------------------------------
# Formatting


# What would make Markdown show model text otherwise than as written, each escaped with a
# backslash only where it would: a backslash before punctuation, the start of an HTML tag,
# comment or autolink, an entity reference, table cell breaks, emphasis and code. Escaping
# every "<" or "&" as an HTML entity would keep the page safe too, but the page is also read as
# plain text (`less report.md`), where "-&gt;" is noise.
MARKUP = re.compile(r"\\(?=[!-/:-@\[-`{-~])|<(?=[A-Za-z/!?])|&(?=#?\w+;)|[|*`]")


def escape(text: str) -> str:
    """Text that Markdown shows as written, and that reads as written in a plain-text viewer:
    no HTML, emphasis, code or table breaks, no control characters (a random model writes any
    byte)."""
    text = MARKUP.sub(lambda found: "\\" + found.group(), ui.printable(str(text)))
    return "\\" + text if text.startswith(("#", ">")) else text


def cell(value) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    return escape(" ".join(str(value).split())) if not str(value).startswith("`") \
        else str(value)


def quoted(text) -> str:
    """A model's text as a Markdown block quote: each line quoted, HTML escaped, cut at
    ``LONGEST`` characters."""
    text = as_text(text).strip() or "(empty)"
    if len(text) > LONGEST:
        text = text[:LONGEST].rstrip() + f" … ({len(text) - LONGEST} more characters)"
    return "\n".join(f"> {escape(line)}" if line.strip() else ">" for line in text.splitlines())


def judge_check_cell(measured: dict | None) -> str:
    """What judge-check measured of a judge, for a table: agreement, interval, and whether it
    is above chance."""
    if not measured:
        return ""
    at = ("below chance" if measured.get("below_chance") else "not above chance"
          if measured.get("at_chance") else "above chance")
    return f"{measured['agreement']:.2f} {interval(measured.get('ci95'))}, {at}"


def interval(ci, digits: int = 2) -> str:
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else ""


def counted(manifest: dict) -> list[tuple[str, object]]:
    return [(key.replace("_", " "), value) for key, value in (manifest.get("counts") or {}).items()]


def timed(manifest: dict) -> list[tuple[str, object]]:
    timings = manifest.get("timings") or {}
    return [("time", ui.duration(timings["seconds"]))] if "seconds" in timings else []


def took(manifest: dict, state: str) -> str:
    seconds = (manifest.get("timings") or {}).get("seconds")
    return "" if seconds is None or state == "missing" else ui.duration(seconds)


def judge_state(manifest: dict) -> str:
    return "done" if manifest.get("status") == "complete" else "partial"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None
