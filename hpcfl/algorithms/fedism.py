"""FedISM (Wu et al., IJCAI'24; reference §3) and FedISM+ (§4): inter-client sharpness matching.

Each client measures its sharpness at the broadcast model, S_i = max(L_i(w^t + ε_i) − L_i(w^t), 1e-10) with
ε_i = ρ_t·∇L_i/‖∇L_i‖ (plain CE over its whole shard, eval mode; ``hpcfl/client/stats.py``). The server weights
â_i = S_i/Σ S, â ← (â + 1e-10)^q normalised, then an EMA over rounds a^t = β·â^t + (1 − β)·a^{t−1} (a^0 = â^0).
Data sizes are not used. Local training is GSAM by default.

FedISM+ differs only in the search distance: ρ_t = ρ·((t+1)/T)^p, used by local GSAM and the measurement alike.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from hpcfl.algorithms.base import Algorithm, AlgorithmOptions, Decision, normalise, q_option, register_algorithm
from hpcfl.options import option


def sharpness_weights(sharpness: np.ndarray, q: float) -> np.ndarray:
    a = normalise(np.maximum(np.asarray(sharpness, dtype=np.float64), 1e-10))
    return normalise((a + 1e-10) ** q)


@register_algorithm("fedism")
class FedISM(Algorithm):
    default_local_optimizer = "gsam"
    order = 6
    weight_state = ("prev",)

    @dataclass
    class Options(AlgorithmOptions):
        q: float = q_option("fedism: exponent of the sharpness (-1: 2)")
        ema_beta: float = option(0.5, lo=0.0, hi=1.0, doc="fedism: EMA weight of the new round's weights")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prev: list[float] | None = None

    @property
    def q(self) -> float:
        return self.opts.q if self.opts.q >= 0 else 2.0

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
    order = 7

    @dataclass
    class Options(FedISM.Options):
        rho_power: float = option(0.5, lo=0.0, doc="fedism_plus: ρ_t = ρ·((t+1)/T)^rho_power")

    def rho(self, t):
        return self.opts.rho * ((t + 1) / self.rounds) ** self.opts.rho_power
