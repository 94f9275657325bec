"""Where everything lives in a run directory, defined once.

Stages, ``status``, ``inspect`` and the tests ask a ``RunLayout`` for paths instead of joining
names onto ``run_dir`` themselves, so the layout (a fixed contract, see DESIGN.md) has one home.

    <run_dir>/.cai/config.yaml       resolved config of the last stage run (tool-owned folder)
    <run_dir>/prompts/red_team.jsonl new red-team prompts (optional stage); prompts/seeds.jsonl
    <run_dir>/sl/chains.jsonl        SL-CAI chains;  sl/sft.jsonl: the SFT examples
    <run_dir>/sft/                   fine-tuned model
    <run_dir>/prefs/pairs.jsonl      labelled pairs; prefs/samples.jsonl: the sampled answers
    <run_dir>/rm/                    reward model
    <run_dir>/policy/                optimised policy
    <run_dir>/eval/report.json       evaluation; eval/answers.jsonl: the answers compared
    <run_dir>/judge/report.json      judge-check (not a pipeline stage): the feedback model on
                                     pairs with known labels; judge/judgments.jsonl: its answers
    <run_dir>/<stage>/manifest.json  what produced each stage
    <run_dir>/.cai/warnings.log      the libraries' warnings while stages ran
    <run_dir>/<stage>/logs/          trackers' files, a trainer's log history
    <run_dir>/<stage>/plots/*.png    the stage's plots (``cai_cli.reports.plots``); left out of the
                                     stage directory's fingerprint
    <run_dir>/<stage>/shards/        the parts of a sharded run (``--shard I/N``) until merged:
                                     chains.I-of-N.jsonl ..., manifest.I-of-N.json

No heavy imports here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Command -> its directory under the run directory, in pipeline order.
STAGE_DIRS = {
    "generate-prompts": "prompts",
    "generate-sl": "sl",
    "finetune": "sft",
    "label-prefs": "prefs",
    "train-rm": "rm",
    "optimize": "policy",
    "evaluate": "eval",
}
# Commands that write a stage directory of their own but are not part of the pipeline.
CHECK_DIRS = {
    "judge-check": "judge",
}
TOOL_DIR = ".cai"  # files only the tool writes: resolved config, lock
SHARDS_DIR = "shards"  # inside a stage directory: the parts of a sharded run
PLOTS_DIR = "plots"  # inside a stage directory: its PNG plots
LOGS = "logs"  # inside a stage directory: trackers' local files (tensorboard), beside the model
LOG_HISTORY = "log_history.json"  # in LOGS: a trainer's log history, every logged step
REPORT = "report.md"  # `cai report`'s page, at the top of the run directory
# What may sit at the top of a run directory that has no .cai/ yet: the stage folders and the
# report. Anything else means the directory is something else (a home, a project, a disk).
RUN_ENTRIES = frozenset({*STAGE_DIRS.values(), *CHECK_DIRS.values(), TOOL_DIR, REPORT})


def run_dir_problem(run_dir: str | Path, own: tuple[Path, ...] = ()) -> str | None:
    """Why ``run_dir`` cannot be a run directory, in words for ``run_dir: <here>``; None when
    it can. A run directory is one that does not exist yet, an empty one, one ``cai`` has
    written (it holds ``.cai/``; files the user keeps beside the stages are left alone), or one
    holding only stage folders, ``report.md`` and the run's own files (``own``: the config and
    the files it names, kept beside the run). The file system's root and the home directory
    never are: a stage writes a dozen folders there and ``--force`` deletes some."""
    if "\0" in str(run_dir):
        return "holds a NUL character, which no path can"
    path = Path(run_dir).expanduser()
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return None  # a loop of links: the stage that writes there says why
    if resolved == Path(resolved.anchor):
        return "is the file system's root"
    if resolved == Path.home().resolve():
        return "is your home directory"
    if not path.exists():
        return None
    if not path.is_dir():
        return "is a file, not a directory"
    if (path / TOOL_DIR).is_dir():
        return None
    mine = set()
    for file in own:
        try:
            mine.update({file.resolve(), *file.resolve().parents})
        except (OSError, RuntimeError, ValueError):
            continue
    try:
        others = sorted(entry.name for entry in path.iterdir()
                        if entry.name not in RUN_ENTRIES and entry.resolve() not in mine)
    except OSError:
        return None  # unreadable: the lock or the stage says so
    if not others:
        return None
    shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
    return (f"holds files that are not a cai run ({shown}); a run directory is new, empty, "
            f"one cai wrote (it has {TOOL_DIR}/), or holds only stage folders and the files the "
            "config names")


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @classmethod
    def of(cls, run_dir: str | Path) -> "RunLayout":
        return cls(Path(run_dir))

    def stage_dir(self, command: str) -> Path:
        return self.root / (STAGE_DIRS.get(command) or CHECK_DIRS[command])

    # Sharded runs (generate-sl, label-prefs, evaluate with --shard I/N)
    def shards_dir(self, command: str) -> Path:
        return self.stage_dir(command) / SHARDS_DIR

    def shard_file(self, command: str, name: str, index: int, count: int) -> Path:
        """Shard ``index`` of ``count``'s part of the stage file ``name``:
        ``chains.jsonl`` -> ``sl/shards/chains.0-of-4.jsonl``."""
        stem, dot, suffix = name.partition(".")
        return self.shards_dir(command) / f"{stem}.{index}-of-{count}{dot}{suffix}"

    def shard_manifest(self, command: str, index: int, count: int) -> Path:
        return self.shard_file(command, "manifest.json", index, count)

    def plots(self, command: str) -> Path:
        """The folder of the stage's PNG plots."""
        return self.stage_dir(command) / PLOTS_DIR

    # The tool's own files
    @property
    def tool_dir(self) -> Path:
        return self.root / TOOL_DIR

    @property
    def resolved_config(self) -> Path:
        return self.tool_dir / "config.yaml"

    @property
    def warnings_log(self) -> Path:
        """The libraries' warnings while stages ran (``ui.warnings_to``), each line naming its
        stage. Not in the stage's folder: a stage that fails before it produces leaves its
        folder as it was (absent), and later stages read an existing folder as its output."""
        return self.tool_dir / "warnings.log"

    @property
    def lock(self) -> Path:
        """The OS-locked file of ``runlock``; its content is meaningless."""
        return self.tool_dir / "lock"

    @property
    def lock_holder(self) -> Path:
        """Who holds the lock: pid, host, command line, since when, job."""
        return self.tool_dir / "lock.holder.json"

    # Stage outputs
    @property
    def generated_prompts(self) -> Path:
        """New red-team prompts (``cai generate-prompts``); ``prompts/seeds.jsonl``: the seeds
        they were shown."""
        return self.stage_dir("generate-prompts") / "red_team.jsonl"

    @property
    def prompt_seeds(self) -> Path:
        return self.stage_dir("generate-prompts") / "seeds.jsonl"

    @property
    def prompt_candidates(self) -> Path:
        """Every request's raw output, before the filters (resumable)."""
        return self.stage_dir("generate-prompts") / "candidates.jsonl"

    @property
    def prompt_feedback(self) -> Path:
        """The feedback filter's P(Yes) of each prompt it was asked about (resumable)."""
        return self.stage_dir("generate-prompts") / "feedback.jsonl"

    @property
    def sl(self) -> Path:
        return self.stage_dir("generate-sl")

    @property
    def chains(self) -> Path:
        return self.sl / "chains.jsonl"

    @property
    def sft_data(self) -> Path:
        return self.sl / "sft.jsonl"

    @property
    def sft(self) -> Path:
        return self.stage_dir("finetune")

    @property
    def prefs(self) -> Path:
        return self.stage_dir("label-prefs")

    @property
    def samples(self) -> Path:
        return self.prefs / "samples.jsonl"

    @property
    def pairs(self) -> Path:
        return self.prefs / "pairs.jsonl"

    @property
    def rm(self) -> Path:
        return self.stage_dir("train-rm")

    @property
    def policy(self) -> Path:
        return self.stage_dir("optimize")

    @property
    def eval(self) -> Path:
        return self.stage_dir("evaluate")

    @property
    def eval_answers(self) -> Path:
        return self.eval / "answers.jsonl"

    @property
    def eval_judgments(self) -> Path:
        return self.eval / "judgments.jsonl"

    @property
    def report(self) -> Path:
        return self.eval / "report.json"

    # judge-check
    @property
    def judge(self) -> Path:
        return self.stage_dir("judge-check")

    @property
    def judge_judgments(self) -> Path:
        return self.judge / "judgments.jsonl"

    @property
    def judge_report(self) -> Path:
        return self.judge / "report.json"
