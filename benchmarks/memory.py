"""Ratio benchmark of the server's memory: peak RSS of rank 0 with 20 clients ÷ with 5 clients.

Command::

    python -m benchmarks.memory [--ranks 3] [--clients 5 20] [--model resnet18] [--set KEY=VALUE ...]

Runs the built-in benchmark with a ResNet-18 (11.2M parameters, the ICH/ISIC model; 32-px images and 800
training images keep it short) for 2 rounds under ``mpiexec -n RANKS``, once per client count, with the same
training images split over more or fewer clients. Rank 0 reports its peak resident set size in ``run.json``
(``server_peak_rss_mb``). A server that held one model per client would grow by 45 MB per client; hpcfl's
server holds O(P) whatever N is (the client ranks send one partial sum each). Goal: ratio <= 1.10.
"""

from __future__ import annotations

import argparse

from benchmarks.runs import machine_line, run_federation

GOAL = 1.10


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=3, help="MPI ranks (default 3)")
    p.add_argument("--clients", type=int, nargs=2, default=[5, 20], metavar=("N1", "N2"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for every run (repeatable)")
    args = p.parse_args(argv)

    peak, params = {}, 0
    for n in args.clients:
        run = run_federation(args.ranks, [f"model.name={args.model}", f"benchmark.num_clients={n}",
                                          "benchmark.num_corrupted=1", "benchmark.num_train=800", "run.rounds=2",
                                          "train.batch_size=32", *args.sets])
        peak[n], params = run["info"]["server_peak_rss_mb"], run["info"]["num_parameters"]

    n1, n2 = args.clients
    ratio = peak[n2] / peak[n1]
    print(machine_line())
    print(f"setup: built-in benchmark, {args.model} ({params:,} parameters = {params * 4 / 2**20:.1f} MiB float32), "
          f"800 training images, 2 rounds, {args.ranks} ranks; extra settings: {' '.join(args.sets) or 'none'}")
    print(f"\n{'clients':<10}{'server peak RSS MiB':>22}")
    for n in args.clients:
        print(f"{n:<10}{peak[n]:>22.1f}")
    print(f"\nratio {n2} / {n1} clients: {ratio:.3f}  (goal <= {GOAL})  [{'ok' if ratio <= GOAL else 'MISS'}]")
    print(f"(one model per client held on the server would add {(n2 - n1) * params * 4 / 2**20:.0f} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
