"""hpcfl.data.partition: bit-exact reproduction of the official FFL4MIA partition files."""

from pathlib import Path

import numpy as np
import pytest

from preprocess.ffl4mia import load_partition_file, load_split_csv
from hpcfl.data.partition import class_counts, dirichlet_partition

# The official files live beside the checkout (../shared), read-only; they are not in the repo.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "ffl4mia"
ICH = DATA / "ICH_20"
needs_data = pytest.mark.skipif(
    not ICH.is_dir(), reason=f"official FFL4MIA files not found at {ICH} (../shared beside the checkout)"
)

# Reference section 6.4 / data README.
SIZES = {
    4: [1469, 854, 1063, 300, 1019, 464, 1145, 1056, 543, 438,
        1101, 831, 1428, 1727, 744, 1817, 1337, 735, 760, 1167],
    2: [1464, 889, 986, 319, 1085, 440, 1145, 1050, 536, 456,
        1171, 823, 1390, 1757, 775, 1782, 1215, 715, 902, 1098],
    # No c=6 file is shipped here, but the reference lists its sizes.
    6: [1505, 983, 1008, 310, 1106, 537, 1206, 1044, 564, 498,
        1119, 870, 1352, 1898, 700, 1577, 1275, 741, 666, 1039],
}
COUNTS_C4 = [
    [15, 179, 621, 113, 541], [31, 94, 54, 62, 613], [5, 402, 67, 335, 254], [0, 143, 105, 2, 50],
    [12, 311, 18, 164, 514], [2, 122, 43, 26, 271], [33, 36, 133, 499, 444], [34, 162, 126, 365, 369],
    [17, 121, 27, 165, 213], [14, 74, 160, 71, 119], [0, 4, 387, 550, 160], [34, 241, 67, 30, 459],
    [24, 719, 98, 386, 201], [74, 384, 112, 130, 1027], [35, 189, 25, 40, 455], [20, 100, 35, 495, 1167],
    [12, 135, 348, 300, 542], [4, 350, 139, 84, 158], [40, 58, 30, 172, 460], [32, 277, 2, 302, 554],
]


@pytest.fixture(scope="module")
def ich_labels():
    if not ICH.is_dir():
        pytest.skip(f"official FFL4MIA files not found at {ICH}")
    return load_split_csv(ICH / "train.csv")[1]


def assert_exact_partition(parts, n_rows):
    """Every row 0..n_rows-1 in exactly one client; int64 arrays."""
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    rows = np.concatenate(parts) if parts else np.empty(0, np.int64)
    assert np.array_equal(np.sort(rows), np.arange(n_rows))


@needs_data
@pytest.mark.parametrize("c", [4, 2])
def test_reproduces_official_file_exactly(ich_labels, c):
    official = load_partition_file(ICH / f"dict_users_noniid_dir1.0_CorruptedNum{c}.npy")
    ours = dirichlet_partition(ich_labels, num_clients=20, num_corrupted=c, alpha=1.0, seed=2024)
    assert len(ours) == len(official) == 20
    for i in range(20):
        assert ours[i].dtype == np.int64
        # Same indices in the same order, not just the same sets.
        assert ours[i].tolist() == official[i].tolist(), f"client {i} differs"


@needs_data
@pytest.mark.parametrize("c", [4, 2, 6])
def test_sizes_and_exact_cover(ich_labels, c):
    parts = dirichlet_partition(ich_labels, 20, c)
    assert [len(p) for p in parts] == SIZES[c]
    assert_exact_partition(parts, len(ich_labels))
    # Corrupted group = fraction c/N of the data (round per class).
    assert sum(len(p) for p in parts[20 - c:]) == {2: 2000, 4: 3999, 6: 5998}[c]


@needs_data
def test_class_counts_match_reference_table(ich_labels):
    counts = class_counts(ich_labels, dirichlet_partition(ich_labels, 20, 4), 5)
    assert counts.shape == (20, 5) and counts.dtype == np.int64
    assert counts.tolist() == COUNTS_C4
    assert counts.sum(0).tolist() == [438, 4101, 2597, 4291, 8571]


def synthetic_labels(n=600, num_classes=4, seed=0):
    # Sorted by class like the official CSVs, with uneven class sizes.
    return np.sort(np.random.default_rng(seed).integers(0, num_classes, size=n))


@pytest.mark.parametrize(
    "n_clients, c, alpha, seed",
    [(20, 4, 1.0, 2024), (1, 0, 1.0, 0), (2, 1, 0.5, 7), (5, 0, 10.0, 3), (7, 6, 0.1, 99), (3, 2, 1e-6, 1)],
)
def test_any_setting_is_an_exact_partition(n_clients, c, alpha, seed):
    labels = synthetic_labels()
    parts = dirichlet_partition(labels, n_clients, c, alpha=alpha, seed=seed)
    assert len(parts) == n_clients
    assert_exact_partition(parts, len(labels))
    # The corrupted group gets exactly the last n_k - round((N-c)/N n_k) rows of each class.
    corrupted = set(np.concatenate(parts[n_clients - c:]).tolist()) if c else set()
    expected = set()
    for k in range(labels.max() + 1):
        idx = np.flatnonzero(labels == k)
        expected |= set(idx[round((n_clients - c) / n_clients * len(idx)):].tolist())
    assert corrupted == expected


def test_no_corrupted_group_draw_sequence():
    # c = 0: per class one Dirichlet over all N clients, then one categorical draw per row.
    labels = synthetic_labels(n=300, num_classes=3)
    parts = dirichlet_partition(labels, 5, 0, alpha=1.0, seed=11)
    rng = np.random.RandomState(11)
    expected = [set() for _ in range(5)]
    for k in range(3):
        idx = np.flatnonzero(labels == k)
        props = rng.dirichlet([1.0] * 5)
        for row, client in zip(idx, rng.choice(5, size=len(idx), p=props)):
            expected[client].add(int(row))
    assert [set(p.tolist()) for p in parts] == expected


def test_single_client_gets_everything():
    labels = synthetic_labels(n=50)
    (only,) = dirichlet_partition(labels, 1, 0)
    assert sorted(only.tolist()) == list(range(50))


def test_absent_classes_and_empty_labels():
    # Class 1 absent in the middle, class 3 only: still an exact partition.
    labels = np.array([0] * 30 + [2] * 40 + [3] * 5)
    parts = dirichlet_partition(labels, 4, 1)
    assert_exact_partition(parts, len(labels))
    # An absent middle class still consumes its two Dirichlet draws (as the official code does).
    shifted = dirichlet_partition(np.where(labels >= 2, labels - 1, labels), 4, 1)
    assert [p.tolist() for p in parts] != [p.tolist() for p in shifted]

    empty = dirichlet_partition(np.array([], dtype=np.int64), 3, 1)
    assert len(empty) == 3 and all(p.size == 0 and p.dtype == np.int64 for p in empty)
    assert [p.size for p in dirichlet_partition([], 2, 0)] == [0, 0]


def test_deterministic_and_independent_of_global_rng():
    labels = synthetic_labels()
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a = dirichlet_partition(labels, 6, 2, seed=5)
    b = dirichlet_partition(labels, 6, 2, seed=5)
    c = dirichlet_partition(labels, 6, 2, seed=6)
    assert [p.tolist() for p in a] == [p.tolist() for p in b]
    assert [p.tolist() for p in a] != [p.tolist() for p in c]
    assert np.array_equal(np.random.get_state()[1], state)  # global stream untouched


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_clients=0, num_corrupted=0), "num_clients"),
        (dict(num_clients=2.0, num_corrupted=0), "num_clients"),
        (dict(num_clients=True, num_corrupted=0), "num_clients"),
        (dict(num_clients=4, num_corrupted=4), "num_corrupted"),
        (dict(num_clients=4, num_corrupted=-1), "num_corrupted"),
        (dict(num_clients=4, num_corrupted=1, alpha=0.0), "alpha"),
        (dict(num_clients=4, num_corrupted=1, alpha=-1.0), "alpha"),
        (dict(num_clients=4, num_corrupted=1, alpha=float("inf")), "alpha"),
        (dict(num_clients=4, num_corrupted=1, alpha=float("nan")), "alpha"),
        (dict(num_clients=4, num_corrupted=1, alpha="1"), "alpha"),
        (dict(num_clients=4, num_corrupted=1, seed=-1), "seed"),
        (dict(num_clients=4, num_corrupted=1, seed=2**32), "seed"),
        (dict(num_clients=4, num_corrupted=1, seed=1.5), "seed"),
    ],
)
def test_argument_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(np.array([0, 1, 1]), **kwargs)


@pytest.mark.parametrize(
    "labels", [np.array([[0, 1]]), np.array([0.0, 1.0]), np.array([0, -1]), np.array(["a"])]
)
def test_label_validation(labels):
    with pytest.raises(ValueError, match="labels"):
        dirichlet_partition(labels, 3, 1)


def test_class_counts_validation():
    labels = np.array([0, 1, 2])
    assert class_counts(labels, [np.array([0, 2]), np.array([1])], 3).tolist() == [[1, 0, 1], [0, 1, 0]]
    with pytest.raises(ValueError, match="num_classes"):
        class_counts(labels, [np.array([0])], 2)
