"""Checkpoints: everything a run needs to continue bit for bit, written atomically, read without pickles.

Layout inside the run directory::

    checkpoint.json                  {"round": t, "dir": "checkpoint-000123"}: the one pointer, replaced atomically
    checkpoint-000123/state.json     round, config digest, algorithm state, last weights, metrics lines so far,
                                     and the sha256 of every model file below (global_sha256, client_sha256),
                                     which a resume checks before it trusts a file
    checkpoint-000123/global.npy     w^{t+1}, the model the next round starts from (float32, no pickle)
    checkpoint-000123/client_007.npy a client's kept local model, for algorithms that keep one (FedCE, FedGA),
                                     written by the rank that hosts the client

A checkpoint directory is filled under a temporary name and renamed when complete; only then does the pointer move
to it, and only then are older checkpoints removed. A run killed at any moment therefore finds either the old or
the new checkpoint, whole. No random-number state needs saving: every stream is re-derived from
(seed, client, round, purpose).
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np

from hpcfl.errors import UsageError
from hpcfl.atomic import atomic_path, write_json

POINTER = "checkpoint.json"


class CheckpointError(UsageError):
    """An unreadable, foreign or mismatching checkpoint."""


def digest(path: Path) -> np.ndarray:
    """A file's sha256 as 32 bytes (uint8), so that ranks can sum their files' digests into one table."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return np.frombuffer(h.digest(), dtype=np.uint8)


def check_digest(path: Path, want: str | None) -> None:
    """Refuse a checkpoint file whose content is not what was written (``want``: its sha256 in hex, or None for a
    checkpoint written before hpcfl recorded them)."""
    if want is not None and digest(path).tobytes().hex() != want:
        raise CheckpointError(f"{path}: its sha256 differs from the checkpoint's record (the file changed)")


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            try:
                np.save(f, array, allow_pickle=False)
            except OSError as e:
                if e.errno is not None:
                    raise
                # NumPy reports a short write as "N requested and M written", without an errno
                raise OSError(errno.ENOSPC, f"No space left on device (the write stopped short: {e})",
                              str(path)) from None


def load_array(path: Path, size: int | None = None) -> np.ndarray:
    """A finite float32 vector saved by ``save_array`` (never unpickled); ``size``: the length it must have."""
    try:
        header = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only: no allocation yet
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({e})") from None
    if header.dtype != np.float32 or header.ndim != 1 or (size is not None and header.shape[0] != size):
        raise CheckpointError(f"{path}: {header.dtype} {tuple(header.shape)}, this model needs float32 ({size},)")
    array = np.array(header)
    del header
    if not np.isfinite(array).all():
        raise CheckpointError(f"{path}: holds non-finite values (NaN or infinity)")
    return array


def staging_dir(run_dir: Path, round_idx: int) -> Path:
    return run_dir / f".checkpoint-{round_idx:06d}.tmp"


def client_path(directory: Path, client_id: int) -> Path:
    return directory / f"client_{client_id:03d}.npy"


def begin(run_dir: Path, round_idx: int) -> Path:
    """Server: an empty staging directory for the checkpoint after round ``round_idx``."""
    d = staging_dir(run_dir, round_idx)
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def commit(run_dir: Path, round_idx: int, state: dict, global_vec: np.ndarray) -> None:
    """Server, after every rank wrote its files into the staging directory: complete, rename, point, prune."""
    staging = staging_dir(run_dir, round_idx)
    save_array(staging / "global.npy", global_vec)
    state = {**state, "global_sha256": digest(staging / "global.npy").tobytes().hex()}
    write_json(staging / "state.json", {"round": round_idx, **state})
    final = run_dir / f"checkpoint-{round_idx:06d}"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    write_json(run_dir / POINTER, {"round": round_idx, "dir": final.name})
    for old in [*run_dir.glob("checkpoint-*"), *run_dir.glob(".checkpoint-*.tmp")]:
        if old != final and old.is_dir():  # older checkpoints, and staging left by a failed attempt
            shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The directory of the newest complete checkpoint, or None."""
    pointer = run_dir / POINTER
    if not pointer.is_file():
        return None
    try:
        info = json.loads(pointer.read_bytes().decode("utf-8"))
        name = info["dir"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer}: not an hpcfl checkpoint pointer ({e})") from None
    if not isinstance(name, str) or not re.fullmatch(r"checkpoint-\d{6}", name):
        raise CheckpointError(f"{pointer}: not an hpcfl checkpoint pointer (dir {name!r} is not a checkpoint of "
                              "this run directory)")
    directory = run_dir / name
    if not (directory / "state.json").is_file():
        raise CheckpointError(f"{pointer} points to {directory}, which is missing or incomplete")
    if info.get("round") != int(name.split("-")[1]):
        raise CheckpointError(f"{pointer}: round {info.get('round')!r} but directory {name}: not one checkpoint")
    return directory


def load_state(directory: Path, rounds: int, eval_every: int) -> dict:
    """state.json, checked before anything is read from it or appended to: the round is one of the run's
    ``rounds``, the weights are finite numbers, the metrics are the lines of every round evaluated up to that
    round (``eval_every``, as the run that wrote it), in order."""
    path = directory / "state.json"
    try:
        state = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not an hpcfl checkpoint (not a JSON object)")
    for key in ("round", "config_digest", "algorithm", "prev_weights", "metrics"):
        if key not in state:
            raise CheckpointError(f"{path}: not an hpcfl checkpoint (lacks {key!r})")
    t = state["round"]
    if type(t) is not int or not 0 <= t < rounds:
        raise CheckpointError(f"{path}: round {t!r} is not a round of this run (0..{rounds - 1})")
    if directory.name != f"checkpoint-{t:06d}":
        raise CheckpointError(f"{path}: round {t} in directory {directory.name}: not one checkpoint")
    if not isinstance(state["algorithm"], dict):
        raise CheckpointError(f"{path}: algorithm state is {type(state['algorithm']).__name__}, not an object")
    weights = state["prev_weights"]
    if not (isinstance(weights, list) and weights and all(_finite_number(w) and w >= 0 for w in weights)):
        raise CheckpointError(f"{path}: prev_weights must be a list of finite numbers >= 0")
    for key in ("global_sha256", "client_sha256"):  # absent in checkpoints of older versions
        value = state.get(key)
        hexes = value if isinstance(value, list) else [value] if key in state else []
        if (key == "client_sha256" and key in state and not isinstance(value, list)) or not all(
                isinstance(h, str) and re.fullmatch(r"[0-9a-f]{64}", h) for h in hexes):
            raise CheckpointError(f"{path}: {key} must be sha256 hex digests")
    lines = state["metrics"]
    expected = [r for r in range(t + 1) if (r + 1) % eval_every == 0 or r == rounds - 1]
    if not (isinstance(lines, list) and all(isinstance(x, dict) for x in lines)) \
            or [x.get("round") for x in lines] != expected:
        found = [x.get("round") for x in lines if isinstance(x, dict)] if isinstance(lines, list) else lines
        raise CheckpointError(f"{path}: metrics must hold the lines of rounds {expected} (evaluated up to round "
                              f"{t}), found {str(found)[:200]}")
    return state


def check_sizes(directory: Path, state: dict, num_clients: int, size: int, client_files: bool,
                check_state) -> np.ndarray:
    """The parts whose sizes only the data and the model know, checked before anything is written: the weights
    (one per client), the algorithm's state (``check_state``), the global model (finite, float32 [size]) and,
    where the algorithm keeps them, every client's file (its header: float32 [size]). Returns the global model."""
    path = directory / "state.json"
    if len(state["prev_weights"]) != num_clients:
        raise CheckpointError(f"{path}: {len(state['prev_weights'])} prev_weights for {num_clients} clients")
    if "client_sha256" in state and len(state["client_sha256"]) != num_clients:
        raise CheckpointError(f"{path}: {len(state['client_sha256'])} client_sha256 for {num_clients} clients")
    try:
        check_state(state["algorithm"], num_clients)
    except ValueError as e:
        raise CheckpointError(f"{path}: algorithm state: {e}") from None
    check_digest(directory / "global.npy", state.get("global_sha256"))
    global_vec = load_array(directory / "global.npy", size)
    if client_files:
        for cid in range(num_clients):
            file = client_path(directory, cid)
            try:
                header = np.load(file, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{file}: unreadable checkpoint file ({e})") from None
            if header.dtype != np.float32 or header.shape != (size,):
                raise CheckpointError(f"{file}: {header.dtype} {tuple(header.shape)}, this model needs float32 "
                                      f"({size},)")
    return global_vec


def _finite_number(x) -> bool:
    return type(x) in (int, float) and math.isfinite(x)
