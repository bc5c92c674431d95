"""Reading finished run directories for the report: their config, run.json and metrics lines."""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from hpcfl.config import Config
from hpcfl.data.shards import Manifest, ShardEntry, ShardError
from hpcfl.errors import UsageError


def _flat(raw: dict) -> dict[str, Any]:
    """{section: {key: value}} as {"section.key": value}; lists become tuples (hashable, comparable)."""
    return {f"{sec}.{key}": tuple(v) if isinstance(v, list) else v
            for sec, table in raw.items() if isinstance(table, dict) for key, v in table.items()}


# A key missing from a run's config.toml (written before the key existed) takes this version's default.
DEFAULTS = _flat(Config().to_dict())


class ReportError(UsageError):
    """Runs that cannot be reported; the message names the directory and the reason."""


@dataclass
class Run:
    """One finished run directory: its flat config ("section.key" -> value), run.json and metrics lines."""

    path: Path
    config: dict[str, Any]
    info: dict
    lines: list[dict]  # one per evaluated round, by round

    def get(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    @property
    def seed(self) -> int:
        return self.get("run.seed", 0)

    @property
    def builtin(self) -> bool:
        return self.get("data.source") == "builtin"

    @property
    def rounds(self) -> list[int]:
        """The evaluated rounds (0-based)."""
        return [line["round"] for line in self.lines]

    @property
    def test_sets(self) -> list[str]:
        return list(self.info.get("test_sets") or self.lines[0]["metrics"])

    def values(self, test_set: str, metric: str) -> np.ndarray:
        """One metric of one test set over the evaluated rounds (NaN where the metric is missing)."""
        out = []
        for line in self.lines:
            if test_set not in line["metrics"]:
                raise ReportError(f"{self.path}/metrics.jsonl: round {line['round'] + 1} has no test set "
                                  f"{test_set!r}")
            out.append(line["metrics"][test_set].get(metric, math.nan))
        return np.asarray(out, dtype=np.float64)

    def weights(self) -> np.ndarray | None:
        """Aggregation weights [evaluated rounds, clients], or None where a line lacks them."""
        rows = [line.get("weights") for line in self.lines]
        if any(r is None for r in rows) or len({len(r) for r in rows}) != 1:
            return None
        return np.asarray(rows, dtype=np.float64)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or not UTF-8
        raise ReportError(f"{path} is not readable JSON ({e})") from None


def flat_config(path: Path) -> dict[str, Any]:
    """config.toml as {"section.key": value}, missing keys filled with their defaults."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad TOML or not UTF-8
        raise ReportError(f"{path} is not a readable config ({e})") from None
    return {**DEFAULTS, **_flat(raw)}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl, one line per evaluated round, sorted by round; a round logged twice keeps its last line."""
    by_round: dict[int, dict] = {}
    try:
        text_lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise ReportError(f"{path}: unreadable ({e})") from None
    for k, text in enumerate(text_lines, 1):
        if not text.strip():
            continue
        try:
            line = json.loads(text)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}: line {k} is not valid JSON ({e})") from None
        if not isinstance(line, dict) or not isinstance(line.get("round"), int) \
                or not isinstance(line.get("metrics"), dict):
            raise ReportError(f"{path}: line {k} is not an hpcfl metrics line (needs 'round' and 'metrics')")
        by_round[line["round"]] = line
    return [by_round[r] for r in sorted(by_round)]


def load_run(path: Path) -> Run:
    """Read one run directory; refuse what is not a run or not finished."""
    path = Path(path)
    if not path.is_dir():
        raise ReportError(f"{path} is not a run directory (no such directory)")
    missing = [name for name in ("config.toml", "run.json") if not (path / name).is_file()]
    if missing:
        raise ReportError(f"{path} is not a run directory (no {' or '.join(missing)})")
    run = Run(path, flat_config(path / "config.toml"), _read_json(path / "run.json"), [])
    if not isinstance(run.info, dict) or "finished" not in run.info:
        raise ReportError(f"{path} is an incomplete run: run.json has no 'finished' (still running, or stopped)")
    if not (path / "metrics.jsonl").is_file():
        raise ReportError(f"{path} is an incomplete run: no metrics.jsonl")
    run.lines = read_metrics(path / "metrics.jsonl")
    rounds, every = run.get("run.rounds"), run.get("eval.every")
    if not isinstance(rounds, int) or not isinstance(every, int) or every < 1:
        raise ReportError(f"{path}/config.toml: needs run.rounds and eval.every as positive integers")
    expected = math.ceil(rounds / every)
    if len(run.lines) < expected:
        raise ReportError(f"{path} is an incomplete run: {len(run.lines)} evaluated round(s) in metrics.jsonl, "
                          f"{expected} expected (run.rounds = {rounds}, eval.every = {every})")
    return run


def corrupted_clients(run: Run) -> list[int] | None:
    """Clients with corrupted training data: run.json, else the data manifest, else the built-in benchmark's rule
    (the last ``num_corrupted`` clients); None when unknown."""
    if isinstance(run.info.get("corrupted_clients"), list):
        return [int(c) for c in run.info["corrupted_clients"]]
    clients = manifest_clients(run)
    if clients is not None:
        return [i for i, c in enumerate(clients) if c.corruption]
    n, k = run.info.get("num_clients", run.get("benchmark.num_clients")), run.get("benchmark.num_corrupted")
    if run.builtin and isinstance(n, int) and isinstance(k, int):
        return list(range(n - k, n))
    return None


def manifest_clients(run: Run) -> list[ShardEntry] | None:
    """The clients of the run's data manifest, when it is still there and readable."""
    data_dir = run.info.get("data_dir")
    if not isinstance(data_dir, str):
        return None
    try:
        return Manifest.load(data_dir).clients
    except ShardError:
        return None


def training_corruption(run: Run) -> str | None:
    """The test-set name of the training corruption ("gaussian_3"), when known."""
    if run.builtin:
        return f"{run.get('benchmark.corruption')}_{run.get('benchmark.severity')}"
    for c in manifest_clients(run) or []:
        if c.corruption:
            return f"{c.corruption.get('kind')}_{c.corruption.get('severity')}"
    return None
