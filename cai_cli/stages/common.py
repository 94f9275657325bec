"""What every stage shares: whether to run at all, refusing outputs of another config, manifests,
and reading the output of an earlier stage.

A stage is described by a ``StageSpec``: its directory, the config settings that decide its
output and fingerprints of its inputs. Their hash is the stage's fingerprint. It is stored in the
stage's manifest, so a rerun can tell "already done", "interrupted, resume" and "made from
something else" apart without loading a model. ``cai status`` and ``cai run`` use the same specs.

No heavy imports here.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_cli import ui
from cai_cli.run import dist
from cai_cli.run.artifacts import (MANIFEST, Manifest, config_hash, diff_keys, file_fingerprint,
                               library_versions, load_manifest, source_fingerprint, write_atomic)
from cai_cli.config import Config, dump_config
from cai_cli.errors import UserError


NEXT_MANIFEST = ".manifest.next.json"  # a run that replaces complete output, until it completes


@dataclass
class StageSpec:
    command: str  # the command that makes this stage's output, e.g. "generate-sl"
    directory: Path
    settings: dict[str, Any]  # config values that decide the output (JSON-able)
    inputs: dict[str, str] = field(default_factory=dict)  # name -> fingerprint
    after: tuple[str, ...] = ()  # earlier stages whose output this one reads

    def __post_init__(self) -> None:
        # Paths inside the run directory (an earlier stage's model) are kept relative to it, so
        # a run directory that is copied or moved keeps its stages done.
        self.settings = in_run_dir(self.settings, self.directory.parent)

    @property
    def fingerprint(self) -> str:
        return config_hash({"settings": self.settings, "inputs": self.inputs})

    def _next(self) -> dict | None:
        """The manifest of an unfinished run that replaces complete output, if it is this
        config's (one of another config is a failed forced run: it changes nothing)."""
        manifest = load_manifest(self.directory, NEXT_MANIFEST)
        return manifest if manifest and manifest.get("config_hash") == self.fingerprint else None

    def manifest(self) -> dict | None:
        """The manifest that describes this stage for the current config: an unfinished
        replacement run of this config, else the stage's ``manifest.json``."""
        return self._next() or load_manifest(self.directory)

    def state(self) -> str:
        """``missing``, ``partial`` (started, not finished: by one run, or by shards of this
        config not all complete and merged), ``done`` or ``stale`` (made from other settings or
        inputs than the current config gives)."""
        manifest = self.manifest()
        if manifest is not None and manifest.get("config_hash") == self.fingerprint:
            return "done" if manifest.get("status") == "complete" else "partial"
        if self.sharded() is not None:
            return "partial"
        return "missing" if manifest is None else "stale"

    def sharded(self) -> str | None:
        """A line describing a sharded run of this config that is not merged yet, or None."""
        from cai_cli.run.shards import SHARDABLE, unmerged

        return unmerged(self) if self.command in SHARDABLE else None

    def changes(self) -> list[str]:
        """What differs between the stored manifest and the current config, as dotted paths:
        settings whose values changed first, then settings only one side has (e.g. keys that
        apply only with another setting), then the inputs (files and models read)."""
        manifest = self.manifest() or {}
        old = {"settings": manifest.get("config", {}), "inputs": manifest.get("inputs", {})}
        new = {"settings": self.settings, "inputs": self.inputs}
        keys = diff_keys(old, new)

        def on_both_sides(key: str) -> bool:
            old_side, new_side = old, new
            for part in key.split("."):
                if not (isinstance(old_side, dict) and isinstance(new_side, dict)
                        and part in old_side and part in new_side):
                    return False
                old_side, new_side = old_side[part], new_side[part]
            return True

        def present(tree: dict, key: str) -> bool:
            for part in key.split("."):
                if not isinstance(tree, dict) or part not in tree:
                    return False
                tree = tree[part]
            return True

        def named(key: str) -> str:
            """A setting only one side has was not changed: it is used now, or no longer."""
            name = key.removeprefix("settings.")
            if key.startswith("inputs.") or on_both_sides(key):
                return name
            return name + (" (now used)" if present(new, key) and not present(old, key)
                           else " (no longer used)" if present(old, key)
                           and not present(new, key) else "")

        order = {key: (key.startswith("inputs."), not on_both_sides(key)) for key in keys}
        return [named(key) for key in sorted(keys, key=order.__getitem__)]

    def describe_changes(self, limit: int = 6) -> str:
        """``changes()`` for a message: the first ``limit`` and how many more."""
        changes = self.changes()
        shown = ", ".join(changes[:limit]) or "unknown"
        return shown + (f" and {len(changes) - limit} more" if len(changes) > limit else "")


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
        write_atomic(self.config.layout.resolved_config, dump_config(self.config))
        self.manifest.save(self.directory, self._running_name())
        self._recorded = True

    def complete(self) -> None:
        """Mark the stage done: its outputs are all in place."""
        if not dist.is_main():
            return
        self.producing()
        manifest = self.manifest
        manifest.status = "complete"
        manifest.finished_at = time.time()
        manifest.timings.setdefault("seconds", round(manifest.finished_at - manifest.started_at, 2))
        manifest.save(self.directory)
        (self.directory / NEXT_MANIFEST).unlink(missing_ok=True)
        for cleanup in self._after:
            cleanup()
        from cai_cli.reports import plots

        plots.draw(self.config, self.spec.command)  # <stage dir>/plots/; warns, never fails


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
        return None
    resuming = state == "partial" and not force
    own = spec.manifest()
    if resuming and (own is None or own.get("config_hash") != spec.fingerprint):
        # Partial only because shards of this config are unfinished: finish those instead of
        # redoing their work here, unless told to.
        from cai_cli.run.shards import refuse_unmerged

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


def require_complete(config: Config, command: str, why: str = "", *,
                     stale_use: str | None = None) -> Path:
    """An earlier stage's output must be there and finished; ``why`` says what it is needed for.
    With ``stale_use``, output made from other settings is used with a warning that names what
    changed (it usually still serves, e.g. when only a sampling setting changed); ``stale_use``
    ends the warning, e.g. "fine-tuning on it as is". Returns the stage's directory."""
    directory = config.layout.stage_dir(command)
    manifest = load_manifest(directory)
    if manifest is None or manifest.get("status") != "complete":
        from cai_cli.run.shards import SHARDABLE, refuse_unmerged

        if command in SHARDABLE:  # started in shards: name those that are not complete
            from cai_cli.stages import stage_module

            refuse_unmerged(stage_module(command).spec(config), why)
        state = "is missing" if manifest is None else "is unfinished"
        raise UserError(f"{directory} {state}: run `cai {command} --config ...` first"
                        + (f" ({why})" if why else ""))
    if stale_use is not None:
        from cai_cli.stages import stage_module

        spec = stage_module(command).spec(config)
        if spec.state() == "stale":
            ui.warn(f"{spec.directory} was made from a different config (changed: "
                    f"{spec.describe_changes()}); {stale_use}")
    return directory


RUN_DIR = "<run_dir>"


def in_run_dir(value: Any, run_dir: Path) -> Any:
    """``value`` (JSON-able settings) with every path inside ``run_dir`` written as
    ``<run_dir>/...``."""
    if isinstance(value, dict):
        return {key: in_run_dir(item, run_dir) for key, item in value.items()}
    if isinstance(value, list):
        return [in_run_dir(item, run_dir) for item in value]
    if isinstance(value, str) and value:
        path = Path(value)
        # run_dir "." would claim every relative string: only absolute forms are matched then
        roots = {run_dir.absolute(), run_dir.resolve()} | ({run_dir} if run_dir.parts else set())
        for root in roots:
            if path == root or root in path.parents:
                return Path(RUN_DIR, path.relative_to(root)).as_posix().removesuffix("/.")
    return value


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
