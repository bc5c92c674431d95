"""Integration tests: the real ``python -m hpcfl.run``, in single-rank mode and under a real mpiexec.

Launches are the expensive part (~5-10 s of imports each, more ranks than cores), so each launch serves
several assertions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import FROM_SCRATCH, REPO, TINY, final_vector, launch, mpiexec, read_metrics, sets

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def equal_runs(tmp_path_factory, data_cache):
    """The same tiny config under mpiexec -n 3 (which builds the benchmark: rank 0 builds, the others wait),
    then single-rank, then mpiexec -n 6. The server tests the model on the test sets under -n 3, the 5 client
    ranks under -n 6, each its share (evaluation batches of 32: 150 test images make 5 shares)."""
    root = tmp_path_factory.mktemp("equal")
    procs = {}
    placement = {1: "auto", 3: "server", 6: "clients"}
    for n in (3, 1, 6):
        procs[n] = launch(n, ["--out", str(root / f"n{n}"), *sets(*TINY, f"data.cache_dir={data_cache}",
                                                                  "eval.batch_size=32", f"eval.placement={placement[n]}")])
        assert procs[n].returncode == 0, procs[n].stderr[-3000:]
    return root, procs


def test_same_numbers_single_rank_and_under_mpi(equal_runs):
    root, _ = equal_runs
    runs = {n: read_metrics(root / f"n{n}") for n in (1, 3, 6)}
    assert [m["round"] for m in runs[1]] == [0, 1, 2]
    for n in (3, 6):
        for a, b in zip(runs[1], runs[n]):
            assert a["weights"] == pytest.approx(b["weights"], abs=1e-12)
            # whoever tested: the same predictions, bit for bit (compared as JSON text: NaN equals NaN there)
            assert json.dumps(a["metrics"]) == json.dumps(b["metrics"]), n
        # the fixed-point aggregation makes the models bitwise equal, not only the metrics
        np.testing.assert_array_equal(final_vector(root / f"n{n}"), final_vector(root / "n1"))


def test_run_directory_contents_and_progress_lines(equal_runs):
    root, procs = equal_runs
    run = root / "n6"
    lines = read_metrics(run)
    first = lines[0]
    assert set(first) >= {"round", "algorithm", "metrics", "weights", "time_s"}
    assert first["algorithm"] == "fedavg"
    assert set(first["metrics"]) == {"clean", "gaussian_2"}  # configs/default.toml: severity 2
    assert set(first["metrics"]["clean"]) == {"bacc", "auc", "acc", "f1", "f1_weighted", "auc_weighted",
                                              "confusion"}
    assert set(first["gap"]) == {"gaussian_2"}
    assert len(first["weights"]) == 20 and sum(first["weights"]) == pytest.approx(1.0)
    for line in lines:  # each client rank's own compute time, within the round's time
        assert len(line["rank_compute_s"]) == 5 and 0 < max(line["rank_compute_s"]) <= line["time_s"]
    info = json.loads((run / "run.json").read_text())
    assert info["test_sets_on"] == "clients" and "the client ranks test the global model" in procs[6].stdout
    assert json.loads((root / "n3" / "run.json").read_text())["test_sets_on"] == "server"
    assert json.loads((root / "n1" / "run.json").read_text())["test_sets_on"] == "server"
    assert info["world_size"] == 6 and sorted(sum(info["assignment"].values(), [])) == list(range(20))
    assert set(info["assignment"]) == {"1", "2", "3", "4", "5"}
    assert "rounds = 3" in (run / "config.toml").read_text()
    assert info["corrupted_clients"] == [16, 17, 18, 19] and info["test_sets"] == ["clean", "gaussian_2"]
    assert (run / "metrics.csv").read_text().splitlines()[0].startswith("round,algorithm,clean_bacc")
    assert all((run / "logs" / f"rank_{r}.log").is_file() for r in range(6))
    assert "[rank 3]" in (run / "logs" / "rank_3.log").read_text()
    progress = [line for line in procs[6].stdout.splitlines() if re.search(r"round \d+/3 ", line)]
    assert len(progress) == 3 and all("[rank 0]" in line for line in progress)  # one line per round, rank 0


def test_auto_placement_tests_on_the_client_ranks_when_ranks_outnumber_cores(tmp_path, data_cache):
    """eval.placement = 'auto': two ranks pinned to one core (CPU affinity, inherited from the launcher) leave no
    core for the server's evaluation, so the client rank tests; two ranks free on two cores, the server."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    # the launcher is started by a tiny Python that sets its own affinity and execs it (no preexec_fn: not safe
    # in a process with threads, as a pytest-xdist worker is)
    pin = "import os, sys; os.sched_setaffinity(0, eval(sys.argv[1])); os.execvp(sys.argv[2], sys.argv[2:])"
    for name, pinned in (("pinned", {cores[0]}), ("free", set(cores))):
        cmd = [sys.executable, "-c", pin, repr(pinned), mpiexec(), "-n", "2", sys.executable, "-m", "hpcfl.run",
               "--out", str(tmp_path / name), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=1")]
        p = subprocess.run(["timeout", "-k", "10", "120", *cmd], cwd=REPO, capture_output=True, text=True)
        assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "pinned" / "run.json").read_text())["test_sets_on"] == "clients"
    assert json.loads((tmp_path / "free" / "run.json").read_text())["test_sets_on"] == "server"
    assert json.dumps(read_metrics(tmp_path / "pinned")[0]["metrics"]) == \
        json.dumps(read_metrics(tmp_path / "free")[0]["metrics"])


def test_a_failure_on_any_rank_ends_the_job_and_names_it(tmp_path, data_cache):
    """(Every phase on every kind of rank: tests/test_fail_fast.py.)"""
    base = sets(*TINY, f"data.cache_dir={data_cache}")
    # a client rank fails in local training
    p = launch(3, ["--out", str(tmp_path / "a"), *base, "--set", "debug.fail_at=2:1", "--set", "run.checkpoint_every=1"],
               timeout=120)
    assert p.returncode != 0 and p.wall_s < 100
    assert "hpcfl: rank 2 failed in round 1, client " in p.stderr and "phase local training" in p.stderr
    assert "injected failure" in p.stderr
    assert len(read_metrics(tmp_path / "a")) == 1  # round 0 was checkpointed: its metrics are kept
    # single-rank mode: exit code 1 and the same message
    p = launch(1, ["--out", str(tmp_path / "c"), *base, "--set", "debug.fail_at=0:2"], timeout=120)
    assert p.returncode == 1 and "hpcfl: rank 0 failed in round 2, client 0, phase local training" in p.stderr


def test_bad_input_gives_one_message_and_exit_2(tmp_path, data_cache):
    p = launch(3, ["--out", str(tmp_path / "a"), "--set", "run.roundz=3"], timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.count("hpcfl: error: unknown key run.roundz") == 1
    assert not (tmp_path / "a").exists()  # nothing half-written
    # more client ranks than clients: found after the data is there, reported once, whole job ends
    p = launch(6, ["--out", str(tmp_path / "b"),
                   *sets(*TINY, f"data.cache_dir={data_cache}", "benchmark.num_clients=4",
                         "benchmark.num_corrupted=1")], timeout=120)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.count("5 client ranks but only 4 clients") == 1, p.stderr


def test_server_memory_does_not_grow_with_the_number_of_clients(tmp_path, data_cache):
    """A model of ~2.4M parameters (9.6 MB): a server holding every client's model would need 12 x 9.6 MB more
    with 16 clients than with 4. hpcfl's server holds O(P) whatever the number of clients."""
    rss = {}
    for n_clients in (4, 16):
        p = launch(3, ["--out", str(tmp_path / f"c{n_clients}"),
                       *sets(*FROM_SCRATCH, "run.rounds=1", "benchmark.num_train=128", "benchmark.num_test=20",
                             "benchmark.image_size=16", "model.width=160", f"benchmark.num_clients={n_clients}",
                             "benchmark.num_corrupted=1", f"data.cache_dir={data_cache}")], timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
        info = json.loads((tmp_path / f"c{n_clients}" / "run.json").read_text())
        rss[n_clients] = info["server_peak_rss_mb"]
        params_mb = info["num_parameters"] * 4 / 2 ** 20
    assert params_mb > 8
    assert rss[16] - rss[4] < 0.25 * 12 * params_mb, (rss, params_mb)


def test_gpu_options_run_end_to_end_on_cpu(tmp_path, data_cache):
    # bf16 autocast and channels_last are meant for GPUs, but take the same code path on the CPU
    run = tmp_path / "opts"
    proc = launch(1, ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=2",
                                                "train.amp=bf16", "train.channels_last=true")])
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = read_metrics(run)
    assert len(lines) == 2 and all(np.isfinite(line["train_loss"]) for line in lines)
    assert all(len(line["rank_compute_s"]) == 1 for line in lines)  # single-rank mode: rank 0 hosts everyone
