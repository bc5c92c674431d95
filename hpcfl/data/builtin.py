"""The built-in quality-shift benchmark: procedurally generated CT-like images, partitioned like the paper.

``hpcfl.run`` builds it on first use (``data.source = "builtin"``) under ``data.cache_dir``;
``python -m preprocess.synthetic OUT_DIR [--set benchmark.key=value ...] [--workers K]`` writes the same shards
anywhere.

Recipe (each step deterministic from ``benchmark.seed``):
1. class counts of the train and test sets from ``class_prior`` (largest remainder), rows sorted by class like
   the official CSVs;
2. images rendered by ``hpcfl.data.render`` (ICH-like lesions that differ by shape, place and texture);
3. the reference's partition (§6.4): each class split between the clean and the corrupted group in proportion
   to group size, then Dirichlet(alpha) over the clients of each group; the last ``num_corrupted`` clients are
   the corrupted ones;
4. the corrupted clients' images get ``corruption`` at ``severity`` (Gaussian noise, severity 3 = sigma 0.18);
5. a clean test set and one corrupted copy per ``test_severities``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from hpcfl.atomic import check_room
from hpcfl.data.shards import Manifest, ShardEntry, client_file, test_file, write_shard
from hpcfl.data.corrupt import corrupt
from hpcfl.data.partition import dirichlet_partition
from hpcfl.data.render import CLASS_NAMES, render_images

TEST_INDEX_OFFSET = 10_000_000  # test images use their own range of image indices in the render streams


def builtin_dir(cache_dir: str | Path, bench) -> Path:
    """The directory of the benchmark with these parameters (a hash of them names it)."""
    key = json.dumps(dataclasses.asdict(bench), sort_keys=True)
    return Path(cache_dir) / f"builtin-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def class_counts_from_prior(n: int, prior) -> np.ndarray:
    """Largest-remainder rounding of n * prior: exact total, deterministic."""
    p = np.asarray(prior, dtype=np.float64)
    raw = n * p / p.sum()
    counts = np.floor(raw).astype(np.int64)
    for k in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[k] += 1
    return counts


def sorted_labels(n: int, prior) -> np.ndarray:
    return np.repeat(np.arange(len(prior)), class_counts_from_prior(n, prior))


def render_parallel(labels: np.ndarray, size: int, seed: int, start_index: int = 0, workers: int = 1) -> np.ndarray:
    """``render_images`` over ``workers`` processes, in chunks; the same bytes (every image has its own stream)."""
    if workers <= 1 or len(labels) < 2 * workers:
        return render_images(labels, size, seed, start_index)
    from concurrent.futures import ProcessPoolExecutor

    bounds = np.linspace(0, len(labels), 4 * workers + 1).astype(int)
    with ProcessPoolExecutor(workers) as pool:
        chunks = pool.map(render_images, [labels[a:b] for a, b in zip(bounds, bounds[1:])],
                          [size] * (len(bounds) - 1), [seed] * (len(bounds) - 1),
                          [start_index + a for a in bounds[:-1]])
        return np.concatenate(list(chunks))


def build(out_dir: str | Path, bench, workers: int = 1) -> Path:
    """Write the benchmark's shards and manifest into ``out_dir`` (built in a temporary directory, then renamed,
    so an interrupted build never leaves a directory that looks complete). ``workers`` > 1 renders the images in
    that many processes (the result is the same)."""
    out_dir = Path(out_dir)
    num_classes = len(bench.class_prior)
    if num_classes > len(CLASS_NAMES):
        raise ValueError(f"benchmark.class_prior: the renderer draws at most {len(CLASS_NAMES)} classes")
    class_names = list(CLASS_NAMES[:num_classes])
    per_image = bench.image_size ** 2
    check_room(out_dir.parent, per_image * (bench.num_train + bench.num_test * (1 + len(bench.test_severities))),
               per_image * max(bench.num_test, bench.num_train))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        size = bench.image_size
        train_labels = sorted_labels(bench.num_train, bench.class_prior)
        test_labels = sorted_labels(bench.num_test, bench.class_prior)
        train_images = render_parallel(train_labels, size, bench.seed, workers=workers)
        test_images = render_parallel(test_labels, size, bench.seed, TEST_INDEX_OFFSET, workers)
        train_ids = [f"train_{j:06d}" for j in range(len(train_labels))]
        test_ids = [f"test_{j:06d}" for j in range(len(test_labels))]

        parts = dirichlet_partition(train_labels, bench.num_clients, bench.num_corrupted, bench.alpha, bench.seed)
        first_corrupted = bench.num_clients - bench.num_corrupted
        common = {"dataset": "builtin", "class_names": class_names}
        clients = []
        for cid, rows in enumerate(parts):
            images, ids = train_images[rows], [train_ids[r] for r in rows]
            corruption = None
            if cid >= first_corrupted:
                corruption = {"kind": bench.corruption, "severity": bench.severity}
                images = corrupt(images, bench.corruption, bench.severity, bench.seed, ids)
            sha = write_shard(tmp / client_file(cid), images, train_labels[rows], ids,
                              {**common, "client_id": cid, "corruption": corruption})
            clients.append(ShardEntry(client_file(cid), int(len(rows)), corruption, sha,
                                      np.bincount(train_labels[rows], minlength=num_classes).tolist()))

        test_sets = []
        variants = [("clean", None)] + [(f"{bench.corruption}_{s}", s) for s in bench.test_severities]
        for name, severity in variants:
            images = test_images if severity is None else corrupt(test_images, bench.corruption, severity,
                                                                   bench.seed, test_ids)
            corruption = None if severity is None else {"kind": bench.corruption, "severity": severity}
            sha = write_shard(tmp / test_file(name), images, test_labels, test_ids,
                              {**common, "test_set": name, "corruption": corruption})
            test_sets.append(ShardEntry(test_file(name), int(len(test_labels)), corruption, sha, name=name))

        Manifest(num_classes, class_names, (size, size, 1), clients, test_sets, dataset="builtin",
                 made_by={"command": "hpcfl.data.builtin.build", "arguments": dataclasses.asdict(bench),
                          "versions": {"numpy": np.__version__}}).write(tmp)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "manifest.json").is_file():
                raise
            shutil.rmtree(tmp)  # another job built the same benchmark first: keep its (identical) result
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
