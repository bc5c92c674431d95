"""preprocess.ich: DICOM pixels (reference windowing), every broken-file case, an RSNA-shaped folder to shards,
the official partition, resume, and one real training run on the result under mpiexec."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from hpcfl.data.shards import Manifest, read_checked
from preprocess.ich import CLASS_NAMES, load_dicom, main, read_kaggle_labels
from hpcfl.data.partition import dirichlet_partition
from preprocess.items import SkipItem, StopRequested
from preprocess.pipeline import PROGRESS, SKIPPED, STOP_AFTER_ENV
from tests.conftest import FROM_SCRATCH, REPO, launch, read_metrics, sets
from tests.fixtures import ct_pixels, make_dicom, make_rsna_folder, pydicom_file, rsna_label_rows


def notebook_reference(stored, slope, intercept, center, width) -> np.ndarray:
    """The Kaggle notebook the reference points to (§6.1), written out independently: int window, w // 2,
    clip, min-max, * 255, truncating cast."""
    img = stored * int(slope) + int(intercept)
    lo, hi = int(center) - int(width) // 2, int(center) + int(width) // 2
    img = np.clip(img, lo, hi).astype(np.float64)
    img = (img - img.min()) / (img.max() - img.min()) * 255
    return img.astype(np.uint8)


# ---------------------------------------------------------------------------------------------- pixels

def test_dicom_window_is_the_reference_notebook(tmp_path):
    stored = ct_pixels(3)
    path = make_dicom(tmp_path / "a.dcm", stored, center=40, width=81)  # odd width: w // 2 = 40, as the notebook
    out = load_dicom(str(path), "dicom", size=64)  # same size: PIL leaves the pixels alone
    assert out.shape == (64, 64, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], notebook_reference(stored, 1, -1024, 40, 81))
    assert out.min() == 0 and out.max() == 255


def test_monochrome1_slope_intercept_and_multivalued_windows(tmp_path):
    stored = ct_pixels(1)
    base = load_dicom(str(make_dicom(tmp_path / "base.dcm", stored)), "dicom", 64)
    inverted = load_dicom(str(make_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1")), "dicom", 64)
    np.testing.assert_array_equal(inverted, 255 - base)
    even = stored - stored % 2  # HU representable with slope 2 and intercept -2048
    halved = ((even.astype(np.int32) + 1024) // 2).astype(np.int16)
    a = load_dicom(str(make_dicom(tmp_path / "s1.dcm", even)), "brain", 64)
    b = load_dicom(str(make_dicom(tmp_path / "s2.dcm", halved, slope=2.0, intercept=-2048.0)), "brain", 64)
    np.testing.assert_array_equal(a, b)  # same HU, same image
    multi = load_dicom(str(make_dicom(tmp_path / "mv.dcm", stored, center=[40, 600], width=[80, 2800])), "dicom", 64)
    np.testing.assert_array_equal(multi, base)  # the first value of each tag


def test_fixed_windows_are_linear_and_need_no_window_tags(tmp_path):
    stored = ct_pixels(2)
    path = make_dicom(tmp_path / "nowin.dcm", stored, center=None)
    with pytest.raises(SkipItem, match="missing window tags: no WindowCenter"):
        load_dicom(str(path), "dicom", 64)
    brain = load_dicom(str(path), "brain", 64)
    hu = stored.astype(np.float64) - 1024
    np.testing.assert_array_equal(brain[..., 0], ((np.clip(hu, 0, 80) - 0) / 80 * 255).astype(np.uint8))
    multi = load_dicom(str(path), "multi", 64)
    assert multi.shape == (64, 64, 3)
    np.testing.assert_array_equal(multi[..., 0], brain[..., 0])
    bone = ((np.clip(hu, -800, 2000) + 800) / 2800 * 255).astype(np.uint8)
    np.testing.assert_array_equal(multi[..., 2], bone)


def test_resize_is_pil_bicubic(tmp_path):
    from PIL import Image

    path = make_dicom(tmp_path / "a.dcm", ct_pixels(0))
    full = load_dicom(str(path), "dicom", 64)[..., 0]
    small = load_dicom(str(path), "dicom", 24)
    expected = np.asarray(Image.fromarray(full).resize((24, 24), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(small[..., 0], expected)


@pytest.mark.parametrize("name, window, shape", [("CT_small.dcm", "brain", (32, 32, 1)),
                                                  ("MR_small.dcm", "dicom", (32, 32, 1)),
                                                  ("MR_small_RLE.dcm", "dicom", (32, 32, 1)),
                                                  ("J2K_pixelrep_mismatch.dcm", "multi", (32, 32, 3))])
def test_real_pydicom_files_decode(name, window, shape):
    out = load_dicom(str(pydicom_file(name)), window, 32)
    assert out.shape == shape and out.dtype == np.uint8 and out.max() > out.min()


def test_every_broken_file_is_a_skip_with_its_reason(tmp_path):
    cases = {
        "nopix.dcm": (lambda p: make_dicom(p, with_pixels=False), "no PixelData"),
        "jls.dcm": (lambda p: make_dicom(p, jpeg_ls=True), r"pixel data not decodable \(JPEG-LS Lossless"),
        "text.dcm": (lambda p: p.write_text("hello"), "not a DICOM file"),
        "cut.dcm": (lambda p: p.write_bytes(make_dicom(p).read_bytes()[:-3000]), "pixel data not decodable"),
        "head.dcm": (lambda p: p.write_bytes(make_dicom(p).read_bytes()[:200]), "no PixelData|unreadable DICOM"),
        "absent.dcm": (lambda p: None, "label without image"),
    }
    for name, (make, reason) in cases.items():
        make(tmp_path / name)
        with pytest.raises(SkipItem, match=reason):
            load_dicom(str(tmp_path / name), "brain", 32)
    for name in ("rtdose.dcm", "ExplVR_BigEnd.dcm"):  # multi-frame, RGB
        with pytest.raises(SkipItem, match="wrong dimensions"):
            load_dicom(str(pydicom_file(name)), "brain", 32)


def test_label_file_keeps_single_subtype_images_only(tmp_path):
    rows = (rsna_label_rows("ID_a", ("subdural",)) + rsna_label_rows("ID_b", ())
            + rsna_label_rows("ID_c", ("epidural", "subdural")) + rsna_label_rows("ID_d", ("epidural",))[:-1]
            + rsna_label_rows("ID_e", ("intraventricular",)) + ["ID_e_epidural,0", "ID_f_subdural,2"])
    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\n" + "\n".join(rows) + "\n")
    single, problems, outside, labelled = read_kaggle_labels(path)
    assert single == {"ID_a": 4, "ID_e": 2}
    assert dict(outside) == {"no hemorrhage": 1, "several subtypes": 1}
    assert dict(problems)["ID_d"] == "incomplete labels: no row for any"
    assert "label '2' is not 0 or 1" in dict(problems)["ID_f"]
    assert labelled == {"ID_a", "ID_b", "ID_c", "ID_d", "ID_e", "ID_f"}


# ---------------------------------------------------------------------------------------------- folders

@pytest.fixture(scope="module")
def rsna(tmp_path_factory):
    root = tmp_path_factory.mktemp("rsna")
    return root, make_rsna_folder(root)


ARGS = ["--size", "32", "--clients", "4", "--corrupted", "1", "--alpha", "10", "--test-severities", "1", "3"]


@pytest.fixture(scope="module")
def shards(rsna, tmp_path_factory):
    root, _ = rsna
    out = tmp_path_factory.mktemp("ich") / "shards"
    assert main([str(root), str(out), *ARGS, "--workers", "2"]) == 0
    return out


def all_entries(m):
    return m.clients + m.test_sets[:1]


def test_folder_to_shards_every_image_once_with_its_label(rsna, shards):
    _, info = rsna
    m = Manifest.load(shards)
    assert m.class_names == list(CLASS_NAMES) and m.image_shape == (32, 32, 1)
    assert [c.corruption for c in m.clients] == [None] * 3 + [{"kind": "gaussian", "severity": 3}]
    assert [t.name for t in m.test_sets] == ["clean", "gaussian_1", "gaussian_3"]
    found = {}
    for entry in all_entries(m):
        shard = read_checked(shards, entry, m)
        for i, label in zip(shard.ids, shard.labels.tolist()):
            assert i not in found
            found[i] = label
    assert found == info["good"]  # every decodable image exactly once, with its own label
    assert m.made_by["command"].startswith("python -m preprocess.ich ")
    assert m.made_by["arguments"]["window"] == "dicom" and "pydicom" in m.made_by["versions"]
    split = (shards / "train.csv").read_text().splitlines() + (shards / "test.csv").read_text().splitlines()[1:]
    assert split[0] == "id,class" and len(split) - 1 == len(info["good"]) + len(info["broken"]) - 3


def test_skipped_csv_names_every_broken_file_and_nothing_else(rsna, shards):
    _, info = rsna
    with open(shards / SKIPPED, newline="") as f:
        rows = {r["id"]: r for r in csv.DictReader(f)}
    assert set(rows) == set(info["broken"])
    for image_id, reason in info["broken"].items():
        assert rows[image_id]["reason"].startswith(reason), (image_id, rows[image_id])
    assert not set(info["outside"]) & set(rows)  # normal / several-subtype images are outside the task, not errors
    assert Manifest.load(shards).extra["skipped"]["count"] == len(info["broken"])


def test_same_shards_again_and_resume_after_a_kill(rsna, shards, tmp_path, monkeypatch):
    root, _ = rsna
    full = {e.file: e.sha256 for e in all_entries(Manifest.load(shards))}
    out = tmp_path / "resumed"
    monkeypatch.setenv(STOP_AFTER_ENV, "3")
    with pytest.raises(StopRequested):
        main([str(root), str(out), *ARGS, "--workers", "1"])
    monkeypatch.delenv(STOP_AFTER_ENV)
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("client_*.h5")}
    assert sorted(before) == ["client_000.h5", "client_001.h5", "client_002.h5"]
    assert main([str(root), str(out), *ARGS, "--workers", "2"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("client_00[012].h5")} == before  # not redone
    m = Manifest.load(out)
    assert {e.file: e.sha256 for e in all_entries(m)} == full  # byte-identical to the one-go run
    assert len(json.loads((out / PROGRESS).read_text())["jobs"]) == 5


def test_official_partition_indexes_rows_and_keeps_rows_without_files(rsna, tmp_path):
    root, info = rsna
    official = tmp_path / "official"
    official.mkdir()
    good = sorted(info["good"].items(), key=lambda kv: (kv[1], kv[0]))
    train = good[:40] + [("ID_gone00000", 4)]  # a row whose DICOM does not exist
    test = good[40:]
    train.sort(key=lambda kv: kv[1])
    for name, rows in (("train.csv", train), ("test.csv", test)):
        (official / name).write_text("id,class\n" + "".join(f"{i},{k}\n" for i, k in rows))
    labels = np.array([k for _, k in train])
    parts = dirichlet_partition(labels, 3, 1, 1.0, 2024)
    with open(official / "dict_users_noniid_dir1.0_CorruptedNum1.npy", "wb") as f:
        np.save(f, np.array({i: p.tolist() for i, p in enumerate(parts)}, dtype=object), allow_pickle=True)
    out = tmp_path / "shards"
    assert main([str(root), str(out), "--partition", "official", "--official-dir", str(official), "--corrupted",
                 "1", "--size", "16", "--window", "brain", "--test-severities", "3", "--workers", "1"]) == 0
    m = Manifest.load(out)
    for cid, entry in enumerate(m.clients):
        shard = read_checked(out, entry, m)
        expected = [train[r] for r in parts[cid] if train[r][0] != "ID_gone00000"]
        assert list(zip(shard.ids, shard.labels.tolist())) == expected
    gone_row = train.index(("ID_gone00000", 4))
    owner = next(c for c, p in enumerate(parts) if gone_row in p)
    assert (out / SKIPPED).read_text().splitlines()[1:] == [
        f"ID_gone00000,client_{owner:03d},label without image: no DICOM file"]


def test_flat_folder_and_limit(rsna, tmp_path):
    root, info = rsna
    flat = tmp_path / "flat"
    shutil.copytree(root / "stage_2_train", flat)
    shutil.copy(root / "stage_2_train.csv", flat / "stage_2_train.csv")
    out = tmp_path / "out"
    assert main([str(flat), str(out), "--limit", "20", "--clients", "2", "--corrupted", "0", "--size", "16",
                 "--test-severities", "--workers", "1"]) == 0
    m = Manifest.load(out)
    rows = (out / "train.csv").read_text().splitlines()[1:] + (out / "test.csv").read_text().splitlines()[1:]
    eligible = sorted(set(info["good"]) | set(info["broken"]) - {"ID_nofile000", "ID_nolabel00", "ID_conflict0"})
    assert sorted(r.split(",")[0] for r in rows) == eligible[:20]  # the first 20 labelled images, by id
    assert [c.corruption for c in m.clients] == [None, None] and [t.name for t in m.test_sets] == ["clean"]


def test_cli_errors_are_one_line_with_exit_2(rsna, tmp_path, capsys):
    root, _ = rsna
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "o1")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main([str(root), str(tmp_path / "o2"), "--partition", "official"]) == 2
    assert "needs --official-dir" in capsys.readouterr().err
    assert main([str(root), str(tmp_path / "o3"), "--severity", "9"]) == 2
    assert "corruption gaussian severity 9: severity must be in 1..5" in capsys.readouterr().err
    assert main([str(root), str(tmp_path / "o4"), "--clients", "3", "--corrupted", "3"]) == 2
    assert "must be below --clients" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- training

@pytest.mark.mpi
def test_the_shards_train_under_mpiexec(rsna, tmp_path):
    """The command line end to end: preprocess.ich, then hpcfl.run with 3 ranks on its shards."""
    root, _ = rsna
    out = tmp_path / "ich32"
    proc = subprocess.run([sys.executable, "-m", "preprocess.ich", str(root), str(out), *ARGS, "--workers", "2"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "4 clients with" in proc.stdout and "skipped 9 item(s)" in proc.stdout
    run = launch(3, ["--out", str(tmp_path / "run"), *sets(*FROM_SCRATCH, f"data.source={out}", "run.rounds=2", "model.width=8",
                                                           "train.batch_size=16")], timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    lines = read_metrics(tmp_path / "run")
    assert [line["round"] for line in lines] == [0, 1]
    assert set(lines[-1]["metrics"]) == {"clean", "gaussian_1", "gaussian_3"}
    assert len(lines[-1]["weights"]) == 4
