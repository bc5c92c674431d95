"""The shard format (design.md, "Shards"): its one writer, its manifest type, and the one place that checks a
shard directory before a run trains on it.

A shard directory holds ``client_000.h5`` ... (one per client), ``test_<name>.h5`` (``clean`` and one per
corrupted copy, e.g. ``gaussian_3``) and ``manifest.json``. Each shard has ``images`` uint8 [n, H, W, C] chunked
by image, ``labels`` int64 [n], ``ids`` (source ids as strings) and JSON-valued attributes. The manifest records
what made the shards, per-client class counts and corruption, and the sha256 of every file.

Writers (the built-in benchmark, the real-data preprocessors) go through :class:`ShardWriter` and
:meth:`Manifest.write`; readers through :meth:`Manifest.load` (schema, types, file names confined to the
directory) and :func:`read_checked` (checksum, lengths, label type and range, image shape). Every problem is a
:class:`ShardError` that names the file and what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from hpcfl.atomic import atomic_path, write_json
from hpcfl.errors import UsageError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
_FILE_NAME = re.compile(r"[A-Za-z0-9_.+-]+\.h5")  # a plain file name inside the directory: no '/', no '..'


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


# ----------------------------------------------------------------------------------------------- writing

class ShardWriter:
    """Writes one shard, a batch of images at a time, into a temporary file renamed into place when the block
    ends without an error (a killed writer never leaves a shard that looks complete)::

        with ShardWriter(path, capacity=n, image_shape=(H, W, C), attrs={...}) as w:
            w.append(images, labels, ids)      # any number of times, up to ``capacity`` images in all
        w.sha256, w.labels                     # after the block

    ``capacity`` is an upper bound: the images dataset is cut to what was appended."""

    def __init__(self, path: str | Path, capacity: int, image_shape, attrs: dict, compression: str | None = None):
        self.path, self.capacity, self.attrs = Path(path), int(capacity), attrs
        self.image_shape, self.compression = tuple(int(x) for x in image_shape), compression
        self.labels: list[int] = []
        self.ids: list[str] = []
        self.sha256: str | None = None

    def __enter__(self) -> ShardWriter:
        stack = contextlib.ExitStack()
        try:
            tmp = stack.enter_context(atomic_path(self.path))
            self._file = stack.enter_context(h5py.File(tmp, "w"))  # closed before the rename (LIFO)
            self._images = self._file.create_dataset(
                "images", shape=(self.capacity, *self.image_shape), maxshape=(None, *self.image_shape),
                dtype=np.uint8, chunks=(1, *self.image_shape), compression=self.compression)
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def append(self, images: np.ndarray, labels, ids) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.image_shape:
            raise ValueError(f"images must be uint8 [n, {', '.join(map(str, self.image_shape))}], got "
                             f"{images.dtype} {images.shape}")
        if len(labels) != len(images) or len(ids) != len(images):
            raise ValueError("images, labels and ids must have the same length")
        start = len(self.labels)
        if start + len(images) > self.capacity:
            raise ValueError(f"{self.path.name}: more than the {self.capacity} images announced")
        if len(images):
            self._images[start:start + len(images)] = images
        self.labels += [int(x) for x in labels]
        self.ids += [str(i) for i in ids]

    def __exit__(self, *exc) -> bool | None:
        if exc[0] is not None:  # the temporary file goes, the error propagates
            return self._stack.__exit__(*exc)
        with self._stack:
            self._images.resize(len(self.labels), axis=0)
            self._file.create_dataset("labels", data=np.asarray(self.labels, dtype=np.int64))
            self._file.create_dataset("ids", data=np.asarray(self.ids, dtype=object), dtype=h5py.string_dtype())
            for k, v in self.attrs.items():
                self._file.attrs[k] = json.dumps(v)
        self.sha256 = sha256_of(self.path)
        return None


def write_shard(path: str | Path, images: np.ndarray, labels: np.ndarray, ids, attrs: dict,
                compression: str | None = None) -> str:
    """Write one shard from whole arrays, atomically; returns its sha256."""
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be uint8 [n, H, W, C], got {images.dtype} {images.shape}")
    if len(labels) != len(images) or len(ids) != len(images):
        raise ValueError("images, labels and ids must have the same length")
    with ShardWriter(path, len(images), images.shape[1:], attrs, compression) as writer:
        writer.append(images, labels, ids)
    return writer.sha256


def read_shard(path: str | Path) -> Shard:
    """Read a shard and check its own consistency: uint8 images [n, H, W, C], n integer labels, n ids."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            images, labels, ids = f["images"][...], f["labels"][...], f["ids"][...]
            attrs = {k: json.loads(v) for k, v in f.attrs.items()}
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ShardError(f"{path}: not a readable hpcfl shard ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ShardError(f"{path}: images are {images.dtype} {tuple(images.shape)}, expected uint8 [n, H, W, C]")
    _check_labels(path, labels, len(images), len(ids))
    ids = [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in ids]
    return Shard(images, labels.astype(np.int64), ids, attrs)


# ----------------------------------------------------------------------------------------------- manifest

@dataclass
class ShardEntry:
    """One shard of the manifest: a client's (with its class counts) or a test set's (with its name)."""

    file: str
    n: int
    corruption: dict | None = None  # {"kind": ..., "severity": ...}
    sha256: str | None = None
    class_counts: list[int] | None = None  # clients
    name: str | None = None  # test sets; for clients an optional display name (e.g. an ISIC centre)

    def to_json(self) -> dict:
        out: dict[str, Any] = {"file": self.file, "n": self.n, "corruption": self.corruption}
        if self.class_counts is not None:
            out["class_counts"] = self.class_counts
        if self.sha256 is not None:
            out["sha256"] = self.sha256
        return {"name": self.name, **out} if self.name is not None else out


@dataclass
class Manifest:
    """manifest.json: what a shard directory holds."""

    num_classes: int
    class_names: list[str]
    image_shape: tuple[int, int, int]  # H, W, C
    clients: list[ShardEntry]
    test_sets: list[ShardEntry]
    dataset: str = ""
    made_by: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # further keys a preprocessor records (skipped, preprocessing, ...)

    @property
    def corrupted_clients(self) -> list[int]:
        return [c for c, entry in enumerate(self.clients) if entry.corruption]

    def to_json(self) -> dict:
        return {"schema": SCHEMA_VERSION, "dataset": self.dataset, "num_classes": self.num_classes,
                "class_names": list(self.class_names), "image_shape": list(self.image_shape),
                "clients": [c.to_json() for c in self.clients], "test_sets": [t.to_json() for t in self.test_sets],
                **self.extra, "made_by": self.made_by}

    def write(self, directory: str | Path) -> None:
        write_json(Path(directory) / MANIFEST, self.to_json())

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """Read and check ``directory/manifest.json`` (not yet the shards: :func:`read_checked`)."""
        directory = Path(directory)
        path = directory / MANIFEST
        if not directory.is_dir():
            raise ShardError(f"shard directory not found: {directory}")
        if not path.is_file():
            raise ShardError(f"{path}: missing (is {directory} a shard directory made by preprocess/?)")
        try:
            raw = json.loads(path.read_bytes().decode("utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(raw, path)

    @classmethod
    def from_json(cls, raw: Any, path: Path) -> Manifest:
        if not isinstance(raw, dict):
            raise ShardError(f"{path}: not an hpcfl manifest (a JSON object is expected)")
        if raw.get("schema") != SCHEMA_VERSION:
            raise ShardError(f"{path}: schema {raw.get('schema')!r}, this hpcfl reads schema {SCHEMA_VERSION}")
        for key in ("num_classes", "class_names", "image_shape", "clients", "test_sets"):
            if key not in raw:
                raise ShardError(f"{path}: lacks {key!r}")
        num_classes, names, shape = raw["num_classes"], raw["class_names"], raw["image_shape"]
        if type(num_classes) is not int or num_classes < 2:
            raise ShardError(f"{path}: num_classes {num_classes!r} must be an integer >= 2")
        if not isinstance(names, list) or len(names) != num_classes or not all(isinstance(x, str) for x in names):
            raise ShardError(f"{path}: class_names must be {num_classes} strings, got {names!r}")
        if not (isinstance(shape, list) and len(shape) == 3 and all(type(x) is int and x > 0 for x in shape)):
            raise ShardError(f"{path}: image_shape {shape!r} must be [height, width, channels] of positive integers")
        for key in ("clients", "test_sets"):
            if not isinstance(raw[key], list) or not all(isinstance(e, dict) for e in raw[key]):
                raise ShardError(f"{path}: {key} must be a list of objects")
        if not raw["clients"]:
            raise ShardError(f"{path}: lists no clients")
        clients = [_entry(e, path, f"clients[{i}]", num_classes) for i, e in enumerate(raw["clients"])]
        tests = [_entry(e, path, f"test_sets[{i}]", num_classes, test_set=True) for i, e in enumerate(raw["test_sets"])]
        if not tests:
            raise ShardError(f"{path}: lists no test sets (hpcfl evaluates every run on them)")
        names_seen = [t.name for t in tests]
        if len(set(names_seen)) != len(names_seen):
            raise ShardError(f"{path}: test set names repeat ({', '.join(names_seen)})")
        files = [e.file for e in [*clients, *tests]]
        repeated = sorted({f for f in files if files.count(f) > 1})
        if repeated:
            raise ShardError(f"{path}: {', '.join(repeated)} listed more than once (each shard holds one client or "
                             "one test set)")
        known = {"schema", "dataset", "num_classes", "class_names", "image_shape", "clients", "test_sets", "made_by"}
        return cls(num_classes, names, tuple(shape), clients, tests, str(raw.get("dataset", "")),
                   raw.get("made_by") if isinstance(raw.get("made_by"), dict) else {},
                   {k: v for k, v in raw.items() if k not in known})


def _entry(raw: dict, path: Path, where: str, num_classes: int, test_set: bool = False) -> ShardEntry:
    """One checked manifest entry; ``where`` names it in messages (``clients[3]``)."""
    file, n = raw.get("file"), raw.get("n")
    if not isinstance(file, str) or not _FILE_NAME.fullmatch(file) or file.startswith("."):
        raise ShardError(f"{path}: {where}.file {file!r} must be a plain .h5 file name inside the shard directory")
    if type(n) is not int or n < 0:
        raise ShardError(f"{path}: {where}.n {n!r} must be a non-negative integer")
    corruption = raw.get("corruption")
    if corruption is not None and not (isinstance(corruption, dict) and isinstance(corruption.get("kind"), str)):
        raise ShardError(f"{path}: {where}.corruption {corruption!r} must be null or {{\"kind\": ..., "
                         "\"severity\": ...}")
    sha = raw.get("sha256")
    if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
        raise ShardError(f"{path}: {where}.sha256 {sha!r} is not a sha256 hex digest")
    counts = raw.get("class_counts")
    if counts is not None and not (isinstance(counts, list) and len(counts) == num_classes
                                   and all(type(c) is int and c >= 0 for c in counts)):
        raise ShardError(f"{path}: {where}.class_counts {counts!r} must be {num_classes} non-negative integers")
    name = raw.get("name")
    if test_set and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.+-]+", name)):
        raise ShardError(f"{path}: {where}.name {name!r} must be a plain name (letters, digits, _ . + -)")
    if name is not None and not isinstance(name, str):
        raise ShardError(f"{path}: {where}.name {name!r} must be a string")
    return ShardEntry(file, n, corruption, sha, counts, name)


def check_directory(directory: str | Path, manifest: Manifest) -> None:
    """Check every shard the manifest lists without reading its images: the file is an hpcfl shard with as many
    uint8 images of the manifest's shape, integer labels in range and ids as the manifest says. Run once, by the
    server, before any rank trains (the checksums are checked by the rank that reads each shard)."""
    for entry in [*manifest.clients, *manifest.test_sets]:
        path = shard_path(directory, entry)
        try:
            with h5py.File(path, "r") as f:
                images, labels, ids = f["images"], f["labels"][...], f["ids"]
                shape, dtype, n_ids = tuple(images.shape), images.dtype, len(ids)
        except (OSError, KeyError, ValueError, TypeError, AttributeError) as e:  # AttributeError: a group, not a dataset
            raise ShardError(f"{path}: not a readable hpcfl shard ({e})") from None
        if dtype != np.uint8 or len(shape) != 4:
            raise ShardError(f"{path}: images are {dtype} {shape}, expected uint8 [n, H, W, C]")
        _check_labels(path, labels, shape[0], n_ids)
        if shape[0] != entry.n:
            raise ShardError(f"{path}: {shape[0]} images, the manifest says {entry.n}")
        if shape[0] and shape[1:] != tuple(manifest.image_shape):
            raise ShardError(f"{path}: images of shape {list(shape[1:])}, the manifest's image_shape is "
                             f"{list(manifest.image_shape)}")
        if len(labels) and (labels.min() < 0 or labels.max() >= manifest.num_classes):
            raise ShardError(f"{path}: labels outside 0..{manifest.num_classes - 1}")
        counts = np.bincount(labels, minlength=manifest.num_classes).tolist()
        if entry.class_counts is not None and entry.class_counts != counts:
            raise ShardError(f"{path}: class counts {counts}, the manifest says {entry.class_counts}")


def read_rows(directory: str | Path, entry: ShardEntry, start: int, stop: int) -> np.ndarray:
    """Images ``start:stop`` (uint8 [k, H, W, C]) of the shard an entry names, reading no other rows: a client
    rank's share of a test set. The server checks the whole shard (``check_directory``, ``read_checked``)."""
    path = shard_path(directory, entry)
    try:
        with h5py.File(path, "r") as f:
            images = f["images"][start:stop]
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise ShardError(f"{path}: not a readable hpcfl shard ({e})") from None
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) != stop - start:
        raise ShardError(f"{path}: rows {start}:{stop} are {images.dtype} {tuple(images.shape)}, expected "
                         f"{stop - start} uint8 images [n, H, W, C]")
    return images


def shard_path(directory: str | Path, entry: ShardEntry) -> Path:
    """The file an entry names, which must exist inside the directory (a symbolic link may not lead out of it)."""
    directory = Path(directory)
    path = directory / entry.file
    if not path.is_file():
        raise ShardError(f"{path}: listed in the manifest but missing")
    if not path.resolve().is_relative_to(directory.resolve()):
        raise ShardError(f"{path}: leads outside the shard directory (to {path.resolve()})")
    return path


def _check_labels(path: Path, labels: np.ndarray, n_images: int, n_ids: int) -> None:
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ShardError(f"{path}: labels are {labels.dtype} {tuple(labels.shape)}, expected integers [n]")
    if not (len(labels) == n_images == n_ids):
        raise ShardError(f"{path}: {n_images} images, {len(labels)} labels and {n_ids} ids: each image needs "
                         "one label and one id")


def read_checked(directory: str | Path, entry: ShardEntry, manifest: Manifest) -> Shard:
    """Read the shard a manifest entry names and check it against the entry and the manifest: checksum, number
    of images, labels in 0..num_classes-1, image shape."""
    path = shard_path(directory, entry)
    if entry.sha256 is not None and sha256_of(path) != entry.sha256:
        raise ShardError(f"{path}: sha256 differs from the manifest (file changed or truncated)")
    shard = read_shard(path)
    if len(shard.labels) != entry.n:
        raise ShardError(f"{path}: {len(shard.labels)} images, the manifest says {entry.n}")
    if len(shard.labels) and tuple(shard.images.shape[1:]) != tuple(manifest.image_shape):
        raise ShardError(f"{path}: images of shape {list(shard.images.shape[1:])}, the manifest's image_shape is "
                         f"{list(manifest.image_shape)}")
    if len(shard.labels) and (shard.labels.min() < 0 or shard.labels.max() >= manifest.num_classes):
        raise ShardError(f"{path}: labels outside 0..{manifest.num_classes - 1}")
    return shard
