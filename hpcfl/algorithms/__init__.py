"""Aggregation rules, one module per method, registered by name (see base.py for the interface).

Every module of this package is imported here, so a new method is one new file: its ``@register_algorithm``
makes it known to the config, the protocol, the reports, the sweeps and the tests.
"""

import importlib
import pkgutil

from hpcfl.algorithms.base import (Algorithm, AlgorithmOptions, Decision, algorithm_class, available,
                                   build_algorithm, options_of, register_algorithm)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["Algorithm", "AlgorithmOptions", "Decision", "algorithm_class", "available", "build_algorithm",
           "options_of", "register_algorithm"]
