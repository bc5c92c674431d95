import numpy as np
import pytest

from hpcfl.config import BenchmarkConfig
from hpcfl.data.shards import Manifest, read_checked
from hpcfl.data.builtin import build, builtin_dir, class_counts_from_prior


def test_class_counts_are_exact_and_imbalanced():
    counts = class_counts_from_prior(4000, BenchmarkConfig().class_prior)
    assert counts.sum() == 4000 and counts.argmax() == 4 and counts.argmin() == 0
    assert class_counts_from_prior(7, [1, 1, 1]).tolist() == [3, 2, 2]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    bench = BenchmarkConfig(num_clients=6, num_corrupted=2, num_train=300, num_test=100, image_size=16,
                            severity=3, test_severities=[1, 3])
    root = tmp_path_factory.mktemp("bench")
    return bench, build(root / "a", bench), root


def test_build_is_deterministic_and_partitions_like_the_reference(small):
    bench, directory, root = small
    again = build(root / "b", bench, workers=2)  # rendered in 2 processes: the same bytes
    m, m2 = Manifest.load(directory), Manifest.load(again)
    assert [c.sha256 for c in m.clients] == [c.sha256 for c in m2.clients]
    assert [t.sha256 for t in m.test_sets] == [t.sha256 for t in m2.test_sets]
    assert sum(c.n for c in m.clients) == 300
    assert [c.corruption for c in m.clients] == [None] * 4 + [{"kind": "gaussian", "severity": 3}] * 2
    assert [t.name for t in m.test_sets] == ["clean", "gaussian_1", "gaussian_3"]
    # §6.4: the corrupted group holds its share (c/N) of every class
    counts = np.array([c.class_counts for c in m.clients])
    total = counts.sum(0)
    np.testing.assert_array_equal(counts[4:].sum(0), total - np.round(4 / 6 * total).astype(int))
    assert not [p for p in directory.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_corrupted_clients_and_test_copies_are_noisy_versions(small):
    bench, directory, _ = small
    m = Manifest.load(directory)
    clean = read_checked(directory, m.test_sets[0], m)
    noisy1 = read_checked(directory, m.test_sets[1], m)
    noisy3 = read_checked(directory, m.test_sets[2], m)
    assert clean.ids == noisy3.ids and np.array_equal(clean.labels, noisy3.labels)
    d1 = np.abs(noisy1.images.astype(int) - clean.images).mean()
    d3 = np.abs(noisy3.images.astype(int) - clean.images).mean()
    assert 0 < d1 < d3  # severity 3 is noisier than severity 1
    assert noisy3.attrs["corruption"] == {"kind": "gaussian", "severity": 3}


def test_the_directory_is_keyed_by_every_benchmark_parameter(tmp_path):
    a = builtin_dir(tmp_path, BenchmarkConfig())
    assert a == builtin_dir(tmp_path, BenchmarkConfig())
    assert a != builtin_dir(tmp_path, BenchmarkConfig(severity=4))
    assert a.parent == tmp_path
