"""What decides a stage's output, and where the stage stands.

A stage is described by a ``StageSpec``: its directory, the config settings that decide its
output and fingerprints of its inputs. Their hash is the stage's fingerprint. It is stored in the
stage's manifest, so a rerun can tell "already done", "interrupted, resume" and "made from
something else" apart without loading a model. ``cai status``, ``cai run`` and every stage use
the same specs.

No heavy imports here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai_cli.run.artifacts import config_hash, diff_keys, load_manifest
from cai_cli.run.layout import RunLayout
from cai_cli.run.shards import ShardSet, shard_sets

NEXT_MANIFEST = ".manifest.next.json"  # a run that replaces complete output, until it completes


@dataclass
class StageSpec:
    command: str  # the command that makes this stage's output, e.g. "generate-sl"
    directory: Path
    settings: dict[str, Any]  # config values that decide the output (JSON-able)
    inputs: dict[str, str] = field(default_factory=dict)  # name -> fingerprint
    shardable: bool = False  # runs in shards (--shard I/N): its parts count towards its state

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

    def shard_sets(self) -> list[ShardSet]:
        """The shard sets of this stage made from the current config, most complete first."""
        if not self.shardable:
            return []
        return shard_sets(RunLayout.of(self.directory.parent), self.command, self.fingerprint)

    def sharded(self) -> str | None:
        """A line describing a sharded run of this config that is not merged yet, or None."""
        sets = self.shard_sets()
        return sets[0].describe() if sets else None

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
