"""Random streams keyed by (seed, client, round, purpose), never by the rank layout.

So single-rank mode and any world size draw the same numbers for the same client, and a resumed run the same as
an uninterrupted one: no random state needs checkpointing.
"""

from __future__ import annotations

import numpy as np
import torch

_PURPOSES = {"init": 0, "train": 1, "stats": 2}


def stream_seed(seed: int, client: int, round_idx: int, purpose: str) -> int:
    """A 63-bit seed for the random stream of (seed, client, round, purpose); client and round -1: none."""
    state = np.random.SeedSequence([seed, client + 1, round_idx + 1, _PURPOSES[purpose]]).generate_state(2)
    return int((int(state[0]) << 31 | int(state[1])) & (2 ** 63 - 1))


def generator(seed: int, client: int, round_idx: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, client, round_idx, purpose))
