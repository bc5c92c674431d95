"""hpcfl/data/shards.py: the one writer, the manifest type and the checks of a shard directory."""

import json

import h5py
import numpy as np
import pytest

from hpcfl.data.shards import (Manifest, ShardEntry, ShardError, ShardWriter, read_checked, read_shard, sha256_of,
                               write_shard)


def _write(tmp_path, n=5, name="client_000.h5"):
    images = np.arange(n * 4 * 4, dtype=np.uint8).reshape(n, 4, 4, 1)
    labels = np.arange(n) % 3
    sha = write_shard(tmp_path / name, images, labels, [f"id{i}" for i in range(n)], {"client_id": 0,
                                                                                      "corruption": None})
    return images, labels, sha


def test_round_trip_attributes_and_no_temporary_left(tmp_path):
    images, labels, sha = _write(tmp_path)
    shard = read_shard(tmp_path / "client_000.h5")
    np.testing.assert_array_equal(shard.images, images)
    np.testing.assert_array_equal(shard.labels, labels)
    assert shard.labels.dtype == np.int64 and shard.ids == [f"id{i}" for i in range(5)]
    assert shard.attrs == {"client_id": 0, "corruption": None}
    assert sha == sha256_of(tmp_path / "client_000.h5")
    assert [p.name for p in tmp_path.iterdir()] == ["client_000.h5"]
    with h5py.File(tmp_path / "client_000.h5") as f:
        assert f["images"].chunks == (1, 4, 4, 1)  # chunked by image


def test_a_failed_write_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="same length"):
        write_shard(tmp_path / "x.h5", np.zeros((2, 4, 4, 1), np.uint8), [0], ["a", "b"], {})
    with pytest.raises(ValueError, match="uint8"):
        write_shard(tmp_path / "x.h5", np.zeros((2, 4, 4, 1), np.float32), [0, 1], ["a", "b"], {})
    with pytest.raises(RuntimeError, match="decoder died"):
        with ShardWriter(tmp_path / "y.h5", 3, (4, 4, 1), {}) as w:
            w.append(np.zeros((1, 4, 4, 1), np.uint8), [0], ["a"])
            raise RuntimeError("decoder died")
    assert list(tmp_path.iterdir()) == []


def test_the_streaming_writer_keeps_what_was_appended(tmp_path):
    """Appending fewer images than announced (skipped items) gives a shard of exactly those."""
    with ShardWriter(tmp_path / "s.h5", 10, (4, 4, 1), {"k": [1, 2]}) as w:
        for j in range(3):
            w.append(np.full((1, 4, 4, 1), j, np.uint8), [j], [f"i{j}"])
    shard = read_shard(tmp_path / "s.h5")
    assert shard.images.shape == (3, 4, 4, 1) and shard.labels.tolist() == [0, 1, 2] and shard.attrs == {"k": [1, 2]}
    assert w.sha256 == sha256_of(tmp_path / "s.h5")
    with pytest.raises(ValueError, match="more than the 1 images announced"):
        with ShardWriter(tmp_path / "t.h5", 1, (4, 4, 1), {}) as w:
            w.append(np.zeros((2, 4, 4, 1), np.uint8), [0, 1], ["a", "b"])


def _manifest(tmp_path, sha, n=5):
    Manifest(3, ["a", "b", "c"], (4, 4, 1), [ShardEntry("client_000.h5", n, None, sha)],
             [ShardEntry("test_clean.h5", 0, name="clean")]).write(tmp_path)
    return Manifest.load(tmp_path)


def test_manifest_round_trip(tmp_path):
    _, _, sha = _write(tmp_path)
    m = Manifest(3, ["a", "b", "c"], (4, 4, 1), [ShardEntry("client_000.h5", 5, {"kind": "blur", "severity": 2},
                                                            sha, [2, 2, 1], name="site A")],
                 [ShardEntry("test_clean.h5", 0, None, name="clean")], dataset="t", made_by={"command": "x"},
                 extra={"skipped": {"count": 0}})
    m.write(tmp_path)
    assert Manifest.load(tmp_path) == m and m.corrupted_clients == [0]


def test_manifest_checks_name_the_problem(tmp_path):
    _, _, sha = _write(tmp_path)
    m = _manifest(tmp_path, sha)
    assert read_checked(tmp_path, m.clients[0], m).labels.shape == (5,)
    two = Manifest(2, ["a", "b"], (4, 4, 1), m.clients, m.test_sets)
    with pytest.raises(ShardError, match="labels outside 0..1"):
        read_checked(tmp_path, m.clients[0], two)
    with pytest.raises(ShardError, match="5 images, the manifest says 6"):
        read_checked(tmp_path, ShardEntry("client_000.h5", 6, None, sha), m)
    # a changed (here: truncated) file is caught by its checksum
    path = tmp_path / "client_000.h5"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match="sha256 differs"):
        read_checked(tmp_path, m.clients[0], m)
    with pytest.raises(ShardError, match="not a readable hpcfl shard"):
        read_shard(path)
    path.unlink()
    with pytest.raises(ShardError, match="listed in the manifest but missing"):
        read_checked(tmp_path, m.clients[0], m)


def test_manifest_problems(tmp_path):
    with pytest.raises(ShardError, match="shard directory not found"):
        Manifest.load(tmp_path / "nope")
    with pytest.raises(ShardError, match="manifest.json: missing"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ShardError, match="not valid JSON"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(ShardError, match="schema 99"):
        Manifest.load(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "clients": []}))
    with pytest.raises(ShardError, match="lacks 'num_classes'"):
        Manifest.load(tmp_path)
