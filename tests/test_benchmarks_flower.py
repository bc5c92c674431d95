"""benchmarks/flower.py without Flower (not a dependency of hpcfl): its hpcfl side alone on tiny settings, and the
install hint when the Flower side is asked for. Checks the plumbing and the printed lines, never speed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, TINY


def flower_bench(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "benchmarks.flower", *args]
    return subprocess.run(["timeout", "-k", "5", str(timeout), *cmd], cwd=REPO,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)


@pytest.mark.mpi
def test_flower_benchmark_runs_the_hpcfl_side_alone(data_cache):
    sets = [a for s in [*TINY, f"data.cache_dir={data_cache}"] if not s.startswith("run.rounds") for a in ("--set", s)]
    proc = flower_bench("--only", "hpcfl", "--rounds", "3", *sets)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert out.startswith("machine: ") and "\nsoftware: " in out, out
    assert re.search(r"^setup: built-in benchmark \(configs/default\.toml\), 20 clients, FedAvg, 3 rounds, medians "
                     r"over rounds 2\.\.3; extra settings: benchmark\.num_train=400 ", out, re.MULTILINE), out
    assert "; model: model.name=cnn model.width=16 model.pretrained_path= " in out, out  # both sides: runs.SMALL_CNN
    assert re.search(r"^  hpcfl   mpiexec -n 3: a server and 2 client ranks, torch threads 1 ", out, re.MULTILINE)
    assert "  flower  " not in out and "ratio" not in out  # one side: no Flower line, no ratio
    rows = re.findall(r"^(hpcfl|flower)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)$", out, re.MULTILINE)
    assert [r[0] for r in rows] == ["hpcfl"], out
    round_s, first_s, bacc = map(float, rows[0][1:])
    assert round_s > 0 and first_s > 0 and 0 <= bacc <= 1  # first_s: rank 0's "start-up" line was seen


@pytest.mark.skipif(importlib.util.find_spec("flwr") is not None, reason="Flower is installed here")
def test_flower_benchmark_says_how_to_install_flower():
    proc = flower_bench("--rounds", "3")
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout + proc.stderr
    assert 'pip install "flwr[simulation]"' in proc.stderr and "--only hpcfl" in proc.stderr, proc.stderr
