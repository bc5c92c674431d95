"""The loader benchmark runs end to end on a tiny input and prints both rates and the ratios.

Timings on a shared 2-core machine are noise: this checks the plumbing, not speed (no timing asserts)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.conftest import REPO


def test_loader_benchmark_tiny():
    proc = subprocess.run(
        ["timeout", "-k", "5", "60", sys.executable, "-m", "benchmarks.loader", "--images", "32", "--size", "32",
         "--epochs", "1", "--repeats", "1"],
        cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    assert text.startswith("machine: ")
    assert "torch threads 1" in text

    def rate(label: str) -> float:
        match = re.search(rf"^{re.escape(label)}\s+([0-9.]+)$", text, re.MULTILINE)
        assert match, f"no rate for {label!r} in:\n{text}"
        return float(match.group(1))

    for label in ("hpcfl (epochs only)", "hpcfl (incl. shard read)", "png DataLoader W=0", "png DataLoader W=2"):
        assert rate(label) > 0
    for w in (0, 2):
        match = re.search(rf"ratio hpcfl/png W={w}: ([0-9.]+)x incl\. shard read, ([0-9.]+)x epochs only", text)
        assert match and float(match.group(1)) > 0 and float(match.group(2)) > 0, text


def test_loader_benchmark_refuses_bad_arguments():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.loader", "--images", "0"], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "--images must be >= 1" in proc.stderr
