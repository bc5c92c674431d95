"""Supervision of a rank: where it is, its log file, the stop request, the round watchdog and the test hooks.

None of this changes a number; it decides what a user learns when something goes wrong, and when the job ends.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("hpcfl")

# Set by a signal handler (SLURM's pre-emption warning, SIGTERM): checkpoint after this round and stop.
stop_requested = False


def request_stop(signum=None, frame=None) -> None:
    """SLURM's pre-emption warning (``--signal=B:USR1@...``, forwarded by the job script) or SIGTERM: finish the
    current round, checkpoint, exit with code 3 so that the job script can requeue."""
    global stop_requested
    stop_requested = True


@dataclass
class Where:
    """Where this rank is, for the message that ends the job when something fails."""

    round: int | None = None
    client: int | None = None
    phase: str = "setup"

    def __str__(self):
        return f"round {self.round if self.round is not None else '-'}, " \
               f"client {self.client if self.client is not None else '-'}, phase {self.phase}"


def add_rank_log(out_dir: Path, rank: int) -> None:
    """Every rank also logs to ``logs/rank_<r>.log`` in the run directory, the rank in each line."""
    path = out_dir / "logs" / f"rank_{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def to_rank_log(text: str) -> None:
    """Also keep a failure in this rank's log file (the console already shows it)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.stream.write(text.rstrip("\n") + "\n")
            handler.flush()


class DebugHooks:
    """``enter(phase)`` marks the phase this rank is in, and honours the test hooks of [debug]:
    ``fail_at = 'RANK:ROUND[:PHASE]'`` raises there, ``hang_at = 'RANK:ROUND'`` never returns from local training
    there (the tests of fail-fast and of the round watchdog). Without a phase, a client rank fails in local
    training, a server in weights."""

    def __init__(self, debug, rank: int, size: int, where: Where):
        self.fail = debug.fail_at.split(":") if debug.fail_at else None
        self.hang = debug.hang_at.split(":") if debug.hang_at else None
        self.fail_at, self.rank, self.size, self.where = debug.fail_at, rank, size, where

    def enter(self, phase: str) -> None:
        self.where.phase = phase
        rnd = self.where.round if self.where.round is not None else 0
        fail, hang = self.fail, self.hang
        if fail and int(fail[0]) == self.rank and int(fail[1]) == rnd:
            default = "weights" if self.size > 1 and self.rank == 0 else "local training"
            if phase == (fail[2] if len(fail) > 2 else default):
                raise RuntimeError(f"injected failure (debug.fail_at = {self.fail_at!r})")
        if hang and int(hang[0]) == self.rank and int(hang[1]) == rnd and phase == "local training":
            while True:  # a rank that never reaches the next collective
                time.sleep(1)


class RoundWatchdog:
    """Ends the job when a round runs longer than ``run.round_timeout_s`` (a stuck collective, a hung rank)."""

    def __init__(self, timeout_s: float, abort, rank: int, where: Where):
        self.timeout_s, self.abort, self.rank, self.where = timeout_s, abort, rank, where
        self.round_started = time.time()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        if timeout_s > 0:
            self.thread.start()

    def new_round(self) -> None:
        self.round_started = time.time()

    def _watch(self) -> None:
        while not self.done.wait(1.0):
            if time.time() - self.round_started > self.timeout_s:
                print(f"hpcfl: rank {self.rank}: round {self.where.round} exceeded run.round_timeout_s = "
                      f"{self.timeout_s:g} s ({self.where}); ending the job", file=sys.stderr, flush=True)
                self.abort(1)

    def stop(self) -> None:
        self.done.set()
