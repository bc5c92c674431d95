"""Ratio benchmark of strong scaling: round time with 2 client ranks ÷ with 1, the same 20 clients.

Command::

    python -m benchmarks.scaling [--rounds 8] [--algorithm fedavg] [--client-ranks 1 2] [--set KEY=VALUE ...]

Runs the built-in benchmark (``configs/default.toml``: CPU, one torch thread per rank) under
``mpiexec -n 1+k`` for each k of ``--client-ranks``, and compares the median round wall time (time between the
ends of consecutive rounds on the server; rounds 2..R). The ratio is T(k=2) ÷ T(k=1); the goal is <= 0.55
(perfect scaling is 0.50). Both runs are bitwise identical in their results (exact aggregation), so only the
time differs. On a machine with 2 cores the server rank shares them with the client ranks.
"""

from __future__ import annotations

import argparse
from statistics import median

from benchmarks.runs import machine_line, round_periods, run_federation

GOAL = 0.55


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.scaling", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=8, help="rounds per run (default 8)")
    p.add_argument("--algorithm", default="fedavg")
    p.add_argument("--client-ranks", type=int, nargs=2, default=[1, 2], metavar=("K1", "K2"),
                   help="client-rank counts compared (default 1 2)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")

    times, finals = {}, {}
    for k in args.client_ranks:
        run = run_federation(1 + k, [f"algorithm.name={args.algorithm}", f"run.rounds={args.rounds}",
                                     "eval.every=1", *args.sets])
        times[k] = median(round_periods(run["lines"]))
        finals[k] = run["lines"][-1]["metrics"]["clean"]["bacc"]

    k1, k2 = args.client_ranks
    ratio = times[k2] / times[k1]
    print(machine_line())
    print(f"setup: built-in benchmark (configs/default.toml), {args.algorithm}, {args.rounds} rounds, median round "
          f"wall time over rounds 2..{args.rounds}; extra settings: {' '.join(args.sets) or 'none'}")
    print(f"\n{'client ranks':<14}{'round s':>10}{'final clean BACC':>18}")
    for k in args.client_ranks:
        print(f"{k:<14}{times[k]:>10.3f}{finals[k]:>18.4f}")
    ideal = k1 / k2
    print(f"\nratio T({k2}) / T({k1}): {ratio:.3f}  (ideal {ideal:.2f}; goal <= {GOAL})  "
          f"[{'ok' if ratio <= GOAL else 'MISS'}]")
    if finals[k1] != finals[k2]:
        print("WARNING: the runs' final accuracies differ; they should be bitwise equal")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
