"""``cai merge STAGE``: merge the complete shards of a stage into its files by hand (the last
shard to finish does it by itself)."""

from __future__ import annotations

from cai_cli.errors import UserError


def merge(command: str, config) -> None:
    from cai_cli.commands.stage import writing
    from cai_cli.stages.pipeline import STAGES
    from cai_cli.stages.sharded import merge_by_hand

    shardable = [name for name, stage in STAGES.items() if stage.shardable]
    if command not in shardable:
        raise UserError(f"cai merge {command}: only {', '.join(shardable)} run in shards")
    writing("merge", config, False, lambda: merge_by_hand(STAGES[command], config))
