"""Agnostic federated learning (reference §5.3).

``as_coded`` (the official code: q-FedAvg with q ≥ 100): all weight on the client with the highest loss at w^t,
so w^{t+1} is that client's local model (ties: the lowest client id).

``minimax`` (Mohri et al., ICML'19): mixture weights λ on the simplex, updated each round by projected gradient
ascent on the client losses at w^t, λ ← Π_Δ(λ + γ_λ·L(w^t)), starting from uniform; the model is aggregated with
the updated λ.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from hpcfl.algorithms.base import Algorithm, AlgorithmOptions, Decision, project_to_simplex, register_algorithm
from hpcfl.options import option


@register_algorithm("afl")
class AFL(Algorithm):
    variants = ("as_coded", "minimax")
    order = 1
    weight_state = ("lam",)

    @dataclass
    class Options(AlgorithmOptions):
        afl_lambda_lr: float = option(0.01, lo=0.0, doc="afl minimax: step γ_λ of the projected ascent on λ")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lam: list[float] | None = None

    def stats_before(self, t):
        return ("loss",)

    def aggregate(self, t, sizes, stats):
        losses = np.asarray(stats["loss"], dtype=np.float64)
        if self.opts.variant == "minimax":
            lam = np.full(len(losses), 1.0 / len(losses)) if self.lam is None else np.asarray(self.lam)
            lam = project_to_simplex(lam + self.opts.afl_lambda_lr * losses)
            self.lam = lam.tolist()
            return Decision(lam)
        one_hot = np.zeros(len(losses))
        one_hot[int(np.argmax(losses))] = 1.0
        return Decision(one_hot)

    def state_dict(self):
        return {"lam": self.lam}

    def load_state_dict(self, state):
        self.lam = state["lam"]
