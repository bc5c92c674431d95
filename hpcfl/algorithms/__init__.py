"""Aggregation rules, one module per method, registered by name (see base.py for the interface)."""

from hpcfl.algorithms.base import (Algorithm, Decision, algorithm_class, available, build_algorithm,
                                   register_algorithm)
from hpcfl.algorithms import fedavg, qfedavg, afl, fairfed, fedce, fedga, fedism  # noqa: F401,E402 (register)

__all__ = ["Algorithm", "Decision", "algorithm_class", "available", "build_algorithm", "register_algorithm"]
