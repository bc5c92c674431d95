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

* Images are decoded by worker processes (``preprocess.decode``) in chunks of ``CHUNK`` items; at most
  ``2 * workers`` chunks are in flight and every shard is written image by image through
  ``hpcfl.data.shards.ShardWriter`` (a temporary file renamed on completion), so memory stays bounded whatever
  the data set size.
* An item whose image cannot be used (unreadable, no pixel data, undecodable, wrong shape, even a decoder that
  kills its process) is left out and listed in ``skipped.csv``; its id and label leave together, so no label
  ever shifts.
* The output depends only on the plan: chunking is fixed and results are written in item order, so any number
  of workers gives byte-identical shards.
* Resume: a shard group (one client, or the test set with its corrupted copies) whose fingerprint (items,
  their files' size and mtime, loader, corruption) and sha256 match ``progress.json`` is kept, the rest redone.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, closing
from pathlib import Path

import numpy as np

from hpcfl.atomic import atomic_path, check_room, write_json, write_text
from hpcfl.data.corrupt import corrupt
from hpcfl.data.shards import MANIFEST, Manifest, ShardEntry, ShardWriter, client_file, sha256_of, test_file
from preprocess.decode import Decoder
from preprocess.items import CHUNK, Corruption, Job, Output, PipelineError, Plan, Result, StopRequested

PROGRESS = "progress.json"
SKIPPED = "skipped.csv"
SPLIT_FILES = ("train.csv", "test.csv")
PROGRESS_FORMAT = 2  # bump when the shard bytes for the same plan change, to invalidate old progress files
STOP_AFTER_ENV = "HPCFL_PREPROCESS_STOP_AFTER"  # test hook: stop after that many shard groups (simulated kill)


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
    skipped = []
    image_bytes = len(job.items) * int(np.prod(shape))
    check_room(out_dir, image_bytes * len(job.outputs), image_bytes)
    with ExitStack() as stack:
        writers = [stack.enter_context(ShardWriter(out_dir / o.file, len(job.items), shape, o.attrs, compression))
                   for o in job.outputs]
        for item, result in itertools.islice(decoded, len(job.items)):
            bar.update(1)
            if isinstance(result, str):
                skipped.append((item.id, job.where, result))
                continue
            for writer, image in zip(writers, result):
                writer.append(image[None], [int(item.label)], [item.id])
    labels = np.asarray(writers[0].labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes).tolist()
    return {"outputs": [{"file": o.file, "sha256": w.sha256, "n": len(labels), "class_counts": counts}
                        for o, w in zip(job.outputs, writers)],
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
        progress = json.loads(progress_path.read_text(encoding="utf-8"))
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
    manifest.write(out_dir)
    return Result(out_dir, manifest, skipped, [j.key for j in todo], sorted(keep))


def write_skipped(path: Path, rows) -> None:
    lines = [["id", "where", "reason"], *[[i, w, r] for i, w, r in rows]]
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            csv.writer(f, lineterminator="\n").writerows(lines)


def write_split(out_dir: Path, plan: Plan) -> None:
    for name, items in zip(SPLIT_FILES, (plan.train, plan.test)):
        write_text(out_dir / name, "id,class\n" + "".join(f"{it.id},{int(it.label)}\n" for it in items))


def build_manifest(plan: Plan, jobs: list[Job], progress: dict, num_skipped: int) -> Manifest:
    clients = []
    for cid, job in enumerate(jobs[:-1]):
        out, = progress[job.key]["outputs"]
        corruption = job.outputs[0].corruption
        clients.append(ShardEntry(out["file"], out["n"], corruption and corruption.as_dict(), out["sha256"],
                                  out["class_counts"],
                                  name=plan.client_names[cid] if plan.client_names is not None else None))
    test_job = jobs[-1]
    test_sets = [ShardEntry(out["file"], out["n"], o.corruption and o.corruption.as_dict(), out["sha256"],
                            name=o.attrs["test_set"])
                 for o, out in zip(test_job.outputs, progress[test_job.key]["outputs"])]
    return Manifest(len(plan.class_names), list(plan.class_names), tuple(plan.image_shape), clients, test_sets,
                    dataset=plan.dataset, made_by=plan.made_by,
                    extra={"skipped": {"file": SKIPPED, "count": num_skipped}, **plan.extra})


# ---------------------------------------------------------------------------------------------- reporting

def reason_kind(reason: str) -> str:
    """Group reasons for the summary: the text before the first ':' (file-specific details dropped)."""
    return reason.split(":", 1)[0]


def summary(result: Result) -> str:
    m = result.manifest
    n_train = sum(c.n for c in m.clients)
    n_test = m.test_sets[0].n if m.test_sets else 0
    lines = [f"{result.out_dir}: {len(m.clients)} clients with {n_train} images, test set {n_test} images "
             f"x {len(m.test_sets)} ({', '.join(t.name for t in m.test_sets)}); "
             f"{len(result.written)} shard group(s) written, {len(result.reused)} reused"]
    empty = [i for i, c in enumerate(m.clients) if c.n == 0]
    if empty:
        lines.append(f"warning: client(s) {empty} have no images (hpcfl.run refuses empty clients)")
    if result.skipped:
        lines.append(f"skipped {len(result.skipped)} item(s), listed in {result.out_dir / SKIPPED}:")
        for kind, n in Counter(reason_kind(r) for _, _, r in result.skipped).most_common():
            lines.append(f"  {n:>7}  {kind}")
    return "\n".join(lines)


