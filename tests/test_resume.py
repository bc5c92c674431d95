"""Checkpoint and resume: a run killed at any moment and resumed ends bitwise identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import REPO, TINY, final_vector, launch, mpiexec, read_metrics, sets

pytestmark = pytest.mark.mpi

# FedGA keeps each client's previous local model (client-side checkpoint files) and cross-round weights.
RESUMABLE = [*TINY, "run.rounds=6", "run.checkpoint_every=1", "algorithm.name=fedga"]


def _start(n, run_dir, data_cache, extra=()):
    cmd = [sys.executable, "-m", "hpcfl.run", "--out", str(run_dir), *sets(*RESUMABLE, f"data.cache_dir={data_cache}"),
           *extra]
    if n > 1:
        cmd = [mpiexec(), "-n", str(n), *cmd]
    # its own session, so that kill -9 reaches mpiexec and every rank at once
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _checkpointed_round(run_dir) -> int:
    try:
        return json.loads((run_dir / "checkpoint.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return -1


def _kill_mid_run(proc, run_dir, rng) -> bool:
    """kill -9 the whole job at a random moment after a random round's checkpoint (or anywhere before the
    first one); False if it finished first."""
    target = rng.randint(-1, 3)
    deadline = time.time() + 120
    while proc.poll() is None and _checkpointed_round(run_dir) < target and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 1.5))
    if proc.poll() is not None:
        proc.communicate()
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    return True


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    p = launch(3, ["--out", str(run_dir), *sets(*RESUMABLE, f"data.cache_dir={data_cache}")])
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir


def test_kill_9_at_random_moments_then_resume_is_bitwise_identical(reference, tmp_path, data_cache):
    rng = random.Random(1234)
    for attempt in range(2):
        run_dir = tmp_path / f"run{attempt}"
        kills = 0
        for _ in range(8):
            proc = _start(3, run_dir, data_cache)
            if kills < 2 and _kill_mid_run(proc, run_dir, rng):
                kills += 1
                continue
            out, err = proc.communicate(timeout=240)
            assert proc.returncode == 0, err[-3000:]
            break
        assert kills >= 1, "the job always finished before the kill: kill earlier"
        np.testing.assert_array_equal(final_vector(run_dir), final_vector(reference))
        for a, b in zip(read_metrics(run_dir), read_metrics(reference)):
            assert (a["metrics"], a["weights"], a["stats"]) == (b["metrics"], b["weights"], b["stats"])
        assert [m["round"] for m in read_metrics(run_dir)] == list(range(6))
        assert not list(run_dir.glob(".checkpoint-*")), "a staging directory was left behind"


def test_sigterm_stops_at_a_checkpoint_and_the_same_command_resumes(reference, tmp_path, data_cache):
    run_dir = tmp_path / "run"
    proc = _start(1, run_dir, data_cache)
    deadline = time.time() + 120
    while time.time() < deadline and not (run_dir / "checkpoint.json").exists():
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err[-3000:]
    stopped_at = json.loads((run_dir / "checkpoint.json").read_text())["round"]
    assert stopped_at < 5 and "run the same command again to resume" in out
    p = launch(1, ["--out", str(run_dir), *sets(*RESUMABLE, f"data.cache_dir={data_cache}")])
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"resuming {run_dir} after round {stopped_at + 1}" in p.stdout
    np.testing.assert_array_equal(final_vector(run_dir), final_vector(reference))  # 1 rank == 3 ranks, too
    info = json.loads((run_dir / "run.json").read_text())
    assert info["resumed"][0]["round"] == stopped_at + 1 and "finished" in info

    # a finished run: the same command says so and changes nothing
    before = (run_dir / "final_model.npy").stat().st_mtime_ns
    p = launch(1, ["--out", str(run_dir), *sets(*RESUMABLE, f"data.cache_dir={data_cache}")])
    assert p.returncode == 0 and "already complete" in p.stdout
    assert (run_dir / "final_model.npy").stat().st_mtime_ns == before


def test_resume_refuses_a_changed_config_by_key(reference, tmp_path, data_cache):
    p = launch(1, ["--out", str(reference), *sets(*RESUMABLE, f"data.cache_dir={data_cache}", "train.lr=0.01",
                                                  "algorithm.fedga_step=0.1")])
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "train.lr: 0.002 -> 0.01" in p.stderr and "algorithm.fedga_step: 0.05 -> 0.1" in p.stderr
    # a checkpoint pointer that is not ours is refused with a message, not a traceback
    (reference / "run.json").write_text(json.dumps({"not": "finished"}))
    (reference / "checkpoint.json").write_text("{garbage")
    p = launch(1, ["--out", str(reference), *sets(*RESUMABLE, f"data.cache_dir={data_cache}")])
    assert p.returncode == 2 and "not an hpcfl checkpoint pointer" in p.stderr and "Traceback" not in p.stderr
