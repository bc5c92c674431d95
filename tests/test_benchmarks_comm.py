"""The comm benchmark runs end to end under a real mpiexec and reports every measurement and ratio.

Timings on a shared 2-core machine are noise: this checks the plumbing (self-launch, JSON, table), not speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.comm import METHODS, RATIOS
from tests.conftest import REPO

pytestmark = pytest.mark.mpi


def test_comm_benchmark_small_model_three_ranks(tmp_path):
    out = tmp_path / "comm.json"
    proc = subprocess.run(
        ["timeout", "-k", "10", "120", sys.executable, "-m", "benchmarks.comm", "--ranks", "3",
         "--params", "200000", "--repeats", "2", "--json", str(out)],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    doc = json.loads(out.read_text())
    run = doc["runs"]["3"]
    assert run["world_size"] == 3 and run["params"] == 200_000
    for name in METHODS:
        assert run["ms"][name] > 0, name
        assert len(run["samples_ms"][name]) == 2 and all(t > 0 for t in run["samples_ms"][name]), name
    for a, b, _, _ in RATIOS:
        key = f"{a}/{b}"
        assert doc["ratios"]["3"][key] > 0, key
        assert doc["verdicts"]["3"][key] in ("PASS", "MISS"), key
    assert doc["machine"]["mpi4py"] and doc["machine"]["mpi_library"]

    text = proc.stdout
    assert "goals: hpcfl / raw <= 1.2" in text and "pickled / hpcfl >= 10" in text
    for a, b, _, _ in RATIOS:
        assert f"{a}/{b}" in text
