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

import re
from pathlib import Path

from hpcfl.atomic import write_text
from hpcfl.report.plots import _colors, write_plots
from hpcfl.report.runs import ReportError, Run, corrupted_clients, load_run
from hpcfl.report.settings import group_runs, method_order
from hpcfl.report.tables import report_markdown, table_csv, table_rows


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
    files += [out / f for fig in figures if fig
              for f in (fig["rounds"], fig["gap"], *fig["weights"].values(), *filter(None, [fig.get("sharpness")]))]
    return markdown, files


__all__ = ["ReportError", "Run", "corrupted_clients", "load_run", "report"]
