"""Seeded draws that do not depend on batching or order: every random choice is made by a
generator seeded with the run's seed and the id of what it is for (a prompt, a pair, a call).

No heavy imports here.
"""

from __future__ import annotations

import hashlib
import random


def record_seed(*parts: object) -> int:
    """A seed for one record from what identifies it, e.g. ``record_seed(config.seed, prompt.id,
    "answer")``: the same on every machine and run (unlike ``hash``), below 2**63. Backends
    sample each prompt with its own seed, so a record's text does not depend on the batch, the
    shard or the position it ran in."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def draw(rng: random.Random, items: tuple, count: int) -> list:
    """``count`` items, all different while the pool lasts, then drawn again from the full pool."""
    out: list = []
    while len(out) < count and items:
        out += rng.sample(items, min(count - len(out), len(items)))
    return out
