"""Running one shard of a stage (``--shard I/N``) and merging the shards' parts into the
stage's files; what the run directory says about shards is ``cai_cli.run.shards``.

A shard holds the run directory's lock shared with the other shards and its own shard lock
(``run.lock.ShardLock``), writes its part of each of the stage's record files
(``RecordStage.parts``) and its own manifest under ``<stage>/shards/``, and the last one to
complete merges them: the stage's files in the order one unsharded run writes them, then what
the stage does once its records are complete (``RecordStage.finish``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cai_cli import ui
from cai_cli.config import Config
from cai_cli.errors import UserError
from cai_cli.run.artifacts import ResumableJsonl, load_manifest, write_atomic, write_json_atomic
from cai_cli.run.layout import RunLayout
from cai_cli.run.lock import merge_lock
from cai_cli.run.resolved import resolved_text
from cai_cli.run.shards import Shard, concatenate_atomic, sum_extras
from cai_cli.run.spec import StageSpec
from cai_cli.stages.common import StageRun, draw_pending_plots


class ShardRun(StageRun):
    """One run of one shard: like ``StageRun``, but it records its start and end in the
    shard's own manifest, never in the stage's."""

    def __init__(self, spec: StageSpec, config: Config, resuming: bool, shard: Shard,
                 bounds: tuple[int, int]):
        super().__init__(spec, config, resuming)
        self.shard, self.bounds = shard, bounds
        self.path = config.layout.shard_manifest(spec.command, shard.index, shard.count)
        self.extra: dict[str, Any] = {}

    def _save(self) -> None:
        data = self.manifest.to_dict()
        data["shard"] = {"index": self.shard.index, "count": self.shard.count,
                         "records": list(self.bounds)}
        data["extra"] = self.extra
        write_json_atomic(self.path, data)

    def producing(self) -> None:
        if self._recorded:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config.layout.resolved_config, resolved_text(self.config))
        self._save()
        self._recorded = True

    def complete(self) -> None:
        self.producing()
        manifest = self.manifest
        manifest.status = "complete"
        manifest.finished_at = time.time()
        manifest.timings.setdefault("seconds", round(manifest.finished_at - manifest.started_at, 2))
        self._save()
        for cleanup in self._after:
            cleanup()


def run_shard(stage, config: Config, spec: StageSpec, shard: Shard, items: list,
              *, force: bool) -> Path | None:
    """Run shard ``shard`` of a stage over its range of ``items``, then merge if it is the last.

    ``stage.produce`` makes the records of the shard's items into the files its ``parts`` map
    to under ``<stage>/shards/`` (resumable, as a whole run), and returns what ``stage.finish``
    needs of them (summed over the shards when they are merged). Returns the stage's output
    once merged."""
    layout, command = config.layout, spec.command
    state = spec.state()
    if state == "done" and not force:
        ui.info(f"{command}: {spec.directory} is complete for this config; nothing to do "
                "(--force redoes this shard and merges again)")
        draw_pending_plots(config, command)
        return None
    if state == "stale" and not force:
        changed = spec.describe_changes()
        raise UserError(
            f"{spec.directory} holds output made from a different config (changed: {changed}). "
            f"Start the shards with --force to replace it (a shard that fails is then rerun "
            f"without --force), or set run_dir to a new directory to keep it.")
    start, end = shard.bounds(len(items))
    path = layout.shard_manifest(command, shard.index, shard.count)
    own = load_manifest(path.parent, path.name)
    mine = own is not None and own.get("config_hash") == spec.fingerprint and not force
    if mine and own.get("status") == "complete":
        ui.info(f"{command}: shard {shard} is complete for this config")
    else:
        if mine:
            ui.info(f"{command}: resuming shard {shard} in {path.parent}")
        _remove_own_temporaries(path.parent, shard)
        run = ShardRun(spec, config, mine, shard, (start, end))
        out = {name: layout.shard_file(command, name, shard.index, shard.count)
               for name in stage.parts}
        ui.info(f"{command}: shard {shard}: records {start} to {end - 1} of {len(items)}"
                if end > start else f"{command}: shard {shard}: no records (only {len(items)} "
                f"for {shard.count} shards)")
        run.extra = stage.produce(config, run, items[start:end], out, force=force, whole=False)
        run.complete()
        ui.info(f"{command}: shard {shard} complete -> {path.parent}")
    with merge_lock(config.run_dir, command):
        if not path.is_file():
            return layout.stage_dir(command)  # merged by the shard that finished with us
        found = next((s for s in spec.shard_sets() if s.count == shard.count), None)
        if found is None or found.incomplete:
            ui.info(f"{command}: {found.describe() if found else 'shards missing'}. The last "
                    f"shard to finish merges them (or `cai merge {command} --config ...`).")
            return None
        return merge(stage, config, spec, shard.count)


def _remove_own_temporaries(directory: Path, shard: Shard) -> None:
    """Temporary files a killed run of this shard left (``write_atomic``'s ``.NAME.tmp-PID``);
    other shards' are theirs: they may be writing them now."""
    if directory.is_dir():
        for path in directory.glob(f".*.{shard.index}-of-{shard.count}.*.tmp-*"):
            path.unlink(missing_ok=True)


def merge(stage, config: Config, spec: StageSpec, count: int) -> Path:
    """Merge the ``count`` complete parts of this config into the stage's files, finish the stage
    as its unsharded run does, complete its manifest and remove the parts. The caller holds the
    stage's merge lock (a shard) or the run directory's lock (``cai merge``)."""
    layout, command = config.layout, spec.command
    manifests = [load_manifest(*_split(layout.shard_manifest(command, i, count)))
                 for i in range(count)]
    parts = [{name: layout.shard_file(command, name, i, count) for name in stage.parts}
             for i in range(count)]
    ui.info(f"{command}: merging {count} shards into {spec.directory}")
    run = StageRun(spec, config, resuming=False)
    run.manifest.started_at = min(m["started_at"] for m in manifests)
    run.manifest.counts["shards"] = count
    run.manifest.timings["slowest_shard_seconds"] = max(
        (m.get("timings") or {}).get("seconds", 0.0) for m in manifests)
    extras = [m.get("extra") or {} for m in manifests]
    extra = stage.merge_parts(config, parts, extras)
    # An unsharded run of this config that was interrupted left its own progress: it is obsolete.
    for name in stage.parts:
        final = layout.stage_dir(command) / name
        final.with_name(name + ".partial").unlink(missing_ok=True)
        final.with_name(f".{name}.progress.json").unlink(missing_ok=True)
    result = stage.finish(config, run, extra)
    for index, files in enumerate(parts):
        for file in files.values():
            file.unlink(missing_ok=True)
            ResumableJsonl(file, "").cleanup()  # its progress, if kept for reuse
        layout.shard_manifest(command, index, count).unlink(missing_ok=True)
    try:
        layout.shards_dir(command).rmdir()  # only when no other parts are left
    except OSError:
        pass
    return result


def _split(path: Path) -> tuple[Path, str]:
    return path.parent, path.name


def concatenate_parts(layout: RunLayout, command: str, names: tuple[str, ...],
                      parts: list[dict[str, Path]], extras: list[dict]) -> dict:
    """The default merge: each stage file is its parts one after the other (shard 0 first),
    byte for byte: what one run writes, since its records come in prompt order. Numbers in the
    extras are summed."""
    for name in names:
        concatenate_atomic([files[name] for files in parts], layout.stage_dir(command) / name)
    return sum_extras(extras)


def merge_by_hand(stage, config: Config) -> Path | None:
    """``cai merge STAGE``: merge the complete shards of this config; say what is missing
    otherwise. The caller holds the run directory's lock, so no shard is running."""
    command = stage.command
    spec = stage.spec(config)
    sets = spec.shard_sets()
    if not sets:
        if spec.state() == "done":
            ui.info(f"{command}: {spec.directory} is complete for this config; nothing to merge")
            return spec.directory
        raise UserError(f"{config.layout.shards_dir(command)}: no shards of this config to "
                        f"merge; run `cai {command} --config ... --shard I/N` for I = 0 to N-1 "
                        "first")
    if sets[0].incomplete:
        raise UserError(f"{spec.directory} cannot be merged yet: "
                        + "; ".join(s.describe() for s in sets)
                        + f". Run the missing shards (`cai {command} --config ... --shard I/N`);"
                        " the last one to finish merges by itself")
    return merge(stage, config, spec, sets[0].count)
