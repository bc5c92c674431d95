"""The local-step and start-up benchmarks run end to end on tiny settings and print their rates and ratios.

Timings on a shared 2-core machine are noise: this checks the plumbing and that each ratio is the one of the
printed figures, not speed (no timing asserts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO


def bench(*args: str, timeout: int = 120) -> str:
    proc = subprocess.run(["timeout", "-k", "5", str(timeout), sys.executable, "-m", *args], cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_step_benchmark_compares_hpcfl_with_a_bare_loop_both_ways():
    out = bench("benchmarks.step", "--images", "64", "--epochs", "1", "--repeats", "1")
    assert out.startswith("machine: ") and "torch threads 1" in out, out
    rates = {(m.group(1), m.group(2)): float(m.group(3)) for m in
             re.finditer(r"^(bare|hpcfl) (with|without) augmentation\s+([0-9.]+) images/s$", out, re.MULTILINE)}
    assert len(rates) == 4 and all(r > 0 for r in rates.values()), out
    for aug in ("with", "without"):
        ratio = float(re.search(rf"^ratio hpcfl/bare {aug} augmentation: ([0-9.]+)", out, re.MULTILINE).group(1))
        assert ratio == pytest.approx(rates[("hpcfl", aug)] / rates[("bare", aug)], rel=0.01, abs=2e-3)


def test_step_benchmark_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.step", "--repeats", "0"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--repeats must be >= 1" in proc.stderr, proc.stderr


def test_launch_benchmark_reads_every_ranks_start_up_line():
    """One single-rank launch (plus the untimed one that builds the data): the rank's three moments, in order."""
    out = bench("benchmarks.launch", "--ranks", "1", "--repeats", "1")
    base = float(re.search(r"^1 process\(es\) at once: bare import torch \+ build the model ([0-9.]+) s", out,
                           re.MULTILINE).group(1))
    m = re.search(r"^  hpcfl rank 0: imports ([0-9.]+) s, ready to train ([0-9.]+) s, first round done ([0-9.]+) s; "
                  r"ratio ready/bare ([0-9.]+)", out, re.MULTILINE)
    assert m, out
    imports, ready, first, ratio = map(float, m.groups())
    assert 0 < imports <= ready <= first and base > 0, out
    # the ratio is of the unrounded medians; ready and base are printed to 0.01 s, ratio to 0.01
    assert ratio == pytest.approx(ready / base, abs=0.005 + (ready / base) * 0.005 * (1 / ready + 1 / base))
