"""Supervision of a rank: where it is, its log and trace files, the stop request, the round watchdog and the test
hooks.

None of this changes a number; it decides what a user learns when something goes wrong, and when the job ends:
- every failure hpcfl sees is one message naming the rank, round, client and phase (hpcfl/run.py);
- a stuck rank (a hung driver, a stopped process) is named by the round watchdog, from the arrival notes each
  rank sends the server at every collective (hpcfl/comm.py);
- a rank that dies without a word (kill -9, the out-of-memory killer) cannot say anything, but its trace file
  ``logs/rank_<r>.where`` (where it was, rewritten at every phase) lets the next run of the same command say
  where every rank was when the job ended (``previous_run_report``).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

log = logging.getLogger("hpcfl")

# The phases a rank goes through, in round order; their index travels in the arrival notes.
PHASES = ("setup", "data", "pretrain", "resume", "broadcast", "statistics", "local training", "cosines", "weights",
          "aggregation", "evaluation", "checkpoint", "finish")

# ------------------------------------------------------------------------------------------------ start-up time

_IMPORTED = time.time()


def process_age() -> float:
    """Seconds since this process started (Linux: its start time in /proc, against the same clock since boot;
    elsewhere since this module was imported)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time() - _IMPORTED


# ---------------------------------------------------------------------------------------------- stop requests

stop_requested = False
_interrupts = 0
_speaks = True  # whether this process prints the Ctrl-C messages (rank 0 only, so that a job says it once)


def launcher_size() -> int | None:
    """How many processes the launcher started for this job step, as it tells them (None: it does not say).
    SLURM_STEP_NUM_TASKS is set by srun in a step, not in a batch script running Python itself."""
    for key in ("SLURM_STEP_NUM_TASKS", "PMI_SIZE", "PMIX_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return None


def launcher_rank() -> int:
    """This process's rank as the launcher tells it, before MPI is initialised (0 when launched alone)."""
    for key in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def request_stop(signum=None, frame=None) -> None:
    """SLURM's pre-emption warning (``--signal=B:USR1@...``, forwarded by the job script) or SIGTERM: finish the
    current round, checkpoint, exit with code 3 so that the job script can requeue."""
    global stop_requested
    stop_requested = True


def interrupt(signum, frame) -> None:
    """Ctrl-C: the first stops at the next checkpoint like SIGTERM, the second ends this process at once. (Under
    mpirun the launcher forwards Ctrl-C to every rank and ends the job itself on a second one.)"""
    global _interrupts
    _interrupts += 1
    if _interrupts == 1:
        request_stop()
        if _speaks:
            print("\nhpcfl: Ctrl-C: stopping after this round at a checkpoint (run the same command again to "
                  "resume); Ctrl-C again to stop at once", file=sys.stderr, flush=True)
        return
    if _speaks:
        print("hpcfl: stopped at once (the run resumes from its last checkpoint)", file=sys.stderr, flush=True)
    os._exit(130)


def install_signal_handlers(speaks: bool) -> None:
    """USR1 and TERM stop at the next checkpoint, Ctrl-C as ``interrupt``; ``speaks``: this rank tells the user."""
    global _speaks
    _speaks = speaks
    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, interrupt)


# ----------------------------------------------------------------------------------------------- where we are

class Where:
    """Where this rank is: for the message that ends the job when something fails, for the arrival notes and,
    once ``trace_to`` is called, in the trace file (rewritten at every change: a few small writes per round)."""

    _FIELDS = ("round", "client", "phase", "waiting")

    def __init__(self):
        object.__setattr__(self, "_trace", None)
        object.__setattr__(self, "_extra", {})
        self.round: int | None = None
        self.client: int | None = None
        self.phase = "setup"
        self.waiting = False  # in a collective, waiting for the other ranks

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name in self._FIELDS and self._trace is not None:
            self._write()

    def phase_code(self) -> int:
        return PHASES.index(self.phase) if self.phase in PHASES else -1

    @staticmethod
    def phase_name(code: int) -> str:
        return PHASES[code] if 0 <= code < len(PHASES) else "?"

    def __str__(self):
        return f"round {self.round if self.round is not None else '-'}, " \
               f"client {self.client if self.client is not None else '-'}, phase {self.phase}"

    def trace_to(self, path: Path, rank: int) -> None:
        object.__setattr__(self, "trace_dir", path.parent)
        object.__setattr__(self, "_extra", {"rank": rank, "pid": os.getpid(), "host": socket.gethostname()})
        path.parent.mkdir(parents=True, exist_ok=True)
        object.__setattr__(self, "_trace", open(path, "w", encoding="utf-8"))  # noqa: SIM115 (kept open)
        self._write()

    def end(self, state: str, message: str = "") -> None:
        """Mark how this rank ended ('finished', 'stopped', 'failed'), and stop tracing."""
        if self._trace is None:
            return
        self._write(state=state, message=message)
        self._trace.close()
        object.__setattr__(self, "_trace", None)

    def _write(self, **more) -> None:
        record = {**self._extra, **{k: getattr(self, k, None) for k in self._FIELDS}, "time": time.time(), **more}
        try:
            f = self._trace
            f.seek(0)
            f.write(json.dumps(record) + "\n")
            f.truncate()
            f.flush()  # the page cache outlives the process: no fsync needed against kill -9
        except (OSError, ValueError):
            pass  # a trace is a courtesy: never the reason a run fails


def process_state(pid: int) -> str | None:
    """'stopped' or 'gone' for a process of this host that cannot take part any more; None if it runs."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"
    except (OSError, IndexError):
        return None
    return {"T": "stopped", "t": "stopped", "Z": "gone", "X": "gone"}.get(state)


def trace_path(out_dir: Path, rank: int) -> Path:
    return out_dir / "logs" / f"rank_{rank}.where"


def read_trace(directory: Path, rank: int) -> dict | None:
    try:
        record = json.loads((directory / f"rank_{rank}.where").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def describe_trace(r: dict) -> str:
    """'in phase local training of round 3, client 7 since 10:14:05 (pid 123 on n01)'."""
    when = time.strftime("%H:%M:%S", time.localtime(r.get("time", 0)))
    doing = "waiting for the other ranks after" if r.get("waiting") else "in"
    client = f", client {r['client']}" if r.get("client") is not None else ""
    return (f"{doing} phase {r.get('phase')} of round {r.get('round') if r.get('round') is not None else '-'}"
            f"{client} since {when} (pid {r.get('pid')} on {r.get('host')})")


def previous_run_report(out_dir: Path) -> str | None:
    """What the rank trace files of an earlier attempt say, when it did not end cleanly (None otherwise)."""
    records = []
    for path in sorted((out_dir / "logs").glob("rank_*.where")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    records = [r for r in records if isinstance(r, dict) and isinstance(r.get("rank"), int)]
    if not records or all(r.get("state") in ("finished", "stopped") for r in records):
        return None
    failed = [r for r in records if r.get("state") == "failed" and r.get("message")]
    if failed:
        r = min(failed, key=lambda r: r.get("time", 0))
        return f"the previous attempt failed: {r['message']}"
    parts = [f"rank {r['rank']} {describe_trace(r)}" for r in sorted(records, key=lambda r: r["rank"])]
    busy = [r["rank"] for r in records if not r.get("waiting")]
    culprit = f"; ranks {busy} were not waiting for others" if 0 < len(busy) < len(records) else ""
    return ("the previous attempt ended without a word from hpcfl (a rank killed, e.g. by kill -9 or the "
            "out-of-memory killer, or the node lost): " + "; ".join(parts) + culprit)


# ---------------------------------------------------------------------------------------------- rank log files

class QuietFileHandler(logging.FileHandler):
    """A rank's log file that cannot be written (a full disk) is not worth a traceback on the console: the write
    that matters fails on its own, with its one message."""

    def handleError(self, record) -> None:
        pass


def add_rank_log(out_dir: Path, rank: int) -> None:
    """Every rank also logs to ``logs/rank_<r>.log`` in the run directory, the rank in each line."""
    path = out_dir / "logs" / f"rank_{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = QuietFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def to_rank_log(text: str) -> None:
    """Also keep a failure in this rank's log file (the console already shows it)."""
    for handler in log.handlers:
        if isinstance(handler, logging.FileHandler):
            try:
                handler.stream.write(text.rstrip("\n") + "\n")
                handler.flush()
            except (OSError, ValueError):
                pass


# ------------------------------------------------------------------------------------------------ test hooks

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


# ---------------------------------------------------------------------------------------------- the watchdog

class RoundWatchdog:
    """Ends the job when a round takes far longer than it should: a stuck collective, a hung or stopped rank.

    The limit is ``run.round_timeout_s`` when it is set; by default (0) it adapts to the run:
    ``FACTOR`` × the slowest round so far, at least ``run.watchdog_floor_s`` (and ``FIRST_ROUND`` × that floor
    for the first round of an attempt, which pays for warm-up). The server reports first and names the ranks
    that did not arrive at its collective, with where each was last seen (``comm.missing_ranks``); a client rank
    waits a little longer, so that it speaks only when the server cannot (then it is likely the server that is
    stuck)."""

    FACTOR = 5.0
    FIRST_ROUND = 4.0  # setup, and the first round of an attempt, may take this many floors
    CLIENT_GRACE = 1.25  # client rank r waits limit x this + 5 s + 3 s x (r - 1): the server, then rank 1, speaks

    def __init__(self, fixed_s: float, floor_s: float, comm, where: Where):
        self.fixed_s, self.floor_s, self.comm, self.where = fixed_s, floor_s, comm, where
        self.slowest = 0.0
        self.round_started = time.monotonic()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True, name="hpcfl-watchdog")
        self.thread.start()

    def limit(self) -> float:
        if self.fixed_s > 0:
            return self.fixed_s
        return max(self.floor_s * (self.FIRST_ROUND if self.slowest == 0 else 1.0), self.FACTOR * self.slowest)

    def new_round(self) -> None:
        now = time.monotonic()
        if self.where.round is not None:  # the round that just ended
            self.slowest = max(self.slowest, now - self.round_started)
        self.round_started = now

    def _watch(self) -> None:
        rank = self.comm.rank
        while not self.done.wait(0.5):
            elapsed = time.monotonic() - self.round_started
            limit = self.limit() if self.comm.is_server else \
                self.limit() * self.CLIENT_GRACE + 5.0 + 3.0 * max(0, rank - 1)
            if elapsed > limit:
                print(self.message(elapsed), file=sys.stderr, flush=True)
                to_rank_log(self.message(elapsed))
                self.where.end("failed", self.message(elapsed))
                self.comm.abort(1)
                return

    def message(self, elapsed: float) -> str:
        w, rank = self.where, self.comm.rank
        how = (f"run.round_timeout_s = {self.fixed_s:g} s" if self.fixed_s > 0 else
               f"{self.limit():.0f} s, adaptive: {self.FACTOR:g} x the slowest round so far, at least "
               f"run.watchdog_floor_s")
        part = f"round {w.round}" if w.round is not None else "setup"
        head = f"hpcfl: rank {rank}: {part} exceeded its time limit ({how}) after {elapsed:.0f} s"
        if w.round is None and not w.waiting:
            return (f"{head}: this rank is still in {w}; ending the job (if setup legitimately takes this long, "
                    f"raise run.watchdog_floor_s)")
        if not w.waiting:
            return f"{head}: this rank is stuck in {w}; ending the job"
        if self.comm.is_server:
            missing = self.comm.missing_ranks()
            traces = {r: read_trace(w.trace_dir, r) if hasattr(w, "trace_dir") else None
                      for r in range(1, self.comm.size)}
            # ranks on this host whose process is stopped or gone are the culprits, whatever the notes say
            here = {r: process_state(t["pid"]) for r, t in traces.items()
                    if t and t.get("host") == socket.gethostname() and isinstance(t.get("pid"), int)}
            culprits = [(r, f"its process {t['pid']} is {here[r]}") for r, t in traces.items() if here.get(r)]
            missing = culprits or missing
            if missing:
                seen = "; ".join(f"rank {r}: {note}" + (f"; its trace: {describe_trace(traces[r])}"
                                                          if traces[r] else "") for r, note in missing)
                return (f"{head}: rank(s) {[r for r, _ in missing]} held up the collective after phase {w.phase} "
                        f"({seen}); ending the job")
            return f"{head}: waiting in the collective after phase {w.phase}; ending the job"
        return (f"{head}: waiting for the other ranks after phase {w.phase}; the server (rank 0) did not end the job "
                "itself, so it is likely rank 0 that is stuck; ending the job")

    def stop(self) -> None:
        self.done.set()
