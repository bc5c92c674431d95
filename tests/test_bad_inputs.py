"""Bad input, table-driven: every case must end with exit code 2 and one clear ``hpcfl: error...: ...`` line.

Each case is (name, how its input is made in a temporary directory of its own, the CLI arguments, the exit code, a
substring the one error message must contain). The cases are set up one by one and launched side by side (fixture
``outcomes``); each test then checks one case's result. For every case the test asserts: that exit code; exactly one line containing
"hpcfl: error"; the substring in that line; no "Traceback"; nothing half-written (no run directory at all for a
config error, no run files for a data error, an existing run directory left as it was for a checkpoint/resume
error, no ``.tmp`` file anywhere in the case's directory or the data cache).

Kinds of case:

- ``config``: refused while the config is read, before anything is created. A tripwire
  ``data.source=<missing directory>`` is added, so that a check that lets the value through fails fast with a
  different message instead of building the benchmark and training.
- ``data``: a shard directory made here with ``hpcfl.data.shards.write_shard`` (4 clients of 6 images, 16x16
  grayscale, 3 classes; ``test_the_handmade_shard_directory_runs`` shows that the unmodified one runs), then
  broken in one way.
- ``resume``: a copy of one real tiny run (``finished_run``, made once per module), then broken in one way.

Bad config files live in ``tests/bad_inputs/``; binary inputs (HDF5, npy) are generated at test time.
A case marked ``xfail(strict=True)`` behaves wrongly today; its reason says what happens now.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
import pytest

from hpcfl.data.shards import MANIFEST, Manifest, ShardEntry, client_file, sha256_of, write_shard
from hpcfl.data.shards import test_file as set_file
from tests.conftest import REPO, TINY, launch, sets

BAD = Path(__file__).parent / "bad_inputs"
# What a run directory holds once a run has really started (hpcfl/rundir.py RUN_FILES); logs/ may exist earlier.
RUN_FILES = ("config.toml", "run.json", "metrics.jsonl", "metrics.csv", "final_model.npy", "checkpoint.json")


# ------------------------------------------------------------------------------------------ input builders

def make_shards(directory: Path, num_clients: int = 4, n: int = 6, size: int = 16, channels: int = 1,
                num_classes: int = 3) -> Path:
    """A small valid shard directory, as preprocess/synthetic.py would write it."""
    directory.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{k}" for k in range(num_classes)]

    def shard(path, count, attrs):
        labels = np.arange(count) % num_classes
        images = rng.integers(0, 256, size=(count, size, size, channels), dtype=np.uint8)
        sha = write_shard(path, images, labels, [f"img{j}" for j in range(count)],
                          {"dataset": "handmade", "class_names": names, **attrs})
        return labels, sha

    clients = []
    for cid in range(num_clients):
        labels, sha = shard(directory / client_file(cid), n, {"client_id": cid, "corruption": None})
        clients.append(ShardEntry(client_file(cid), n, None, sha, np.bincount(labels, minlength=num_classes).tolist()))
    _, sha = shard(directory / set_file("clean"), 9, {"test_set": "clean", "corruption": None})
    Manifest(num_classes, names, (size, size, channels), clients, [ShardEntry(set_file("clean"), 9, None, sha,
                                                                             name="clean")],
             dataset="handmade").write(directory)
    return directory


def edit_manifest(directory: Path, edit: Callable[[dict], None]) -> None:
    path = directory / MANIFEST
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m, indent=2))


def set_client_entry(directory: Path, cid: int, **changes) -> None:
    edit_manifest(directory, lambda m: m["clients"][cid].update(changes))


class RunsArbitraryCode:
    """Unpickling this creates the file ``path``: a checkpoint must never be unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class Ctx:
    """What a case's setup may use; ``out`` is the run directory every case passes with --out."""

    def __init__(self, tmp_path: Path, data_cache: Path, finished_run: Callable[[], Path]):
        self.tmp, self.cache, self._finished_run = tmp_path, data_cache, finished_run
        self.out = tmp_path / "run"

    def base(self) -> list[str]:
        """The TINY settings on the session cache: exactly the config of ``finished_run``."""
        return [*TINY, f"data.cache_dir={self.cache}"]

    def tripwire(self) -> str:
        return f"data.source={self.tmp / 'tripwire-no-data'}"

    def config_args(self, *pairs: str) -> list[str]:
        return sets(*self.base(), self.tripwire(), *pairs)

    def shards(self, **kw) -> Path:
        return make_shards(self.tmp / "shards", **kw)

    def data_args(self, shard_dir: Path, *pairs: str) -> list[str]:
        return sets(*self.base(), f"data.source={shard_dir}", "run.rounds=1", *pairs)

    def copy_run(self, finished: bool = True, to: Path | None = None) -> Path:
        """A copy of the real tiny run; ``finished=False`` makes it look interrupted after its last checkpoint."""
        to = to or self.out
        shutil.copytree(self._finished_run(), to)
        if not finished:
            info = json.loads((to / "run.json").read_text())
            for key in ("finished", "wall_s", "server_peak_rss_mb"):
                info.pop(key, None)
            (to / "run.json").write_text(json.dumps(info, indent=2))
        return to

    def checkpoint_dir(self, run_dir: Path | None = None) -> Path:
        run_dir = run_dir or self.out
        return run_dir / json.loads((run_dir / "checkpoint.json").read_text())["dir"]


# ------------------------------------------------------------------------------------------------ cases

@dataclass
class Case:
    name: str
    kind: str  # "config" | "data" | "resume" (| "control": a valid input)
    setup: Callable[[Ctx], list[str]]  # makes the input, returns the CLI arguments (without --out)
    expect: str  # a substring of the one "hpcfl: error" line
    code: int = 2
    nprocs: int = 1
    xfail: str | None = None  # what happens today, when it is wrong
    check: Callable[[Ctx], None] | None = None  # a further assertion after the run


def _config_file(name: str):
    # only the tripwire: a --set of the TINY settings (run.rounds=3) would override the bad value in the file
    return lambda c: ["--config", str(BAD / name), *sets(c.tripwire())]


def _set(*pairs: str):
    return lambda c: c.config_args(*pairs)


# --- data cases


def _missing_source(c):
    return c.data_args(Path("/nonexistent"))


def _no_manifest(c):
    d = c.shards()
    (d / MANIFEST).unlink()
    return c.data_args(d)


def _manifest_not_json(c):
    d = c.shards()
    (d / MANIFEST).write_text('{"schema": 1, "clients": [')
    return c.data_args(d)


def _manifest_schema(c):
    d = c.shards()
    edit_manifest(d, lambda m: m.update(schema=2))
    return c.data_args(d)


def _shard_missing(c):
    d = c.shards()
    (d / client_file(2)).unlink()
    return c.data_args(d)


def _shard_truncated(c):
    d = c.shards()
    p = d / client_file(1)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return c.data_args(d)


def _shard_not_hdf5_no_sha(c):
    d = c.shards()
    (d / client_file(1)).write_bytes(b"this is not an HDF5 file\n" * 10)
    edit_manifest(d, lambda m: m["clients"][1].pop("sha256"))
    return c.data_args(d)


def _labels_out_of_range(c):
    d = c.shards()
    images = np.zeros((6, 16, 16, 1), dtype=np.uint8)
    sha = write_shard(d / client_file(0), images, np.array([0, 1, 2, 3, 4, 1]), [f"x{j}" for j in range(6)], {})
    set_client_entry(d, 0, sha256=sha)  # a consistent file: only its labels are wrong (num_classes is 3)
    return c.data_args(d)


def _n_mismatch(c):
    d = c.shards()
    set_client_entry(d, 1, n=7)
    return c.data_args(d)


def _client_without_samples(c):
    d = c.shards()
    sha = write_shard(d / client_file(3), np.zeros((0, 16, 16, 1), dtype=np.uint8), np.zeros(0, np.int64), [], {})
    set_client_entry(d, 3, n=0, sha256=sha, class_counts=[0, 0, 0])
    return c.data_args(d)


def _float_images(c):
    d = c.shards()
    p = d / client_file(0)
    p.unlink()
    with h5py.File(p, "w") as f:  # no NaN, right shape, but float32 in [0, 1] instead of uint8 in [0, 255]
        f.create_dataset("images", data=np.random.default_rng(1).random((6, 16, 16, 1), dtype=np.float32))
        f.create_dataset("labels", data=np.arange(6, dtype=np.int64) % 3)
        f.create_dataset("ids", data=np.asarray([f"f{j}" for j in range(6)], dtype=object),
                         dtype=h5py.string_dtype())
    set_client_entry(d, 0, sha256=sha256_of(p))
    return c.data_args(d)


def _image_shape_mismatch(c):
    d = c.shards(channels=3)  # RGB shards ...
    edit_manifest(d, lambda m: m.update(image_shape=[16, 16, 1]))  # ... that the manifest calls grayscale
    return c.data_args(d)


def _rewrite_shard(path: Path, images, labels, ids) -> str:
    """Replace a shard by raw HDF5 datasets (bypassing the writer's checks, as a foreign tool would)."""
    path.unlink()
    with h5py.File(path, "w") as f:
        f.create_dataset("images", data=images)
        f.create_dataset("labels", data=labels)
        f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
    return sha256_of(path)


def _bad_labels(labels, which="client"):
    def setup(c):
        d = c.shards()
        images = np.zeros((6 if which == "client" else 9, 16, 16, 1), dtype=np.uint8)
        ids = [f"x{j}" for j in range(len(images))]
        if which == "client":
            set_client_entry(d, 0, sha256=_rewrite_shard(d / client_file(0), images, labels, ids))
        else:
            sha = _rewrite_shard(d / set_file("clean"), images, labels, ids)
            edit_manifest(d, lambda m: m["test_sets"][0].update(sha256=sha))
        return c.data_args(d)
    return setup


def _manifest_edit(edit):
    def setup(c):
        d = c.shards()
        edit_manifest(d, edit)
        return c.data_args(d)
    return setup


def _pretrained_missing(c):
    return c.data_args(c.shards(), "model.name=resnet18", f"model.pretrained_path={c.tmp / 'imagenet.pt'}")


def _more_ranks_than_clients(c):
    return c.data_args(c.shards(num_clients=4))  # launched with 6 ranks: 5 client ranks


# --- resume cases (a copy of the real tiny run)


def _changed_config(c):
    c.copy_run()
    return sets(*c.base(), "train.lr=0.001")


def _pointer_garbage(c):
    c.copy_run(finished=False)
    (c.out / "checkpoint.json").write_text("{this is not json")
    return sets(*c.base())


def _pointer_to_missing_dir(c):
    c.copy_run(finished=False)
    (c.out / "checkpoint.json").write_text(json.dumps({"round": 7, "dir": "checkpoint-000007"}))
    return sets(*c.base())


def _pointer_outside_run_dir(c):
    other = c.copy_run(to=c.tmp / "another-run")
    c.copy_run(finished=False)
    shutil.rmtree(c.checkpoint_dir())
    (c.out / "checkpoint.json").write_text(json.dumps({"round": 2, "dir": str(c.checkpoint_dir(other))}))
    return sets(*c.base())


def _vouch_for_global(c):
    """Record the (replaced) global.npy's sha256 in state.json, as if hpcfl had written it: the checks behind the
    checksum must refuse it on their own."""
    path = c.checkpoint_dir() / "state.json"
    state = json.loads(path.read_text())
    state["global_sha256"] = sha256_of(c.checkpoint_dir() / "global.npy")
    path.write_text(json.dumps(state))


def _global_is_pickle(c):
    c.copy_run(finished=False)
    payload = np.empty(1, dtype=object)
    payload[0] = RunsArbitraryCode(c.tmp / "pickle-was-executed")
    with open(c.checkpoint_dir() / "global.npy", "wb") as f:
        np.save(f, payload, allow_pickle=True)
    _vouch_for_global(c)
    return sets(*c.base())


def _global_changed(c):
    c.copy_run(finished=False)
    path = c.checkpoint_dir() / "global.npy"
    vec = np.load(path)
    vec[0] += 1.0
    with open(path, "wb") as f:
        np.save(f, vec, allow_pickle=False)
    return sets(*c.base())


def _pickle_not_executed(c):
    assert not (c.tmp / "pickle-was-executed").exists(), "the checkpoint's pickle was executed"


def _global_wrong_length(c):
    c.copy_run(finished=False)
    with open(c.checkpoint_dir() / "global.npy", "wb") as f:
        np.save(f, np.zeros(7, dtype=np.float32), allow_pickle=False)
    _vouch_for_global(c)
    return sets(*c.base())


def _state_of_another_config(c):
    c.copy_run(finished=False)
    path = c.checkpoint_dir() / "state.json"
    state = json.loads(path.read_text())
    state["config_digest"] = "0123456789abcdef"
    path.write_text(json.dumps(state))
    return sets(*c.base())


def _edit_state(edit):
    def setup(c):
        c.copy_run(finished=False)
        path = c.checkpoint_dir() / "state.json"
        state = json.loads(path.read_text())
        edit(state)
        path.write_text(json.dumps(state))
        return sets(*c.base())
    return setup


def _global_nonfinite(c):
    c.copy_run(finished=False)
    path = c.checkpoint_dir() / "global.npy"
    vec = np.load(path)
    vec[3] = np.nan
    with open(path, "wb") as f:
        np.save(f, vec, allow_pickle=False)
    _vouch_for_global(c)
    return sets(*c.base())


def _run_json_garbage(c):
    c.copy_run(finished=False)
    (c.out / "run.json").write_bytes(b"\x00not json")
    return sets(*c.base())


def _no_config_toml(c):
    c.copy_run(finished=False)
    (c.out / "config.toml").unlink()
    return sets(*c.base(), "train.lr=0.01")


def _overwrite_with_missing_data(c):
    c.copy_run()
    return [*sets(*c.base(), f"data.source={c.tmp / 'no-such-shards'}"), "--overwrite"]


def _pointer_round_mismatch(c):
    c.copy_run(finished=False)
    pointer = json.loads((c.out / "checkpoint.json").read_text())
    (c.out / "checkpoint.json").write_text(json.dumps({**pointer, "round": pointer["round"] - 1}))
    return sets(*c.base())


def _global_huge_header(c):
    c.copy_run(finished=False)
    path = c.checkpoint_dir() / "global.npy"
    with open(path, "wb") as f:  # a header that claims 4 TB, over a few bytes
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (10 ** 12,)})
        f.write(b"\0" * 64)
    _vouch_for_global(c)
    return sets(*c.base())


def _symlink_out(c):
    d = c.shards()
    elsewhere = c.tmp / "elsewhere.h5"
    (d / client_file(1)).rename(elsewhere)
    (d / client_file(1)).symlink_to(elsewhere)
    return c.data_args(d)


def _config_not_utf8(c):
    path = c.tmp / "latin1.toml"
    path.write_bytes('[run]\nout = "runs/\xe9t\xe9"\n'.encode("latin-1"))
    return ["--config", str(path), *sets(c.tripwire())]


def _out_not_utf8(c):
    return [*c.config_args(), "--out", str(c.tmp / "run\udcff")]  # the byte 0xff in a file name


CASES = [
    # config: the file
    Case("malformed_toml", "config", _config_file("malformed.toml"), "malformed.toml: not valid TOML"),
    Case("unknown_section", "config", _config_file("unknown_section.toml"), "unknown section [trainn]"),
    Case("unknown_key", "config", _config_file("unknown_key.toml"), "unknown key train.lrr"),
    Case("section_not_a_table", "config", _config_file("section_not_table.toml"), "run: expected a table"),
    Case("wrong_type", "config", _config_file("wrong_type.toml"), "run.rounds: expected int, got str"),
    Case("bool_for_int", "config", _config_file("bool_for_int.toml"), "run.rounds: expected int, got bool"),
    Case("missing_config_file", "config", lambda c: ["--config", str(c.tmp / "nope.toml"), *c.config_args()],
         "config file not found"),
    # config: values
    Case("rounds_0", "config", _set("run.rounds=0"), "run.rounds: 0 is out of range"),
    Case("lr_0", "config", _set("train.lr=0"), "train.lr: 0.0 is out of range (must be > 0.0)"),
    Case("severity_6", "config", _set("benchmark.severity=6"), "benchmark.severity: 6 is out of range"),
    Case("val_fraction_0.9", "config", _set("data.val_fraction=0.9"), "data.val_fraction: 0.9 is out of range"),
    Case("lr_nan", "config", _set("train.lr=nan"), "train.lr"),
    Case("bool_in_int_list", "config", _set("benchmark.test_severities=[true]"), "benchmark.test_severities"),
    Case("unknown_algorithm", "config", _set("algorithm.name=fedprox"), "algorithm.name: 'fedprox' is not one of"),
    Case("variant_of_another_algorithm", "config", _set("algorithm.name=fedism", "algorithm.variant=qffl"),
         "algorithm.variant: 'qffl' is not a variant of fedism"),
    Case("unknown_model", "config", _set("model.name=vgg16"), "model.name: 'vgg16' is not one of"),
    Case("pretrained_path_for_cnn", "config", _set("model.pretrained_path=weights.pt"), "model.pretrained_path"),
    Case("fail_at_malformed", "config", _set("debug.fail_at=2-1"), "debug.fail_at: '2-1' must look like"),
    # config: the command line
    Case("set_without_equals", "config", lambda c: [*c.config_args(), "--set", "run.rounds"],
         "--set 'run.rounds': expected section.key=value"),
    Case("set_key_not_section_key", "config", _set("rounds=3"), "the key must be section.key"),
    # data
    Case("missing_shard_directory", "data", _missing_source, "shard directory not found: /nonexistent"),
    Case("directory_without_manifest", "data", _no_manifest, "manifest.json: missing"),
    Case("manifest_not_json", "data", _manifest_not_json, "manifest.json: not valid JSON"),
    Case("manifest_wrong_schema", "data", _manifest_schema, "schema 2, this hpcfl reads schema 1"),
    Case("shard_missing", "data", _shard_missing, "client_002.h5: listed in the manifest but missing"),
    Case("shard_truncated", "data", _shard_truncated, "client_001.h5: not a readable hpcfl shard"),
    Case("shard_not_hdf5_without_sha", "data", _shard_not_hdf5_no_sha, "client_001.h5: not a readable hpcfl shard"),
    Case("labels_out_of_range", "data", _labels_out_of_range, "client_000.h5: labels outside 0..2"),
    Case("manifest_n_differs", "data", _n_mismatch, "client_001.h5: 6 images, the manifest says 7"),
    Case("client_without_samples", "data", _client_without_samples, "client(s) [3]"),
    Case("float32_images", "data", _float_images, "uint8"),
    Case("image_shape_differs_from_manifest", "data", _image_shape_mismatch, "image_shape"),
    Case("pretrained_path_missing", "data", _pretrained_missing, "model.pretrained_path"),
    Case("more_client_ranks_than_clients", "data", _more_ranks_than_clients, "5 client ranks but only 4 clients",
         nprocs=6),
    Case("fewer_labels_than_images", "data", _bad_labels(np.arange(5) % 3),
         "client_000.h5: 6 images, 5 labels and 6 ids"),
    Case("float_labels", "data", _bad_labels(np.array([0, 1, 2, 0.5, 1, 2])), "client_000.h5: labels are float64"),
    Case("labels_2d", "data", _bad_labels((np.arange(6) % 3).reshape(6, 1)), "client_000.h5: labels are int64 (6, 1)"),
    Case("test_set_label_count_differs", "data", _bad_labels(np.arange(8) % 3, "test"),
         "test_clean.h5: 9 images, 8 labels and 9 ids"),
    Case("manifest_file_absolute", "data", _manifest_edit(lambda m: m["clients"][0].update(file="/etc/passwd")),
         "clients[0].file '/etc/passwd' must be a plain .h5 file name inside the shard directory"),
    Case("manifest_file_outside", "data",
         _manifest_edit(lambda m: m["clients"][1].update(file="../elsewhere/client_001.h5")),
         "clients[1].file '../elsewhere/client_001.h5' must be a plain .h5 file name"),
    Case("manifest_entry_lacks_file", "data", _manifest_edit(lambda m: m["clients"][2].pop("file")),
         "clients[2].file None must be a plain .h5 file name"),
    Case("manifest_n_is_text", "data", _manifest_edit(lambda m: m["clients"][1].update(n="6")),
         "clients[1].n '6' must be a non-negative integer"),
    Case("manifest_clients_not_a_list", "data", _manifest_edit(lambda m: m.update(clients={"0": {}})),
         "clients must be a list of objects"),
    Case("manifest_class_names_short", "data", _manifest_edit(lambda m: m.update(class_names=["a"])),
         "class_names must be 3 strings"),
    Case("manifest_test_set_name_with_slash", "data", _manifest_edit(lambda m: m["test_sets"][0].update(name="a/b")),
         "test_sets[0].name 'a/b' must be a plain name"),
    Case("manifest_not_an_object", "data", _manifest_edit(lambda m: (m.clear(), m.update(schema=1, x=[]))),
         "lacks 'num_classes'"),
    Case("manifest_class_counts_wrong", "data",
         _manifest_edit(lambda m: m["clients"][2].update(class_counts=[6, 0, 0])),
         "client_002.h5: class counts [2, 2, 2], the manifest says [6, 0, 0]"),
    Case("manifest_without_test_sets", "data", _manifest_edit(lambda m: m.update(test_sets=[])), "lists no test sets"),
    Case("manifest_two_clients_one_file", "data",
         _manifest_edit(lambda m: m["clients"][1].update(m["clients"][0])), "client_000.h5 listed more than once"),
    Case("shard_is_a_link_out_of_the_directory", "data", _symlink_out,
         "client_001.h5: leads outside the shard directory"),
    # resume / checkpoint
    Case("resume_with_changed_config", "resume", _changed_config, "different config (train.lr: 0.002 -> 0.001)"),
    Case("checkpoint_pointer_garbage", "resume", _pointer_garbage, "checkpoint.json: not an hpcfl checkpoint pointer"),
    Case("checkpoint_pointer_to_missing_dir", "resume", _pointer_to_missing_dir, "missing or incomplete"),
    Case("checkpoint_pointer_outside_run_dir", "resume", _pointer_outside_run_dir, "checkpoint.json"),
    Case("checkpoint_global_is_pickle", "resume", _global_is_pickle, "global.npy: unreadable checkpoint file",
         check=_pickle_not_executed),
    Case("checkpoint_global_wrong_length", "resume", _global_wrong_length, "global.npy"),
    Case("checkpoint_of_another_config", "resume", _state_of_another_config, "state.json"),
    Case("state_round_negative", "resume", _edit_state(lambda st: st.update(round=-3)),
         "state.json: round -3 is not a round of this run (0..2)"),
    Case("state_round_huge", "resume", _edit_state(lambda st: st.update(round=10 ** 12)),
         "is not a round of this run (0..2)"),
    Case("state_weights_wrong_length", "resume", _edit_state(lambda st: st.update(prev_weights=[0.5, 0.5])),
         "state.json: 2 prev_weights for 20 clients"),
    Case("state_weights_not_numbers", "resume", _edit_state(lambda st: st["prev_weights"].__setitem__(3, "x")),
         "state.json: prev_weights must be a list of finite numbers >= 0"),
    Case("state_metrics_not_a_list", "resume", _edit_state(lambda st: st.update(metrics={"round": 0})),
         "state.json: metrics must hold the lines of rounds [0, 1, 2]"),
    Case("state_metrics_lost_rounds", "resume", _edit_state(lambda st: st.update(metrics=st["metrics"][-1:])),
         "metrics must hold the lines of rounds [0, 1, 2] (evaluated up to round 2), found [2]"),
    Case("state_algorithm_not_an_object", "resume", _edit_state(lambda st: st.update(algorithm=[1, 2])),
         "state.json: algorithm state is list, not an object"),
    Case("state_algorithm_unknown_keys", "resume", _edit_state(lambda st: st.update(algorithm={"prev": [1]})),
         "algorithm state: keys ['prev'], expected []"),
    Case("global_model_not_finite", "resume", _global_nonfinite, "global.npy: holds non-finite values"),
    Case("global_model_changed", "resume", _global_changed,
         "global.npy: its sha256 differs from the checkpoint's record (the file changed)"),
    Case("run_json_garbage", "resume", _run_json_garbage, "run.json: unreadable"),
    Case("state_weights_negative", "resume", _edit_state(lambda st: st["prev_weights"].__setitem__(0, -0.5)),
         "state.json: prev_weights must be a list of finite numbers >= 0"),
    Case("pointer_round_differs", "resume", _pointer_round_mismatch, "checkpoint.json: round 1 but directory "
         "checkpoint-000002"),
    Case("checkpoint_global_huge_header", "resume", _global_huge_header, "global.npy: unreadable checkpoint file"),
    Case("run_without_config_toml", "resume", _no_config_toml, "but no config.toml: restore it to resume, or pass "
         "--overwrite"),
    Case("overwrite_with_missing_data", "resume", _overwrite_with_missing_data, "shard directory not found"),
    # text
    Case("config_not_utf8", "config", _config_not_utf8, "latin1.toml: not UTF-8 text"),
    Case("out_path_not_utf8", "config", _out_not_utf8, "holds bytes that are not UTF-8"),
]


# ---------------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_cache) -> Path:
    """One real tiny run (3 rounds, checkpoint after the last), reused read-only by every resume case."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    p = launch(1, ["--out", str(run_dir), *sets(*TINY, f"data.cache_dir={data_cache}")], timeout=240)
    assert p.returncode == 0, p.stderr[-3000:]
    assert (run_dir / "checkpoint.json").is_file()
    return run_dir


def snapshot(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run directory but its logs (which a refused attempt may append to)."""
    if not run_dir.exists():
        return {}
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*"))
            if p.is_file() and p.relative_to(run_dir).parts[0] != "logs"}


def tmp_files(*roots: Path) -> list[str]:
    return [str(p) for root in roots if root.exists() for p in root.rglob("*") if ".tmp" in p.name]


def _control_args(num_classes: int):
    return lambda c: c.data_args(c.shards(num_classes=num_classes))


CONTROLS = {2: Case("control_2_classes", "control", _control_args(2), ""),
            3: Case("control_3_classes", "control", _control_args(3), "")}


@dataclass
class Outcome:
    ctx: Ctx
    proc: subprocess.CompletedProcess
    before: dict[str, bytes]  # the run directory before the launch (resume cases)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory, data_cache) -> dict[str, Outcome]:
    """Every selected case (and control): set up, then launched side by side.

    Each launch is a fresh Python that imports torch and scikit-learn before it looks at the data (~3 s of CPU
    each): one after the other the table takes minutes of wall time; side by side (one per core, at most 4) about
    its CPU time divided by the cores. The real run that the resume cases copy runs meanwhile. No two launches
    share a writable file."""
    selected = {item.callspec.params[key].name for item in request.session.items
                if item.module.__name__ == __name__ and hasattr(item, "callspec")
                for key in ("case", "control") if key in item.callspec.params}
    jobs = [c for c in [*CASES, *CONTROLS.values()] if c.name in selected]
    made: dict[str, tuple[Ctx, list[str], dict]] = {}
    futures = {}

    def submit(pool, case):
        ctx = Ctx(tmp_path_factory.mktemp(case.name), data_cache, lambda: request.getfixturevalue("finished_run"))
        args = case.setup(ctx)
        made[case.name] = (ctx, args, snapshot(ctx.out))
        futures[case.name] = pool.submit(launch, case.nprocs, ["--out", str(ctx.out), *args], 300, REPO)

    workers = max(1, min(4, len(os.sched_getaffinity(0))))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        # the long ones first; the resume cases once the real run they copy exists (made here, meanwhile)
        for case in sorted((c for c in jobs if c.kind != "resume"), key=lambda c: (c.kind == "config", -c.nprocs)):
            submit(pool, case)
        for case in (c for c in jobs if c.kind == "resume"):
            submit(pool, case)
        return {name: Outcome(made[name][0], f.result(), made[name][2]) for name, f in futures.items()}


def _param(case: Case):
    marks = [pytest.mark.mpi] if case.nprocs > 1 else []
    if case.xfail:
        marks.append(pytest.mark.xfail(strict=True, reason=case.xfail))
    return pytest.param(case, id=case.name, marks=marks)


# ------------------------------------------------------------------------------------------------ tests

def test_the_table_is_large_enough():
    assert len(CASES) >= 25 and len({c.name for c in CASES}) == len(CASES)
    assert sum(c.nprocs > 1 for c in CASES) <= 2  # each mpiexec launch costs ~10 s


@pytest.mark.parametrize("control", [
    pytest.param(CONTROLS[3], id="3_classes"),
    pytest.param(CONTROLS[2], id="2_classes"),
])
def test_the_handmade_shard_directory_runs(control: Case, outcomes):
    """The control of the data cases: unmodified, the hand-made shard directory trains (so each data case fails
    because of its one change)."""
    o = outcomes[control.name]
    assert o.proc.returncode == 0, o.proc.stderr[-3000:]
    assert (o.ctx.out / "final_model.npy").is_file()


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(case: Case, outcomes, data_cache):
    o = outcomes[case.name]
    ctx, p = o.ctx, o.proc
    output = p.stdout + p.stderr
    errors = [line for line in output.splitlines() if "hpcfl: error" in line]
    detail = f"exit {p.returncode}\n--- stderr ---\n{p.stderr[-3000:]}\n--- stdout ---\n{p.stdout[-1500:]}"

    assert "Traceback" not in p.stderr, detail
    assert p.returncode == case.code, detail
    assert len(errors) == 1, detail
    assert case.expect in errors[0], detail
    assert not tmp_files(ctx.tmp, data_cache), f"left behind: {tmp_files(ctx.tmp, data_cache)}"
    if case.kind == "config":
        assert not ctx.out.exists(), f"a config error created the run directory {ctx.out}"
    elif case.kind == "data":
        left = [n for n in RUN_FILES if (ctx.out / n).exists()] + [d.name for d in ctx.out.glob("checkpoint-*")]
        assert not left, f"a refused run left {left} in {ctx.out}"
    else:
        assert snapshot(ctx.out) == o.before, "a refused resume changed the run directory"
    if case.check:
        case.check(ctx)
