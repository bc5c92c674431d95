"""preprocess.pipeline: shards from items, skipped-item report, crash isolation, determinism, resume."""

from __future__ import annotations

import csv
import functools
import json
import time

import numpy as np
import pytest

from hpcfl.data.shards import Manifest, read_checked, read_shard
from hpcfl.data.corrupt import corrupt
from preprocess.cli import stratified_split
from preprocess.decode import Decoder
from preprocess.items import Corruption, Item, Job, Output, PipelineError, Plan, StopRequested
from preprocess.pipeline import PROGRESS, SKIPPED, STOP_AFTER_ENV, summary, write_shards
from tests.fixtures import gradient_image, toy_loader

SIZE = 8


def toy_plan(bad=("bad:t05", "big:t11", "bad:x02"), n_train=48, n_test=12, num_clients=4, severity=3) -> Plan:
    """Items ``t00..`` (train) and ``x00..`` (test) with labels i % 3; the sources in ``bad`` replace the good
    ones of the same id."""
    overrides = {s.split(":")[1]: s for s in bad}
    train = [Item(f"t{i:02d}", i % 3, overrides.get(f"t{i:02d}", f"ok:t{i:02d}")) for i in range(n_train)]
    test = [Item(f"x{i:02d}", i % 3, overrides.get(f"x{i:02d}", f"ok:x{i:02d}")) for i in range(n_test)]
    parts = [np.arange(c, n_train, num_clients)[::-1] for c in range(num_clients)]  # any order must be kept
    return Plan(dataset="toy", class_names=["a", "b", "c"], image_shape=(SIZE, SIZE, 1),
                loader=functools.partial(toy_loader, size=SIZE), train=train, parts=parts,
                corrupted_clients=[num_clients - 1], corruption=Corruption("gaussian", severity), test=test,
                test_corruptions=[Corruption("gaussian", 1), Corruption("gaussian", 3)],
                skipped=[("t99", "labels", "label without image: no toy file")],
                made_by={"command": "test", "arguments": {}, "versions": {}})


def shas(directory) -> dict:
    m = Manifest.load(directory)
    return {e.file: e.sha256 for e in m.clients + m.test_sets}


def mtimes(directory) -> dict:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.h5")}


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy") / "shards"
    return toy_plan(), write_shards(toy_plan(), out, workers=2)


def test_shards_manifest_and_labels_travel_with_ids(written):
    plan, result = written
    m = Manifest.load(result.out_dir)
    raw = json.loads((result.out_dir / "manifest.json").read_text())
    assert set(raw) >= {"dataset", "num_classes", "class_names", "image_shape", "clients", "test_sets", "made_by"}
    assert m.image_shape == (SIZE, SIZE, 1) and m.num_classes == 3
    assert [c.corruption for c in m.clients] == [None] * 3 + [{"kind": "gaussian", "severity": 3}]
    assert [t.name for t in m.test_sets] == ["clean", "gaussian_1", "gaussian_3"]
    label_of = {it.id: it.label for it in plan.train + plan.test}
    seen = []
    for cid, entry in enumerate(m.clients):
        shard = read_checked(result.out_dir, entry, m)
        assert shard.attrs["client_id"] == cid and shard.attrs["dataset"] == "toy"
        assert [label_of[i] for i in shard.ids] == shard.labels.tolist()
        assert entry.class_counts == np.bincount(shard.labels, minlength=3).tolist()
        expected = [plan.train[r].id for r in plan.parts[cid] if plan.train[r].source.startswith("ok:")]
        assert shard.ids == expected  # partition order kept, skipped items simply absent
        seen += shard.ids
        if entry.corruption is None:
            np.testing.assert_array_equal(shard.images, np.stack([gradient_image(i, SIZE) for i in shard.ids]))
    assert sorted(seen) == sorted(it.id for it in plan.train if it.source.startswith("ok:"))


def test_corrupted_copies_are_the_corrupt_function_per_image(written):
    plan, result = written
    m = Manifest.load(result.out_dir)
    clean = read_checked(result.out_dir, m.test_sets[0], m)
    assert "x02" not in clean.ids and len(clean.ids) == 11
    for entry, severity in zip(m.test_sets[1:], (1, 3)):
        noisy = read_checked(result.out_dir, entry, m)
        assert noisy.ids == clean.ids and noisy.attrs["corruption"] == {"kind": "gaussian", "severity": severity}
        np.testing.assert_array_equal(noisy.images, corrupt(clean.images, "gaussian", severity, 0, clean.ids))
    client3 = read_checked(result.out_dir, m.clients[3], m)
    clean3 = np.stack([gradient_image(i, SIZE) for i in client3.ids])
    np.testing.assert_array_equal(client3.images, corrupt(clean3, "gaussian", 3, 0, client3.ids))


def test_skipped_csv_lists_id_place_and_reason(written):
    _, result = written
    with open(result.out_dir / SKIPPED, newline="") as f:
        rows = list(csv.DictReader(f))
    by_id = {r["id"]: r for r in rows}
    assert set(by_id) == {"t99", "t05", "t11", "x02"}
    assert by_id["t99"]["where"] == "labels" and by_id["x02"]["where"] == "test"
    assert by_id["t05"]["where"] == "client_001"
    assert by_id["t05"]["reason"] == "ValueError: cannot decode t05"
    assert by_id["t11"]["reason"].startswith("wrong dimensions: decoded uint8 [16, 16, 1], expected uint8 [8, 8, 1]")
    assert Manifest.load(result.out_dir).extra["skipped"] == {"file": SKIPPED, "count": 4}
    text = summary(result)
    assert "skipped 4 item(s)" in text and "wrong dimensions" in text


def test_same_bytes_with_one_worker_and_in_another_directory(written, tmp_path):
    _, result = written
    again = write_shards(toy_plan(), tmp_path / "again", workers=1)
    assert shas(again.out_dir) == shas(result.out_dir)
    assert (tmp_path / "again" / "train.csv").read_text() == (result.out_dir / "train.csv").read_text()


def test_a_decoder_that_kills_its_process_is_skipped_not_fatal(tmp_path):
    plan = toy_plan(bad=("crash:t02", "crash:x03"), n_train=40, n_test=8, num_clients=2)
    result = write_shards(plan, tmp_path / "out", workers=2)
    reasons = {i: r for i, _, r in result.skipped}
    assert reasons["t02"].startswith("the decoder process died") and reasons["x03"].startswith("the decoder")
    m = Manifest.load(tmp_path / "out")
    assert sum(c.n for c in m.clients) == 39 and m.test_sets[0].n == 7


def test_a_crash_while_the_writer_is_busy_is_caught_at_the_next_submission():
    """Regression: the pool can break between two results; submitting to it then raises at once."""
    items = [Item(f"i{k:03d}", 0, "crash:x" if k == 20 else f"ok:i{k:03d}") for k in range(160)]
    job = Job("j", "j", items, [Output("x.h5", None, {})])
    with Decoder(functools.partial(toy_loader, size=SIZE), (SIZE, SIZE, 1), 0, workers=2) as decoder:
        results = []
        for item, result in decoder.run([job]):
            time.sleep(0.002)  # a slow writer: the worker dies meanwhile
            results.append((item.id, isinstance(result, str)))
    assert [i for i, _ in results] == [it.id for it in items]
    assert [i for i, skipped in results if skipped] == ["i020"]


def test_interrupted_run_resumes_with_only_the_missing_shards(written, tmp_path, monkeypatch):
    _, full = written
    out = tmp_path / "out"
    monkeypatch.setenv(STOP_AFTER_ENV, "2")
    with pytest.raises(StopRequested):
        write_shards(toy_plan(), out, workers=1)
    assert not (out / "manifest.json").exists()  # an interrupted directory never looks complete
    assert set(json.loads((out / PROGRESS).read_text())["jobs"]) == {"client_000", "client_001"}
    monkeypatch.delenv(STOP_AFTER_ENV)
    before = mtimes(out)
    resumed = write_shards(toy_plan(), out, workers=1)
    assert resumed.reused == ["client_000", "client_001"] and resumed.written == ["client_002", "client_003", "test"]
    assert mtimes(out)["client_000.h5"] == before["client_000.h5"]
    assert shas(out) == shas(full.out_dir)
    assert len(resumed.skipped) == len(full.skipped)  # skips of reused shards are remembered

    # a deleted shard and a changed one (its sha256 no longer matches) are redone, nothing else
    (out / "client_001.h5").unlink()
    with open(out / "client_002.h5", "r+b") as f:
        f.seek(-10, 2)
        f.write(b"0123456789")
    again = write_shards(toy_plan(), out, workers=1)
    assert again.written == ["client_001", "client_002"]
    assert shas(out) == shas(full.out_dir)

    # other arguments: only the shards they change are redone (here the corrupted client's severity)
    changed = write_shards(toy_plan(severity=4), out, workers=1)
    assert changed.written == ["client_003"]
    assert read_shard(out / "client_003.h5").attrs["corruption"] == {"kind": "gaussian", "severity": 4}


def test_a_run_killed_in_its_first_shard_can_be_rerun(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / ".client_000.h5.tmp-4242").write_bytes(b"half a shard")  # SIGKILL leaves such a file
    write_shards(toy_plan(), out, workers=1)
    assert not list(out.glob(".*"))


def test_refuses_foreign_directories_and_bad_plans(tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not empty and holds no progress.json"):
        write_shards(toy_plan(), tmp_path / "busy")
    plan = toy_plan()
    plan.test[0] = Item("t00", 0, "ok:t00")
    with pytest.raises(PipelineError, match="'t00' appears more than once"):
        write_shards(plan, tmp_path / "a")
    plan = toy_plan()
    plan.parts[1] = np.append(plan.parts[1], 0)
    with pytest.raises(PipelineError, match="more than one client"):
        write_shards(plan, tmp_path / "b")
    plan = toy_plan()
    plan.train[3] = Item("t03", 7, "ok:t03")
    with pytest.raises(PipelineError, match="t03: label 7 outside 0..2"):
        write_shards(plan, tmp_path / "c")
    plan = toy_plan()
    plan.test_corruptions = [Corruption("smudge", 2)]
    with pytest.raises(PipelineError, match="corruption smudge severity 2: unknown corruption kind 'smudge'"):
        write_shards(plan, tmp_path / "d")


def test_stratified_split_is_exact_proportional_and_seeded():
    strata = ["a"] * 50 + ["b"] * 7 + ["c"] * 3 + ["d"]
    train, test = stratified_split(strata, 0.2, seed=1)
    assert len(test) == round(0.2 * 61) and sorted(np.concatenate([train, test]).tolist()) == list(range(61))
    got = {s: sum(strata[r] == s for r in test) for s in "abcd"}
    assert got["a"] == 10 and got["b"] in (1, 2) and got["c"] in (0, 1)
    again = stratified_split(strata, 0.2, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(test, again[1])
    assert not np.array_equal(test, stratified_split(strata, 0.2, seed=2)[1])
