"""What every stage run shares: whether to run at all, refusing outputs of another config, the
manifest written as the stage goes, and reading the output of an earlier stage.

No heavy imports here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.errors import UserError
from cai_cli.run import dist
from cai_cli.run.artifacts import (MANIFEST, Manifest, file_fingerprint, library_versions,
                                   load_manifest, source_fingerprint, write_atomic)
from cai_cli.run.resolved import resolved_text
from cai_cli.run.spec import NEXT_MANIFEST, StageSpec


class StageRun:
    """One run of a stage, from ``begin`` to ``complete``.

    Nothing is recorded until the stage has really started producing (``producing``: its model
    loaded), so a run that fails on a bad device, bad weights or an unreachable model leaves the
    directory as it was, and fixing the input and rerunning works without ``--force``. A run that
    replaces complete output (``--force``, or a stale stage under ``cai run``) keeps its manifest
    in ``.manifest.next.json`` until it completes: if it fails, the old output is still done for
    its old config, and rerunning the new config resumes it. Under several processes of one
    training job only the main process writes.
    """

    def __init__(self, spec: StageSpec, config: Config, resuming: bool):
        self.spec, self.config, self.resuming = spec, config, resuming
        self.manifest = Manifest(stage=spec.command, config_hash=spec.fingerprint,
                                 config=spec.settings, inputs=spec.inputs,
                                 versions=library_versions())
        self._recorded = False
        self._after: list = []

    def after_complete(self, cleanup) -> None:
        """Run ``cleanup()`` once the stage is recorded complete (e.g. delete checkpoints that
        a run killed before that point would resume from)."""
        self._after.append(cleanup)

    @property
    def directory(self) -> Path:
        return self.spec.directory

    def _running_name(self) -> str:
        current = load_manifest(self.directory)
        return NEXT_MANIFEST if current and current.get("status") == "complete" else MANIFEST

    def producing(self) -> None:
        """Record the start (once): the stage is about to write output that a rerun resumes."""
        if self._recorded or not dist.is_main():
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config.layout.resolved_config, resolved_text(self.config))
        self.manifest.save(self.directory, self._running_name())
        self._recorded = True

    def discard(self) -> None:
        """Forget this run (it made nothing: ``NothingMade``): the manifest it wrote goes, so
        the stage reads as before it started, as after a failed start, and a rerun with other
        settings needs no --force. Its record files stay: a rerun of the same settings reuses
        them (and fails as fast), one of other settings replaces them. A resumed run forgets
        the manifest of the run it resumes, even with no batch left to make."""
        if (self._recorded or self.resuming) and dist.is_main():
            (self.directory / self._running_name()).unlink(missing_ok=True)
            self._recorded = False

    def complete(self) -> None:
        """Mark the stage done: its outputs are all in place."""
        if not dist.is_main():
            return
        from cai_cli.reports import plots

        self.producing()
        plots.mark_pending(self.config, self.spec.command)  # drawn below, unless stopped first
        manifest = self.manifest
        manifest.status = "complete"
        manifest.finished_at = time.time()
        manifest.timings.setdefault("seconds", round(manifest.finished_at - manifest.started_at, 2))
        manifest.save(self.directory)
        (self.directory / NEXT_MANIFEST).unlink(missing_ok=True)
        for cleanup in self._after:
            cleanup()
        plots.draw(self.config, self.spec.command)  # <stage dir>/plots/; warns, never fails


class NothingMade(UserError):
    """Every item a stage was given was skipped (too long for a model's context, say), so it
    has no record to show: a user error (exit 2) whose message says what to change, instead of
    a stage complete with nothing in it. The stage's run is forgotten (``StageRun.discard``)."""


def begin(spec: StageSpec, config: Config, *, force: bool) -> StageRun | None:
    """Decide whether the stage runs. Returns ``None`` when its output is already complete for
    this config, raises ``UserError`` when the directory holds output of another config (unless
    ``force``), and otherwise returns the run to record (``StageRun.producing``) and complete."""
    state = spec.state()
    if state == "stale" and not force:
        changed = spec.describe_changes()
        raise UserError(
            f"{spec.directory} holds output made from a different config (changed: {changed}). "
            f"Rerun with --force to replace it, or set run_dir to a new directory to keep it.")
    if state == "done" and not force:
        ui.info(f"{spec.command}: {spec.directory} is complete for this config; nothing to do "
                "(--force redoes it)")
        draw_pending_plots(config, spec.command)
        return None
    resuming = state == "partial" and not force
    own = spec.manifest()
    if resuming and (own is None or own.get("config_hash") != spec.fingerprint):
        # Partial only because shards of this config are unfinished: finish those instead of
        # redoing their work here, unless told to.
        refuse_unmerged(spec, "or rerun this with --force to do every record in this one run")
    if resuming:
        ui.info(f"{spec.command}: resuming the unfinished run in {spec.directory}")
    if dist.is_main():
        remove_stale_temporaries(spec.directory)
        remove_stale_temporaries(config.layout.tool_dir)
    run = StageRun(spec, config, resuming)
    # This run does every record: parts of a sharded run left in the stage are obsolete once it
    # completes (no shard runs now: this run holds the run directory's lock exclusively).
    run.after_complete(lambda: _remove_shards(spec, config))
    return run


def draw_pending_plots(config: Config, command: str) -> None:
    """For a stage found complete: the plots that the run completing it was stopped before
    drawing (``reports.plots.draw_pending``)."""
    if dist.is_main():
        from cai_cli.reports import plots

        plots.draw_pending(config, command)


def refuse_unmerged(spec: StageSpec, why: str = "") -> None:
    """Raise the error a later stage (or a plain run) gives for a partly sharded stage."""
    sets = spec.shard_sets()
    if not sets:
        return
    found = sets[0]
    todo = ", ".join(str(i) for i in found.incomplete)
    how = (f"run `cai {spec.command} --config ... --shard I/{found.count}` for I = {todo}"
           if found.incomplete else f"run `cai merge {spec.command} --config ...`")
    raise UserError(f"{spec.directory} is unfinished: {found.describe()}. To finish it, {how}"
                    + (f" ({why})" if why else ""))


def _remove_shards(spec: StageSpec, config: Config) -> None:
    import shutil

    directory = config.layout.shards_dir(spec.command)
    if dist.is_main() and directory.is_dir():
        shutil.rmtree(directory, ignore_errors=True)


def remove_stale_temporaries(directory: Path) -> None:
    """Temporary files of killed writers (``write_atomic``'s ``.NAME.tmp-PID``). The caller holds
    the run directory's lock, so no other process is writing them."""
    if directory.is_dir():
        for path in directory.glob(".*.tmp-*"):
            path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Need:
    """An earlier stage whose output a stage reads."""

    stage: Any  # the earlier stage (a ``stages.base.Stage``)
    why: str = ""  # what the output is needed for, said when it is missing
    # Output made from other settings is used with a warning that names what changed, ending in
    # this (e.g. "fine-tuning on it as is"); None: no such check.
    stale_use: str | None = None
    required: bool = True  # False: read when it is there (its state still makes this one stale)


def require_complete(config: Config, need: Need) -> Path:
    """An earlier stage's output must be there and finished (``need.why`` says what it is
    needed for); with ``need.stale_use``, output made from other settings is used with a
    warning that names what changed. Returns the earlier stage's directory."""
    spec = need.stage.spec(config)
    command, why, directory = spec.command, need.why, spec.directory
    manifest = load_manifest(directory)
    if manifest is None or manifest.get("status") != "complete":
        refuse_unmerged(spec, why)  # started in shards: name those that are not complete
        state = "is missing" if manifest is None else "is unfinished"
        raise UserError(f"{directory} {state}: run `cai {command} --config ...` first"
                        + (f" ({why})" if why else ""))
    if need.stale_use is not None and spec.state() == "stale":
        ui.warn(f"{directory} was made from a different config (changed: "
                f"{spec.describe_changes()}); {need.stale_use}")
    return directory


def constitution_fingerprint(config: Config, *, evaluation: bool = False) -> str:
    """The constitution as the stages read it: its principles and worked examples (and with
    ``evaluation`` its evaluation questions), not the files' bytes, so a comment or a changed
    evaluation question does not make SL-CAI data stale. A constitution that does not load
    falls back to the files' fingerprints (the stage reports the problem when it runs)."""
    import dataclasses
    import hashlib
    import json

    from cai_cli.constitution import load_constitution

    try:
        constitution = load_constitution(config.constitution_paths)
    except UserError:
        return "+".join(file_fingerprint(p) for p in config.constitution_paths)
    content = dataclasses.asdict(constitution)
    if not evaluation:
        content.pop("evaluation")
    text = json.dumps(content, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def red_team_inputs(config: Config) -> tuple[dict[str, Any], dict[str, str]]:
    """The settings and input fingerprints every stage that reads the red-team prompts and the
    constitution shares: ``(settings, inputs)``, to extend with the stage's own."""
    settings = {
        "seed": config.seed,
        "constitution": config.constitution,
        "data.red_team": config.data.red_team.model_dump(mode="json"),
    }
    inputs = {
        "constitution": constitution_fingerprint(config),
        "prompts": source_fingerprint(config.data.red_team),
    }
    return settings, inputs


def checkpoint_batches(items: list, size: int) -> list[list]:
    """``items`` in the stage's checkpointed batches of ``size`` (the last may be shorter)."""
    return [items[i:i + size] for i in range(0, len(items), size)]
