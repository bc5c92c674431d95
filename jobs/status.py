"""``python -m jobs status OUT_ROOT``: how far each cell of a sweep got, and what to run next."""

from __future__ import annotations

import json
import time
from pathlib import Path

from hpcfl.runlock import LOCK, REFRESH_S
from hpcfl.supervise import read_trace
from jobs.cells import read_cells
from jobs.scripts import LOCAL_FILE, SBATCH_FILE, _q


def traces(run_dir: Path) -> list[dict]:
    """The ranks' trace files (logs/rank_<r>.where): where each rank was, and how it ended."""
    found = [read_trace(run_dir / "logs", int(p.stem.split("_")[1]))
             for p in (run_dir / "logs").glob("rank_*.where") if p.stem.split("_")[1].isdigit()]
    return [t for t in found if t]


def cell_state(run_dir: Path) -> tuple[str, bool]:
    """(a short description of the run directory's state, finished?)."""
    info_path, pointer = run_dir / "run.json", run_dir / "checkpoint.json"
    rounds = "?"
    try:
        import tomllib

        rounds = tomllib.loads((run_dir / "config.toml").read_text(encoding="utf-8"))["run"]["rounds"]
    except Exception:  # noqa: BLE001 - a state report never fails on one odd directory
        pass
    try:
        info = json.loads(info_path.read_text(encoding="utf-8")) if info_path.is_file() else None
    except ValueError:
        info = {}
    if info is not None and "finished" in info:
        return "finished", True
    failures = [t for t in traces(run_dir) if t.get("state") == "failed" and t.get("message")]
    if failures:
        return "FAILED: " + min(failures, key=lambda t: t.get("time", 0))["message"], False
    lock = run_dir / LOCK
    try:
        holder = json.loads(lock.read_text(encoding="utf-8"))
        if time.time() - lock.stat().st_mtime < 2 * REFRESH_S:
            return f"running (pid {holder.get('pid')} on {holder.get('host')})", False
    except (OSError, ValueError, AttributeError):
        pass
    if pointer.is_file():
        try:
            done = json.loads(pointer.read_text(encoding="utf-8"))["round"] + 1
        except (ValueError, KeyError, TypeError):
            done = "?"
        return f"checkpoint after round {done}/{rounds}", False
    if info is not None:
        return "started, no checkpoint yet", False
    return "not started", False


def status(opts) -> int:
    out_root = Path(opts.out_root)
    workdir, rows = read_cells(out_root)
    unfinished = []
    for index, run_dir, _ in rows:
        state, finished = cell_state(Path(run_dir) if workdir is None else workdir / run_dir)
        if not finished:
            unfinished.append(index)
        print(f"{index:4d}  {state:32s} {run_dir}")
    print(f"{len(rows) - len(unfinished)} of {len(rows)} cells finished")
    if not unfinished:
        # The cells' directories only: the glob leaves out cells.tsv, the job script and logs/.
        print(f"report: python -m hpcfl.report {_q(out_root)}")
    elif (out_root / SBATCH_FILE).is_file():
        ranges = compress(unfinished)
        print(f"(re)submit the unfinished cells once no task of an earlier submission is queued or running "
              f"(squeue --me): sbatch --array={ranges} {_q(out_root / SBATCH_FILE)}")
    elif (out_root / LOCAL_FILE).is_file():
        print(f"run the unfinished cells: bash {_q(out_root / LOCAL_FILE)}")
    return 0 if not unfinished else 1


def compress(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="the state of every cell of a sweep",
                       description="The state of every cell of a sweep (finished, checkpointed, not started); "
                                   "exit code 0 when all are finished, else 1.")
    p.add_argument("out_root", help="the sweep directory (its --out-root)")
    p.set_defaults(func=status)
