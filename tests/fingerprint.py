"""Fingerprints of short runs of every algorithm: the guard of restructuring (results must not move).

A fingerprint is the sha256 of a run's final model (the raw float32 bytes of ``final_model.npy``) and of its
metrics lines reduced to their result keys (weights, statistics, losses, every test-set metric; no timings, so it
does not depend on the machine's speed or on the world size). ``tests/fingerprints.json`` holds the fingerprints
recorded before the restructuring of issue #12, with the environment they were recorded in; the tests compare the
runs of ``tests/test_algorithms_mpi.py`` (single-rank and ``mpiexec -n 3``) against them.

Floating-point kernels may round differently on another CPU or torch build, so the stored values are compared only
where the environment matches the recorded one; everywhere, the single-rank and MPI runs must still agree bit for
bit. A quick check while editing (single-rank, about 10 s), and recording anew (only when a change is *meant* to
move results, with the reason in the commit message):

    python -m tests.fingerprint check
    python -m tests.fingerprint record
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.conftest import FROM_SCRATCH

HERE = Path(__file__).resolve().parent
STORE = HERE / "fingerprints.json"

# The short run: the tests' tiny benchmark, with held-out parts so that the per-client evaluation is covered too.
SETTINGS = ["run.rounds=3", "benchmark.num_train=400", "benchmark.num_test=150", "benchmark.image_size=16",
            "model.width=8", "train.batch_size=16", "data.val_fraction=0.2", *FROM_SCRATCH]
# Every registered method in its reference form, plus the papers' variants.
VARIANTS = [("qfedavg", "qffl"), ("afl", "minimax"), ("fairfed", "corrected")]
# The numbers a metrics line carries; timings (time_s, elapsed_s, rank_compute_s) are left out.
RESULT_KEYS = ("round", "algorithm", "weights", "keep", "rho", "stats", "train_loss", "metrics", "gap", "clients",
               "client_summary")


def cases() -> list[tuple[str, str]]:
    from hpcfl.algorithms import available

    return [(name, "as_coded") for name in available()] + VARIANTS


def case_name(name: str, variant: str) -> str:
    return f"{name}-{variant}"


def fingerprint(run_dir: Path) -> str:
    h = hashlib.sha256()
    model = np.load(run_dir / "final_model.npy", allow_pickle=False)
    h.update(str(model.dtype).encode() + str(model.shape).encode() + model.tobytes())
    for text in (run_dir / "metrics.jsonl").read_text().splitlines():
        line = json.loads(text)
        h.update(json.dumps({k: line[k] for k in RESULT_KEYS if k in line}, sort_keys=True).encode())
    return h.hexdigest()


def environment() -> dict:
    """What decides the bits of a float result: the software and the CPU's instruction set."""
    import torch

    cpu, flags = platform.processor(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    isa = sorted(f for f in flags.split() if f.startswith(("avx", "fma", "amx")))
    return {"python": platform.python_version(), "machine": platform.machine(), "torch": torch.__version__,
            "numpy": np.__version__, "cpu_isa": " ".join(isa)}


def stored() -> dict:
    return json.loads(STORE.read_text())


def environment_differences(recorded: dict) -> list[str]:
    here = environment()
    return [f"{k}: recorded {recorded.get(k)!r}, here {here.get(k)!r}" for k in here if recorded.get(k) != here[k]]


def run_cases() -> dict[str, str]:
    """Run every case single-rank in this process; their fingerprints."""
    import logging

    from hpcfl.run import main

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, variant in cases():
            run_dir = Path(tmp) / case_name(name, variant)
            code = main(["--out", str(run_dir), *[a for s in SETTINGS for a in ("--set", s)],
                         "--set", f"data.cache_dir={tmp}/data", "--set", f"algorithm.name={name}",
                         "--set", f"algorithm.variant={variant}"])
            logging.getLogger("hpcfl").handlers.clear()  # the next run sets up its own
            if code:
                raise SystemExit(f"{name} ({variant}) failed with exit code {code}")
            out[case_name(name, variant)] = fingerprint(run_dir)
    return out


if __name__ == "__main__":
    if sys.argv[1:] not in (["record"], ["check"]):
        sys.exit(__doc__)
    import torch

    torch.set_num_threads(1)
    found = run_cases()
    if sys.argv[1] == "record":
        STORE.write_text(json.dumps({"environment": environment(), "settings": SETTINGS, "fingerprints": found},
                                    indent=2) + "\n")
        print(f"wrote {STORE}")
    else:
        want = stored()["fingerprints"]
        for case in sorted(set(want) | set(found)):
            print(f"{case:24s} {'same' if want.get(case) == found.get(case) else 'MOVED'}")
        sys.exit(0 if want == found else 1)
