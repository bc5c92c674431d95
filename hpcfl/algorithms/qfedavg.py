"""q-FedAvg (reference §5.2).

``as_coded`` (the official code): a loss-power reweighted model average, a_i = (L_i + 1e-10)^q / Σ_j (...),
with L_i the plain CE of the broadcast model w^t on client i's data. Data sizes are not used.

``qffl`` (Li et al., ICLR'20, the q-FFL update): with Lipschitz constant L (default 1/lr),
Δ_i = L·(w^t − w_i), h_i = q·L_i^{q−1}·‖Δ_i‖² + L·L_i^q and w^{t+1} = w^t − Σ L_i^q Δ_i / Σ h_i, i.e.
w^{t+1} = (1 − Σ b_i)·w^t + Σ b_i·w_i with b_i = L·L_i^q / Σ h. With q = 0 it is the uniform average.
"""

from __future__ import annotations

import numpy as np

from dataclasses import dataclass

from hpcfl.algorithms.base import Algorithm, AlgorithmOptions, Decision, normalise, q_option, register_algorithm
from hpcfl.options import option


def loss_power_weights(losses: np.ndarray, q: float) -> np.ndarray:
    return normalise((np.asarray(losses, dtype=np.float64) + 1e-10) ** q)


def qffl_decision(losses: np.ndarray, update_sq_norms: np.ndarray, q: float, lipschitz: float) -> Decision:
    losses = np.asarray(losses, dtype=np.float64)
    lq = losses ** q
    dq = q * losses ** (q - 1) if q != 0 else np.zeros_like(losses)
    h = dq * lipschitz ** 2 * np.asarray(update_sq_norms, dtype=np.float64) + lipschitz * lq
    b = lipschitz * lq / h.sum()
    return Decision(b, keep=float(1.0 - b.sum()))


@register_algorithm("qfedavg")
class QFedAvg(Algorithm):
    variants = ("as_coded", "qffl")
    order = 2

    @dataclass
    class Options(AlgorithmOptions):
        q: float = q_option("qfedavg: exponent of the loss (-1: 1)")
        qffl_lipschitz: float = option(0.0, lo=0.0, doc="qfedavg qffl: Lipschitz constant L; 0: 1/train.lr")

    @property
    def q(self) -> float:
        return self.opts.q if self.opts.q >= 0 else 1.0

    def stats_before(self, t):
        return ("loss",)

    def aggregate(self, t, sizes, stats):
        if self.opts.variant == "qffl":
            lipschitz = self.opts.qffl_lipschitz or 1.0 / self.lr
            return qffl_decision(stats["loss"], stats["update_sq_norm"], self.q, lipschitz)
        return Decision(loss_power_weights(stats["loss"], self.q))
