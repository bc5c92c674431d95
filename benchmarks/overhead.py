"""Ratio benchmark of the round protocol's overhead: round wall time ÷ the slowest client rank's own compute.

Command::

    python -m benchmarks.overhead [--ranks 3] [--rounds 8] [--algorithms fedavg fedism] [--set KEY=VALUE ...]

Runs the built-in benchmark (``configs/default.toml``) once per algorithm under ``mpiexec -n RANKS``. Every
round, each client rank times its own work (statistics and local training of its clients: the metrics line's
``rank_compute_s``); the round's wall time is the time between the ends of consecutive rounds on the server, so
it includes everything else: broadcasts, reductions, waiting for the slowest rank, the server's decisions,
logging and checkpoints. Rounds 2..R are used (the first pays for warm-up). The ratio is
median(round wall time) ÷ median(slowest rank's compute); the goal is <= 1.10.

The server tests the model on the test sets (``eval.placement = "server"``, set here: with ``"auto"`` on a machine
with fewer cores than ranks the client ranks would test, and that work, which ``rank_compute_s`` does not time,
would count as overhead). It does so during the clients' next round, on rank 0; with fewer cores than ranks it
takes CPU from a client rank, which shows up in that rank's compute time, not as overhead.
"""

from __future__ import annotations

import argparse
from statistics import median

from benchmarks.runs import machine_line, round_periods, run_federation

GOAL = 1.10


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=3, help="MPI ranks: 1 server + client ranks (default 3)")
    p.add_argument("--rounds", type=int, default=8, help="rounds per run (default 8)")
    p.add_argument("--algorithms", nargs="+", default=["fedavg", "fedism"], help="default: fedavg fedism")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    args = p.parse_args(argv)
    if args.rounds < 3:
        p.error("--rounds must be at least 3")

    results = {}
    for name in args.algorithms:
        run = run_federation(args.ranks, [f"algorithm.name={name}", f"run.rounds={args.rounds}", "eval.every=1",
                                          "eval.placement=server", *args.sets])
        lines = run["lines"]
        periods = round_periods(lines)  # rounds 2..R
        slowest = [max(line["rank_compute_s"]) for line in lines[1:]]
        results[name] = (median(periods), median(slowest), run["info"]["num_parameters"])

    print(machine_line())
    print(f"setup: built-in benchmark (configs/default.toml), {args.ranks} ranks, {args.rounds} rounds, "
          f"medians over rounds 2..{args.rounds}; extra settings: {' '.join(args.sets) or 'none'}")
    print(f"\n{'algorithm':<14}{'round wall s':>14}{'slowest rank s':>16}{'ratio':>8}")
    ok = True
    for name, (wall, compute, _) in results.items():
        ratio = wall / compute
        ok &= ratio <= GOAL
        print(f"{name:<14}{wall:>14.3f}{compute:>16.3f}{ratio:>8.3f}  [{'ok' if ratio <= GOAL else 'MISS'}]")
    print(f"\ngoal: round wall time / slowest client rank's compute <= {GOAL}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
