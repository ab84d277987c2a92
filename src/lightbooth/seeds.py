"""Seeds derived from seeds: one copy, shared by generation (fresh noise per step) and the trainers (every draw)."""

from __future__ import annotations

import numpy as np


def draw_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (numpy's SeedSequence hashing: nearby keys give unrelated streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, np.uint64)[0] >> np.uint64(1))
