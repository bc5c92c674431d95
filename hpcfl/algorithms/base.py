"""The algorithm interface and its registry: the one list of methods.

An algorithm is the server's rule: per-client statistics in (NumPy arrays of N values, computed by the clients
on their own shards and gathered by the protocol), aggregation weights out. It imports neither MPI nor torch, and
its cross-round state is a plain dict of lists and floats (``state_dict``), ready for checkpoints.

A method is one module in this package: a subclass of :class:`Algorithm` decorated with
``@register_algorithm("name")``, with its own config keys in a nested ``Options`` dataclass (a subclass of
:class:`AlgorithmOptions`). The package imports every module in it, the config's ``[algorithm]`` section is built
from the registry, and reports, sweeps and tests list the methods from it: adding a method touches one file
(docs/algorithms.md, "Adding a method").

What the protocol offers an algorithm each round t:

- ``stats_before(t)``: names of statistics the clients compute at the broadcast model w^t before training
  (``hpcfl/client/stats.py`` defines each name);
- always, after training: ``train_loss`` (mean mini-batch loss), ``steps``, ``update_sq_norm`` (‖w^t − w_i‖²
  over the parameters);
- ``consensus_weights(t, prev_weights)``: when not None, the clients also receive the consensus model
  Σ_j c_j w_j^t of their new local models with these weights, and each computes ``consensus_statistics`` of its
  own update against it (FedCE's cosines), named by ``consensus_stats``;
- ``keeps_local_model``: clients keep their last local model w_i^{t-1} for the next round's statistics.

``stats_before``, ``rho``, ``consensus_weights`` and ``consensus_statistics`` run on every rank and must depend on
their arguments and options only; ``aggregate`` and the state run on the server. ``aggregate`` returns a
``Decision``: w^{t+1} = keep · w^t + Σ_i weights_i · w_i^t. For a model average ``keep = 0`` and the weights sum to
1; q-FFL's update keeps part of w^t.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hpcfl.options import ConfigError, option


# What the protocol measures after local training, for every algorithm (its table of training results).
AFTER_TRAINING = ("train_loss", "steps", "update_sq_norm")


@dataclass
class Decision:
    weights: np.ndarray  # N float64
    keep: float = 0.0  # coefficient of the broadcast model w^t in w^{t+1}


@dataclass
class AlgorithmOptions:
    """The keys of [algorithm] that every method has. A method's ``Options`` adds its own."""

    name: str = option("fedavg", doc="aggregation rule")
    variant: str = option("as_coded", doc="'as_coded' = the official code; the papers' versions where a method "
                                          "has them (qfedavg: 'qffl'; afl: 'minimax'; fairfed: 'corrected')")
    rho: float = option(0.05, lo=0.0, doc="search distance ρ (ρ_max of fedism_plus) of local SAM/GSAM and of the "
                                          "sharpness measurement")
    stats_augment: bool = option(True, doc="client statistics on augmented data (as the reference) or "
                                           "un-augmented")


def q_option(doc: str):
    """``q``, shared by methods that raise something to a power: -1 selects the method's own default."""
    return option(-1.0, lo=-1.0, doc=doc)


class Algorithm:
    name: str = ""
    variants: tuple[str, ...] = ("as_coded",)
    default_local_optimizer: str = "plain"
    keeps_local_model: bool = False
    consensus_stats: tuple[str, ...] = ()
    order: int = 100  # place in listings and report tables (the paper's order; new methods come last)
    weight_state: tuple[str, ...] = ()  # state keys that hold aggregation weights (checked to be >= 0)
    Options = AlgorithmOptions

    def __init__(self, opts: AlgorithmOptions, rounds: int, lr: float):
        """``opts``: this method's options; ``rounds``: T (for schedules); ``lr``: the local learning rate (q-FFL's
        default Lipschitz constant is 1/lr)."""
        self.opts, self.rounds, self.lr = opts, rounds, lr

    @classmethod
    def check_options(cls, opts: AlgorithmOptions) -> None:
        """Refuse option values that are in range but meaningless together (raise ConfigError)."""
        if cls.variants and opts.variant not in cls.variants:
            raise ConfigError(f"algorithm.variant: {opts.variant!r} is not a variant of {cls.name} "
                              f"(its variants: {', '.join(cls.variants)})")
        q = getattr(opts, "q", None)
        if q is not None and q < 0 and q != -1.0:
            raise ConfigError(f"algorithm.q: {q!r} must be -1 (the method's default) or >= 0")

    # ------------------------------------------------------------------ every rank
    def stats_before(self, t: int) -> tuple[str, ...]:
        return ()

    def rho(self, t: int) -> float:
        """Search distance ρ_t of round t (local SAM/GSAM and the sharpness measurement)."""
        return self.opts.rho

    def consensus_weights(self, t: int, prev_weights: np.ndarray) -> np.ndarray | None:
        return None

    def consensus_statistics(self, local: np.ndarray, global_vec: np.ndarray, consensus: np.ndarray,
                             own_weight: float, param_mask: np.ndarray) -> tuple[float, ...]:
        raise NotImplementedError

    # ------------------------------------------------------------------ the server
    def aggregate(self, t: int, sizes: np.ndarray, stats: dict[str, np.ndarray]) -> Decision:
        raise NotImplementedError

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def check_state(self, state: dict, num_clients: int) -> None:
        """Refuse a checkpointed state this method could not continue from (ValueError naming the key). This
        default fits states made of per-client rows: a key that starts as None holds None or one row of N finite
        numbers; a key that starts as [] holds a history, a list of such rows."""
        fresh = self.state_dict()
        if not isinstance(state, dict) or sorted(state) != sorted(fresh):
            raise ValueError(f"keys {sorted(state) if isinstance(state, dict) else state!r}, expected {sorted(fresh)}")
        for key, value in state.items():
            if fresh[key] == []:
                if not isinstance(value, list):
                    raise ValueError(f"{key!r} must be a list of rows")
                rows = value
            else:
                rows = [] if value is None else [value]
            for row in rows:
                if not (isinstance(row, list) and len(row) == num_clients
                        and all(type(x) in (int, float) and np.isfinite(x) for x in row)):
                    raise ValueError(f"{key!r} must hold {num_clients} finite numbers per row")
                if key in self.weight_state and (min(row) < 0 or sum(row) <= 0):
                    raise ValueError(f"{key!r} holds weights: non-negative, not all zero")


_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(name: str) -> Callable[[type[Algorithm]], type[Algorithm]]:
    def deco(cls):
        if name in _REGISTRY:
            raise ValueError(f"algorithm {name!r} registered twice")
        if not (dataclasses.is_dataclass(cls.Options) and issubclass(cls.Options, AlgorithmOptions)):
            raise TypeError(f"{cls.__name__}.Options must be a dataclass subclassing AlgorithmOptions")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def available() -> list[str]:
    """The registered methods, in listing order."""
    return sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].order, n))


def algorithm_class(name: str) -> type[Algorithm]:
    if name not in _REGISTRY:
        raise ConfigError(f"algorithm.name: unknown algorithm {name!r} (known: {', '.join(available())})")
    return _REGISTRY[name]


def options_of(name: str, section) -> AlgorithmOptions:
    """The method's own ``Options`` taken from the config's [algorithm] section (which holds every method's keys)."""
    cls = algorithm_class(name)
    return cls.Options(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls.Options)})


def build_algorithm(cfg) -> Algorithm:
    """The run's algorithm, handed its own options, the number of rounds and the local learning rate."""
    cls = algorithm_class(cfg.algorithm.name)
    return cls(options_of(cls.name, cfg.algorithm), rounds=cfg.run.rounds, lr=cfg.train.lr)


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
