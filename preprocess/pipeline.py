"""Shared machinery of the real-data preprocessors (``preprocess.ich``, ``preprocess.isic``): items -> shards.

A data set module builds a :class:`Plan`: the train and test :class:`Item` s (id, label, source path), the
client partition (row indices into ``train``), which clients are corrupted and how, and the corrupted test
copies. :func:`write_shards` then writes, into one output directory,

* ``client_XXX.h5`` (one per client), ``test_clean.h5`` and ``test_<kind>_<severity>.h5``, in the format of
  :mod:`hpcfl.data.shards`;
* ``manifest.json`` (last, so that its presence means "complete"), ``skipped.csv`` (every item left out, with
  the reason), ``train.csv``/``test.csv`` (the split, ``id,class`` like the official files) and
  ``progress.json`` (what is done, for resuming).

How:

* Images are decoded by worker processes (``ProcessPoolExecutor``) in chunks of :data:`CHUNK` items; at most
  ``2 * workers`` chunks are in flight and every shard is written image by image into a temporary HDF5 file
  renamed on completion, so memory stays bounded whatever the data set size.
* An item whose image cannot be used (unreadable, no pixel data, undecodable, wrong shape, even a decoder that
  kills its process) is left out and listed in ``skipped.csv``; its id and label leave together, so no label
  ever shifts.
* The output depends only on the plan: chunking is fixed and results are written in item order, so any number
  of workers gives byte-identical shards.
* Resume: a shard group (one client, or the test set with its corrupted copies) whose fingerprint (items,
  their files' size and mtime, loader, corruption) and sha256 match ``progress.json`` is kept, the rest redone.
"""

from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import itertools
import json
import os
import re
import shlex
import signal
import sys
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import ExitStack, closing
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from hpcfl.data.shards import MANIFEST, client_file, sha256_of, test_file, write_manifest
from hpcfl.errors import UsageError
from hpcfl.atomic import atomic_path, write_json, write_text
from hpcfl.data.corrupt import corrupt

PROGRESS = "progress.json"
SKIPPED = "skipped.csv"
SPLIT_FILES = ("train.csv", "test.csv")
CHUNK = 16  # items per worker task; fixed, so that the output never depends on --workers
PROGRESS_FORMAT = 1  # bump when the shard bytes for the same plan change, to invalidate old progress files
STOP_AFTER_ENV = "HPCFL_PREPROCESS_STOP_AFTER"  # test hook: stop after that many shard groups (simulated kill)
MAX_REASON = 300


class PipelineError(UsageError):
    """Bad input to a preprocessor (arguments, folders, CSVs); the message names the file or option."""


class SkipItem(Exception):
    """Raised by a loader when an item cannot be used; the message is the reason written to skipped.csv."""


class StopRequested(RuntimeError):
    """Raised after ``$HPCFL_PREPROCESS_STOP_AFTER`` shard groups, to test resuming."""


@dataclass(frozen=True)
class Item:
    """One image: its id, its class, and where it comes from (a path for ``Plan.loader``, or a picklable
    zero-argument callable returning the image)."""
    id: str
    label: int
    source: object


@dataclass(frozen=True)
class Corruption:
    kind: str
    severity: int

    @property
    def name(self) -> str:
        return f"{self.kind}_{self.severity}"

    def as_dict(self) -> dict:
        return {"kind": self.kind, "severity": self.severity}


@dataclass
class Plan:
    """Everything that decides the output. ``loader(source) -> uint8 [H, W, C]`` must be picklable (a module
    function or a ``functools.partial`` of one) and raise :class:`SkipItem` (or anything) for a bad item."""
    dataset: str
    class_names: list[str]
    image_shape: tuple[int, int, int]
    loader: Callable | None
    train: list[Item]
    parts: list[np.ndarray]  # client i holds train[parts[i]], in that order
    corrupted_clients: list[int]
    corruption: Corruption | None  # of the corrupted clients
    test: list[Item]
    test_corruptions: list[Corruption]
    corruption_seed: int = 0
    client_names: list[str] | None = None  # e.g. the ISIC centres; recorded per client
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (id, where, reason) found up front
    compression: str | None = None
    made_by: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # more manifest fields


@dataclass
class Output:
    file: str
    corruption: Corruption | None
    attrs: dict


@dataclass
class Job:
    """A group of shards made from the same items: one client, or the test set and its corrupted copies."""
    key: str
    where: str  # the 'where' column of skipped.csv
    items: list[Item]
    outputs: list[Output]


@dataclass
class Result:
    out_dir: Path
    manifest: dict
    skipped: list[tuple[str, str, str]]
    written: list[str]
    reused: list[str]


# ---------------------------------------------------------------------------------------------- checks

def check_plan(plan: Plan) -> None:
    """Refuse a plan that would write wrong shards (bad labels, overlapping clients, unknown corruption)."""
    num_classes = len(plan.class_names)
    h, w, c = plan.image_shape
    if min(h, w) < 1 or c not in (1, 3):
        raise PipelineError(f"image_shape must be [H, W, 1|3], got {list(plan.image_shape)}")
    if plan.loader is None and not all(callable(it.source) for it in plan.train + plan.test):
        raise PipelineError("items with a path as source need a loader")
    ids = [it.id for it in plan.train] + [it.id for it in plan.test]
    if len(set(ids)) != len(ids):
        dup = next(i for i, n in Counter(ids).items() if n > 1)
        raise PipelineError(f"image id {dup!r} appears more than once in the train and test items")
    bad = next((it for it in plan.train + plan.test if not 0 <= int(it.label) < num_classes), None)
    if bad is not None:
        raise PipelineError(f"image {bad.id}: label {bad.label} outside 0..{num_classes - 1}")
    rows = np.concatenate([np.asarray(p, dtype=np.int64) for p in plan.parts]) if plan.parts else np.empty(0)
    if rows.size and (rows.min() < 0 or rows.max() >= len(plan.train)):
        raise PipelineError(f"partition row {int(rows.max())} out of range for {len(plan.train)} train items")
    if len(np.unique(rows)) != len(rows):
        raise PipelineError("partition: a train item is in more than one client")
    if any(not 0 <= c < len(plan.parts) for c in plan.corrupted_clients):
        raise PipelineError(f"corrupted clients {plan.corrupted_clients} outside 0..{len(plan.parts) - 1}")
    if plan.corrupted_clients and plan.corruption is None:
        raise PipelineError("corrupted clients given without a corruption")
    if plan.client_names is not None and len(plan.client_names) != len(plan.parts):
        raise PipelineError("client_names must name every client")
    names = [c.name for c in plan.test_corruptions]
    if len(set(names)) != len(names):
        raise PipelineError(f"test corruptions repeat: {names}")
    for c in ([plan.corruption] if plan.corruption else []) + list(plan.test_corruptions):
        check_corruption(c, plan.image_shape)


def check_corruption(c: Corruption, image_shape) -> None:
    """Try the corruption on one black image of the plan's shape: an unknown kind or severity (whatever
    ``preprocess.corrupt`` supports today) fails here, before any work, not in every worker."""
    try:
        corrupt(np.zeros((1, *image_shape), np.uint8), c.kind, c.severity, 0, ["probe"])
    except Exception as e:
        raise PipelineError(f"corruption {c.kind} severity {c.severity}: {e}") from None


# ---------------------------------------------------------------------------------------------- jobs

def make_jobs(plan: Plan) -> list[Job]:
    common = {"dataset": plan.dataset, "class_names": list(plan.class_names)}
    corrupted = set(plan.corrupted_clients)
    jobs = []
    for cid, rows in enumerate(plan.parts):
        corruption = plan.corruption if cid in corrupted else None
        attrs = {**common, "client_id": cid, "corruption": corruption and corruption.as_dict()}
        if plan.client_names is not None:
            attrs["client_name"] = plan.client_names[cid]
        items = [plan.train[int(r)] for r in rows]
        jobs.append(Job(f"client_{cid:03d}", f"client_{cid:03d}", items,
                        [Output(client_file(cid), corruption, attrs)]))
    variants = [("clean", None)] + [(c.name, c) for c in plan.test_corruptions]
    outputs = [Output(test_file(name), c, {**common, "test_set": name, "corruption": c and c.as_dict()})
               for name, c in variants]
    jobs.append(Job("test", "test", list(plan.test), outputs))
    return jobs


def describe_callable(f) -> object:
    """A stable description of a loader (a partial's repr holds a memory address, so build one)."""
    if isinstance(f, functools.partial):
        return {"function": describe_callable(f.func), "args": [repr(a) for a in f.args],
                "keywords": {k: repr(v) for k, v in sorted(f.keywords.items())}}
    if f is None:
        return None
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', repr(f))}"


def source_key(source) -> list:
    """What identifies an item's input: its path with size and mtime (an edited file is redone)."""
    if callable(source):
        return [describe_callable(source)]
    try:
        st = os.stat(source)
        return [str(source), st.st_size, st.st_mtime_ns]
    except OSError:
        return [str(source), None, None]


@functools.lru_cache(maxsize=None)
def source_sha(module_name: str) -> str | None:
    """sha256 of a module's source: edited decoding or corruption code must not reuse old shards."""
    module = sys.modules.get(module_name)
    path = getattr(module, "__file__", None)
    return sha256_of(Path(path)) if path and os.path.isfile(path) else None


def fingerprint(plan: Plan, job: Job) -> str:
    h = hashlib.sha256()
    loader = plan.loader.func if isinstance(plan.loader, functools.partial) else plan.loader
    code = {m: source_sha(m) for m in sorted({getattr(loader, "__module__", None), corrupt.__module__} - {None})}
    head = {"format": PROGRESS_FORMAT, "code": code, "loader": describe_callable(plan.loader),
            "shape": list(plan.image_shape), "compression": plan.compression,
            "corruption_seed": plan.corruption_seed, "chunk": CHUNK,
            "outputs": [[o.file, o.corruption and o.corruption.as_dict(), o.attrs] for o in job.outputs]}
    h.update(json.dumps(head, sort_keys=True).encode())
    for it in job.items:
        h.update(json.dumps([it.id, int(it.label), source_key(it.source)]).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- decoding

def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def load_item(loader, item: Item) -> np.ndarray:
    return item.source() if callable(item.source) else loader(item.source)


def check_image(image, shape) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape != tuple(shape):
        raise SkipItem(f"wrong dimensions: decoded {image.dtype} {list(image.shape)}, expected uint8 {list(shape)}")
    return image


def decode_chunk(loader, items: Sequence[Item], corruptions: Sequence[Corruption | None], seed: int,
                 shape) -> list:
    """In a worker: per item, the list of output images (one per corruption), or the reason it is skipped."""
    out = []
    for item in items:
        try:
            image = check_image(load_item(loader, item), shape)
        except SkipItem as e:
            out.append(one_line(e))
            continue
        except Exception as e:  # anything a decoder raises on a bad file is that file's problem, not the run's
            out.append(one_line(f"{type(e).__name__}: {e}"))
            continue
        out.append([image if c is None else corrupt(image[None], c.kind, c.severity, seed, [item.id])[0]
                    for c in corruptions])
    return out


def init_worker(parent_pid: int) -> None:
    """In each worker: leave Ctrl-C to the main process (it stops the pool cleanly) and, on Linux, die with the
    main process, so that a killed run leaves no orphan decoders."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Only a forked worker is the main process's child (forkserver/spawn workers are the server's).
    if sys.platform.startswith("linux") and os.getppid() == parent_pid:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent_pid:  # the main process died before prctl took effect
            os._exit(1)


class Decoder:
    """Decodes items in worker processes, in order, with a bounded number of chunks in flight."""

    def __init__(self, loader, shape, seed: int, workers: int):
        self.loader, self.shape, self.seed, self.workers = loader, tuple(shape), seed, workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            self.pool = self._new_pool()
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, initializer=init_worker, initargs=(os.getpid(),))

    def _restart(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()

    def _submit(self, chunk, corruptions) -> Future:
        try:
            return self.pool.submit(decode_chunk, self.loader, chunk, corruptions, self.seed, self.shape)
        except BrokenProcessPool as e:  # a worker died since the last result: handled when this chunk is due
            failed: Future = Future()
            failed.set_exception(e)
            return failed

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Item, object]]:
        """(item, output images or skip reason) for every item of ``jobs``, in order. Chunks of the next jobs
        are decoded while the current one is written, so the workers never wait for a job boundary."""
        tasks = [(job.items[i:i + CHUNK], [o.corruption for o in job.outputs])
                 for job in jobs for i in range(0, len(job.items), CHUNK)]
        if self.pool is None:
            for chunk, corruptions in tasks:
                yield from zip(chunk, decode_chunk(self.loader, chunk, corruptions, self.seed, self.shape))
            return
        todo = deque(tasks)
        pending: deque = deque()
        while todo or pending:
            while todo and len(pending) < 2 * self.workers:
                task = todo.popleft()
                pending.append((task, self._submit(*task)))
            (chunk, corruptions), future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:
                # A decoder killed its process (e.g. a C library crashing on a bad file): find the culprit one
                # item at a time, then send the chunks that were in flight again.
                self._restart()
                results = self._one_by_one(chunk, corruptions)
                todo.extendleft(reversed([task for task, _ in pending]))
                pending.clear()
            yield from zip(chunk, results)

    def _one_by_one(self, chunk, corruptions) -> list:
        results = []
        for item in chunk:
            try:
                results.extend(self._submit([item], corruptions).result())
            except BrokenProcessPool:
                self._restart()
                results.append("the decoder process died on this file (crash or out of memory)")
        return results


# ---------------------------------------------------------------------------------------------- progress bar

class _Counter:
    """Progress lines on stderr without tqdm or a terminal: one every 10 s and one at the end."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.n = total, desc, 0
        self.t0 = self.last = time.monotonic()

    def update(self, k: int = 1):
        self.n += k
        now = time.monotonic()
        if now - self.last >= 10:
            self.last = now
            self._print(now)

    def _print(self, now):
        rate = self.n / max(now - self.t0, 1e-9)
        print(f"{self.desc}: {self.n}/{self.total} images ({rate:.0f}/s)", file=sys.stderr, flush=True)

    def close(self):
        if self.total:
            self._print(time.monotonic())


def progress_bar(total: int, desc: str):
    """tqdm's bar on a terminal; otherwise (no tqdm, or a batch job's log file) a line every 10 s."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, desc)
    if not sys.stderr.isatty():
        return _Counter(total, desc)
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr)


# ---------------------------------------------------------------------------------------------- writing

def write_job(job: Job, decoded: Iterator, out_dir: Path, shape, compression, num_classes: int, bar) -> dict:
    """Write a job's shards from the next ``len(job.items)`` decoded items (temporary files renamed at the end);
    returns its progress entry."""
    labels, ids, skipped = [], [], []
    with ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(out_dir / o.file)) for o in job.outputs]
        files = [stack.enter_context(h5py.File(t, "w")) for t in tmps]  # closed before the renames (LIFO)
        images = [f.create_dataset("images", shape=(len(job.items), *shape), maxshape=(None, *shape),
                                   dtype=np.uint8, chunks=(1, *shape), compression=compression) for f in files]
        for item, result in itertools.islice(decoded, len(job.items)):
            bar.update(1)
            if isinstance(result, str):
                skipped.append((item.id, job.where, result))
                continue
            for dataset, image in zip(images, result):
                dataset[len(labels)] = image
            labels.append(int(item.label))
            ids.append(item.id)
        for f, dataset, output in zip(files, images, job.outputs):
            dataset.resize(len(labels), axis=0)
            f.create_dataset("labels", data=np.asarray(labels, dtype=np.int64))
            f.create_dataset("ids", data=np.asarray(ids, dtype=object), dtype=h5py.string_dtype())
            for k, v in output.attrs.items():
                f.attrs[k] = json.dumps(v)
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()
    return {"outputs": [{"file": o.file, "sha256": sha256_of(out_dir / o.file), "n": len(labels),
                         "class_counts": counts} for o in job.outputs],
            "skipped": [[i, r] for i, _, r in skipped]}


def reusable(entry: dict | None, fp: str, out_dir: Path) -> bool:
    if not entry or entry.get("fingerprint") != fp:
        return False
    return all((out_dir / o["file"]).is_file() and sha256_of(out_dir / o["file"]) == o["sha256"]
               for o in entry["outputs"])


def prepare_out_dir(out_dir: Path) -> dict:
    """Create ``out_dir`` or reopen one of ours; returns the progress entries found there."""
    if out_dir.exists() and not out_dir.is_dir():
        raise PipelineError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp-*"):  # left by a killed run (atomic_path removes them otherwise)
        if re.fullmatch(r"\..+\.tmp-\d+", stale.name):
            stale.unlink()
    progress_path = out_dir / PROGRESS
    if not progress_path.is_file():
        if any(out_dir.iterdir()):
            raise PipelineError(f"{out_dir}: not empty and holds no {PROGRESS}; choose a new or empty directory")
        return {}
    try:
        progress = json.loads(progress_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        print(f"warning: {progress_path} unreadable ({e}); redoing every shard", file=sys.stderr)
        return {}
    return progress.get("jobs", {}) if progress.get("format") == PROGRESS_FORMAT else {}


def stop_after() -> int | None:
    value = os.environ.get(STOP_AFTER_ENV)
    return int(value) if value else None


def write_shards(plan: Plan, out_dir: str | Path, workers: int = 1) -> Result:
    """Write (or complete) the shard directory of ``plan``; see the module docstring."""
    check_plan(plan)
    out_dir = Path(out_dir)
    done = prepare_out_dir(out_dir)
    jobs = make_jobs(plan)
    fingerprints = {job.key: fingerprint(plan, job) for job in jobs}
    keep = {job.key for job in jobs if reusable(done.get(job.key), fingerprints[job.key], out_dir)}
    progress = {k: done[k] for k in keep}
    todo = [job for job in jobs if job.key not in keep]
    if todo and (out_dir / MANIFEST).exists():
        (out_dir / MANIFEST).unlink()  # the directory must not look complete while shards change
    write_json(out_dir / PROGRESS, {"format": PROGRESS_FORMAT, "jobs": progress})  # marks the directory as ours

    limit = stop_after()
    bar = progress_bar(sum(len(j.items) for j in todo), f"{plan.dataset} -> {out_dir.name}")
    try:
        with ExitStack() as stack:
            decoder = stack.enter_context(Decoder(plan.loader, plan.image_shape, plan.corruption_seed, workers))
            decoded = stack.enter_context(closing(decoder.run(todo)))
            for count, job in enumerate(todo, 1):
                entry = write_job(job, decoded, out_dir, plan.image_shape, plan.compression,
                                  len(plan.class_names), bar)
                progress[job.key] = {"fingerprint": fingerprints[job.key], **entry}
                write_json(out_dir / PROGRESS, {"format": PROGRESS_FORMAT, "jobs": progress})
                if limit is not None and count >= limit:
                    raise StopRequested(f"stopped after {count} shard group(s) (${STOP_AFTER_ENV})")
    finally:
        bar.close()

    skipped = list(plan.skipped) + [(i, job.where, r) for job in jobs for i, r in progress[job.key]["skipped"]]
    write_skipped(out_dir / SKIPPED, skipped)
    write_split(out_dir, plan)
    manifest = build_manifest(plan, jobs, progress, len(skipped))
    write_manifest(out_dir, manifest)
    return Result(out_dir, manifest, skipped, [j.key for j in todo], sorted(keep))


def write_skipped(path: Path, rows) -> None:
    lines = [["id", "where", "reason"], *[[i, w, r] for i, w, r in rows]]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            csv.writer(f, lineterminator="\n").writerows(lines)


def write_split(out_dir: Path, plan: Plan) -> None:
    for name, items in zip(SPLIT_FILES, (plan.train, plan.test)):
        write_text(out_dir / name, "id,class\n" + "".join(f"{it.id},{int(it.label)}\n" for it in items))


def build_manifest(plan: Plan, jobs: list[Job], progress: dict, num_skipped: int) -> dict:
    clients = []
    for cid, job in enumerate(jobs[:-1]):
        out, = progress[job.key]["outputs"]
        corruption = job.outputs[0].corruption
        entry = {"file": out["file"], "n": out["n"], "corruption": corruption and corruption.as_dict(),
                 "class_counts": out["class_counts"], "sha256": out["sha256"]}
        if plan.client_names is not None:
            entry["name"] = plan.client_names[cid]
        clients.append(entry)
    test_job = jobs[-1]
    test_sets = [{"name": o.attrs["test_set"], "file": out["file"], "n": out["n"],
                  "corruption": o.corruption and o.corruption.as_dict(), "sha256": out["sha256"]}
                 for o, out in zip(test_job.outputs, progress[test_job.key]["outputs"])]
    return {"dataset": plan.dataset, "num_classes": len(plan.class_names), "class_names": list(plan.class_names),
            "image_shape": list(plan.image_shape), "clients": clients, "test_sets": test_sets,
            "skipped": {"file": SKIPPED, "count": num_skipped}, **plan.extra, "made_by": plan.made_by}


# ---------------------------------------------------------------------------------------------- reporting

def reason_kind(reason: str) -> str:
    """Group reasons for the summary: the text before the first ':' (file-specific details dropped)."""
    return reason.split(":", 1)[0]


def summary(result: Result) -> str:
    m = result.manifest
    n_train = sum(c["n"] for c in m["clients"])
    n_test = m["test_sets"][0]["n"] if m["test_sets"] else 0
    lines = [f"{result.out_dir}: {len(m['clients'])} clients with {n_train} images, test set {n_test} images "
             f"x {len(m['test_sets'])} ({', '.join(t['name'] for t in m['test_sets'])}); "
             f"{len(result.written)} shard group(s) written, {len(result.reused)} reused"]
    empty = [i for i, c in enumerate(m["clients"]) if c["n"] == 0]
    if empty:
        lines.append(f"warning: client(s) {empty} have no images (hpcfl.run refuses empty clients)")
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} item(s), listed in {result.out_dir / SKIPPED}:")
        for kind, n in Counter(reason_kind(r) for _, _, r in result.skipped).most_common():
            lines.append(f"  {n:>7}  {kind}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI helpers

def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def add_common_arguments(p: argparse.ArgumentParser, partitions: Sequence[str]) -> None:
    p.add_argument("out_dir", type=Path, help="shard directory to write (new, empty, or an interrupted one)")
    p.add_argument("--partition", choices=partitions, default=partitions[0],
                   help=f"client partition (default {partitions[0]})")
    p.add_argument("--official-dir", type=Path, help="folder with the official train.csv, test.csv and "
                   "dict_users_noniid_dir<alpha>_CorruptedNum<c>.npy (--partition official)")
    p.add_argument("--clients", type=int, default=20, help="clients N (dirichlet; default 20)")
    p.add_argument("--corrupted", type=int, default=4, help="corrupted clients c, the last c (default 4)")
    p.add_argument("--alpha", type=float, default=1.0, help="Dirichlet concentration (default 1.0)")
    p.add_argument("--seed", type=int, default=2024, help="seed of the train/test split and the partition "
                   "(default 2024, the reference's)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="stratified test share (default 0.2)")
    p.add_argument("--size", type=int, default=224, help="output side in pixels (default 224)")
    p.add_argument("--corruption", default="gaussian", help="corruption of the corrupted clients (default gaussian)")
    p.add_argument("--severity", type=int, default=3, help="their severity 1..5 (default 3)")
    p.add_argument("--test-severities", type=int, nargs="*", default=[1, 2, 3, 4, 5],
                   help="severities of the corrupted test copies (default 1 2 3 4 5)")
    p.add_argument("--test-kinds", nargs="*", default=None,
                   help="corruption kinds of the test copies (default: --corruption)")
    p.add_argument("--corruption-seed", type=int, default=0, help="seed of the corruption noise (default 0)")
    p.add_argument("--compression", choices=["none", "gzip", "lzf"], default="none",
                   help="HDF5 compression of the images (default none)")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="decoding processes (default: the usable cores)")
    p.add_argument("--limit", type=int, default=None,
                   help="use only the first N labelled images, by id (quick trials; not with official)")


def check_common_arguments(args) -> None:
    for name in ("clients", "workers", "size"):
        if getattr(args, name) < 1:
            raise PipelineError(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.corrupted < 0:
        raise PipelineError(f"--corrupted must be >= 0, got {args.corrupted}")
    if not 0 <= args.test_fraction < 1:
        raise PipelineError(f"--test-fraction must be in [0, 1), got {args.test_fraction}")
    if args.limit is not None and args.limit < 1:
        raise PipelineError(f"--limit must be >= 1, got {args.limit}")
    if args.partition == "official":
        if args.official_dir is None:
            raise PipelineError("--partition official needs --official-dir")
        if args.limit is not None:
            raise PipelineError("--limit cannot be used with --partition official (the partition indexes every "
                                "row of train.csv)")


def corruptions_from_args(args) -> tuple[Corruption, list[Corruption]]:
    kinds = args.test_kinds if args.test_kinds is not None else [args.corruption]
    return (Corruption(args.corruption, args.severity),
            [Corruption(k, s) for k in kinds for s in args.test_severities])


def stratified_split(strata: Sequence, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded split with ``round(test_fraction * n)`` test rows, shared among the strata in proportion to their
    size (largest remainder, so that small strata still add up); returns ascending (train, test) rows."""
    strata = np.asarray([str(s) for s in strata])
    names = sorted(set(strata.tolist()))
    rows = {s: np.flatnonzero(strata == s) for s in names}
    quota = {s: test_fraction * len(rows[s]) for s in names}
    take = {s: int(np.floor(quota[s])) for s in names}
    extra = round(test_fraction * len(strata)) - sum(take.values())
    for s in sorted(names, key=lambda s: -(quota[s] - take[s]))[:max(extra, 0)]:  # stable: ties by name
        take[s] += 1
    rng = np.random.RandomState(seed)
    train, test = [], []
    for s in names:
        shuffled = rng.permutation(rows[s])
        test.extend(shuffled[: take[s]].tolist())
        train.extend(shuffled[take[s]:].tolist())
    return np.array(sorted(train), dtype=np.int64), np.array(sorted(test), dtype=np.int64)


def sort_by_class(items: list[Item]) -> list[Item]:
    """Rows sorted by class then id, like the official CSVs (the partition draws per class in row order)."""
    return sorted(items, key=lambda it: (it.label, it.id))


def split_items(items: list[Item], args, strata: Sequence | None = None) -> tuple[list[Item], list[Item]]:
    """Stratified (by class, or by ``strata``) seeded train/test split; both sorted by class then id."""
    strata = [it.label for it in items] if strata is None else strata
    train_rows, test_rows = stratified_split(strata, args.test_fraction, args.seed)
    return sort_by_class([items[r] for r in train_rows]), sort_by_class([items[r] for r in test_rows])


def dirichlet_split(items: list[Item], args) -> tuple[list[Item], list[Item], list[np.ndarray]]:
    """``--partition dirichlet``: stratified 80/20 split, then the reference's partition of the train rows."""
    from hpcfl.data.partition import dirichlet_partition

    if args.corrupted >= args.clients:
        raise PipelineError(f"--corrupted {args.corrupted} must be below --clients {args.clients}")
    train, test = split_items(items, args)
    labels = np.array([it.label for it in train], dtype=np.int64)
    return train, test, dirichlet_partition(labels, args.clients, args.corrupted, args.alpha, args.seed)


def official_split(args, source_of: Callable[[str], object], num_classes: int):
    """``--partition official``: the official CSVs and ``dict_users`` file (``preprocess.ffl4mia``). Every row
    stays, even one without an image (the partition indexes rows): its loader reports it as skipped."""
    from preprocess.ffl4mia import load_official_split

    try:
        train_ids, train_labels, test_ids, test_labels, parts = load_official_split(
            args.official_dir, args.corrupted, args.alpha)
    except (OSError, ValueError) as e:
        raise PipelineError(str(e)) from None
    for name, labels in (("train.csv", train_labels), ("test.csv", test_labels)):
        if labels.size and labels.max() >= num_classes:
            raise PipelineError(f"{args.official_dir / name}: class {int(labels.max())} outside "
                                f"0..{num_classes - 1}")
    train = [Item(i, int(k), source_of(i)) for i, k in zip(train_ids, train_labels)]
    test = [Item(i, int(k), source_of(i)) for i, k in zip(test_ids, test_labels)]
    return train, test, parts


def match_files(eligible: dict[str, int], labelled: set[str], files: dict[str, Path], label_source: str,
                kind: str, skipped: list) -> list[str]:
    """Ids of the task (``eligible``) that have an image file, sorted. Images with no label row at all, and
    eligible labels without an image, are added to ``skipped``."""
    skipped += [(i, "labels", f"image without label: no row in {label_source}")
                for i in sorted(set(files) - labelled)]
    skipped += [(i, "labels", f"label without image: no {kind} file") for i in sorted(set(eligible) - set(files))]
    return sorted(set(eligible) & set(files))


def package_versions() -> dict:
    from importlib import metadata

    import hpcfl

    versions = {"python": sys.version.split()[0], "hpcfl": hpcfl.__version__}
    for name in ("numpy", "h5py", "pydicom", "Pillow"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def made_by(module: str, argv: Sequence[str], args) -> dict:
    arguments = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items())}
    return {"command": f"python -m {module} {shlex.join(argv)}".strip(), "arguments": arguments,
            "versions": package_versions()}


def run_cli(module: str, argv: Sequence[str] | None, parser: argparse.ArgumentParser,
            build_plan: Callable[[argparse.Namespace, dict], Plan]) -> int:
    """Parse, build the plan, write the shards, print the summary; a user error is one message, exit 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        check_common_arguments(args)
        plan = build_plan(args, made_by(module, argv, args))
        result = write_shards(plan, args.out_dir, workers=args.workers)
    except (PipelineError, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary(result))
    return 0
