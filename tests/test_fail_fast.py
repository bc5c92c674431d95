"""Fail-fast: an exception on any rank in any phase ends the whole job quickly, naming rank, client and round;
a stuck rank is ended by the round watchdog; non-finite clients abort or are left out."""

from __future__ import annotations

import re

import pytest

from tests.conftest import TINY, launch, read_metrics, sets

pytestmark = pytest.mark.mpi

# (rank, round, phase, extra settings): every phase in which a rank can fail
PHASES = [
    (1, 0, "data", []),
    (2, 1, "statistics", ["algorithm.name=qfedavg"]),
    (2, 1, "local training", []),
    (0, 1, "weights", []),
    (1, 1, "aggregation", []),
    (0, 1, "evaluation", ["eval.placement=server"]),
    (1, 1, "evaluation", ["eval.placement=clients"]),  # a client rank, while it tests its share of the test sets
    (2, 1, "checkpoint", ["run.checkpoint_every=1"]),
]
IDS = [p[2].replace(" ", "_") + ("_on_clients" if "eval.placement=clients" in p[3] else "") for p in PHASES]


@pytest.mark.parametrize("rank,rnd,phase,extra", PHASES, ids=IDS)
def test_a_failure_in_every_phase_ends_the_job(tmp_path, data_cache, rank, rnd, phase, extra):
    p = launch(3, ["--out", str(tmp_path / "run"),
                   *sets(*TINY, f"data.cache_dir={data_cache}", f"debug.fail_at={rank}:{rnd}:{phase}", *extra)],
               timeout=120)
    assert p.returncode == 1 and p.wall_s < 100, (p.returncode, p.wall_s, p.stderr[-2000:])
    shown_round = rnd if phase != "data" else "-"
    assert f"hpcfl: rank {rank} failed in round {shown_round}, client " in p.stderr
    assert f"phase {phase}: RuntimeError: injected failure" in p.stderr


def test_the_watchdog_ends_a_job_with_a_hung_rank_and_names_it(tmp_path, data_cache):
    """The adaptive limit (no run.round_timeout_s): round 1 may take 5 x round 0, at least the floor."""
    p = launch(3, ["--out", str(tmp_path / "run"),
                   *sets(*TINY, f"data.cache_dir={data_cache}", "debug.hang_at=2:1", "run.watchdog_floor_s=4")],
               timeout=150)
    assert p.returncode != 0 and p.wall_s < 120, p.stderr[-2000:]
    # (round 1 hangs; on a very busy machine round 0 alone may already outlast the limit)
    said = [line for line in p.stderr.splitlines() if "exceeded its time limit" in line]
    assert len(said) == 1 and said[0].startswith("hpcfl: rank 0: round 1"), p.stderr[-2000:]
    assert "adaptive: 5 x the slowest round so far" in said[0], said[0]
    assert "rank(s) [2] held up the collective after phase local training (rank 2: last heard at" in said[0] and "its trace: in phase local training of round 1, client" in said[0]


def test_nonfinite_client_aborts_or_is_left_out(tmp_path, data_cache):
    base = sets(*TINY, f"data.cache_dir={data_cache}", "debug.nan_at=5:1")
    p = launch(1, ["--out", str(tmp_path / "abort"), *base], timeout=120)
    assert p.returncode == 1 and "client(s) [5] sent non-finite parameters" in p.stderr
    p = launch(3, ["--out", str(tmp_path / "skip"), *base, "--set", "run.on_nonfinite=skip"], timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "round 1: client(s) [5] non-finite, left out of this round" in p.stdout
    lines = read_metrics(tmp_path / "skip")
    assert lines[1]["weights"][5] == 0 and sum(lines[1]["weights"]) == pytest.approx(1)
    assert lines[0]["weights"][5] > 0 and lines[2]["weights"][5] > 0  # only that round
