"""The federation benchmarks (overhead, scaling, memory) and the GPU script's first part run end to end on tiny
settings and print their ratios. Timings on a shared 2-core machine are noise: this checks the plumbing and the
figures' consistency, never speed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from tests.conftest import FROM_SCRATCH, REPO, TINY

pytestmark = pytest.mark.mpi


def bench(module: str, *args: str, timeout: int = 240) -> str:
    cmd = [sys.executable, "-m", f"benchmarks.{module}", *args]
    proc = subprocess.run(["timeout", "-k", "5", str(timeout), *cmd], cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("machine: ")
    return proc.stdout


def tiny_sets(data_cache) -> list[str]:
    return [a for s in [*TINY, f"data.cache_dir={data_cache}"] if not s.startswith("run.rounds")
            for a in ("--set", s)]


def test_overhead_benchmark_compares_round_time_with_the_slowest_rank(data_cache):
    out = bench("overhead", "--rounds", "3", "--algorithms", "fedavg", "fedism", *tiny_sets(data_cache))
    rows = re.findall(r"^(fedavg|fedism)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["fedavg", "fedism"], out
    for _, wall, compute, ratio in rows:
        # a round cannot be shorter than the computing inside it; the ratio is of the unrounded medians, which
        # the table prints to 3 decimals (tiny rounds take 0.1 s: 0.5 % each)
        assert float(wall) >= float(compute) > 0
        assert float(ratio) == pytest.approx(float(wall) / float(compute), rel=0.02)


def test_scaling_benchmark_runs_1_and_2_client_ranks_to_the_same_model(data_cache):
    out = bench("scaling", "--rounds", "3", *tiny_sets(data_cache))  # exit 0 only if both runs agree bitwise
    assert re.search(r"ratio T\(2\) / T\(1\): [0-9.]+", out), out


def test_memory_benchmark_reports_the_server_peak_for_both_client_counts(data_cache):
    out = bench("memory", "--model", "cnn", "--ranks", "2", "--set", "benchmark.image_size=16", "--set",
                f"data.cache_dir={data_cache}", *[a for s in FROM_SCRATCH for a in ("--set", s)])
    peaks = re.findall(r"^(5|20)\s+([0-9.]+)$", out, re.MULTILINE)
    assert [p[0] for p in peaks] == ["5", "20"] and all(float(p[1]) > 50 for p in peaks), out
    assert re.search(r"ratio 20 / 5 clients: [0-9.]+", out)


def test_gpu_benchmark_part1_plumbing_on_cpu():
    from benchmarks.gpu import part1

    torch.set_num_threads(1)
    [(setting, rates)] = part1(torch.device("cpu"), 32, 2, [(4, True, True)])
    assert setting == (4, True, True)
    assert set(rates) == {"bare gsam", "hpcfl gsam", "hpcfl gsam+aug", "bare plain", "hpcfl plain"}
    assert all(r > 0 for r in rates.values())


def test_norm_diagnostic_runs_and_reports_both_test_sets():
    out = subprocess.run(["timeout", "-k", "5", "120", sys.executable, "-m", "benchmarks.norm_diagnostic",
                          "--train", "64", "--epochs", "1", "--size", "16", "--width", "4", "--batches", "grouped"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(r"eval mode: +clean [01]\.\d{3}  noisy [01]\.\d{3}", out.stdout), out.stdout
    assert "statistics re-estimated" in out.stdout  # BatchNorm (the default) gets the second line
