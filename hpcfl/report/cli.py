"""``python -m hpcfl.report RUN_DIR... [--last 5] [--out DIR] [--group-by SECTION.KEY ...] [--no-plots]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hpcfl.errors import UsageError
from hpcfl.report import __doc__ as report_doc
from hpcfl.report import report


def _positive(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m hpcfl.report", description=report_doc.split("\n\n")[0],
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
