"""Grouping runs into settings (one table each) and methods (one row each), and refusing mixed tables."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpcfl.algorithms import available
from hpcfl.report.runs import ReportError, Run, training_corruption

METHOD_KEYS = ("algorithm.name", "algorithm.variant", "train.local_optimizer")
BUILTIN_KEYS = ("benchmark.num_corrupted", "benchmark.corruption", "benchmark.severity")
IGNORED_KEYS = ("run.seed", "run.out", "run.checkpoint_every", "run.round_timeout_s", "run.watchdog_floor_s",
                "data.cache_dir")  # never split a setting
AGREE_KEYS = ("run.rounds", "eval.every", "benchmark.test_severities")  # must agree within a setting


def method_of(run: Run) -> str:
    """"fedism", "afl (minimax)", "fedavg + sam"."""
    name, variant, opt = (run.get(k) for k in METHOD_KEYS)
    label = str(name) if variant == "as_coded" else f"{name} ({variant})"
    if opt != "auto" and opt != _default_optimizer(name):
        label += f" + {opt}"
    return label


def _default_optimizer(name: str) -> str | None:
    try:
        from hpcfl.algorithms import algorithm_class

        return algorithm_class(name).default_local_optimizer
    except Exception:  # noqa: BLE001 - an algorithm this version does not know: show the optimizer
        return None


def method_order(run: Run) -> tuple[int, str]:
    """Sort key of a run's method: the registry's listing order (baselines first), then the label."""
    name, known = run.get("algorithm.name"), available()
    return known.index(name) if name in known else len(known), method_of(run)


def _relevant(run: Run) -> dict[str, Any]:
    """The config keys that define a run's setting: the benchmark's only for the built-in data."""
    if run.builtin:
        return run.config
    return {k: v for k, v in run.config.items() if not k.startswith("benchmark.")}


def setting_keys(runs: list[Run], group_by: list[str]) -> list[str]:
    """The keys of the setting label, in config order: the default ones, those that differ, the --group-by ones."""
    for key in group_by:
        if not any(key in r.config for r in runs):
            raise ReportError(f"--group-by {key}: no run has this config key (keys look like section.key, "
                              "e.g. benchmark.num_corrupted)")
    keys = ["data.source"] + ([*BUILTIN_KEYS] if any(r.builtin for r in runs) else [])
    skip = set(keys) | set(METHOD_KEYS) | set(IGNORED_KEYS) | set(AGREE_KEYS)
    every_key = dict.fromkeys(k for r in runs for k in _relevant(r))
    missing = object()
    keys += [k for k in every_key if k not in skip and len({repr(_relevant(r).get(k, missing)) for r in runs}) > 1]
    return keys + [k for k in group_by if k not in keys]


@dataclass
class Setting:
    """One table: runs with the same setting label, by method."""

    label: tuple[tuple[str, Any], ...]
    methods: dict[str, list[Run]] = field(default_factory=dict)
    name: str = ""  # for file names

    @property
    def runs(self) -> list[Run]:
        return [r for group in self.methods.values() for r in group]

    @property
    def first(self) -> Run:
        return self.runs[0]

    @property
    def rounds(self) -> list[int]:
        return self.first.rounds

    @property
    def num_rounds(self) -> int:
        return self.first.get("run.rounds")

    def text(self, short: bool = False) -> str:
        return ", ".join(f"{k.split('.')[-1] if short else k}={_show(v)}" for k, v in self.label)

    def corrupted_set(self) -> tuple[str, str]:
        """(name of the corrupted test set, why that one)."""
        sets = [s for s in self.first.test_sets if s != "clean"]
        wanted = training_corruption(self.first)
        if wanted in sets:
            return wanted, "the training corruption"
        why = "no test set matches the training corruption" if wanted else "the training corruption is unknown"
        return sets[0], f"the first non-clean test set; {why}"


def _show(value: Any) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, tuple) else str(value)


def group_runs(runs: list[Run], group_by: list[str], last: int) -> list[Setting]:
    """Settings in order of first appearance, methods in the registry's order; checked (see check_setting)."""
    keys = setting_keys(runs, group_by)
    settings: dict[tuple, Setting] = {}
    for run in runs:
        rel = _relevant(run)
        label = tuple((k, rel[k]) for k in keys if k in rel)
        setting = settings.setdefault(label, Setting(label))
        setting.methods.setdefault(method_of(run), []).append(run)
    out = list(settings.values())
    for i, setting in enumerate(out, 1):
        setting.methods = dict(sorted(setting.methods.items(), key=lambda kv: method_order(kv[1][0])))
        setting.name = f"s{i}_" + _slug(setting.text(short=True))
        check_setting(setting, last)
    return out


def check_setting(setting: Setting, last: int) -> None:
    """Refuse what would make a table of mixed runs."""
    _same(setting, "numbers of rounds", lambda r: r.get("run.rounds"),
          hint=": report them separately, or add --group-by run.rounds")
    _same(setting, "evaluated rounds", lambda r: tuple(r.rounds), show=lambda v: f"{len(v)} evaluated rounds",
          hint=": check eval.every")
    _same(setting, "test sets", lambda r: tuple(r.test_sets), show=", ".join)
    for method, group in setting.methods.items():
        seen: dict[int, Path] = {}
        for r in group:
            if r.seed in seen:
                raise ReportError(f"the same seed twice in {method}, setting {setting.text()}: {seen[r.seed]} and "
                                  f"{r.path} both have run.seed = {r.seed}")
            seen[r.seed] = r.path
    sets = setting.first.test_sets
    if "clean" not in sets or len(sets) < 2:
        raise ReportError(f"{setting.first.path}: needs a 'clean' and a corrupted test set, has "
                          f"{', '.join(sets) or 'none'}")
    if len(setting.rounds) < last:
        raise ReportError(f"setting {setting.text()}: only {len(setting.rounds)} evaluated round(s), fewer than "
                          f"--last {last}")


def _same(setting: Setting, what: str, value, show=str, hint: str = "") -> None:
    """Refuse runs of one setting whose ``value(run)`` differ."""
    values = [value(r) for r in setting.runs]
    if len(set(values)) > 1:
        listing = "; ".join(f"{r.path}: {show(v)}" for r, v in zip(setting.runs, values))
        raise ReportError(f"runs of one setting ({setting.text()}) have different {what} ({listing}){hint}")


def _slug(text: str, limit: int = 100) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text.replace("=", "-")).strip("_")[:limit].rstrip("_")
