"""Faults from outside, on real processes with real signals and real files (docs/reliability.md): a stopped rank,
a killed rank, Ctrl-C, a read-only or full disk, two runs in one run directory, a run directory whose name is
not ASCII. Each ends with one message, no traceback, and nothing lost."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TINY, final_vector, launch, mpiexec, read_metrics, sets
from tests.fixtures import make_rsna_folder

pytestmark = pytest.mark.mpi


def start(nprocs: int, args: list[str], env: dict | None = None) -> subprocess.Popen:
    """``python -m hpcfl.run ARGS`` in a session of its own (so that a signal reaches exactly what a user's would)."""
    cmd = [sys.executable, "-m", "hpcfl.run", *args]
    if nprocs > 1:
        cmd = [mpiexec(), "-n", str(nprocs), *cmd]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


def finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"the job did not end within {timeout} s:\n{err[-3000:]}")
    return proc.returncode, out, err


def wait_for(condition, timeout: float = 120, what: str = "") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def trace(run_dir: Path, rank: int) -> dict:
    try:
        return json.loads((run_dir / "logs" / f"rank_{rank}.where").read_text())
    except (OSError, ValueError):
        return {}


def checkpointed(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoint.json").read_text())["round"]
    except (OSError, ValueError, KeyError):
        return -1


def no_traceback(*texts: str) -> None:
    for text in texts:
        assert "Traceback" not in text, text[-3000:]


def hpcfl_lines(text: str, marker: str = "hpcfl:") -> list[str]:
    return [line for line in text.splitlines() if marker in line]


# ------------------------------------------------------------------------------------------ ranks that stop

def test_a_stopped_rank_is_named_by_the_default_watchdog(tmp_path, data_cache):
    """SIGSTOP on a client rank (what a hung driver looks like from outside): the adaptive watchdog ends the job
    and the server names the rank."""
    run = tmp_path / "run"
    proc = start(3, ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=40",
                                               "run.checkpoint_every=1", "run.watchdog_floor_s=3")])
    pid = None
    try:
        wait_for(lambda: checkpointed(run) >= 1, what="round 2's checkpoint")
        pid = trace(run, 2)["pid"]
        os.kill(pid, signal.SIGSTOP)
        code, out, err = finish(proc, timeout=90)
    finally:
        _release(pid)
    assert code not in (0, 3)
    no_traceback(err)
    said = hpcfl_lines(err, "exceeded its time limit")
    assert len(said) == 1 and said[0].startswith("hpcfl: rank 0: round "), err[-3000:]
    assert "rank(s) [2] held up the collective" in said[0], said[0]
    assert checkpointed(run) >= 1 and not (run / "final_model.npy").exists()


def test_a_rank_stopped_during_setup_or_a_stopped_server_is_named_once(tmp_path, data_cache):
    """Setup is watched too (the first round's limit): a client stopped while the server builds the benchmark is
    named; when the server itself is stopped, one client rank says so, once."""
    run, cache = tmp_path / "run", tmp_path / "fresh-cache"  # a fresh cache: setup builds the benchmark
    proc = start(3, ["--out", str(run), *sets(*TINY, f"data.cache_dir={cache}", "benchmark.num_train=3000",
                                               "benchmark.image_size=32", "run.watchdog_floor_s=2")])
    pid = None
    try:
        wait_for(lambda: trace(run, 2).get("phase") == "data", what="rank 2 in setup")
        pid = trace(run, 2)["pid"]
        os.kill(pid, signal.SIGSTOP)
        code, _, err = finish(proc, timeout=90)
    finally:
        _release(pid)
    no_traceback(err)
    said = hpcfl_lines(err, "exceeded its time limit")
    assert code not in (0, 3) and len(said) == 1, err[-3000:]
    assert said[0].startswith("hpcfl: rank 0: setup exceeded") and "rank(s) [2]" in said[0], said[0]

    run = tmp_path / "run2"
    proc = start(3, ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=40",
                                               "run.watchdog_floor_s=3")])
    pid = None
    try:
        wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 2, what="two rounds")
        pid = trace(run, 0)["pid"]
        os.kill(pid, signal.SIGSTOP)
        code, _, err = finish(proc, timeout=120)
    finally:
        _release(pid)
    said = hpcfl_lines(err, "exceeded its time limit")
    assert code not in (0, 3) and len(said) == 1, err[-3000:]
    assert said[0].startswith("hpcfl: rank 1: round") and "likely rank 0 that is stuck" in said[0], said[0]


def test_a_rank_stopped_during_start_up_does_not_hang_the_job(tmp_path, data_cache):
    """SIGSTOP of a rank a moment after launch, before MPI is up or the run directory is decided: a timer outside
    the interpreter ends the waiting ranks after the setup's limit (4 x run.watchdog_floor_s: 8 s here, more than
    the other ranks' imports take even on a busy machine)."""
    args = ["--out", str(tmp_path / "run"), *sets(*TINY, f"data.cache_dir={data_cache}", "run.watchdog_floor_s=2")]
    proc = subprocess.Popen([mpiexec(), "-n", "3", sys.executable, "-m", "hpcfl.run", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    pid = None
    try:
        deadline = time.time() + 30
        while pid is None and time.time() < deadline:  # a rank's python, as soon as the three exist
            found = subprocess.run(["pgrep", "-f", f"hpcfl.run --out {tmp_path / 'run'}"], capture_output=True,
                                   text=True)
            pids = sorted(int(x) for x in found.stdout.split() if int(x) != proc.pid)
            if len(pids) >= 3:
                pid = pids[-1]
            time.sleep(0.05)
        assert pid, "no rank process found"
        os.kill(pid, signal.SIGSTOP)
        code, _, err = finish(proc, timeout=90)
    finally:
        _release(pid)
    assert code not in (0, 3), err[-3000:]
    assert "Traceback (most recent call last)" not in err


def _release(pid: int | None) -> None:
    for sig in (signal.SIGCONT, signal.SIGKILL):
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


def test_a_stop_signal_that_reaches_one_client_rank_stops_the_job(tmp_path, data_cache):
    """SIGTERM to one client rank only (a node of a multi-node job pre-empted): the whole job checkpoints and
    exits 3, and the same command resumes."""
    run = tmp_path / "run"
    args = ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=30",
                                      "run.checkpoint_every=100")]
    proc = start(3, args)
    wait_for(lambda: (run / "metrics.jsonl").is_file(), what="the first round")
    os.kill(trace(run, 2)["pid"], signal.SIGTERM)
    code, _, err = finish(proc)
    no_traceback(err)
    assert code == 3 and 0 <= checkpointed(run) < 29, err[-3000:]


def test_a_killed_rank_is_named_the_next_time_and_the_run_resumes(tmp_path, data_cache):
    """kill -9 of a client rank: the launcher ends the job at once, before hpcfl can say anything; the next run of
    the same command says where every rank was (the killed one's pid among them), takes over the dead run's
    lock and resumes."""
    run = tmp_path / "run"
    args = ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=8", "run.checkpoint_every=1")]
    proc = start(3, args)
    wait_for(lambda: checkpointed(run) >= 1, what="round 2's checkpoint")
    victim = trace(run, 2)["pid"]
    os.kill(victim, signal.SIGKILL)
    code, _, err = finish(proc)
    assert code != 0
    p = launch(3, args)
    assert p.returncode == 0, p.stderr[-3000:]
    no_traceback(p.stderr)
    report = [line for line in (p.stdout + p.stderr).splitlines() if "the previous attempt ended without a word" in line]
    assert len(report) == 1, p.stdout[-3000:]
    assert "rank 2 " in report[0] and f"(pid {victim} on {socket.gethostname()})" in report[0], report[0]
    assert "took over the lock of a run that is gone" in p.stdout
    assert [m["round"] for m in read_metrics(run)] == list(range(8))


# --------------------------------------------------------------------------------------------------- Ctrl-C

def test_ctrl_c_under_mpirun_stops_at_a_checkpoint_with_one_message(tmp_path, data_cache):
    run = tmp_path / "run"
    args = ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=6",
                                      "run.checkpoint_every=100")]
    proc = start(3, args)
    wait_for(lambda: (run / "metrics.jsonl").is_file(), what="the first round")
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C goes to the launcher's process group
    code, out, err = finish(proc)
    no_traceback(err, out)
    assert code == 3, err[-3000:]
    assert len(hpcfl_lines(err, "Ctrl-C: stopping after this round at a checkpoint")) == 1, err
    stopped = checkpointed(run)
    assert 0 <= stopped < 5
    p = launch(3, args)  # the same command resumes
    assert p.returncode == 0 and f"resuming {run} after round {stopped + 1}" in p.stdout, p.stderr[-3000:]


def test_a_second_ctrl_c_stops_at_once(tmp_path, data_cache):
    run = tmp_path / "run"  # rounds of a few seconds, so that the second Ctrl-C comes before the first stops it
    proc = start(1, ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=50",
                                               "model.width=48", "train.batch_size=4")])
    wait_for(lambda: (run / "metrics.jsonl").is_file(), what="the first round")
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)
    code, out, err = finish(proc, timeout=30)
    no_traceback(err)
    assert code == 130
    assert hpcfl_lines(err) == [
        "hpcfl: Ctrl-C: stopping after this round at a checkpoint (run the same command again to resume); Ctrl-C "
        "again to stop at once", "hpcfl: stopped at once (the run resumes from its last checkpoint)"]


# ---------------------------------------------------------------------------------------------- environment

@contextmanager
def mounted(path: Path, options: str):
    """A tmpfs mounted at ``path`` (root only); yields False where the machine does not allow it."""
    path.mkdir(parents=True, exist_ok=True)
    ok = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                                              capture_output=True).returncode == 0
    try:
        yield ok
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextmanager
def read_only_dir(path: Path):
    """A directory this process cannot write: a read-only tmpfs as root, else plain permissions."""
    if os.geteuid() == 0:
        with mounted(path, "ro,size=64k") as ok:
            if not ok:
                pytest.skip("running as root and no read-only mount is allowed here")
            yield path
        return
    path.mkdir()
    path.chmod(0o500)
    try:
        yield path
    finally:
        path.chmod(0o700)


def file_size_limit(n_bytes: int):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n_bytes, n_bytes))
    return limit


def test_an_unwritable_run_directory_or_cache_is_one_line(tmp_path, data_cache):
    with read_only_dir(tmp_path / "ro") as ro:
        for args in (["--out", str(ro / "run"), *sets(*TINY, f"data.cache_dir={data_cache}")],
                     ["--out", str(tmp_path / "run"), *sets(*TINY, f"data.cache_dir={ro / 'cache'}")]):
            p = launch(1, args, timeout=120)
            no_traceback(p.stderr)
            assert p.returncode == 2, p.stderr[-2000:]
            errors = hpcfl_lines(p.stderr, "hpcfl: error")
            assert len(errors) == 1 and "cannot write there" in errors[0], p.stderr


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path, data_cache):
    """The run directory on a disk that fills up at the first checkpoint: exit 2, one line, no half-written
    checkpoint; the preprocessors on a file-size limit: exit 2, one line, no crash."""
    run = tmp_path / "disk" / "run"
    args = ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.checkpoint_every=1",
                                      "model.width=64")]  # ~100k parameters: a 0.4 MB checkpoint
    with mounted(tmp_path / "disk", "size=256k") as ok:
        if ok:
            p = launch(1, args, timeout=120)
        else:  # no tmpfs here: a file-size limit stands in for the full disk (without MPI, which maps files)
            p = subprocess.run([sys.executable, "-m", "hpcfl.run", *args], cwd=REPO, capture_output=True, text=True,
                               env={**os.environ, "HPCFL_NO_MPI": "1"}, preexec_fn=file_size_limit(200_000))
        no_traceback(p.stderr)
        assert p.returncode == 2, p.stderr[-2000:]
        errors = hpcfl_lines(p.stderr, "hpcfl: error")
        assert len(errors) == 1 and ("the disk is full" in errors[0] or "ulimit -f" in errors[0]), p.stderr
        assert not (run / "checkpoint.json").exists() and not list(run.glob("checkpoint-*"))
        assert len(read_metrics(run)) == 1  # the round before the failed checkpoint is on record
    make_rsna_folder(tmp_path / "rsna", per_class=4)
    with mounted(tmp_path / "tiny", "size=16k") as ok:  # so small that even the rank logs cannot be written
        if ok:
            p = launch(1, ["--out", str(tmp_path / "tiny" / "run"), *args[2:]], timeout=120)
            no_traceback(p.stderr)
            assert p.returncode == 2 and "--- Logging error ---" not in p.stderr, p.stderr[-2000:]
            assert len(hpcfl_lines(p.stderr, "hpcfl: error")) == 1, p.stderr
    for cmd in (["-m", "preprocess.synthetic", str(tmp_path / "synthetic")],
                ["-m", "preprocess.ich", str(tmp_path / "rsna"), str(tmp_path / "ich"), "--size", "64",
                 "--clients", "3", "--corrupted", "1", "--workers", "1"]):
        p = subprocess.run([sys.executable, *cmd], cwd=REPO, capture_output=True, text=True,
                           preexec_fn=file_size_limit(20_000))
        no_traceback(p.stderr)
        assert p.returncode == 2, (cmd, p.returncode, p.stderr[-2000:])
        assert [line for line in p.stderr.splitlines() if line.startswith("error:")][-1].endswith(
            "then run the same command again"), p.stderr[-2000:]


# ------------------------------------------------------------------------------------- one run per directory

def test_two_runs_never_share_a_run_directory(tmp_path, data_cache):
    run = tmp_path / "run"
    base = ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=8")]
    # started together, with different settings: one runs, the other is refused by name
    a, b = start(1, [*base, "--set", "train.lr=0.002"]), start(1, [*base, "--set", "train.lr=0.003"])
    (code_a, _, err_a), (code_b, _, err_b) = finish(a), finish(b)
    no_traceback(err_a, err_b)
    assert sorted([code_a, code_b]) == [0, 2], (err_a[-2000:], err_b[-2000:])
    loser = err_b if code_b == 2 else err_a
    assert "is in use by another hpcfl run: pid " in loser or "holds a run with a different config" in loser, loser
    winner_lr = "0.002" if code_a == 0 else "0.003"
    assert f"lr = {winner_lr}" in (run / "config.toml").read_text()
    assert [m["round"] for m in read_metrics(run)] == list(range(8))
    # a second run while the first one runs, same settings: refused, and the first finishes undisturbed
    other = tmp_path / "other"
    first = start(1, ["--out", str(other), *base[2:], "--set", "run.rounds=30"])
    wait_for(lambda: (other / "run.json").is_file(), what="the first run's start")
    p = launch(1, ["--out", str(other), *base[2:], "--set", "run.rounds=30"])
    assert p.returncode == 2 and "is in use by another hpcfl run: pid" in p.stderr, p.stderr[-2000:]
    assert f"on {socket.gethostname()}" in p.stderr and "remove" in p.stderr
    code, _, err = finish(first)
    assert code == 0, err[-2000:]
    assert not (other / "run.lock").exists()


def test_a_resumed_run_writes_its_metrics_history_back(tmp_path, data_cache):
    """A damaged metrics.jsonl in an unfinished run: the resumed run writes back the history its checkpoint kept."""
    run = tmp_path / "run"
    args = ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.checkpoint_every=1")]
    assert launch(1, args).returncode == 0
    history = read_metrics(run)
    info = json.loads((run / "run.json").read_text())
    del info["finished"]
    (run / "run.json").write_text(json.dumps(info))
    (run / "metrics.jsonl").write_text("garbage\n")
    p = launch(1, args)
    assert p.returncode == 0 and "resuming" in p.stdout, p.stderr[-2000:]
    assert read_metrics(run) == history


def test_a_run_directory_with_a_non_ascii_name_resumes(tmp_path, data_cache):
    run = tmp_path / "données-😀"
    args = ["--out", str(run), *sets(*TINY, f"data.cache_dir={data_cache}", "run.rounds=4", "run.checkpoint_every=1")]
    proc = start(1, args)
    wait_for(lambda: checkpointed(run) >= 0, what="the first checkpoint")
    proc.send_signal(signal.SIGTERM)
    code, _, err = finish(proc)
    assert code == 3, err[-2000:]
    p = launch(1, args)
    assert p.returncode == 0 and "resuming" in p.stdout, p.stderr[-2000:]
    assert np.isfinite(final_vector(run)).all()


def test_a_lock_from_a_clock_ahead_is_fresh_and_its_holder_named(tmp_path):
    """A run.lock written by a host whose clock is ahead of ours (its time in our future) is a live holder."""
    from hpcfl.errors import UsageError
    from hpcfl.runlock import LOCK, RunLock

    lock = tmp_path / LOCK
    lock.write_text(json.dumps({"host": "othernode-17", "pid": 4242, "since": "2026-12-03T10:00:00+0000"}))
    ahead = time.time() + 120
    os.utime(lock, (ahead, ahead))
    with pytest.raises(UsageError, match="in use by another hpcfl run: pid 4242 on othernode-17"):
        RunLock(tmp_path).acquire()
    stale = time.time() - 700  # no refresh for over 10 minutes: its holder is gone
    os.utime(lock, (stale, stale))
    mine = RunLock(tmp_path)
    assert "not refreshed" in mine.acquire()["stale"]
    mine.release()
    assert not lock.exists()
