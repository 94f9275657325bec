"""Seeded draws that do not depend on batching or order: every random choice is made by a
generator seeded with the run's seed and the id of what it is for (a prompt, a pair, a call).

No heavy imports here.
"""

from __future__ import annotations

import hashlib
import random


def call_seed(seed: int, *parts: object) -> int:
    """A 32-bit seed from the run's seed and any identifying parts, e.g. ``(seed, batch, step)``
    for one backend call or ``(seed, prompt id, step)`` for one record."""
    key = ":".join(str(part) for part in (seed, *parts))
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)


def draw(rng: random.Random, items: tuple, count: int) -> list:
    """``count`` items, all different while the pool lasts, then drawn again from the full pool."""
    out: list = []
    while len(out) < count and items:
        out += rng.sample(items, min(count - len(out), len(items)))
    return out
