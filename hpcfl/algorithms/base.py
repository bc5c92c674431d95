"""The algorithm interface and its registry.

An algorithm is the server's rule: per-client statistics in (NumPy arrays of N values, computed by the clients
on their own shards and gathered by the protocol), aggregation weights out. It imports neither MPI nor torch, and
its cross-round state is a plain dict of lists and floats (``state_dict``), ready for checkpoints.

What the protocol offers an algorithm each round t:
- ``stats_before(t)``: names of statistics the clients compute at the broadcast model w^t before training
  (see ``hpcfl/local/stats.py`` for each name's definition);
- always, after training: ``train_loss`` (mean mini-batch loss), ``steps``, ``update_sq_norm`` (‖w^t − w_i‖²
  over the parameters);
- ``needs_cosines``: FedCE's cos(Δ_i, Δ_c − c_i Δ_i) against the consensus update, as statistic ``cosine``;
- ``keeps_local_model``: clients keep their last local model w_i^{t-1} for the next round's statistics.

``aggregate`` returns a ``Decision``: w^{t+1} = keep · w^t + Σ_i weights_i · w_i^t. For a model average
``keep = 0`` and the weights sum to 1; q-FFL's update keeps part of w^t.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np


@dataclass
class Decision:
    weights: np.ndarray  # N float64
    keep: float = 0.0  # coefficient of the broadcast model w^t in w^{t+1}


class Algorithm:
    name: str = ""
    variants: tuple[str, ...] = ("as_coded",)
    default_q: float | None = None
    default_local_optimizer: str = "plain"
    keeps_local_model: bool = False
    needs_cosines: bool = False

    def __init__(self, cfg):
        self.cfg = cfg
        self.opts = cfg.algorithm
        self.rounds = cfg.run.rounds
        if self.opts.variant not in self.variants:
            from hpcfl.errors import UsageError

            raise UsageError(f"algorithm.variant: {self.opts.variant!r} is not a variant of {self.name} "
                             f"(its variants: {', '.join(self.variants)})")
        self.q = self.opts.q if self.opts.q >= 0 else self.default_q

    def stats_before(self, t: int) -> tuple[str, ...]:
        return ()

    def rho(self, t: int) -> float:
        """Search distance ρ_t of round t (local SAM/GSAM and the sharpness measurement)."""
        return self.opts.rho

    def aggregate(self, t: int, sizes: np.ndarray, stats: dict[str, np.ndarray]) -> Decision:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} registered twice")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    return list(_REGISTRY)


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise ValueError(f"algorithm.name: unknown algorithm {name!r} (known: {', '.join(available())})")
    return _REGISTRY[name]


def build_algorithm(cfg) -> Algorithm:
    """``cfg`` is the whole run config: algorithms read [algorithm] and, for schedules, run.rounds."""
    return algorithm_class(cfg.algorithm.name)(cfg)


def normalise(w: np.ndarray) -> np.ndarray:
    """Weights on the simplex; refuses vectors that cannot be normalised."""
    w = np.asarray(w, dtype=np.float64)
    total = w.sum()
    if not np.isfinite(total) or total <= 0 or (w < 0).any():
        raise ValueError(f"aggregation weights cannot be normalised: {w}")
    return w / total


def project_to_simplex(v: np.ndarray) -> np.ndarray:
    """Euclidean projection onto {x >= 0, sum x = 1} (Held et al. / Duchi et al. 2008, sort-based)."""
    v = np.asarray(v, dtype=np.float64)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    k = np.arange(1, len(v) + 1)
    r = k[u - css / k > 0][-1]
    return np.maximum(v - css[r - 1] / r, 0.0)
