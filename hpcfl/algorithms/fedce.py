"""FedCE (Jiang et al., CVPR'23), as the reference codes it (§5.5).

State: the coefficients c (uniform at first) and the per-round histories of cosines, leave-one-out accuracies
and raw coefficients. Each round t:

1. before training (t > 0), client i measures mv_i = balanced accuracy of the leave-one-out model
   w_{−i} = (w^t − c_i w_i^{t−1}) / (1 − c_i) on its data (mv = 0 at t = 0); minus_val_i = 1 − mean_τ mv_i^τ;
2. after training, with Δ_i = w_i^t − w^t (parameters only) and the consensus Δ_c = Σ_j c_j Δ_j, client i
   measures cos_i = cos(Δ_i, Δ_c − c_i Δ_i); cw_i = 1 − mean_τ cos_i^τ;
3. with cw and minus_val each normalised to sum 1, new = cw · minus_val (mode ``times``) or cw + minus_val
   (``plus``), normalised; c = mean_τ new^τ (time average); the model is aggregated with c.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from hpcfl.algorithms.base import Algorithm, AlgorithmOptions, Decision, normalise, register_algorithm
from hpcfl.options import option


def _unit_sum(v: np.ndarray) -> np.ndarray:
    total = v.sum()
    return v / total if total > 0 else np.full(len(v), 1.0 / len(v))


def update_cosine(local: np.ndarray, global_vec: np.ndarray, consensus: np.ndarray, weight: float,
                  mask: np.ndarray) -> float:
    """cos(Δ_i, Δ_c − c_i·Δ_i) with Δ_i = w_i − w^t and Δ_c = consensus − w^t, over parameters only."""
    g = global_vec[mask].astype(np.float64)
    d_i = local[mask] - g
    d_rest = (consensus[mask] - g) - weight * d_i
    denom = np.linalg.norm(d_i) * np.linalg.norm(d_rest)
    return float(np.dot(d_i, d_rest) / denom) if denom > 0 else 0.0


@register_algorithm("fedce")
class FedCE(Algorithm):
    keeps_local_model = True
    consensus_stats = ("cosine",)
    order = 4

    @dataclass
    class Options(AlgorithmOptions):
        fedce_mode: str = option("times", choices=("times", "plus"),
                                 doc="fedce: how cosine and leave-one-out terms combine")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cos_hist: list[list[float]] = []
        self.mv_hist: list[list[float]] = []
        self.new_hist: list[list[float]] = []

    def stats_before(self, t):
        return ("loo_bacc",) if t > 0 else ()

    def consensus_weights(self, t, prev_weights):
        return prev_weights  # the consensus update Δ_c = Σ_j c_j Δ_j, with last round's coefficients

    def consensus_statistics(self, local, global_vec, consensus, own_weight, param_mask):
        return (update_cosine(local, global_vec, consensus, own_weight, param_mask),)

    def aggregate(self, t, sizes, stats):
        n = len(sizes)
        self.mv_hist.append(list(map(float, stats["loo_bacc"])) if t > 0 else [0.0] * n)
        self.cos_hist.append(list(map(float, stats["cosine"])))
        minus_val = _unit_sum(1.0 - np.mean(self.mv_hist, axis=0))
        cw = _unit_sum(1.0 - np.mean(self.cos_hist, axis=0))
        new = cw * minus_val if self.opts.fedce_mode == "times" else cw + minus_val
        self.new_hist.append(_unit_sum(new).tolist())
        return Decision(normalise(np.mean(self.new_hist, axis=0)))

    def state_dict(self):
        return {"cos_hist": self.cos_hist, "mv_hist": self.mv_hist, "new_hist": self.new_hist}

    def load_state_dict(self, state):
        self.cos_hist, self.mv_hist, self.new_hist = state["cos_hist"], state["mv_hist"], state["new_hist"]
