"""Sharded generation: ``cai generate-prompts|generate-sl|label-prefs|evaluate --shard I/N``.

A stage whose records are made one prompt (or request) at a time (each seeded by its own id, so
a record does not depend on the batch, the shard or the position it ran in) can be cut into N
shards that any scheduler starts as separate processes: a Slurm array, or ``&`` in a shell loop.

- Shard I takes the prompts ``datasets.Dataset.shard(N, I, contiguous=True)`` would give it
  (``Shard.bounds``): contiguous ranges, the first ``len % N`` one longer.
- It writes its part of each of the stage's record files under ``<stage>/shards/``
  (``chains.I-of-N.jsonl`` ...; ``RunLayout.shard_file``), resumable as a whole run is, and its
  own manifest (``manifest.I-of-N.json``: config fingerprint, status, counts, timings). It holds
  the run directory's lock shared with the other shards and its own shard lock
  (``runlock.ShardLock``).
- A shard that completes takes the stage's merge lock and looks at the other parts: once all N
  are complete for the same config fingerprint it merges them (``merge``). ``cai merge STAGE``
  does the same by hand. The merge writes the stage's files in the order one unsharded run
  writes them, does what the stage does after its records are complete (``sft.jsonl``, label
  statistics, the evaluation report), completes the stage's manifest and removes the parts.
- Until then the stage is ``partial``: ``cai status`` lists the shards that are not complete,
  later stages refuse it naming them (``unmerged``), and a plain run of the stage refuses too
  (unless ``--force``) rather than silently redoing the shards' work.

A shardable stage module provides ``PARTS`` (its record files), ``finish(config, run, extra)``
(everything after the records are complete) and optionally ``merge_parts``; its ``run`` calls
``run_shard`` with the work of one shard. No heavy imports here: ``cai status`` uses it.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from cai_cli import ui
from cai_cli.run.artifacts import ResumableJsonl, _fsync_dir, load_manifest, write_json_atomic
from cai_cli.config import Config
from cai_cli.errors import UserError
from cai_cli.run.layout import RunLayout
from cai_cli.stages import STAGES
from cai_cli.stages.common import StageRun, StageSpec

SHARDABLE = tuple(name for name, stage in STAGES.items() if stage.shards)
_PART_MANIFEST = re.compile(r"manifest\.(\d+)-of-(\d+)\.json")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` (counted from 0) of ``count``."""

    index: int
    count: int

    @classmethod
    def parse(cls, text: str) -> "Shard":
        """``"I/N"`` as given to ``--shard``."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise UserError(f"--shard {text}: expected I/N, shard I of N counted from 0, "
                            "e.g. --shard 0/4 ... --shard 3/4")
        index, count = int(match[1]), int(match[2])
        if count < 1 or index >= count:
            raise UserError(f"--shard {text}: I must be 0 to N-1 (shards are counted from 0), "
                            f"e.g. --shard 0/{max(count, 1)} ... --shard {max(count, 1) - 1}/"
                            f"{max(count, 1)}")
        return cls(index, count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def bounds(self, total: int) -> tuple[int, int]:
        """``[start, end)`` of this shard among ``total`` records, exactly as
        ``datasets.Dataset.shard(count, index, contiguous=True)`` selects them."""
        div, mod = divmod(total, self.count)
        start = div * self.index + min(self.index, mod)
        return start, start + div + (1 if self.index < mod else 0)


# ---------------------------------------------------------------------------------------------
# Where the shards of a stage stand


@dataclass
class ShardSet:
    """The shards of one stage, one config fingerprint and one shard count."""

    command: str
    count: int
    manifests: dict[int, dict] = field(default_factory=dict)  # index -> its manifest
    running: dict[int, dict] = field(default_factory=dict)  # index -> the live lock holder

    @property
    def complete(self) -> list[int]:
        return [i for i, m in sorted(self.manifests.items()) if m.get("status") == "complete"]

    @property
    def incomplete(self) -> list[int]:
        return [i for i in range(self.count) if i not in self.complete]

    def state_of(self, index: int) -> str:
        if index in self.complete:
            return "complete"
        if index in self.running:
            return f"running, pid {self.running[index]['pid']} on {self.running[index]['host']}"
        if index in self.manifests:
            return "interrupted: rerun it to resume"
        return "not started"

    def describe(self) -> str:
        """One line: how many are complete, and each shard that is not, with its state."""
        missing = ", ".join(f"{i}/{self.count} ({self.state_of(i)})" for i in self.incomplete)
        return (f"sharded {self.count} ways, {len(self.complete)} of {self.count} shards complete"
                + (f"; not complete: {missing}" if missing else "; not merged yet"))


def _layout(spec: StageSpec) -> RunLayout:
    return RunLayout.of(spec.directory.parent)


def shard_sets(spec: StageSpec) -> list[ShardSet]:
    """The shard sets of this stage made from the current config (same fingerprint), most
    complete first. Reads the part manifests and the shard locks' records; never waits."""
    from cai_cli.run.lock import holder, shard_lock_name

    layout = _layout(spec)
    directory = layout.shards_dir(spec.command)
    if not directory.is_dir():
        return []
    sets: dict[int, ShardSet] = {}
    for path in directory.glob("manifest.*-of-*.json"):
        match = _PART_MANIFEST.fullmatch(path.name)
        if match is None:
            continue
        index, count = int(match[1]), int(match[2])
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # torn by a killed writer: that shard is not complete
        if manifest.get("config_hash") != spec.fingerprint or index >= count:
            continue
        sets.setdefault(count, ShardSet(spec.command, count)).manifests[index] = manifest
    for found in sets.values():
        for index in range(found.count):
            record = holder(layout.root, shard_lock_name(spec.command, index, found.count))
            if record is not None:
                found.running[index] = record
    return sorted(sets.values(), key=lambda s: (len(s.incomplete), s.count))


def unmerged(spec: StageSpec) -> str | None:
    """A line describing the sharded run of this config that is not merged yet, or None."""
    sets = shard_sets(spec)
    return sets[0].describe() if sets else None


def refuse_unmerged(spec: StageSpec, why: str = "") -> None:
    """Raise the error a later stage (or a plain run) gives for a partly sharded stage."""
    line = unmerged(spec)
    if line is None:
        return
    found = shard_sets(spec)[0]
    todo = ", ".join(str(i) for i in found.incomplete)
    how = (f"run `cai {spec.command} --config ... --shard I/{found.count}` for I = {todo}"
           if found.incomplete else f"run `cai merge {spec.command} --config ...`")
    raise UserError(f"{spec.directory} is unfinished: {line}. To finish it, {how}"
                    + (f" ({why})" if why else ""))


# ---------------------------------------------------------------------------------------------
# One shard


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
        from cai_cli.run.artifacts import write_atomic
        from cai_cli.config import dump_config

        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(self.config.layout.resolved_config, dump_config(self.config))
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


def run_shard(module, config: Config, spec: StageSpec, shard: Shard, items: list, *,
              force: bool, produce: Callable[[ShardRun, list, dict[str, Path]], dict]) -> Path | None:
    """Run shard ``shard`` of a stage over its range of ``items``, then merge if it is the last.

    ``produce(run, items, out)`` makes the records of ``items`` into the files ``out`` maps the
    stage's ``PARTS`` to (resumable, as a whole run), and returns what ``finish`` needs of them
    (summed over the shards when they are merged). Returns the stage's output once merged."""
    layout, command = config.layout, spec.command
    state = spec.state()
    if state == "done" and not force:
        ui.info(f"{command}: {spec.directory} is complete for this config; nothing to do "
                "(--force redoes this shard and merges again)")
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
               for name in module.PARTS}
        ui.info(f"{command}: shard {shard}: records {start} to {end - 1} of {len(items)}"
                if end > start else f"{command}: shard {shard}: no records (only {len(items)} "
                f"for {shard.count} shards)")
        run.extra = produce(run, items[start:end], out)
        run.complete()
        ui.info(f"{command}: shard {shard} complete -> {path.parent}")
    from cai_cli.run.lock import merge_lock

    with merge_lock(config.run_dir, command):
        if not path.is_file():
            return layout.stage_dir(command)  # merged by the shard that finished with us
        found = next((s for s in shard_sets(spec) if s.count == shard.count), None)
        if found is None or found.incomplete:
            ui.info(f"{command}: {found.describe() if found else 'shards missing'}. The last "
                    f"shard to finish merges them (or `cai merge {command} --config ...`).")
            return None
        return merge(module, config, spec, shard.count)


def _remove_own_temporaries(directory: Path, shard: Shard) -> None:
    """Temporary files a killed run of this shard left (``write_atomic``'s ``.NAME.tmp-PID``);
    other shards' are theirs: they may be writing them now."""
    if directory.is_dir():
        for path in directory.glob(f".*.{shard.index}-of-{shard.count}.*.tmp-*"):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Merging


def merge(module, config: Config, spec: StageSpec, count: int) -> Path:
    """Merge the ``count`` complete parts of this config into the stage's files, finish the stage
    as its unsharded run does, complete its manifest and remove the parts. The caller holds the
    stage's merge lock (a shard) or the run directory's lock (``cai merge``)."""
    layout, command = config.layout, spec.command
    manifests = [load_manifest(*_split(layout.shard_manifest(command, i, count)))
                 for i in range(count)]
    parts = [{name: layout.shard_file(command, name, i, count) for name in module.PARTS}
             for i in range(count)]
    ui.info(f"{command}: merging {count} shards into {spec.directory}")
    run = StageRun(spec, config, resuming=False)
    run.manifest.started_at = min(m["started_at"] for m in manifests)
    run.manifest.counts["shards"] = count
    run.manifest.timings["slowest_shard_seconds"] = max(
        (m.get("timings") or {}).get("seconds", 0.0) for m in manifests)
    extras = [m.get("extra") or {} for m in manifests]
    merge_parts = getattr(module, "merge_parts", None)
    extra = (merge_parts(config, parts, extras) if merge_parts else
             concatenate_parts(layout, command, module.PARTS, parts, extras))
    # An unsharded run of this config that was interrupted left its own progress: it is obsolete.
    for name in module.PARTS:
        final = layout.stage_dir(command) / name
        final.with_name(name + ".partial").unlink(missing_ok=True)
        final.with_name(f".{name}.progress.json").unlink(missing_ok=True)
    result = module.finish(config, run, extra)
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


def sum_extras(extras: list[dict]) -> dict:
    total: dict[str, Any] = {}
    for extra in extras:
        for key, value in extra.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                total[key] = total.get(key, 0) + value
            else:
                total.setdefault(key, value)
    return total


def concatenate_atomic(sources: list[Path], target: Path) -> None:
    """``target`` becomes the sources one after the other, in one rename (streamed: parts may be
    larger than memory)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with tmp.open("wb") as out:
        for source in sources:
            with source.open("rb") as handle:
                while chunk := handle.read(1 << 20):
                    out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    _fsync_dir(target.parent)


def merge_by_hand(config: Config, command: str) -> Path | None:
    """``cai merge STAGE``: merge the complete shards of this config; say what is missing
    otherwise. The caller holds the run directory's lock, so no shard is running."""
    from cai_cli.stages import stage_module

    if command not in SHARDABLE:
        raise UserError(f"cai merge {command}: only {', '.join(SHARDABLE)} run in shards")
    module = stage_module(command)
    spec = module.spec(config)
    sets = shard_sets(spec)
    if not sets:
        if spec.state() == "done":
            ui.info(f"{command}: {spec.directory} is complete for this config; nothing to merge")
            return spec.directory
        raise UserError(f"{_layout(spec).shards_dir(command)}: no shards of this config to "
                        f"merge; run `cai {command} --config ... --shard I/N` for I = 0 to N-1 "
                        "first")
    if sets[0].incomplete:
        raise UserError(f"{spec.directory} cannot be merged yet: "
                        + "; ".join(s.describe() for s in sets)
                        + f". Run the missing shards (`cai {command} --config ... --shard I/N`);"
                        " the last one to finish merges by itself")
    return merge(module, config, spec, sets[0].count)
