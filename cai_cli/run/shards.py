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

This module holds what the run directory says about shards (which exist, which are complete)
and the byte-level merge; running a shard and merging a stage's parts is
``cai_cli.stages.sharded``. No heavy imports here: ``cai status`` uses it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_cli.errors import UserError
from cai_cli.run.artifacts import fsync_dir
from cai_cli.run.layout import RunLayout

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


def shard_sets(layout: RunLayout, command: str, fingerprint: str) -> list[ShardSet]:
    """The shard sets of stage ``command`` made from the config of ``fingerprint``, most
    complete first. Reads the part manifests and the shard locks' records; never waits."""
    from cai_cli.run.lock import holder, shard_lock_name

    directory = layout.shards_dir(command)
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
        if manifest.get("config_hash") != fingerprint or index >= count:
            continue
        sets.setdefault(count, ShardSet(command, count)).manifests[index] = manifest
    for found in sets.values():
        for index in range(found.count):
            record = holder(layout.root, shard_lock_name(command, index, found.count))
            if record is not None:
                found.running[index] = record
    return sorted(sets.values(), key=lambda s: (len(s.incomplete), s.count))


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
    fsync_dir(target.parent)
