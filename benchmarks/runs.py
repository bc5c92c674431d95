"""What the federation benchmarks share: launch ``hpcfl.run`` under mpiexec and read back what it wrote.

``overhead.py``, ``scaling.py`` and ``memory.py`` measure whole runs of the built-in benchmark (``configs/default.toml``
plus their own ``--set`` overrides) rather than pieces of the code, so that what they time is what a user's job
does. Each run goes to a fresh temporary directory; the built-in data is cached under ``data/`` as usual.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# The small CNN trained from scratch (hpcfl/config.py's defaults), which configs/default.toml replaces by resnet8 from
# the built-in pretrained start: the comparisons against a bare loop or another framework pin it, so that both
# sides build the same model and nothing is pretrained on one side only.
SMALL_CNN = ["model.name=cnn", "model.width=16", "model.pretrained_path=", "train.lr=0.002"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_line() -> str:
    import numpy as np
    import torch
    from mpi4py import MPI

    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    return (f"machine: {platform.node()} | {cpu_model()} | {os.cpu_count()} logical CPUs | load average {load}\n"
            f"software: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
            f"{library}")


def find_mpiexec() -> str:
    here = Path(sys.executable).parent / "mpiexec"
    found = str(here) if here.exists() else shutil.which("mpiexec")
    if not found:
        raise SystemExit("no mpiexec beside this Python nor on PATH (install the 'mpich' extra, load an MPI "
                         "module, or pass --mpiexec where the benchmark has it)")
    return found


def run_federation(ranks: int, sets: list[str], timeout_s: float = 1200) -> dict:
    """One ``hpcfl.run`` on ``ranks`` ranks (1: no launcher) with ``--set`` overrides ``sets``.

    Returns {"lines": metrics.jsonl lines, "info": run.json, "wall_s": seconds of the whole launch}."""
    with tempfile.TemporaryDirectory(prefix="hpcfl-bench-") as tmp:
        out = Path(tmp) / "run"
        cmd = [sys.executable, "-m", "hpcfl.run", "--out", str(out)]
        for s in sets:
            cmd += ["--set", s]
        if ranks > 1:
            cmd = [find_mpiexec(), "-n", str(ranks), *cmd]
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
        print(f"running: {' '.join(cmd)}", file=sys.stderr, flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        wall = time.time() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
            raise SystemExit(f"the {ranks}-rank run failed (exit code {proc.returncode})")
        lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        info = json.loads((out / "run.json").read_text())
    return {"lines": lines, "info": info, "wall_s": wall}


def round_periods(lines: list[dict]) -> list[float]:
    """Seconds from one round's end to the next one's: everything a round costs (the first round is left out,
    it pays for warm-up). Needs eval.every = 1 (one line per round)."""
    elapsed = [line["elapsed_s"] for line in lines]
    return [b - a for a, b in zip(elapsed, elapsed[1:])]
