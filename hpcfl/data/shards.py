"""HDF5 shards and their manifest (design.md, "Shards").

A shard directory holds ``client_000.h5`` ... (one per client), ``test_<name>.h5`` (``clean`` and one per
corrupted copy, e.g. ``gaussian_3``) and ``manifest.json``. Each shard has ``images`` uint8 [n, H, W, C] chunked
by image, ``labels`` int64 [n], ``ids`` (source ids as strings) and attributes. The manifest records what made
the shards, per-client class counts and corruption, and the sha256 of every file; the reader checks it and
refuses a mismatch by name.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from hpcfl.errors import UsageError
from hpcfl.atomic import atomic_path, write_json

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ShardError(UsageError, ValueError):
    """A shard directory or file that cannot be used; the message names the file."""


@dataclass
class Shard:
    images: np.ndarray  # uint8 [n, H, W, C]
    labels: np.ndarray  # int64 [n]
    ids: list[str]
    attrs: dict


def client_file(client_id: int) -> str:
    return f"client_{client_id:03d}.h5"


def test_file(name: str) -> str:
    return f"test_{name}.h5"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(path: str | Path, images: np.ndarray, labels: np.ndarray, ids, attrs: dict,
                compression: str | None = None) -> str:
    """Write one shard atomically; returns its sha256."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [n, H, W, C], got {images.dtype} {images.shape}")
    if len(labels) != len(images) or len(ids) != len(images):
        raise ValueError("images, labels and ids must have the same length")
    path = Path(path)
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            chunks = (1, *images.shape[1:]) if len(images) else None
            f.create_dataset("images", data=images, chunks=chunks, compression=compression)
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            f.create_dataset("ids", data=np.asarray([str(i) for i in ids], dtype=object),
                             dtype=h5py.string_dtype())
            for k, v in attrs.items():
                f.attrs[k] = json.dumps(v)
    return sha256_of(path)


def read_shard(path: str | Path) -> Shard:
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            images = f["images"][...]
            labels = f["labels"][...]
            ids = [s.decode() if isinstance(s, bytes) else str(s) for s in f["ids"][...]]
            attrs = {k: json.loads(v) for k, v in f.attrs.items()}
    except (OSError, KeyError) as e:
        raise ShardError(f"{path}: not a readable hpcfl shard ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ShardError(f"{path}: images are {images.dtype} {tuple(images.shape)}, expected uint8 [n, H, W, C]")
    return Shard(images, labels.astype(np.int64), ids, attrs)


def write_manifest(directory: str | Path, manifest: dict) -> None:
    write_json(Path(directory) / MANIFEST, {"schema": SCHEMA_VERSION, **manifest})


def load_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise ShardError(f"shard directory not found: {directory}")
    if not path.is_file():
        raise ShardError(f"{path}: missing (is {directory} a shard directory made by preprocess/?)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"{path}: not valid JSON ({e})") from None
    if m.get("schema") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema {m.get('schema')!r}, this hpcfl reads schema {SCHEMA_VERSION}")
    for key in ("num_classes", "class_names", "image_shape", "clients", "test_sets"):
        if key not in m:
            raise ShardError(f"{path}: lacks {key!r}")
    return m


def read_checked(directory: str | Path, entry: dict, num_classes: int, image_shape=None) -> Shard:
    """Read the shard a manifest entry names and check it against the entry (sha256, size, labels)."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise ShardError(f"{path}: listed in the manifest but missing")
    if "sha256" in entry and sha256_of(path) != entry["sha256"]:
        raise ShardError(f"{path}: sha256 differs from the manifest (file changed or truncated)")
    shard = read_shard(path)
    if len(shard.labels) != entry["n"]:
        raise ShardError(f"{path}: {len(shard.labels)} images, the manifest says {entry['n']}")
    if image_shape is not None and len(shard.labels) and list(shard.images.shape[1:]) != list(image_shape):
        raise ShardError(f"{path}: images of shape {list(shard.images.shape[1:])}, the manifest's image_shape is "
                         f"{list(image_shape)}")
    if len(shard.labels) and (shard.labels.min() < 0 or shard.labels.max() >= num_classes):
        raise ShardError(f"{path}: labels outside 0..{num_classes - 1}")
    return shard
