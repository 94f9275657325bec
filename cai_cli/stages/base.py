"""The one shape every stage has.

A stage is an object with:

- ``command``: its command name, and the run directory folder that holds its output
  (``run.layout.STAGE_DIRS``);
- ``spec(config)``: what decides its output (settings, input fingerprints), from which
  ``cai status`` and ``cai run`` tell done / partial / stale / missing without loading a model;
- ``needs(config)``: the earlier stages whose output it reads;
- ``preflight(config)``: what can be checked before anything runs (trainer arguments,
  trackers, models that must exist), for ``cai run``, ``cai config validate`` and the stage
  itself;
- ``work(config, ctx)``: the engine calls it will make, in order (``engines.work``): what
  ``cai plan`` prices, read from the same helpers the stage's ``run`` uses;
- ``run(config, force=...)``: the stage itself.

The stages that make records one prompt (or request) at a time derive from ``RecordStage``:
their ``run`` is the same everywhere (checks, then one shard of the items or the whole, then
``finish``), so sharding (``--shard I/N``) is a property of the stage (its ``parts``), not
something each stage wires up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from cai_cli.config import Config
from cai_cli.run.spec import StageSpec
from cai_cli.stages.common import Need, NothingMade, StageRun, begin, require_complete

if TYPE_CHECKING:
    from cai_cli.engines.work import Work
    from cai_cli.run.shards import Shard


class Stage:
    """A stage of the pipeline (see the module's docstring)."""

    command: ClassVar[str]
    trains: ClassVar[bool] = False  # may run under torchrun / accelerate launch; can be uploaded
    # The record files a shard writes its part of; a stage without them does not run in shards.
    parts: ClassVar[tuple[str, ...]] = ()

    @property
    def shardable(self) -> bool:
        return bool(self.parts)

    def spec(self, config: Config) -> StageSpec:
        raise NotImplementedError

    def needs(self, config: Config) -> list[Need]:
        return []

    def preflight(self, config: Config) -> None:
        """Raise ``UserError`` for what would make the stage fail once started; loads no model
        weights and writes nothing."""

    def check_needs(self, config: Config) -> None:
        """Every required earlier output is there and finished (else a ``UserError`` naming the
        command that makes it)."""
        for need in self.needs(config):
            if need.required:
                require_complete(config, need)

    def output(self, config: Config) -> Path:
        """The stage's main artifact (or its directory)."""
        return config.layout.stage_dir(self.command)

    def work(self, config: Config, ctx) -> "Work":
        raise NotImplementedError

    def run(self, config: Config, *, force: bool = False, shard: "Shard | None" = None) -> Path | None:
        raise NotImplementedError


class RecordStage(Stage):
    """A stage that makes its records from a list of items (prompts, requests), each seeded by
    its own id, so any contiguous range of them can run as a shard of its own."""

    def items(self, config: Config, *, force: bool) -> list:
        """The items (after the stage's checks: this runs before anything is written)."""
        raise NotImplementedError

    def outputs(self, config: Config) -> dict[str, Path]:
        """Where an unsharded run writes each of ``parts``."""
        directory = config.layout.stage_dir(self.command)
        return {name: directory / name for name in self.parts}

    def produce(self, config: Config, run: StageRun, items: list, out: dict[str, Path], *,
                force: bool, whole: bool) -> dict:
        """The records of ``items`` into the files ``out`` (resumable); returns what ``finish``
        needs (numbers are summed over shards). ``whole``: the unsharded run."""
        raise NotImplementedError

    def finish(self, config: Config, run: StageRun, extra: dict) -> Path:
        """Once the record files are complete (one run, or shards merged): what follows from
        them, the manifest's counts, and the stage marked complete; ``NothingMade`` when every
        item was skipped (``produce`` says so earlier for a whole run, before its files move
        into place)."""
        raise NotImplementedError

    def merge_parts(self, config: Config, parts: list[dict[str, Path]],
                    extras: list[dict]) -> dict:
        """The shards' parts into the stage's files, in the order one run writes them; by
        default each file is its parts one after the other."""
        from cai_cli.stages.sharded import concatenate_parts

        return concatenate_parts(config.layout, self.command, self.parts, parts, extras)

    def run(self, config: Config, *, force: bool = False, shard: "Shard | None" = None) -> Path | None:
        """The whole stage, or with ``shard`` that shard's range of the items."""
        spec = self.spec(config)
        items = self.items(config, force=force)
        if shard is not None:
            from cai_cli.stages.sharded import run_shard

            return run_shard(self, config, spec, shard, items, force=force)
        run = begin(spec, config, force=force)
        if run is None:
            return self.output(config)
        try:
            extra = self.produce(config, run, items, self.outputs(config), force=force, whole=True)
            return self.finish(config, run, extra)
        except NothingMade:  # every item skipped: fixing the settings and rerunning starts anew
            run.discard()
            raise
