import json

import h5py
import numpy as np
import pytest

from hpcfl.data.shards import (ShardError, load_manifest, read_checked, read_shard, sha256_of, write_manifest,
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
    assert list(tmp_path.iterdir()) == []


def _manifest(tmp_path, sha, n=5):
    write_manifest(tmp_path, {"num_classes": 3, "class_names": ["a", "b", "c"], "image_shape": [4, 4, 1],
                              "clients": [{"file": "client_000.h5", "n": n, "sha256": sha}], "test_sets": []})
    return load_manifest(tmp_path)


def test_manifest_checks_name_the_problem(tmp_path):
    _, _, sha = _write(tmp_path)
    m = _manifest(tmp_path, sha)
    assert read_checked(tmp_path, m["clients"][0], 3).labels.shape == (5,)
    with pytest.raises(ShardError, match="labels outside 0..1"):
        read_checked(tmp_path, m["clients"][0], 2)
    with pytest.raises(ShardError, match="5 images, the manifest says 6"):
        read_checked(tmp_path, {**m["clients"][0], "n": 6}, 3)
    # a changed (here: truncated) file is caught by its checksum
    path = tmp_path / "client_000.h5"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ShardError, match="sha256 differs"):
        read_checked(tmp_path, m["clients"][0], 3)
    with pytest.raises(ShardError, match="not a readable hpcfl shard"):
        read_shard(path)
    path.unlink()
    with pytest.raises(ShardError, match="listed in the manifest but missing"):
        read_checked(tmp_path, m["clients"][0], 3)


def test_manifest_problems(tmp_path):
    with pytest.raises(ShardError, match="shard directory not found"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ShardError, match="manifest.json: missing"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ShardError, match="not valid JSON"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 99}))
    with pytest.raises(ShardError, match="schema 99"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema": 1, "clients": []}))
    with pytest.raises(ShardError, match="lacks 'num_classes'"):
        load_manifest(tmp_path)
