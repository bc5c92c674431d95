"""Shared test helpers: launching hpcfl for real (plain python or a real mpiexec) on a tiny benchmark."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

# One torch thread in the test process: with two cores shared by helper processes (mpiexec ranks), OpenMP's
# spinning threads slow small models down many times over.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]

# A benchmark small enough for a few seconds per round on 2 cores, yet with every feature of the default one.
# The built-in defaults' model and optimizer, also where configs/default.toml is read (its benchmark keys: resnet8
# from the built-in pretrained start); most tests need a quick model from scratch, not the benchmark's.
FROM_SCRATCH = ["model.name=cnn", "model.pretrained_path=", "train.lr=0.002", "algorithm.rho=0.05"]
TINY = [
    "run.rounds=3", "benchmark.num_train=400", "benchmark.num_test=150", "benchmark.image_size=16",
    "model.width=8", "train.batch_size=16", *FROM_SCRATCH,
]


def mpiexec() -> str:
    """The mpiexec beside this interpreter (the PyPI MPICH of the venv), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        pytest.fail("no mpiexec found: install with the 'mpich' extra (pip install -e '.[dev]') or load an MPI")
    return found


def launch(nprocs: int, args: list[str], timeout: float = 240, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Run ``python -m hpcfl.run ARGS`` with ``nprocs`` ranks (1: no mpiexec at all, single-rank mode).

    Always under ``timeout -k`` so that a hung MPI job can never hang the test suite."""
    cmd = [sys.executable, "-m", "hpcfl.run", *args]
    if nprocs > 1:
        cmd = [mpiexec(), "-n", str(nprocs), *cmd]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    proc = subprocess.run(["timeout", "-k", "10", str(int(timeout)), *cmd], cwd=cwd, env=env,
                          capture_output=True, text=True)
    proc.wall_s = time.time() - t0
    return proc


def sets(*pairs: str) -> list[str]:
    return [a for p in pairs for a in ("--set", p)]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_vector(run_dir: Path) -> np.ndarray:
    return np.load(run_dir / "final_model.npy", allow_pickle=False)


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> Path:
    """One benchmark cache for the whole session (the first run builds the tiny benchmark in it)."""
    return tmp_path_factory.mktemp("data-cache")
