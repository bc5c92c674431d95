"""The paper's table and plots from finished runs (reference §8 and §9, "Expected shape of the tables").

    python -m hpcfl.report RUN_DIR... [--last 5] [--out DIR] [--group-by SECTION.KEY ...] [--no-plots]

The runs are grouped into settings (one table each) and, within a setting, into methods (one row each):

* method: ``algorithm.name``, with ``algorithm.variant`` when it is not ``as_coded`` and ``train.local_optimizer``
  when it is set to something other than ``auto`` and the algorithm's default;
* setting: ``data.source``; for the built-in benchmark ``benchmark.num_corrupted``, ``benchmark.corruption`` and
  ``benchmark.severity``; every other config key whose value differs between the runs given, except the seed,
  the keys that do not change the numbers (``run.out``, ``run.checkpoint_every``, ``data.cache_dir``) and the keys
  that must agree within a setting (``run.rounds``, ``eval.every``, ``benchmark.test_severities``: runs that differ
  there are refused); and every ``--group-by`` key (which may name one of those too).

Each cell of a table is mean ± population std (ddof 0), in %, over the last ``--last`` evaluated rounds × the
seeds of a method: BACC and AUC (macro one-vs-one, the paper's "AUC") on the clean test set, on the corrupted
one, their average ("Avg" = (clean + corrupted)/2) and their gap ("Gap" = clean − corrupted), both element-wise
before the mean and std. The corrupted test set is the one of the training corruption (``gaussian_2`` for the
default built-in benchmark), else the first non-clean one; each table says which.

Written into ``--out`` (default ``report/``): ``report.md`` (the tables, also printed on stdout), ``table.csv``
(one row per setting and method) and, per setting ``S``: ``bacc_rounds_S.png`` (clean and corrupted BACC over the
rounds, mean ± std over the seeds), ``weights_S_METHOD.png`` (aggregation weights, clients × rounds, mean over
the seeds; corrupted clients marked) and ``gap_S.png`` (clean − corrupted BACC per method, ± std).

Input that cannot make a fair table (not a run, an unfinished run, runs that cannot be compared) is refused with
one message and exit code 2.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from hpcfl.algorithms import available
from hpcfl.config import Config
from hpcfl.errors import UsageError
from hpcfl.atomic import write_text

METHOD_KEYS = ("algorithm.name", "algorithm.variant", "train.local_optimizer")
BUILTIN_KEYS = ("benchmark.num_corrupted", "benchmark.corruption", "benchmark.severity")
IGNORED_KEYS = ("run.seed", "run.out", "run.checkpoint_every", "run.round_timeout_s", "data.cache_dir")  # never split a setting
AGREE_KEYS = ("run.rounds", "eval.every", "benchmark.test_severities")  # must agree within a setting
METRICS = (("bacc", "BACC"), ("auc", "AUC"))
COLUMNS = (("clean", "Clean"), ("corrupted", "Corrupted"), ("avg", "Avg"), ("gap", "Gap"))



def save_figure(fig, path: Path) -> None:
    """Write a figure atomically (a reader never sees half a PNG) and free it."""
    import matplotlib.pyplot as plt

    from hpcfl.atomic import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def _flat(raw: dict) -> dict[str, Any]:
    """{section: {key: value}} as {"section.key": value}; lists become tuples (hashable, comparable)."""
    return {f"{sec}.{key}": tuple(v) if isinstance(v, list) else v
            for sec, table in raw.items() if isinstance(table, dict) for key, v in table.items()}


# A key missing from a run's config.toml (written before the key existed) takes this version's default.
DEFAULTS = _flat(Config().to_dict())


class ReportError(UsageError):
    """Runs that cannot be reported; the message names the directory and the reason."""


# ------------------------------------------------------------------------------------------------------ runs

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
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} is not readable JSON ({e})") from None


def flat_config(path: Path) -> dict[str, Any]:
    """config.toml as {"section.key": value}, missing keys filled with their defaults."""
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ReportError(f"{path} is not a readable config ({e})") from None
    return {**DEFAULTS, **_flat(raw)}


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl, one line per evaluated round, sorted by round; a round logged twice keeps its last line."""
    by_round: dict[int, dict] = {}
    for k, text in enumerate(path.read_text().splitlines(), 1):
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
    clients = _manifest_clients(run)
    if clients is not None:
        return [i for i, c in enumerate(clients) if c.get("corruption")]
    n, k = run.info.get("num_clients", run.get("benchmark.num_clients")), run.get("benchmark.num_corrupted")
    if run.builtin and isinstance(n, int) and isinstance(k, int):
        return list(range(n - k, n))
    return None


def _manifest_clients(run: Run) -> list[dict] | None:
    data_dir = run.info.get("data_dir")
    manifest = Path(data_dir) / "manifest.json" if data_dir else None
    if manifest is None or not manifest.is_file():
        return None
    try:
        clients = json.loads(manifest.read_text()).get("clients")
    except (OSError, json.JSONDecodeError, AttributeError):
        return None
    return clients if isinstance(clients, list) and all(isinstance(c, dict) for c in clients) else None


def training_corruption(run: Run) -> str | None:
    """The test-set name of the training corruption ("gaussian_3"), when known."""
    if run.builtin:
        return f"{run.get('benchmark.corruption')}_{run.get('benchmark.severity')}"
    for c in _manifest_clients(run) or []:
        if isinstance(c.get("corruption"), dict):
            return f"{c['corruption'].get('kind')}_{c['corruption'].get('severity')}"
    return None


# -------------------------------------------------------------------------------------------------- grouping

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


# ------------------------------------------------------------------------------------------------ statistics

def window(runs: list[Run], test_set: str, metric: str, last: int) -> np.ndarray:
    """[seeds, last]: the metric over the last ``last`` evaluated rounds of each run."""
    return np.stack([r.values(test_set, metric)[-last:] for r in runs])


def cell_values(runs: list[Run], corrupted: str, last: int) -> dict[tuple[str, str], np.ndarray]:
    """(column, metric) -> the seeds × rounds values of one table row, as fractions; Avg and Gap element-wise."""
    out = {}
    for metric, _ in METRICS:
        clean, corr = window(runs, "clean", metric, last), window(runs, corrupted, metric, last)
        out.update({("clean", metric): clean, ("corrupted", metric): corr,
                    ("avg", metric): (clean + corr) / 2, ("gap", metric): clean - corr})
    return out


def mean_std(values: np.ndarray) -> tuple[float, float]:
    """Mean and population std (ddof 0) of all values, in percent."""
    v = 100.0 * np.asarray(values, dtype=np.float64).ravel()
    return float(np.mean(v)), float(np.std(v, ddof=0))


@dataclass
class Row:
    method: str
    seeds: list[int]
    stats: dict[tuple[str, str], tuple[float, float]]  # (column, metric) -> (mean, std) in %


def table_rows(setting: Setting, last: int) -> list[Row]:
    corrupted, _ = setting.corrupted_set()
    return [Row(method, sorted(r.seed for r in runs),
                {k: mean_std(v) for k, v in cell_values(runs, corrupted, last).items()})
            for method, runs in setting.methods.items()]


# ---------------------------------------------------------------------------------------------------- tables

def _cell(mean: float, std: float) -> str:
    return "n/a" if not (math.isfinite(mean) and math.isfinite(std)) else f"{mean:.2f} ± {std:.2f}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _window_text(setting: Setting, rows: list[Row], last: int) -> str:
    """"2 seeds (0, 1) × the last 5 of 20 evaluated rounds (rounds 16, ..., 20 of 20) = 10 values per cell"."""
    shown = ", ".join(str(r + 1) for r in setting.rounds[-last:])
    window = (f"the last {last} of {len(setting.rounds)} evaluated rounds ({'rounds' if last > 1 else 'round'} "
              f"{shown} of {setting.num_rounds})")
    if len({tuple(r.seeds) for r in rows}) > 1:
        return f"the seeds in the Seeds column × {window}"
    seeds = rows[0].seeds
    return (f"{_plural(len(seeds), 'seed')} ({', '.join(map(str, seeds))}) × {window} = "
            f"{len(seeds) * last} values per cell")


def corrupted_weight_text(setting: Setting) -> str | None:
    """How much aggregation weight the corrupted clients got, per method, against their share of the samples
    (what FedAvg gives them): the paper's claim is that FedISM raises it."""
    first = setting.first
    corrupted = corrupted_clients(first)
    if not corrupted:
        return None
    parts = []
    for method, runs in setting.methods.items():
        per_round = [sum(line["weights"][c] for c in corrupted) for r in runs for line in r.lines
                     if len(line.get("weights", [])) > max(corrupted)]
        if per_round:
            parts.append(f"{method} {_cell(*mean_std(per_round))}")
    clients = _manifest_clients(first)
    share = ""
    if clients and all(isinstance(c.get("n"), int) for c in clients):
        n = np.array([c["n"] for c in clients], dtype=np.float64)
        share = f"; their share of the training samples: {100 * n[corrupted].sum() / n.sum():.2f} %"
    return (f"Total aggregation weight of the corrupted clients {corrupted}, in %, mean ± std over every evaluated "
            f"round × seed{share}: " + " · ".join(parts) + ".")


def setting_markdown(index: int, setting: Setting, rows: list[Row], last: int, figures: dict | None) -> str:
    """One setting's heading, what its cells are made of, its table and links to its figures."""
    corrupted, why = setting.corrupted_set()
    seeds_column = len({tuple(r.seeds) for r in rows}) > 1
    header = ["Method"] + ["Seeds"] * seeds_column + [f"{c} {m}" for _, c in COLUMNS for _, m in METRICS]
    lines = [f"## Setting {index}: {setting.text()}", "",
             f"{_window_text(setting, rows, last)}. Corrupted test set: `{corrupted}` ({why}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.method] + [", ".join(map(str, row.seeds))] * seeds_column
        cells += [_cell(*row.stats[(c, m)]) for c, _ in COLUMNS for m, _ in METRICS]
        lines.append("| " + " | ".join(cells) + " |")
    weights = corrupted_weight_text(setting)
    if weights:
        lines += ["", weights]
    if figures:
        links = [f"[BACC over rounds]({figures['rounds']})", f"[BACC gap]({figures['gap']})"]
        links += [f"[weights: {m}]({p})" for m, p in figures["weights"].items()]
        lines += ["", "Figures: " + " · ".join(links)]
    return "\n".join(lines + [""])


def report_markdown(settings: list[Setting], tables: list[list[Row]], last: int, figures: list) -> str:
    n_runs = sum(len(s.runs) for s in settings)
    intro = ["# Results", "",
             f"{_plural(n_runs, 'run')} in {_plural(len(settings), 'setting')}. Each cell: mean ± population std "
             f"(ddof 0), in %, over the last {last} evaluated rounds × the seeds. BACC: balanced accuracy; AUC: "
             "macro one-vs-one AUC (the paper's \"AUC\"); Avg = (Clean + Corrupted)/2 and Gap = Clean − Corrupted, "
             "element-wise before the mean and std.", ""]
    parts = [setting_markdown(i, s, rows, last, f)
             for i, (s, rows, f) in enumerate(zip(settings, tables, figures), 1)]
    return "\n".join(intro) + "\n" + "\n".join(parts)


def table_csv(settings: list[Setting], tables: list[list[Row]], last: int) -> str:
    keys = list(dict.fromkeys(k for s in settings for k, _ in s.label))
    stat_cols = [f"{c}_{m}_{stat}" for c, _ in COLUMNS for m, _ in METRICS for stat in ("mean", "std")]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["setting", "method", *keys, "corrupted_set", "seeds", "num_seeds", "last_rounds", "num_values",
                     *stat_cols])
    for i, (setting, rows) in enumerate(zip(settings, tables), 1):
        label = dict(setting.label)
        corrupted, _ = setting.corrupted_set()
        for row in rows:
            stats = [x for c, _ in COLUMNS for m, _ in METRICS for x in row.stats[(c, m)]]
            writer.writerow([i, row.method, *(_show(label[k]) if k in label else "" for k in keys), corrupted,
                             " ".join(map(str, row.seeds)), len(row.seeds),
                             " ".join(str(r + 1) for r in setting.rounds[-last:]), len(row.seeds) * last,
                             *(f"{x:.6f}" for x in stats)])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------------- plots

def _figure(width: float, height: float):
    """A matplotlib Figure on the Agg canvas: no pyplot, no display, no global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colors(methods: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return {m: cmap(i % 10) for i, m in enumerate(methods)}


def _title(text: str, setting: Setting, width: float) -> str:
    """A figure title and the setting, wrapped to the figure's width (inches)."""
    return text + "\n" + "\n".join(textwrap.wrap(setting.text(short=True), int(9 * width)))


def plot_rounds(setting: Setting, colors: dict, last: int, path: Path) -> None:
    """Clean and corrupted BACC over the evaluated rounds per method: mean over seeds, shaded ± std."""
    from matplotlib.ticker import MaxNLocator

    corrupted, _ = setting.corrupted_set()
    x = np.asarray(setting.rounds) + 1
    fig = _figure(11, 4.5)
    axes = fig.subplots(1, 2, sharey=True)
    panels = (("clean", "Clean test set"), (corrupted, f"Corrupted test set ({corrupted})"))
    for ax, (test_set, title) in zip(axes, panels):
        for method, runs in setting.methods.items():
            v = 100 * np.stack([r.values(test_set, "bacc") for r in runs])
            mean, std = v.mean(axis=0), v.std(axis=0)
            ax.plot(x, mean, color=colors[method], label=f"{method} ({_plural(len(runs), 'seed')})",
                    marker="o" if len(x) <= 30 else None, markersize=3)
            ax.fill_between(x, mean - std, mean + std, color=colors[method], alpha=0.2, linewidth=0)
        ax.axvspan(x[-last] - 0.5, x[-1] + 0.5, color="0.9", zorder=0, label=f"table window (last {last})")
        ax.set(title=title, xlabel="round", xlim=(x[0] - 0.5, x[-1] + 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("BACC (%)")
    axes[1].legend(loc="best", fontsize="small")
    fig.suptitle(_title("Balanced accuracy over rounds (mean ± std over seeds)", setting, 11))
    save_figure(fig, path)


def plot_weights(setting: Setting, method: str, path: Path) -> bool:
    """Heat map of the aggregation weights, clients × evaluated rounds, mean over seeds; False if none logged."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    runs = setting.methods[method]
    arrays = [r.weights() for r in runs]
    if any(a is None for a in arrays) or len({a.shape for a in arrays}) != 1:
        return False
    w = np.mean(arrays, axis=0).T  # [clients, rounds]
    n_clients, n_rounds = w.shape
    uniform = 1.0 / n_clients
    spread = max(abs(float(w.max()) - uniform), abs(float(w.min()) - uniform), 1e-9)
    width = min(14, 6 + 0.05 * n_rounds)
    fig = _figure(width, min(12, 2.5 + 0.22 * n_clients))
    ax = fig.subplots()
    image = ax.imshow(w, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                      norm=TwoSlopeNorm(uniform, uniform - spread, uniform + spread))
    rounds = np.asarray(setting.rounds) + 1
    ax.xaxis.set_major_locator(MaxNLocator(nbins=12, integer=True))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda i, _: str(rounds[int(i)]) if 0 <= int(i) < n_rounds else ""))
    corrupted = corrupted_clients(runs[0]) or []
    step = max(1, math.ceil(n_clients / 40))
    ticks = sorted(set(range(0, n_clients, step)) | {c for c in corrupted if c < n_clients})
    ax.set_yticks(ticks, [f"{c} *" if c in corrupted else str(c) for c in ticks])
    for label, c in zip(ax.get_yticklabels(), ticks):
        if c in corrupted:
            label.set_color("tab:red")
            label.set_fontweight("bold")
    marked = ("corrupted clients in red, marked *" if corrupted
              else "corrupted clients unknown (no corrupted_clients in run.json, no manifest)")
    ax.set(xlabel="round", ylabel=f"client ({marked})")
    bar = fig.colorbar(image, ax=ax, label=f"weight (white = uniform 1/{n_clients})")
    bar.ax.set_ylim(min(float(w.min()), uniform), max(float(w.max()), uniform))  # only the range in use
    fig.suptitle(_title(f"Aggregation weights: {method}, mean over {_plural(len(runs), 'seed')}", setting, width))
    save_figure(fig, path)
    return True


def plot_gap(setting: Setting, rows: list[Row], colors: dict, last: int, path: Path) -> None:
    """The clean − corrupted BACC gap per method as bars, with the std as error bars."""
    corrupted, _ = setting.corrupted_set()
    methods = [r.method for r in rows]
    mean = np.array([r.stats[("gap", "bacc")][0] for r in rows])
    std = np.array([r.stats[("gap", "bacc")][1] for r in rows])
    width = max(6.5, 1.1 * len(rows) + 2)
    fig = _figure(width, 4.5)
    ax = fig.subplots()
    ax.bar(range(len(rows)), mean, yerr=std, capsize=5, color=[colors[m] for m in methods])
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(rows)), [f"{m}\n{a:.2f} ± {b:.2f}" for m, a, b in zip(methods, mean, std)],
                  rotation=20 if len(rows) > 4 else 0, ha="right" if len(rows) > 4 else "center")
    ax.set_ylabel(f"clean − {corrupted} BACC (points)")
    ax.grid(axis="y", alpha=0.3)
    fig.suptitle(_title(f"BACC gap, mean ± std over the last {last} rounds × seeds", setting, width))
    save_figure(fig, path)


def write_plots(setting: Setting, rows: list[Row], colors: dict, last: int, out: Path) -> dict[str, Any]:
    """Every figure of one setting; returns their file names (for report.md)."""
    figures = {"rounds": f"bacc_rounds_{setting.name}.png", "gap": f"gap_{setting.name}.png", "weights": {}}
    plot_rounds(setting, colors, last, out / figures["rounds"])
    plot_gap(setting, rows, colors, last, out / figures["gap"])
    for method in setting.methods:
        name = f"weights_{setting.name}_{_slug(method)}.png"
        if plot_weights(setting, method, out / name):
            figures["weights"][method] = name
    return figures


# ------------------------------------------------------------------------------------------------------ main

def report(run_dirs: list[Path], out: Path, last: int = 5, group_by: list[str] = (),
           plots: bool = True) -> tuple[str, list[Path]]:
    """Read, check and group the runs; write report.md, table.csv and (``plots``) the figures.

    Returns the Markdown and the files written."""
    for key in group_by:
        if not re.fullmatch(r"[A-Za-z_]\w*\.[A-Za-z_]\w*", key):
            raise ReportError(f"--group-by {key!r}: expected section.key, e.g. benchmark.num_corrupted")
    runs = [load_run(Path(p)) for p in run_dirs]
    settings = group_runs(runs, list(group_by), last)
    tables = [table_rows(s, last) for s in settings]
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"--out {out}: cannot create the output directory ({e})") from None
    colors = _colors([label for _, label in sorted({method_order(r) for r in runs})])
    figures = [write_plots(s, rows, colors, last, out) if plots else None for s, rows in zip(settings, tables)]
    markdown = report_markdown(settings, tables, last, figures)
    write_text(out / "report.md", markdown)
    write_text(out / "table.csv", table_csv(settings, tables, last))
    files = [out / "report.md", out / "table.csv"]
    files += [out / f for fig in figures if fig for f in (fig["rounds"], fig["gap"], *fig["weights"].values())]
    return markdown, files


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m hpcfl.report", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                   help="finished run directories, or a sweep's root directory (all its runs)")
    p.add_argument("--last", type=_positive, default=5, help="evaluated rounds per run in each cell (default 5)")
    p.add_argument("--out", type=Path, default=Path("report"), help="output directory (default report/)")
    p.add_argument("--group-by", dest="group_by", action="append", default=[], metavar="SECTION.KEY",
                   help="one more config key of the setting (repeatable)")
    p.add_argument("--no-plots", dest="plots", action="store_false", help="write the tables only")
    return p.parse_args(argv)


def expand_sweep_roots(paths: list[Path]) -> list[Path]:
    """A sweep's root directory (``python -m jobs sweep --out-root``: it holds cells.tsv) stands for its run
    directories; every other path is taken as given."""
    out = []
    for p in paths:
        if (p / "cells.tsv").is_file():
            out.extend(sorted(d for d in p.iterdir() if (d / "config.toml").is_file()))
        else:
            out.append(p)
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        markdown, files = report(expand_sweep_roots(args.runs), args.out, args.last, args.group_by, args.plots)
    except UsageError as e:
        print(f"hpcfl.report: error: {e}", file=sys.stderr)
        return 2
    print(markdown, end="")
    print(f"wrote {len(files)} files to {args.out}/: {', '.join(f.name for f in files)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
