"""ISIC 2019 dermoscopy JPEGs -> partitioned, quality-shifted HDF5 shards (reference §6.2).

``python -m preprocess.isic ISIC_DIR OUT_DIR [--partition dirichlet|centres|official] [--ham-metadata CSV]
[--size 224] [--clients 20 --corrupted 4 --alpha 1.0 --seed 2024] [--corruption gaussian --severity 3
--test-severities 1 2 3 4 5] [--workers N] [--limit N]``

Task (§6.2): 8 classes in the ground-truth column order, 0 MEL, 1 NV, 2 BCC, 3 AK, 4 BKL, 5 DF, 6 VASC, 7 SCC;
rows labelled UNK are outside the task. Inputs: ``ISIC_DIR/ISIC_2019_Training_GroundTruth.csv`` (one-hot),
``ISIC_DIR/ISIC_2019_Training_Metadata.csv`` (for ``--partition centres``) and the JPEGs in
``ISIC_DIR/ISIC_2019_Training_Input/`` (or ``ISIC_DIR`` itself). Each image is converted to RGB and resized
with PIL's bicubic filter to ``--size`` x ``--size`` (the aspect ratio is not kept, as a torchvision
``Resize((224, 224))``); shards hold uint8 [H, W, 3]. Corrupted copies are stored as uint8 arrays, i.e.
losslessly (the reference presumably re-saved them as JPEG, which smooths part of the noise).

``--partition centres`` makes one client per data centre, derived as FLamby's Fed-ISIC2019 does
(``dataset_creation_scripts/download_isic.py``): an image without ``lesion_id`` in the metadata has no known
centre and is left out; otherwise the ``lesion_id`` prefix names the source, ``BCN_`` -> BCN, ``MSK`` -> MSK,
``HAM_`` -> the HAM10000 ``dataset`` column of that image (vidir_molemax, vidir_modern, rosendahl, vienna_dias;
from ``--ham-metadata``, the HAM10000_metadata CSV). Clients in FLamby's centre order: 0 BCN,
1 HAM_vidir_molemax, 2 HAM_vidir_modern, 3 HAM_rosendahl, 4 MSK, 5 HAM_vienna_dias. Without
``--ham-metadata`` the HAM images form one centre: 0 BCN, 1 HAM, 2 MSK. The test set is a seeded 20 % of every
(centre, class) stratum; the corrupted clients are the last ``--corrupted`` centres.
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import sys
from pathlib import Path

import numpy as np

from preprocess.cli import (add_common_arguments, corruptions_from_args, dirichlet_split, match_files,
                            official_split, run_cli, split_items)
from preprocess.items import Item, PipelineError, Plan, SkipItem

CLASS_NAMES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
GT_COLUMNS = (*CLASS_NAMES, "UNK")
GROUND_TRUTH = "ISIC_2019_Training_GroundTruth.csv"
METADATA = "ISIC_2019_Training_Metadata.csv"
IMAGE_FOLDER = "ISIC_2019_Training_Input"
FLAMBY_CENTRES = ("BCN", "HAM_vidir_molemax", "HAM_vidir_modern", "HAM_rosendahl", "MSK", "HAM_vienna_dias")
COARSE_CENTRES = ("BCN", "HAM", "MSK")


# ---------------------------------------------------------------------------------------------- pixels

def load_jpeg(path: str, size: int = 224) -> np.ndarray:
    """One JPEG -> uint8 [size, size, 3]. Raises SkipItem for a missing, non-image or truncated file."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")  # decodes the whole file: a truncated one raises here
    except FileNotFoundError:
        raise SkipItem("label without image: no JPEG file") from None
    except UnidentifiedImageError:
        raise SkipItem("not an image file") from None
    except OSError as e:
        raise SkipItem(f"unreadable image: {e}") from None
    return np.asarray(rgb.resize((size, size), Image.Resampling.BICUBIC))


# ---------------------------------------------------------------------------------------------- CSVs

def read_rows(path: Path, required: tuple[str, ...]) -> list[dict]:
    if not path.is_file():
        raise PipelineError(f"{path}: not found")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    with io.StringIO(text, newline="") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise PipelineError(f"{path}: line 1: missing column(s) {', '.join(missing)}")
        return [row for row in reader if any(v for v in row.values())]


def read_ground_truth(path: Path):
    """Returns ({image: class} of the 8-class task, problems [(id, reason)], number of UNK images, set of every
    labelled image)."""
    labels, problems, unknown, labelled = {}, [], 0, set()
    for line, row in enumerate(read_rows(path, ("image", *GT_COLUMNS)), 2):
        image = row["image"].strip()
        if image in labelled:  # two rows for one image: trust neither
            problems.append((image, f"malformed label row: {path.name} line {line}: repeated image"))
            labels.pop(image, None)
            continue
        labelled.add(image)
        try:
            values = [float(row[c]) for c in GT_COLUMNS]
        except (TypeError, ValueError):
            problems.append((image, f"malformed label row: {path.name} line {line}: not numbers"))
            continue
        ones = [k for k, v in enumerate(values) if v == 1.0]
        if len(ones) != 1 or any(v not in (0.0, 1.0) for v in values):
            problems.append((image, f"malformed label row: {path.name} line {line}: not one-hot"))
        elif ones[0] == len(CLASS_NAMES):
            unknown += 1
        else:
            labels[image] = ones[0]
    return labels, problems, unknown, labelled


def read_ham_datasets(path: Path) -> dict[str, str]:
    """{image id: HAM10000 'dataset' (vidir_molemax, ...)} from the HAM10000_metadata CSV."""
    return {row["image_id"].strip(): row["dataset"].strip() for row in read_rows(path, ("image_id", "dataset"))}


def centre_of(lesion_id: str, image: str, ham: dict[str, str] | None) -> str:
    """FLamby's rule (module docstring); raises SkipItem when the centre is unknown."""
    lesion_id = (lesion_id or "").strip()
    if not lesion_id:
        raise SkipItem("no centre: no lesion_id in the metadata (FLamby leaves these out)")
    if lesion_id.startswith("BCN_"):
        return "BCN"
    if lesion_id.startswith("MSK"):
        return "MSK"
    if lesion_id.startswith("HAM_"):
        if ham is None:
            return "HAM"
        if image not in ham or f"HAM_{ham[image]}" not in FLAMBY_CENTRES:
            raise SkipItem(f"no centre: HAM image without a known dataset in the HAM10000 metadata "
                           f"({ham.get(image)!r})")
        return f"HAM_{ham[image]}"
    raise SkipItem(f"no centre: unknown lesion_id prefix {lesion_id!r}")


def centres(args, ids: list[str], skipped: list) -> tuple[list[str], list[str]]:
    """(centre of each id, or '' if unknown; the centre names in client order)."""
    meta = {row["image"].strip(): row["lesion_id"] for row in read_rows(args.isic_dir / METADATA,
                                                                        ("image", "lesion_id"))}
    ham = read_ham_datasets(args.ham_metadata) if args.ham_metadata is not None else None
    if ham is None:
        print("warning: no --ham-metadata: the HAM10000 images form one centre (3 centres, not FLamby's 6)",
              file=sys.stderr)
    names, out = (FLAMBY_CENTRES if ham is not None else COARSE_CENTRES), []
    for i in ids:
        try:
            out.append(centre_of(meta.get(i, ""), i, ham))
        except SkipItem as e:
            skipped.append((i, "centres", str(e)))
            out.append("")
    return out, list(names)


# ---------------------------------------------------------------------------------------------- plan

def find_images(root: Path) -> tuple[Path, dict[str, Path]]:
    folder = root / IMAGE_FOLDER if (root / IMAGE_FOLDER).is_dir() else root
    if not folder.is_dir():
        raise PipelineError(f"{folder}: no such folder")
    return folder, {e.name[:-4]: Path(e.path) for e in os.scandir(folder) if e.name.endswith(".jpg")}


def centre_split(items: list[Item], args, skipped: list):
    centre, names = centres(args, [it.id for it in items], skipped)
    known = [k for k, c in enumerate(centre) if c]
    items, centre = [items[k] for k in known], [centre[k] for k in known]
    if not 0 <= args.corrupted < len(names):
        raise PipelineError(f"--corrupted {args.corrupted}: there are {len(names)} centres")
    centre_by_id = dict(zip((it.id for it in items), centre))
    train, test = split_items(items, args, strata=[f"{c}/{it.label}" for c, it in zip(centre, items)])
    parts = [np.array([r for r, it in enumerate(train) if centre_by_id[it.id] == name], dtype=np.int64)
             for name in names]
    return train, test, parts, names


def build_plan(args, made_by: dict) -> Plan:
    folder, files = find_images(args.isic_dir)
    skipped: list = []
    names = None
    if args.partition == "official":
        train, test, parts = official_split(args, lambda i: str(folder / f"{i}.jpg"), len(CLASS_NAMES))
    else:
        labels, problems, unknown, labelled = read_ground_truth(args.isic_dir / GROUND_TRUTH)
        skipped += [(i, "labels", r) for i, r in problems]
        ids = match_files(labels, labelled, files, GROUND_TRUTH, "JPEG", skipped)
        print(f"{GROUND_TRUTH}: {len(labels)} images in the 8 classes ({len(ids)} with a JPEG file), "
              f"{unknown} UNK left out", file=sys.stderr)
        if args.limit is not None:
            ids = ids[: args.limit]
        items = [Item(i, labels[i], str(files[i])) for i in ids]
        if args.partition == "centres":
            train, test, parts, names = centre_split(items, args, skipped)
        else:
            train, test, parts = dirichlet_split(items, args)
    corruption, test_corruptions = corruptions_from_args(args)
    n = len(parts)
    return Plan(
        dataset="isic2019", class_names=list(CLASS_NAMES), image_shape=(args.size, args.size, 3),
        loader=functools.partial(load_jpeg, size=args.size), train=train, parts=parts,
        corrupted_clients=list(range(n - args.corrupted, n)), corruption=corruption, test=test,
        test_corruptions=test_corruptions, corruption_seed=args.corruption_seed, client_names=names,
        skipped=skipped, compression=None if args.compression == "none" else args.compression, made_by=made_by,
        extra={"preprocessing": {"size": args.size, "resize": "PIL bicubic", "storage": "uint8, lossless"},
               "partition": {"kind": args.partition, "alpha": args.alpha, "seed": args.seed}})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.isic", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("isic_dir", type=Path, help=f"folder with {GROUND_TRUTH}, {METADATA} and {IMAGE_FOLDER}/")
    add_common_arguments(p, partitions=["dirichlet", "centres", "official"])
    p.add_argument("--ham-metadata", type=Path, default=None,
                   help="HAM10000_metadata CSV (image_id, dataset columns): splits the HAM images into FLamby's "
                        "4 HAM centres (--partition centres)")
    return p


def main(argv=None) -> int:
    return run_cli("preprocess.isic", argv, parser(), build_plan)


if __name__ == "__main__":
    # Run the imported module's main: the loader sent to the workers is then preprocess.isic.load_*, not a
    # function of __main__ (which other start methods than fork cannot import, and which would change the
    # resume fingerprint).
    from preprocess.isic import main as module_main

    sys.exit(module_main())
