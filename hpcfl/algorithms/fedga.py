"""FedGA (Zhang et al., CVPR'23), as the reference codes it (§5.6).

Round 0: a = 1/N. Round t > 0: with the generalisation gap G_i = L_i(w^t) − L_i(w_i^{t−1}) (plain CE of the new
global model minus that of client i's own previous local model, both on client i's data), centred
(G ← G − mean G), and the step d_t = d·(T − t)/T (d = ``algorithm.fedga_step``, 0.05):
a ← a + (d_t/N)·G / max_j |G_j|, normalised to sum 1, then negatives clipped to 0 (not renormalised: the
clipped vector is carried to the next round; the aggregation renormalises).
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from hpcfl.algorithms.base import Algorithm, AlgorithmOptions, Decision, normalise, register_algorithm
from hpcfl.options import option


def fedga_step(prev: np.ndarray, gap: np.ndarray, step: float) -> np.ndarray:
    gap = np.asarray(gap, dtype=np.float64)
    gap = gap - gap.mean()
    biggest = np.abs(gap).max()
    w = np.asarray(prev, dtype=np.float64)
    if biggest > 0:
        w = w + step / len(w) * gap / biggest
    w = w / w.sum()
    return np.maximum(w, 0.0)


@register_algorithm("fedga")
class FedGA(Algorithm):
    keeps_local_model = True
    order = 5
    weight_state = ("prev",)

    @dataclass
    class Options(AlgorithmOptions):
        fedga_step: float = option(0.05, lo=0.0, doc="fedga: base step d (decays linearly to 0 over the rounds)")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prev: list[float] | None = None

    def stats_before(self, t):
        return ("loss", "loss_prev_local") if t > 0 else ()

    def aggregate(self, t, sizes, stats):
        n = len(sizes)
        if t == 0 or self.prev is None:
            w = np.full(n, 1.0 / n)
        else:
            step = self.opts.fedga_step * (self.rounds - t) / self.rounds
            w = fedga_step(np.asarray(self.prev), stats["loss"] - stats["loss_prev_local"], step)
        self.prev = w.tolist()
        return Decision(normalise(w))

    def state_dict(self):
        return {"prev": self.prev}

    def load_state_dict(self, state):
        self.prev = state["prev"]
