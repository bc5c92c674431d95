"""Checkpoints: everything a run needs to continue bit for bit, written atomically, read without pickles.

Layout inside the run directory::

    checkpoint.json                  {"round": t, "dir": "checkpoint-000123"}: the one pointer, replaced atomically
    checkpoint-000123/state.json     round, config digest, algorithm state, last weights, metrics lines so far
    checkpoint-000123/global.npy     w^{t+1}, the model the next round starts from (float32, no pickle)
    checkpoint-000123/client_007.npy a client's kept local model, for algorithms that keep one (FedCE, FedGA),
                                     written by the rank that hosts the client

A checkpoint directory is filled under a temporary name and renamed when complete; only then does the pointer move
to it, and only then are older checkpoints removed. A run killed at any moment therefore finds either the old or
the new checkpoint, whole. No random-number state needs saving: every stream is re-derived from
(seed, client, round, purpose).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np

from hpcfl.errors import UsageError
from hpcfl.atomic import atomic_path, write_json

POINTER = "checkpoint.json"


class CheckpointError(UsageError):
    """An unreadable, foreign or mismatching checkpoint."""


def save_array(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, array, allow_pickle=False)


def load_array(path: Path, size: int | None = None) -> np.ndarray:
    """A float32 vector saved by ``save_array`` (never unpickled); ``size``: the length it must have."""
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint file ({e})") from None
    if array.dtype != np.float32 or array.ndim != 1 or (size is not None and array.shape[0] != size):
        raise CheckpointError(f"{path}: {array.dtype} {tuple(array.shape)}, this model needs float32 ({size},)")
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
    write_json(staging / "state.json", {"round": round_idx, **state})
    final = run_dir / f"checkpoint-{round_idx:06d}"
    shutil.rmtree(final, ignore_errors=True)
    staging.rename(final)
    write_json(run_dir / POINTER, {"round": round_idx, "dir": final.name})
    for old in run_dir.glob("checkpoint-*"):
        if old != final and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The directory of the newest complete checkpoint, or None."""
    pointer = run_dir / POINTER
    if not pointer.is_file():
        return None
    try:
        info = json.loads(pointer.read_text())
        name = info["dir"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{pointer}: not an hpcfl checkpoint pointer ({e})") from None
    if not isinstance(name, str) or not re.fullmatch(r"checkpoint-\d{6}", name):
        raise CheckpointError(f"{pointer}: not an hpcfl checkpoint pointer (dir {name!r} is not a checkpoint of "
                              "this run directory)")
    directory = run_dir / name
    if not (directory / "state.json").is_file():
        raise CheckpointError(f"{pointer} points to {directory}, which is missing or incomplete")
    return directory


def load_state(directory: Path) -> dict:
    try:
        state = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{directory / 'state.json'}: unreadable ({e})") from None
    for key in ("round", "config_digest", "algorithm", "prev_weights", "metrics"):
        if key not in state:
            raise CheckpointError(f"{directory / 'state.json'}: not an hpcfl checkpoint (lacks {key!r})")
    return state
