"""Declared options: a dataclass field with its valid range or choices and a one-line meaning.

Every config key is one such field, declared where it is used: the run's sections in ``hpcfl/config.py``, an
algorithm's own keys in its module (``hpcfl/algorithms/``). ``check_value`` is the one type and range check
they all go through, so a typo or an out-of-range value is refused with the key's name wherever it was declared.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Any

from hpcfl.errors import UsageError


class ConfigError(UsageError, ValueError):
    """A configuration problem the user must fix; the message names the key."""


def option(default, *, lo=None, hi=None, lo_open=False, choices=None, doc=""):
    """A field with its valid range (``lo``/``hi`` inclusive unless ``lo_open``) or its allowed values."""
    meta = {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices, "doc": doc}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def default_of(f: dataclasses.Field) -> Any:
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def check_value(key: str, value: Any, f: dataclasses.Field) -> Any:
    """Type-check ``value`` against field ``f`` (exact types: a bool is not an int) and its range."""
    want = type(default_of(f))
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if want is list and isinstance(value, tuple):
        value = list(value)
    if type(value) is not want:
        raise ConfigError(f"{key}: expected {want.__name__}, got {type(value).__name__} ({value!r})")
    if want is float and not math.isfinite(value):
        raise ConfigError(f"{key}: {value!r} is not a finite number")
    m = f.metadata
    if m.get("choices") is not None and value not in m["choices"]:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, m['choices']))}")
    if m.get("lo") is not None:
        if value < m["lo"] or (m["lo_open"] and value == m["lo"]):
            op = ">" if m["lo_open"] else ">="
            raise ConfigError(f"{key}: {value!r} is out of range (must be {op} {m['lo']})")
    if m.get("hi") is not None and value > m["hi"]:
        raise ConfigError(f"{key}: {value!r} is out of range (must be <= {m['hi']})")
    return value


def same_declaration(a: dataclasses.Field, b: dataclasses.Field) -> bool:
    """Whether two declarations of one key agree (several algorithms may share a key, e.g. ``q``)."""
    keys = ("lo", "hi", "lo_open", "choices")
    return default_of(a) == default_of(b) and all(a.metadata.get(k) == b.metadata.get(k) for k in keys)
