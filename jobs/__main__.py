"""``python -m jobs SUBCOMMAND``: cluster jobs for hpcfl.

    python -m jobs sweep --config C --algorithms fedavg fedism --seeds 0 1 2 --out-root runs/sweep1 ...
    python -m jobs status runs/sweep1

``sweep`` expands algorithms × seeds × grid values into cells, checks every cell's config and writes a Slurm job
array (or a local script) that runs them; ``status`` tells how far each cell of a sweep got. Bad input is refused
with one message and exit code 2. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import sys

from hpcfl.errors import UsageError
from jobs.status import add_status_parser
from jobs.sweep import add_sweep_parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(prog="python -m jobs", description="Cluster jobs for hpcfl: generate and submit "
                                "sweeps of runs (Slurm job arrays or a local script), and follow them. "
                                "See docs/cluster.md.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{sweep,status}")
    add_sweep_parser(sub)
    add_status_parser(sub)
    opts = p.parse_args(argv)
    opts.argv = argv[1:]  # the subcommand's own arguments, recorded in the scripts it writes
    try:
        return opts.func(opts)
    except UsageError as e:
        print(f"jobs {opts.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
