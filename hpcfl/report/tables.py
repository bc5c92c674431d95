"""The report's numbers and text: each table cell's statistics, report.md and table.csv."""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

import numpy as np

from hpcfl.report.runs import Run, corrupted_clients, manifest_clients
from hpcfl.report.settings import Setting, _show

METRICS = (("bacc", "BACC"), ("auc", "AUC"))
COLUMNS = (("clean", "Clean"), ("corrupted", "Corrupted"), ("avg", "Avg"), ("gap", "Gap"))


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


def sharpness_ratio(run: Run) -> np.ndarray:
    """Per evaluated round: the corrupted clients' mean sharpness ÷ the clean clients' (FedISM's premise is that it is
    above 1); NaN where a line has no sharpness (methods that do not measure it) or the corrupted clients are unknown."""
    corrupted = set(corrupted_clients(run) or [])
    out = []
    for line in run.lines:
        s = np.asarray(line.get("stats", {}).get("sharpness", []), dtype=np.float64)
        is_corrupted = np.isin(np.arange(len(s)), list(corrupted))
        bad, clean = s[is_corrupted], s[~is_corrupted]
        out.append(bad.mean() / clean.mean() if bad.size and clean.size and clean.mean() > 0 else np.nan)
    return np.asarray(out)


@dataclass
class Row:
    method: str
    seeds: list[int]
    stats: dict[tuple[str, str], tuple[float, float]]  # (column, metric) -> (mean, std) in %
    sharpness: tuple[float, float] | None = None  # mean ± std of the sharpness ratio over the window (a ratio)


def table_rows(setting: Setting, last: int) -> list[Row]:
    corrupted, _ = setting.corrupted_set()
    rows = []
    for method, runs in setting.methods.items():
        ratios = np.stack([sharpness_ratio(r)[-last:] for r in runs])
        sharp = (float(ratios.mean()), float(ratios.std())) if np.isfinite(ratios).all() else None
        rows.append(Row(method, sorted(r.seed for r in runs),
                        {k: mean_std(v) for k, v in cell_values(runs, corrupted, last).items()}, sharp))
    return rows


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
    clients = manifest_clients(first)
    share = ""
    if clients:
        n = np.array([c.n for c in clients], dtype=np.float64)
        share = f"; their share of the training samples: {100 * n[corrupted].sum() / n.sum():.2f} %"
    return (f"Total aggregation weight of the corrupted clients {corrupted}, in %, mean ± std over every evaluated "
            f"round × seed{share}: " + " · ".join(parts) + ".")


def setting_markdown(index: int, setting: Setting, rows: list[Row], last: int, figures: dict | None) -> str:
    """One setting's heading, what its cells are made of, its table and links to its figures."""
    corrupted, why = setting.corrupted_set()
    seeds_column = len({tuple(r.seeds) for r in rows}) > 1
    sharp_column = any(r.sharpness for r in rows)
    header = ["Method"] + ["Seeds"] * seeds_column + [f"{c} {m}" for _, c in COLUMNS for _, m in METRICS]
    header += ["Sharpness ratio"] * sharp_column
    lines = [f"## Setting {index}: {setting.text()}", "",
             f"{_window_text(setting, rows, last)}. Corrupted test set: `{corrupted}` ({why}).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.method] + [", ".join(map(str, row.seeds))] * seeds_column
        cells += [_cell(*row.stats[(c, m)]) for c, _ in COLUMNS for m, _ in METRICS]
        if sharp_column:
            cells.append(f"{row.sharpness[0]:.3f} ± {row.sharpness[1]:.3f}" if row.sharpness else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if sharp_column:
        lines += ["", "Sharpness ratio: the corrupted clients' mean sharpness ÷ the clean clients', at the broadcast "
                      "model, per round (mean ± std over the same rounds × seeds; a ratio, not %). FedISM's premise is "
                      "that it is above 1; only methods that measure sharpness have it."]
    weights = corrupted_weight_text(setting)
    if weights:
        lines += ["", weights]
    if figures:
        links = [f"[BACC over rounds]({figures['rounds']})", f"[BACC gap]({figures['gap']})"]
        if figures.get("sharpness"):
            links.append(f"[sharpness ratio]({figures['sharpness']})")
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
                     *stat_cols, "sharpness_ratio_mean", "sharpness_ratio_std"])
    for i, (setting, rows) in enumerate(zip(settings, tables), 1):
        label = dict(setting.label)
        corrupted, _ = setting.corrupted_set()
        for row in rows:
            stats = [x for c, _ in COLUMNS for m, _ in METRICS for x in row.stats[(c, m)]]
            writer.writerow([i, row.method, *(_show(label[k]) if k in label else "" for k in keys), corrupted,
                             " ".join(map(str, row.seeds)), len(row.seeds),
                             " ".join(str(r + 1) for r in setting.rounds[-last:]), len(row.seeds) * last,
                             *(f"{x:.6f}" for x in stats),
                             *([f"{x:.6f}" for x in row.sharpness] if row.sharpness else ["", ""])])
    return buf.getvalue()
