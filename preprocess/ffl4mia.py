"""Safe import of the official FFL4MIA (FedISM) split: ``train.csv``, ``test.csv`` and the
``dict_users_noniid_dir1.0_CorruptedNum{c}.npy`` client partitions.

The partition files are ``.npy`` files holding a pickled ``dict`` {client id: list of numpy int64
row indices into train.csv}. ``np.load(..., allow_pickle=True)`` would execute whatever a tampered
file holds, so we parse the ``.npy`` header ourselves and unpickle the payload with an unpickler
that resolves only the four NumPy globals such a file needs and refuses every other global.

Usage: ``python -m preprocess.ffl4mia FOLDER --corrupted 4`` prints per-client sizes and class
counts (``--verify`` also re-runs :func:`hpcfl.data.partition.dirichlet_partition` and reports
whether it reproduces the file exactly).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import numbers
import pickle
import re
import reprlib
import sys
from pathlib import Path

import numpy as np

from hpcfl.data.partition import class_counts, dirichlet_partition

__all__ = [
    "PartitionFileError",
    "UnsafePickleError",
    "load_partition_file",
    "load_split_csv",
    "load_official_split",
    "partition_file_name",
    "main",
]

# NumPy 2 moved numpy.core to numpy._core (numpy.core.* still imports, with a warning).
try:
    from numpy._core import multiarray as _multiarray
except ImportError:  # NumPy 1.x
    from numpy.core import multiarray as _multiarray


class PartitionFileError(ValueError):
    """A partition file is malformed, truncated or holds unexpected content."""


class UnsafePickleError(PartitionFileError):
    """A partition file's pickle references a global outside the allowed set."""


MAX_ELEMENTS = 10 ** 7  # row indices in all: far above any partition (the largest official one has ~20,000)


class _PendingArray:
    """What a pickled ``ndarray`` becomes while a partition file is read: its state is checked before anything is
    allocated, then turned into the array (``_resolve``). NumPy's own ``__setstate__`` trusts the state's shape:
    a tiny file could make it allocate gigabytes, or crash on an object array whose item list is short."""

    def __init__(self):
        self.array: np.ndarray | None = None

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("unexpected array state")
        _, shape, dtype, fortran, raw = state
        if not (isinstance(shape, tuple) and all(_is_int(d) and d >= 0 for d in shape) and len(shape) <= 2):
            raise pickle.UnpicklingError(f"unexpected array shape {_short(shape)}")
        n = math.prod(int(d) for d in shape)
        if n > MAX_ELEMENTS:
            raise pickle.UnpicklingError(f"an array of {n} elements is not a partition")
        dtype = np.dtype(dtype)
        if dtype == np.dtype(object):  # np.save's 0-d wrapper around the dict
            if shape != () or not (isinstance(raw, list) and len(raw) == 1):
                raise pickle.UnpicklingError("only a 0-d object array holding one item is expected")
            self.array = np.empty((), dtype=object)
            self.array[()] = raw[0]
        elif dtype.kind in "biuf" and isinstance(raw, bytes) and len(raw) == n * dtype.itemsize:
            self.array = np.frombuffer(raw, dtype).reshape(shape, order="F" if fortran else "C").copy()
        else:
            raise pickle.UnpicklingError(f"unexpected array data ({dtype}, {type(raw).__name__} of "
                                         f"{len(raw) if hasattr(raw, '__len__') else '?'} for {n} elements)")


def _reconstruct(subtype, shape, dtype):
    """``numpy.core.multiarray._reconstruct``, restricted to what ``ndarray.__reduce__`` emits; the array's
    content comes in its ``__setstate__`` (``_PendingArray``)."""
    if subtype is not np.ndarray or shape != (0,):
        raise pickle.UnpicklingError(f"unexpected array reconstruction ({_short(subtype)}, {_short(shape)})")
    return _PendingArray()


def _scalar(dtype, data=None):
    """``numpy.core.multiarray.scalar`` for plain numbers, from exactly one item's bytes (whether they are row
    indices is checked later, with a message that says so)."""
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf" or not isinstance(data, bytes) or len(data) != dtype.itemsize:
        raise pickle.UnpicklingError(f"unexpected NumPy scalar ({dtype})")
    return _multiarray.scalar(dtype, data)


def _dtype(name, align=False, copy=True):
    """``numpy.dtype`` for plain numbers and the object wrapper (nothing with fields or sub-arrays)."""
    if not (isinstance(name, str) and re.fullmatch(r"[biuf][1248]|O[48]?|b1", name)):
        raise pickle.UnpicklingError(f"unexpected dtype {_short(name)}")
    return np.dtype(name, align, copy)


def _resolve(obj, depth: int = 0):
    """A partition's structure (np.save's wrapper, a dict, its per-client arrays) with each ``_PendingArray``
    replaced by its array. Nothing is copied and lists are not entered: pickle's memo lets a tiny file name the
    same list a million times, and copying it would be the allocation the file asks for."""
    if isinstance(obj, _PendingArray):
        if obj.array is None:
            raise pickle.UnpicklingError("an array without its data")
        if obj.array.dtype == object:
            return _resolve(obj.array.item(), depth + 1) if depth == 0 else obj.array
        return obj.array
    if isinstance(obj, dict) and depth <= 1:
        return {k: _resolve(v, 2) for k, v in obj.items()}
    return obj


# The globals the official files reference (found with pickletools.dis): protocol 3, GLOBAL
# 'numpy.core.multiarray _reconstruct', 'numpy ndarray', 'numpy dtype' and
# 'numpy.core.multiarray scalar'. Files re-saved by NumPy 2 name numpy._core instead.
# dict, list and int need no global (they are pickle opcodes); admitting them is harmless
# and covers files written with other pickle settings.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.multiarray", "scalar"): _scalar,
    ("numpy._core.multiarray", "scalar"): _scalar,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "int"): int,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only ``_ALLOWED_GLOBALS`` and refuses everything else."""

    def __init__(self, file, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        # Called for GLOBAL/STACK_GLOBAL/EXT opcodes: the only way a pickle reaches any callable.
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(
                f"{self._source}: refusing to unpickle global {module}.{name} (a partition file "
                "needs only dict, list, int and NumPy scalar/array constructors; the file may have "
                "been tampered with)"
            ) from None

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self._source}: refusing persistent id {_short(pid)} in pickle")


def _short(x: object) -> str:
    """A repr bounded in length and depth (a crafted file's nesting could be millions deep or long)."""
    return reprlib.repr(x)


def _is_int(x: object) -> bool:
    return isinstance(x, (numbers.Integral, np.integer)) and not isinstance(x, (bool, np.bool_))


def _as_index_array(value: object, key: int, source: str) -> np.ndarray:
    """Convert one client's list of row indices to int64, checking non-negative ints."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or (value.size and value.dtype.kind not in "iu"):
            raise PartitionFileError(
                f"{source}: client {key}: expected a 1-D integer array, got "
                f"dtype {value.dtype} shape {value.shape}"
            )
        items = value
    elif isinstance(value, (list, tuple, set)):
        bad = next((x for x in value if not _is_int(x)), None)
        if bad is not None:
            raise PartitionFileError(
                f"{source}: client {key}: row indices must be ints, got {type(bad).__name__} {_short(bad)}"
            )
        items = list(value)
    else:
        raise PartitionFileError(
            f"{source}: client {key}: expected a list of row indices, got {type(value).__name__}"
        )
    try:
        arr = np.array(items, dtype=np.int64).reshape(-1)
    except OverflowError:
        raise PartitionFileError(f"{source}: client {key}: row index out of int64 range") from None
    if arr.size and arr.min() < 0:
        raise PartitionFileError(f"{source}: client {key}: negative row index {int(arr.min())}")
    return arr


def load_partition_file(path: str | Path) -> dict[int, np.ndarray]:
    """Read an official ``dict_users_*.npy`` without ``allow_pickle``.

    Returns {client id: int64 array of row indices}, keys ascending, each client's indices in the
    file's order. Raises :class:`UnsafePickleError` if the pickle references any global outside
    the NumPy scalar/array constructors, :class:`PartitionFileError` for anything else wrong.
    """
    path = Path(path)
    source = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PartitionFileError(f"{source}: cannot read partition file: {e}") from e

    f = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise PartitionFileError(f"{source}: unsupported .npy format version {version}")
    except PartitionFileError:
        raise
    except (ValueError, EOFError) as e:
        # read_magic / read_array_header_* raise ValueError on a short or garbled header.
        raise PartitionFileError(f"{source}: not a valid .npy file (truncated header?): {e}") from e

    # np.save stores a dict as a 0-d object array whose single element is the dict.
    if dtype != np.dtype(object) or shape != ():
        raise PartitionFileError(
            f"{source}: expected a pickled dict (0-d object array), got dtype {dtype} shape {shape}"
        )

    try:
        obj = _resolve(_RestrictedUnpickler(f, source).load())
    except PartitionFileError:
        raise
    except EOFError as e:
        raise PartitionFileError(f"{source}: pickle payload is truncated") from e
    except Exception as e:  # UnpicklingError, TypeError from a constructor, MemoryError, ...
        raise PartitionFileError(
            f"{source}: corrupt pickle payload (truncated?): {type(e).__name__}: {e}"
        ) from e
    if f.read(1):
        raise PartitionFileError(f"{source}: unexpected bytes after the pickle payload")

    if not isinstance(obj, dict):
        raise PartitionFileError(f"{source}: expected a dict of clients, got {type(obj).__name__}")

    total = sum(len(v) if isinstance(v, (list, tuple, set, np.ndarray)) else 1 for v in obj.values())
    if total > MAX_ELEMENTS:
        raise PartitionFileError(f"{source}: holds {total} row indices; no partition is that large")
    parts: dict[int, np.ndarray] = {}
    for key, value in obj.items():
        if not _is_int(key) or int(key) < 0:
            raise PartitionFileError(f"{source}: client ids must be non-negative ints, got {_short(key)}")
        parts[int(key)] = _as_index_array(value, int(key), source)
    return dict(sorted(parts.items()))


def load_split_csv(path: str | Path) -> tuple[list[str], np.ndarray]:
    """Read an ``id,class`` CSV. Returns (ids in row order, int64 labels).

    Row order matters: the partition files index these rows. Blank lines are skipped (as pandas,
    which the official code uses, does); anything else malformed raises a ValueError naming the
    file and line.
    """
    path = Path(path)
    ids: list[str] = []
    labels: list[int] = []
    # utf-8-sig: tolerate a byte-order mark written by spreadsheet tools.
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    with io.StringIO(text, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["id", "class"]:
            raise ValueError(f"{path}: line 1: expected header 'id,class', got {header!r}")
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) != 2:
                raise ValueError(f"{path}: line {line}: expected 2 fields (id,class), got {row!r}")
            row_id, cls = row[0].strip(), row[1].strip()
            if not row_id:
                raise ValueError(f"{path}: line {line}: empty id")
            try:
                label = int(cls)
            except ValueError:
                raise ValueError(f"{path}: line {line}: class {cls!r} is not an integer") from None
            if label < 0:
                raise ValueError(f"{path}: line {line}: negative class {label}")
            ids.append(row_id)
            labels.append(label)
    return ids, np.asarray(labels, dtype=np.int64)


def partition_file_name(num_corrupted: int, alpha: float = 1.0) -> str:
    """Official partition file name, e.g. ``dict_users_noniid_dir1.0_CorruptedNum4.npy``."""
    return f"dict_users_noniid_dir{float(alpha)}_CorruptedNum{int(num_corrupted)}.npy"


def load_official_split(folder: str | Path, num_corrupted: int, alpha: float = 1.0):
    """Load ``train.csv``, ``test.csv`` and the partition for ``num_corrupted`` from ``folder``.

    Returns ``(train_ids, train_labels, test_ids, test_labels, parts)`` where ``parts[i]`` is the
    int64 row-index array of client i (clients 0..N-1, the last ``num_corrupted`` corrupted).
    Checks that client ids are exactly 0..N-1, that every train row is in exactly one client, and
    that ids are unique and train/test do not overlap.
    """
    folder = Path(folder)
    train_ids, train_labels = load_split_csv(folder / "train.csv")
    test_ids, test_labels = load_split_csv(folder / "test.csv")
    part_path = folder / partition_file_name(num_corrupted, alpha)
    clients = load_partition_file(part_path)

    n_clients = len(clients)
    if list(clients) != list(range(n_clients)):
        raise PartitionFileError(f"{part_path}: client ids must be 0..N-1, got {sorted(clients)}")
    if not 0 <= num_corrupted < n_clients:
        raise ValueError(f"num_corrupted must be in [0, {n_clients - 1}], got {num_corrupted}")
    parts = [clients[i] for i in range(n_clients)]

    n_train = len(train_ids)
    all_rows = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
    if all_rows.size and all_rows.max() >= n_train:
        raise PartitionFileError(
            f"{part_path}: row index {int(all_rows.max())} out of range for {n_train} train rows"
        )
    hits = np.bincount(all_rows, minlength=n_train)
    if (hits != 1).any():
        missing = np.flatnonzero(hits == 0)
        repeated = np.flatnonzero(hits > 1)
        raise PartitionFileError(
            f"{part_path}: every train row must be in exactly one client; "
            f"{missing.size} rows in none (first: {missing[:5].tolist()}), "
            f"{repeated.size} rows more than once (first: {repeated[:5].tolist()})"
        )

    for name, ids in (("train.csv", train_ids), ("test.csv", test_ids)):
        if len(set(ids)) != len(ids):
            raise ValueError(f"{folder / name}: duplicate ids")
    overlap = set(train_ids) & set(test_ids)
    if overlap:
        raise ValueError(f"{folder}: {len(overlap)} ids in both train.csv and test.csv")
    return train_ids, train_labels, test_ids, test_labels, parts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m preprocess.ffl4mia",
        description="Load the official FFL4MIA split safely and print per-client class counts.",
    )
    parser.add_argument("folder", type=Path, help="folder with train.csv, test.csv, dict_users_*.npy")
    parser.add_argument("--corrupted", type=int, default=4, help="corrupted client count c (default 4)")
    parser.add_argument("--alpha", type=float, default=1.0, help="Dirichlet alpha in the file name")
    parser.add_argument(
        "--verify",
        action="store_true",
        help="re-run the partition procedure (seed 2024) and check it reproduces the file exactly",
    )
    args = parser.parse_args(argv)

    try:
        train_ids, train_labels, test_ids, test_labels, parts = load_official_split(
            args.folder, args.corrupted, args.alpha
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    n_clients = len(parts)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    counts = class_counts(train_labels, parts, num_classes)
    first_corrupted = n_clients - args.corrupted

    print(f"{args.folder}: {len(train_ids)} train rows, {len(test_ids)} test rows, "
          f"{n_clients} clients, last {args.corrupted} corrupted (*)")
    width = max(6, len(str(counts.max())) + 1)
    print("client" + f"{'n':>{width}}" + "".join(f"{f'c{k}':>{width}}" for k in range(num_classes)))
    for i in range(n_clients):
        mark = "*" if i >= first_corrupted else " "
        row = "".join(f"{v:>{width}}" for v in counts[i])
        print(f"{i:>5}{mark}{len(parts[i]):>{width}}{row}")
    clean_n = int(sum(len(p) for p in parts[:first_corrupted]))
    corrupted_n = len(train_ids) - clean_n
    print(f"total {len(train_ids):>{width}}" + "".join(f"{v:>{width}}" for v in counts.sum(0)))
    print(f"clean {clean_n}, corrupted {corrupted_n} ({100 * corrupted_n / len(train_ids):.1f}%)")

    if args.verify:
        ours = dirichlet_partition(train_labels, n_clients, args.corrupted, args.alpha, seed=2024)
        same = all(np.array_equal(a, b) for a, b in zip(ours, parts))
        verdict = "reproduced exactly" if same else "NOT reproduced"
        print(f"{verdict} by dirichlet_partition(seed=2024)")
        return 0 if same else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
