"""The report's figures: BACC over rounds, the aggregation weights, the BACC gap (matplotlib, no pyplot)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from hpcfl.atomic import atomic_path
from hpcfl.report.runs import corrupted_clients
from hpcfl.report.settings import Setting, _slug
from hpcfl.report.tables import Row, _plural, sharpness_ratio


def save_figure(fig, path: Path) -> None:
    """Write a figure atomically (a reader never sees half a PNG)."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


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


def plot_sharpness(setting: Setting, colors: dict, path: Path) -> bool:
    """The corrupted ÷ clean sharpness ratio over the evaluated rounds per method that measures it (mean over
    seeds, shaded ± std), with FedISM's premise (> 1) marked; False when no method measures sharpness."""
    x = np.asarray(setting.rounds) + 1
    fig = _figure(7, 4.5)
    ax = fig.subplots()
    drawn = False
    for method, runs in setting.methods.items():
        ratios = np.stack([sharpness_ratio(r) for r in runs])
        if not np.isfinite(ratios).all():
            continue
        mean, std = ratios.mean(axis=0), ratios.std(axis=0)
        ax.plot(x, mean, color=colors[method], label=f"{method} ({_plural(len(runs), 'seed')})")
        ax.fill_between(x, mean - std, mean + std, color=colors[method], alpha=0.2, linewidth=0)
        drawn = True
    if not drawn:
        return False
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--", label="equal sharpness")
    ax.set(xlabel="round", ylabel="sharpness: corrupted ÷ clean clients")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    fig.suptitle(_title("Sharpness of the corrupted clients relative to the clean ones", setting, 7))
    save_figure(fig, path)
    return True


def write_plots(setting: Setting, rows: list[Row], colors: dict, last: int, out: Path) -> dict[str, Any]:
    """Every figure of one setting; returns their file names (for report.md)."""
    figures = {"rounds": f"bacc_rounds_{setting.name}.png", "gap": f"gap_{setting.name}.png", "weights": {}}
    plot_rounds(setting, colors, last, out / figures["rounds"])
    plot_gap(setting, rows, colors, last, out / figures["gap"])
    if plot_sharpness(setting, colors, out / f"sharpness_{setting.name}.png"):
        figures["sharpness"] = f"sharpness_{setting.name}.png"
    for method in setting.methods:
        name = f"weights_{setting.name}_{_slug(method)}.png"
        if plot_weights(setting, method, out / name):
            figures["weights"][method] = name
    return figures
