"""FairFed (Ezzeldin et al., AAAI'23), as the reference adapts it (§5.4).

Round 0: a = n / Σ n. Round t > 0, with acc_i the balanced accuracy of w^t on client i's data:
a_i ← a_i − β·(Δ_i − mean_j Δ_j), clipped at 0 and renormalised, where

- ``as_coded`` (the official code's bug: the "global" accuracy is never summed): Δ_i = |acc_i − acc_i·n_i/Σn|;
- ``corrected`` (the intended data-weighted global metric): Δ_i = |acc_i − Σ_j n_j acc_j / Σ n|.

β is ``algorithm.fairness_beta`` (the official code reads it from --q, default 1.0).
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from hpcfl.algorithms.base import Algorithm, AlgorithmOptions, Decision, normalise, register_algorithm
from hpcfl.options import option


def fairfed_step(prev: np.ndarray, acc: np.ndarray, sizes: np.ndarray, beta: float, corrected: bool) -> np.ndarray:
    acc = np.asarray(acc, dtype=np.float64)
    share = np.asarray(sizes, dtype=np.float64) / np.sum(sizes)
    global_acc = (share * acc).sum() if corrected else acc * share
    gap = np.abs(acc - global_acc)
    w = np.maximum(np.asarray(prev) - beta * (gap - gap.mean()), 0.0)
    return normalise(w)


@register_algorithm("fairfed")
class FairFed(Algorithm):
    variants = ("as_coded", "corrected")
    order = 3
    weight_state = ("prev",)

    @dataclass
    class Options(AlgorithmOptions):
        fairness_beta: float = option(1.0, lo=0.0, doc="fairfed: step β of the weight update")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prev: list[float] | None = None

    def stats_before(self, t):
        return ("bacc",) if t > 0 else ()

    def aggregate(self, t, sizes, stats):
        if t == 0 or self.prev is None:
            w = normalise(sizes)
        else:
            w = fairfed_step(np.asarray(self.prev), stats["bacc"], sizes, self.opts.fairness_beta,
                             corrected=self.opts.variant == "corrected")
        self.prev = w.tolist()
        return Decision(w)

    def state_dict(self):
        return {"prev": self.prev}

    def load_state_dict(self, state):
        self.prev = state["prev"]
