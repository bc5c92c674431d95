"""One run at a time in a run directory: a lock file that works on local disks, NFS and Lustre alike.

``run.lock`` is created with ``O_CREAT | O_EXCL``, which is atomic on NFS (v3 and later) and Lustre, unlike
``flock``/``fcntl`` locks, which many Lustre mounts do not offer. The file says who holds it (host, pid, Slurm
job, command, since when), and its holder refreshes its modification time every ``REFRESH_S`` seconds.

A lock is stale, and taken over, when its holder is known to be gone:
- the same host, and its pid no longer runs (a killed job, rerun on the same machine);
- the same Slurm job (array task), restarted (a requeued job that lands on another node);
- no refresh for ``STALE_S`` seconds (a holder on another machine that died without a word).
Otherwise the run is refused with a message naming the holder. A take-over renames the stale file away first,
so two runs that find the same stale lock cannot both take it.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from hpcfl.errors import UsageError

LOCK = "run.lock"
REFRESH_S = 30.0
STALE_S = 600.0


def _me() -> dict:
    env = os.environ
    job = env.get("SLURM_JOB_ID")
    if job and env.get("SLURM_ARRAY_TASK_ID"):
        job = f"{env.get('SLURM_ARRAY_JOB_ID', job)}_{env['SLURM_ARRAY_TASK_ID']}"
    return {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job,
            "slurm_restart": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
            "command": " ".join(sys.argv)[:500], "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": uuid.uuid4().hex}


def _alive(pid: int) -> bool:
    """Whether a process of this host still runs (a zombie, not yet reaped, does not)."""
    from hpcfl.supervise import process_state

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        return True
    return process_state(pid) != "gone"


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK
        self.info: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> dict | None:
        """Take the lock (the run directory must exist); returns the stale holder it replaced, if any. Raises
        UsageError, naming the holder, while another run holds it."""
        me, replaced = _me(), None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder, age = self._holder()
                if age < 0:  # released meanwhile
                    continue
                why = self._stale(holder, age, me)
                if why is None:
                    raise UsageError(self._busy_message(holder, age)) from None
                replaced = {**(holder or {}), "stale": why}
                self._break()
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.info = me
            self._thread = threading.Thread(target=self._refresh, daemon=True, name="hpcfl-run-lock")
            self._thread.start()
            return replaced
        raise UsageError(f"{self.path}: could not take the run directory's lock (other runs keep taking it)")

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        self._stop.set()
        if self.info is None:
            return
        holder, _ = self._holder()
        if holder and holder.get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)
        self.info = None

    # ----------------------------------------------------------------------------------------------- helpers
    def _holder(self) -> tuple[dict | None, float]:
        """The lock's content (None when unreadable) and its age in seconds; (None, -1) when there is none."""
        try:
            age = max(0.0, time.time() - self.path.stat().st_mtime)  # a clock ahead of ours: as fresh
        except FileNotFoundError:
            return None, -1.0
        try:
            holder = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None, age
        return (holder if isinstance(holder, dict) else None), age

    @staticmethod
    def _stale(holder: dict | None, age: float, me: dict) -> str | None:
        if age > STALE_S:
            return f"not refreshed for {age:.0f} s"
        if holder is None:
            return None if age < REFRESH_S else "unreadable"  # a lock being written right now is not stale
        if holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]):
            return f"pid {holder['pid']} on {holder['host']} is gone"
        if holder.get("slurm_job") and holder.get("slurm_job") == me["slurm_job"] \
                and int(holder.get("slurm_restart") or 0) < me["slurm_restart"]:
            return f"Slurm job {holder['slurm_job']} was restarted"
        return None

    def _break(self) -> None:
        aside = self.path.with_name(f".{LOCK}.stale-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(self.path, aside)  # only one of several breakers succeeds
            aside.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def _busy_message(self, holder: dict | None, age: float) -> str:
        if holder is None:
            who = "another hpcfl run (its lock is being written)"
        else:
            job = f", Slurm job {holder['slurm_job']}" if holder.get("slurm_job") else ""
            who = f"another hpcfl run: pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('since')}"
        return (f"{self.path.parent} is in use by {who} (lock refreshed {age:.0f} s ago): wait for it to end or "
                f"choose another --out; if that run is gone, remove {self.path}")

    def _refresh(self) -> None:
        while not self._stop.wait(REFRESH_S):
            try:
                os.utime(self.path)
            except OSError:
                pass
