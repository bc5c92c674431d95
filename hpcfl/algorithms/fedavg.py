"""FedAvg (McMahan et al., AISTATS'17; reference §5.1): w^{t+1} = Σ n_i w_i / Σ n_i."""

from __future__ import annotations

from hpcfl.algorithms.base import Algorithm, Decision, normalise, register_algorithm


@register_algorithm("fedavg")
class FedAvg(Algorithm):
    order = 0

    def aggregate(self, t, sizes, stats):
        return Decision(normalise(sizes))
