"""FedISM (Wu et al., IJCAI'24; reference §3) and FedISM+ (§4): inter-client sharpness matching.

Each client measures its sharpness at the broadcast model, S_i = max(L_i(w^t + ε_i) − L_i(w^t), 1e-10) with
ε_i = ρ_t·∇L_i/‖∇L_i‖ (plain CE over its whole shard, eval mode; ``hpcfl/local/stats.py``). The server weights
â_i = S_i/Σ S, â ← (â + 1e-10)^q normalised, then an EMA over rounds a^t = β·â^t + (1 − β)·a^{t−1} (a^0 = â^0).
Data sizes are not used. Local training is GSAM by default.

FedISM+ differs only in the search distance: ρ_t = ρ·((t+1)/T)^p, used by local GSAM and the measurement alike.
"""

from __future__ import annotations

import numpy as np

from hpcfl.algorithms.base import Algorithm, Decision, normalise, register_algorithm


def sharpness_weights(sharpness: np.ndarray, q: float) -> np.ndarray:
    a = normalise(np.maximum(np.asarray(sharpness, dtype=np.float64), 1e-10))
    return normalise((a + 1e-10) ** q)


@register_algorithm("fedism")
class FedISM(Algorithm):
    default_q = 2.0
    default_local_optimizer = "gsam"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.prev: list[float] | None = None

    def stats_before(self, t):
        return ("sharpness",)

    def aggregate(self, t, sizes, stats):
        a = sharpness_weights(stats["sharpness"], self.q)
        if self.prev is not None:
            beta = self.opts.ema_beta
            a = beta * a + (1.0 - beta) * np.asarray(self.prev)
        self.prev = a.tolist()
        return Decision(normalise(a))

    def state_dict(self):
        return {"prev": self.prev}

    def load_state_dict(self, state):
        self.prev = state["prev"]


@register_algorithm("fedism_plus")
class FedISMPlus(FedISM):
    def rho(self, t):
        return self.opts.rho * ((t + 1) / self.rounds) ** self.opts.rho_power
