"""The judges of ``cai evaluate``: who they are, which of them labelled the training pairs, what
``cai judge-check`` measured of them, the jury's pooled judgments, and where each one's figures
are in eval/report.json.

Two model configs are the same judge only when engine, ``name_or_path`` (a local directory by
where it resolves), revision and, for a server, ``base_url`` all match
(``config.model_identity``): the same model name served elsewhere is another judge.

The jury's figure for a comparison or a yes/no question is the mean of its judges'
probabilities, not a majority vote: a judge's confidence counts (a judge at 0.51 barely moves the
mean, a sure one moves it far), as the soft labels of label-prefs are means over orders and
principles; and two judges that disagree give 0.5, an honest tie, where a vote needs a
tie-break.

No heavy imports here (``cai report`` and ``cai status`` read these).
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass

from cai_cli.config import AnyModelConfig, Config, model_identity
from cai_cli.errors import UserError
from cai_cli.reports.judge_check import below_chance
from cai_cli.run.artifacts import load_manifest
from cai_cli.run.spec import in_run_dir

FEEDBACK = "feedback"  # the name of the feedback model among the judges
# Evaluated models of this run trained on the feedback model's labels (DPO on its pairs, or
# GRPO / RLOO against the reward model trained on them).
TRAINED_ON_LABELS = ("policy",)


@dataclass(frozen=True)
class Juror:
    """One judge of the evaluation."""

    name: str  # in tables, judgments.jsonl and report.json: "feedback", or the model's name
    key: str  # the config key that names it, for messages
    model: AnyModelConfig
    feedback: bool  # the feedback model (by ``model_identity``): it labelled the training pairs

    def describe(self) -> dict:
        """Its entry in report.json's ``judges``."""
        entry = {"name": self.name, "model": self.model.name_or_path,
                 "backend": self.model.backend}
        if getattr(self.model, "revision", None):
            entry["revision"] = self.model.revision
        if self.model.remote:
            entry["base_url"] = self.model.base_url
        entry["feedback_model"] = self.feedback
        return entry


def jury(config: Config) -> list[Juror]:
    """The configured judges (``Config.jury``), named; the same judge twice is a user error."""
    feedback = model_identity(config.feedback_model)
    entries = config.jury
    jurors: list[Juror] = []
    seen: dict[tuple, str] = {}
    for index, (key, model) in enumerate(entries):
        identity = model_identity(model)
        if identity in seen:
            raise UserError(f"{key}: the same judge as {seen[identity]} (same engine, "
                            "name_or_path, revision and base_url); list each judge once")
        seen[identity] = key
        is_feedback = identity == feedback
        # a checkpoint of this run as <run_dir>/...: a moved run names it the same
        name = FEEDBACK if is_feedback else in_run_dir(model.name_or_path, config.layout.root)
        if any(j.name == name for j in jurors) or (name == FEEDBACK and not is_feedback):
            name = f"{name} #{index + 1}"  # the same name served elsewhere: told apart by place
        jurors.append(Juror(name, key, model, is_feedback))
    return jurors


def judge_check_of(config: Config, jurors: list[Juror]) -> list[dict | None]:
    """What ``cai judge-check`` measured of each judge: its report's agreement with the known
    labels for the judge that is the model it checked (judge-check checks the feedback model of
    its own run, as its manifest records, with paths inside the run directory written as
    ``<run_dir>/...``); None for the others."""
    layout = config.layout
    manifest = load_manifest(layout.judge)
    if not manifest or manifest.get("status") != "complete" or not layout.judge_report.is_file():
        return [None] * len(jurors)
    checked = (manifest.get("config") or {}).get("models.feedback")
    try:
        report = json.loads(layout.judge_report.read_text())
    except (OSError, ValueError):
        return [None] * len(jurors)
    if not isinstance(checked, dict) or report.get("agreement") is None:
        return [None] * len(jurors)
    low, high = report["ci95"]
    measured = {"agreement": report["agreement"], "ci95": [low, high],
                "pairs": report.get("pairs"), "below_chance": below_chance(report),
                "at_chance": low <= 0.5}
    identity = model_identity(checked)
    return [measured if model_identity(in_run_dir(j.model.model_dump(mode="json"), layout.root))
            == identity else None for j in jurors]


# ---------------------------------------------------------------------------------------------
# Reading a report's figures


def figure_sources(report: dict) -> list[tuple[str | None, dict]]:
    """The sets of figures of an evaluation's report, ``(name, figures)``: with several judges
    the jury's (the report's own, named "jury"), then each judge's; with one judge the report's,
    named None."""
    by_judge = report.get("by_judge") or {}
    return [("jury", report), *by_judge.items()] if by_judge else [(None, report)]


def win_entry(entries: list[dict] | None, model: str, over: str) -> dict | None:
    """The win rate of ``model`` over ``over`` among ``entries``; None when not there."""
    return next((w for w in entries or [] if w["model"] == model and w["over"] == over), None)


def engine_of(judge: dict) -> str:
    """Where a judge of report.json's ``judges`` runs: engine, server and revision."""
    return ", ".join(str(part) for part in (judge.get("backend"), judge.get("base_url"),
                                            judge.get("revision")) if part)


# ---------------------------------------------------------------------------------------------
# Pooling


def pool(results: list[dict]) -> dict:
    """The jury's judged results from each judge's (the shape of one judge's in
    ``stages.evaluate.judged_by_judge``): per prompt, the mean of the judges' probabilities (a
    yes/no question's over the judges that could judge the answer; None when none could), each
    principle's likewise. A comparison's over the judges that read it: one a judge could not
    read (too long for its context: a tie with no principles) is left out where another judge
    read it; identical answers, a tie with no principles for every judge, stay 0.5."""
    if len(results) == 1:
        return results[0]
    pooled: dict = {}
    for key in ("comparisons", "helpful_comparisons"):
        pooled[key] = []
        for index, comparison in enumerate(results[0][key]):
            rows = [r[key][index]["rows"] for r in results]
            pooled[key].append({"models": comparison["models"],
                                "rows": [_mean_row(same) for same in _aligned(rows)]})
    for key in ("harmful", "refusal"):
        pooled[key] = {name: [_mean_row(same) for same in _aligned([r[key][name] for r in results])]
                       for name in results[0][key]}
    return pooled


def _aligned(rows_by_judge: list[list[dict]]) -> list[list[dict]]:
    """The judges' rows of one task, prompt by prompt (every judge judges the same prompts)."""
    by_id = [{row["id"]: row for row in rows} for rows in rows_by_judge]
    return [[judged[row["id"]] for judged in by_id if row["id"] in judged]
            for row in rows_by_judge[0]]


def _mean_row(rows: list[dict]) -> dict:
    if "principles" in rows[0]:  # a comparison: the judges that read it
        rows = [row for row in rows if row.get("principles") != {}] or rows
    values = [row["p"] for row in rows if row["p"] is not None]
    out = {"id": rows[0]["id"], "p": statistics.fmean(values) if values else None}
    if "principles" in rows[0]:
        by_principle: dict[str, list[float]] = {}
        for row in rows:
            for name, value in row.get("principles", {}).items():
                by_principle.setdefault(name, []).append(value)
        out["principles"] = {name: statistics.fmean(v) for name, v in by_principle.items()}
    return out
