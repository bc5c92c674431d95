"""What the real-data preprocessors' command lines share: the common arguments, the train/test split and the
client partition (the reference's Dirichlet one or the official files), and the run of a plan with a summary.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from hpcfl.errors import UsageError, describe_os_error, exit_now
from preprocess.items import Corruption, Item, PipelineError, Plan
from preprocess.pipeline import summary, write_shards


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
    except OSError as e:  # a full disk, a directory we may not write: finished shards are kept
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        exit_now(2)
    except KeyboardInterrupt:
        print("\ninterrupted: finished shards are kept; run the same command again to resume", file=sys.stderr)
        return 130
    print(summary(result))
    return 0
