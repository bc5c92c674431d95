"""preprocess.isic: JPEG decoding, ground truth, FLamby's centre rule, an ISIC-shaped folder to shards."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from hpcfl.data.shards import Manifest, read_checked
from preprocess.isic import CLASS_NAMES, FLAMBY_CENTRES, centre_of, load_jpeg, main, read_ground_truth
from preprocess.items import SkipItem
from preprocess.pipeline import SKIPPED
from tests.fixtures import lesion_image, make_isic_folder


def test_jpeg_to_rgb_bicubic(tmp_path):
    from PIL import Image

    lesion_image(2, 90, 60, 0).save(tmp_path / "a.jpg", quality=95)
    out = load_jpeg(str(tmp_path / "a.jpg"), 32)
    with Image.open(tmp_path / "a.jpg") as im:
        expected = np.asarray(im.convert("RGB").resize((32, 32), Image.Resampling.BICUBIC))
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    lesion_image(2, 40, 40, 0).convert("L").save(tmp_path / "gray.jpg")
    gray = load_jpeg(str(tmp_path / "gray.jpg"), 16)
    assert gray.shape == (16, 16, 3) and np.array_equal(gray[..., 0], gray[..., 2])


def test_broken_jpegs_are_skips(tmp_path):
    lesion_image(1, 64, 64, 0).save(tmp_path / "whole.jpg")
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "whole.jpg").read_bytes()[:400])
    (tmp_path / "text.jpg").write_text("no image here")
    for name, reason in (("cut.jpg", "unreadable image"), ("text.jpg", "not an image file"),
                         ("absent.jpg", "label without image")):
        with pytest.raises(SkipItem, match=reason):
            load_jpeg(str(tmp_path / name), 16)


def test_ground_truth_one_hot_unk_and_repeats(tmp_path):
    head = "image," + ",".join((*CLASS_NAMES, "UNK"))
    onehot = lambda k: ",".join("1.0" if j == k else "0.0" for j in range(9))  # noqa: E731
    rows = [head, f"ISIC_1,{onehot(0)}", f"ISIC_2,{onehot(7)}", f"ISIC_3,{onehot(8)}",
            "ISIC_4," + ",".join(["1.0"] * 2 + ["0.0"] * 7), f"ISIC_5,{onehot(1)}", f"ISIC_5,{onehot(2)}"]
    path = tmp_path / "gt.csv"
    path.write_text("\n".join(rows) + "\n")
    labels, problems, unknown, labelled = read_ground_truth(path)
    assert labels == {"ISIC_1": 0, "ISIC_2": 7} and unknown == 1
    assert [i for i, _ in problems] == ["ISIC_4", "ISIC_5"] and "not one-hot" in problems[0][1]
    assert labelled == {f"ISIC_{k}" for k in range(1, 6)}


def test_centre_rule_is_flambys():
    ham = {"ISIC_h1": "vidir_molemax", "ISIC_h2": "vienna_dias"}
    assert centre_of("BCN_0001", "ISIC_b", ham) == "BCN"
    assert centre_of("MSK4_0002", "ISIC_m", ham) == "MSK"
    assert centre_of("HAM_0003", "ISIC_h1", ham) == "HAM_vidir_molemax"
    assert centre_of("HAM_0004", "ISIC_h2", ham) == "HAM_vienna_dias"
    assert centre_of("HAM_0004", "ISIC_h2", None) == "HAM"
    for lesion, image, reason in (("", "ISIC_x", "no lesion_id"), ("HAM_9", "ISIC_h9", "HAM image without"),
                                  ("XYZ_1", "ISIC_x", "unknown lesion_id prefix")):
        with pytest.raises(SkipItem, match=reason):
            centre_of(lesion, image, ham)


@pytest.fixture(scope="module")
def isic(tmp_path_factory):
    root = tmp_path_factory.mktemp("isic")
    return root, make_isic_folder(root)


def contents(out, m) -> dict:
    found = {}
    places = [(c, c.name) for c in m.clients] + [(m.test_sets[0], "test")]
    for entry, place in places:
        shard = read_checked(out, entry, m)
        for i, label in zip(shard.ids, shard.labels.tolist()):
            assert i not in found
            found[i] = (label, place)
    return found


def skipped(out) -> dict:
    with open(out / SKIPPED, newline="") as f:
        return {r["id"]: r["reason"] for r in csv.DictReader(f)}


def test_centres_partition_one_client_per_flamby_centre(isic, tmp_path):
    root, info = isic
    out = tmp_path / "centres"
    assert main([str(root), str(out), "--partition", "centres", "--ham-metadata", str(root / "HAM10000_metadata.csv"),
                 "--corrupted", "2", "--size", "24", "--test-severities", "3", "--workers", "2"]) == 0
    m = Manifest.load(out)
    assert [c.name for c in m.clients] == list(FLAMBY_CENTRES)
    assert [c.corruption is not None for c in m.clients] == [False] * 4 + [True] * 2
    assert m.image_shape == (24, 24, 3) and m.class_names == list(CLASS_NAMES)
    found = contents(out, m)
    expected = {i: k for i, k in info["good"].items() if i not in info["no_centre"]}
    assert {i: label for i, (label, _) in found.items()} == expected
    for i, (_, where) in found.items():
        assert where in (info["centre"][i], "test")
    reasons = skipped(out)
    assert set(reasons) == set(info["broken"]) | set(info["no_centre"])
    for i, reason in info["broken"].items():
        assert reasons[i].startswith(reason), (i, reasons[i])
    assert reasons["ISIC_0000907"].startswith("no centre")
    assert 0 < m.test_sets[0].n < len(expected)


def test_dirichlet_partition_and_same_bytes_twice(isic, tmp_path):
    root, info = isic
    args = ["--clients", "3", "--corrupted", "1", "--alpha", "5", "--size", "16", "--test-severities", "2"]
    assert main([str(root), str(tmp_path / "a"), *args, "--workers", "2"]) == 0
    assert main([str(root), str(tmp_path / "b"), *args, "--workers", "1"]) == 0
    ma, mb = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert [e.sha256 for e in ma.clients + ma.test_sets] == \
        [e.sha256 for e in mb.clients + mb.test_sets]
    found = contents(tmp_path / "a", ma)
    assert {i: label for i, (label, _) in found.items()} == info["good"]  # lesion_id does not matter here
    assert set(skipped(tmp_path / "a")) == set(info["broken"])
    assert [t.name for t in ma.test_sets] == ["clean", "gaussian_2"]


def test_cli_refuses_too_many_corrupted_centres(isic, tmp_path, capsys):
    root, _ = isic
    assert main([str(root), str(tmp_path / "o"), "--partition", "centres", "--corrupted", "3"]) == 2
    assert "there are 3 centres" in capsys.readouterr().err
