"""Ratio benchmark of start-up: how long an hpcfl rank takes from its launch to its first training step, against a
bare Python that imports torch and builds the same model.

Command::

    python -m benchmarks.launch [--ranks 1 3] [--repeats 3]

  bare    ``python -c "import torch; <the built-in benchmark's small CNN>"``: seconds from the process's start to the
          model built (read from /proc, so the interpreter's own start-up counts on both sides);
  hpcfl   ``python -m hpcfl.run`` (one round of a tiny built-in benchmark, its data already built), alone and under
          ``mpiexec -n R``. Every rank logs (``logs/rank_<r>.log``, "start-up: ...") three moments after its
          process started: its imports done, ready to train (data read, model built, w^0 received from the
          server), and its first round done (which includes creating the optimizer: torch.optim imports
          torch._dynamo when it is first used, about 0.75 s here, in hpcfl as in any training loop).

The ratio is hpcfl's "ready to train" over bare (the goal of issue #14: <= 1.2); medians over repeats. Under
mpiexec R ranks start at once and share the cores while they import: the bare side is then R bare processes
started at once too, so that both sides pay the same crowding.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.runs import REPO, SMALL_CNN, find_mpiexec, machine_line

GOAL = 1.2
TINY = ["run.rounds=1", "benchmark.num_train=400", "benchmark.num_test=150", "benchmark.image_size=16",
        *SMALL_CNN, "model.width=8"]
BARE = r"""
import os, time
def age():
    ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
    return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
import torch
from torch import nn
torch.set_num_threads(1)
layers, c = [], 1
for k in range(3):
    w = 8 * 2 ** k
    layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.GroupNorm(8, w), nn.ReLU(), nn.MaxPool2d(2)]
    c = w
model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 5))
print(f"{age():.3f}")
"""
LINE = re.compile(r"\[rank (\d+)\] start-up: imports done ([0-9.]+) s, ready to train ([0-9.]+) s, first round "
                  r"done ([0-9.]+) s")


def bare(copies: int) -> float:
    """The median over ``copies`` bare processes started at once."""
    procs = [subprocess.Popen([sys.executable, "-c", BARE], stdout=subprocess.PIPE, text=True) for _ in range(copies)]
    return statistics.median(float(p.communicate()[0].strip()) for p in procs)


def hpcfl(ranks: int, cache: Path) -> dict[int, tuple[float, float, float]]:
    with tempfile.TemporaryDirectory(prefix="hpcfl-launch-") as tmp:
        cmd = [sys.executable, "-m", "hpcfl.run", "--out", str(Path(tmp) / "run")]
        for s in [*TINY, f"data.cache_dir={cache}"]:
            cmd += ["--set", s]
        if ranks > 1:
            cmd = [find_mpiexec(), "-n", str(ranks), *cmd]
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if p.returncode != 0:
            sys.stderr.write(p.stderr[-3000:])
            raise SystemExit(f"the {ranks}-rank run failed (exit code {p.returncode})")
        out = {}
        for log in (Path(tmp) / "run" / "logs").glob("rank_*.log"):
            for m in LINE.finditer(log.read_text()):
                out[int(m.group(1))] = (float(m.group(2)), float(m.group(3)), float(m.group(4)))
        return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.launch", description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 3])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if args.repeats < 1 or any(r < 1 for r in args.ranks):
        p.error("--repeats and --ranks must be >= 1")
    with tempfile.TemporaryDirectory(prefix="hpcfl-launch-cache-") as cache:
        hpcfl(1, Path(cache))  # builds the tiny benchmark once, outside the timing
        bares, runs = {r: [] for r in args.ranks}, {r: [] for r in args.ranks}
        for _ in range(args.repeats):
            for r in args.ranks:
                bares[r].append(bare(r))
                runs[r].append(hpcfl(r, Path(cache)))
    print(machine_line())
    for r in args.ranks:
        base = statistics.median(bares[r])
        print(f"{r} process(es) at once: bare import torch + build the model {base:.2f} s after the process started")
        for rank in sorted(runs[r][0]):
            imports, ready, first = (statistics.median(x[rank][k] for x in runs[r]) for k in range(3))
            print(f"  hpcfl rank {rank}: imports {imports:.2f} s, ready to train {ready:.2f} s, first round done "
                  f"{first:.2f} s; ratio ready/bare {ready / base:.2f} (goal <= {GOAL})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
