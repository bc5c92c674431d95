"""Non-IID Dirichlet client partition with a corrupted group, as in FedISM/FFL4MIA.

This reproduces the official FFL4MIA split files (``dict_users_noniid_dir1.0_CorruptedNum{c}.npy``)
bit for bit, index order included: with the ICH ``train.csv`` labels, N = 20, alpha = 1 and
seed 2024, ``dirichlet_partition`` returns exactly the lists stored in those files.

How (reference section 6.4, details settled by comparing against the official files):

* one legacy Mersenne-Twister stream, ``np.random.RandomState(seed)`` (identical draws to the
  global ``np.random.seed(seed)`` the official code uses, without touching global state);
* per class k = 0..C-1, with idx_k the rows of class k in row order:
  ``m = round((N - c) / N * len(idx_k))`` (float expression evaluated in that order, rounded
  half to even, as ``np.round``/``round`` do; ``floor``/``ceil`` do not reproduce the files);
  the first m rows form the clean share, the rest the corrupted share;
* draws, in this order: ``dirichlet([alpha] * (N - c))``, ``dirichlet([alpha] * c)``, then
  ``choice(N - c, size=m, p=clean_props)``, then ``choice(c, size=len(idx_k) - m, p=corr_props)``
  (one uniform per row, in row order; a per-row ``choice`` loop gives the same stream, while
  ``multinomial`` or drawing each Dirichlet just before its own categorical draws does not);
* index order inside a client: the official code accumulates each client's rows in Python
  ``set``s (``s = set(s | set(new_rows))`` once per class) and finally calls ``list(s)``, so the
  files hold CPython set-iteration order. We perform the same set operations (on Python ints, whose
  hashes equal those of np.int64) to get the same order; checked on CPython 3.8 to 3.13.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

__all__ = ["dirichlet_partition", "class_counts"]


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    """Return ``value`` as int, or raise a ValueError naming the argument."""
    # bool is an Integral subclass, but passing True as a client count is surely a mistake.
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _dirichlet(rng: np.random.RandomState, k: int, alpha: float) -> np.ndarray:
    """Legacy ``rng.dirichlet([alpha] * k)``, made total for tiny alpha.

    For k = 0 the legacy call consumes no draws and returns an empty vector. For very small
    alpha (about 1e-4 and below) every gamma variate can underflow to 0, and the legacy call
    returns NaNs (the official code would then crash in ``choice``). Only in that case we put all
    mass on one client drawn uniformly (the alpha -> 0 limit of a symmetric Dirichlet); this costs
    one extra draw, so results for every setting the official code can handle stay identical.
    """
    props = rng.dirichlet([alpha] * k) if k > 0 else np.empty(0)
    if k > 0 and not np.all(np.isfinite(props)):
        props = np.zeros(k)
        props[rng.randint(k)] = 1.0
    return props


def dirichlet_partition(
    labels: np.ndarray,
    num_clients: int,
    num_corrupted: int,
    alpha: float = 1.0,
    seed: int = 2024,
) -> list[np.ndarray]:
    """Split rows among clients with per-class Dirichlet proportions, corrupted clients last.

    labels: int array of class ids in row order. Returns one int64 index array per client
    (client 0..N-1), corrupted clients last.

    Clients ``0 .. N-c-1`` are clean and ``N-c .. N-1`` corrupted. Each class sends its first
    ``round((N-c)/N * n_k)`` rows to the clean group and the rest to the corrupted group, so the
    corrupted group holds a fraction c/N of every class. Classes are ``0 .. max(labels)``; a class
    with no rows still draws its two Dirichlet vectors (and no categorical draws), as in the
    official code, so absent classes shift the random stream exactly as there.

    With ``num_corrupted == 0`` there is no corrupted group: per class the draws are one
    ``dirichlet([alpha] * N)`` and then ``choice(N, size=n_k, p=...)``. (The official code calls
    ``dirichlet([])`` there, which consumes no draws, and then fails in ``choice``; this is the
    same stream with the failing empty draw left out.)

    The order of indices within each client is the official files' order (see module docstring);
    sort a client's array if you need ascending indices.
    """
    num_clients = _check_int("num_clients", num_clients, 1)
    num_corrupted = _check_int("num_corrupted", num_corrupted, 0, num_clients - 1)
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    alpha = float(alpha)
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    # RandomState accepts exactly the 32-bit unsigned seeds.
    seed = _check_int("seed", seed, 0, 2**32 - 1)

    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size == 0:
        labels = labels.astype(np.int64)  # np.asarray([]) is float64; an empty split is fine
    elif labels.dtype.kind not in "iu":
        raise ValueError(f"labels must hold integer class ids, got dtype {labels.dtype}")
    elif labels.min() < 0:
        raise ValueError(f"labels must be non-negative class ids, got {int(labels.min())}")

    n_clean_clients = num_clients - num_corrupted
    num_classes = int(labels.max()) + 1 if labels.size else 0
    rng = np.random.RandomState(seed)

    # Python sets, updated exactly like the official code, to reproduce its index order.
    client_sets: list[set[int] | None] = [None] * num_clients

    for k in range(num_classes):
        idx_k = np.flatnonzero(labels == k)
        # Same float expression as the official code; round() is half-to-even like np.round.
        m = round((num_clients - num_corrupted) / num_clients * len(idx_k))
        clean_rows, corrupted_rows = idx_k[:m], idx_k[m:]

        # Both Dirichlet vectors are drawn before any categorical draw.
        p_clean = _dirichlet(rng, n_clean_clients, alpha)
        p_corrupted = _dirichlet(rng, num_corrupted, alpha)

        assignment = rng.choice(n_clean_clients, size=len(clean_rows), p=p_clean)
        if num_corrupted > 0:
            corrupted_assignment = rng.choice(num_corrupted, size=len(corrupted_rows), p=p_corrupted)
            assignment = np.concatenate([assignment, n_clean_clients + corrupted_assignment])

        for client in range(num_clients):
            new_rows = set(idx_k[assignment == client].tolist())
            old = client_sets[client]
            # `set(old | new)` (not old.update(new)): the copies decide the hash-table size and
            # hence the iteration order that ended up in the official files.
            client_sets[client] = new_rows if old is None else set(old | new_rows)

    return [
        np.fromiter(s, dtype=np.int64, count=len(s)) if s else np.empty(0, dtype=np.int64)
        for s in client_sets
    ]


def class_counts(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-client class histogram: an int64 array [N, num_classes]."""
    num_classes = _check_int("num_classes", num_classes, 0)
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array, got shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}), got range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    counts = np.zeros((len(parts), num_classes), dtype=np.int64)
    for i, rows in enumerate(parts):
        rows = np.asarray(rows, dtype=np.int64)
        counts[i] = np.bincount(labels[rows], minlength=num_classes)
    return counts
