"""RSNA Intracranial Hemorrhage DICOMs -> partitioned, quality-shifted HDF5 shards (reference §6.1).

``python -m preprocess.ich RSNA_DIR OUT_DIR [--partition dirichlet|official --official-dir DIR]
[--window dicom|brain|multi] [--size 224] [--clients 20 --corrupted 4 --alpha 1.0 --seed 2024]
[--corruption gaussian --severity 3 --test-severities 1 2 3 4 5] [--workers N] [--limit N]``

Task (§6.1): 5-class single-subtype classification. From the Kaggle label file (``ID_<image>_<subtype>,Label``
rows) only images with exactly one positive subtype are kept; class ids 0 epidural, 1 intraparenchymal,
2 intraventricular, 3 subarachnoid, 4 subdural. DICOMs are read from ``RSNA_DIR/stage_2_train/ID_*.dcm`` (or
``stage_1_train_images/``, or ``RSNA_DIR`` itself).

Pixels (:func:`load_dicom`): pydicom's ``apply_modality_lut`` (RescaleSlope/Intercept -> HU), then the window:

* ``dicom`` (the reference, the Kaggle notebook the authors point to): the image's own WindowCenter/WindowWidth
  (first value if several, cast to int like the notebook), clip to [c - w//2, c + w//2], then min-max of the
  clipped image to [0, 255]; an image without the window tags is skipped;
* ``brain`` (40/80) or ``multi`` (brain 40/80, subdural 80/200, bone 600/2800 as 3 channels): clip to
  [c - w/2, c + w/2] and map that range linearly to [0, 255] (a fixed window means the same HU -> same grey in
  every image).

Then MONOCHROME1 is inverted, values are truncated to uint8 (as the notebook's cast), and each channel is
resized with PIL's bicubic filter to ``--size`` x ``--size``. Shards hold uint8 [H, W, 1] (``multi``: 3).
"""

from __future__ import annotations

import argparse
import csv
import functools
import io
import os
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np

from preprocess.cli import (add_common_arguments, corruptions_from_args, dirichlet_split, match_files,
                            official_split, run_cli)
from preprocess.items import Item, PipelineError, Plan, SkipItem

CLASS_NAMES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
SUBTYPES = (*CLASS_NAMES, "any")
FIXED_WINDOWS = {"brain": ((40, 80),), "multi": ((40, 80), (80, 200), (600, 2800))}  # (center, width)
DICOM_FOLDERS = ("stage_2_train", "stage_2_train_images", "stage_1_train_images", "stage_1_train")
LABEL_FILES = ("stage_2_train.csv", "stage_1_train.csv")


# ---------------------------------------------------------------------------------------------- pixels

def read_pixels(path: str):
    """The dataset and its single-frame pixel array, or SkipItem saying why not."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom warns about many harmless oddities of real files
            ds = pydicom.dcmread(path)
    except FileNotFoundError:
        raise SkipItem("label without image: no DICOM file") from None
    except InvalidDicomError:
        raise SkipItem("not a DICOM file (no DICOM header)") from None
    except Exception as e:
        raise SkipItem(f"unreadable DICOM: {type(e).__name__}: {e}") from None
    if "PixelData" not in ds:
        raise SkipItem("no PixelData")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pixels = ds.pixel_array
    except Exception as e:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax)
        raise SkipItem(f"pixel data not decodable ({name}): {type(e).__name__}: {e}") from None
    if pixels.ndim != 2 or min(pixels.shape) < 1:
        raise SkipItem(f"wrong dimensions: not a single-frame grayscale image (pixel array {list(pixels.shape)})")
    return ds, pixels


def first_int(ds, keyword: str) -> int:
    """The tag's first value as int (the notebook's ``get_first_of_dicom_field_as_int``)."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise SkipItem(f"missing window tags: no {keyword} (needed by --window dicom)")
    if not isinstance(value, (str, bytes)) and hasattr(value, "__len__"):  # MultiValue
        if len(value) == 0:
            raise SkipItem(f"missing window tags: empty {keyword} (needed by --window dicom)")
        value = value[0]
    try:
        return int(float(value))
    except (TypeError, ValueError):
        raise SkipItem(f"bad window tags: {keyword} = {value!r}") from None


def dicom_window(hu: np.ndarray, ds) -> np.ndarray:
    """The reference: the image's own window, clipped, then min-max to [0, 255] (float)."""
    center, width = first_int(ds, "WindowCenter"), first_int(ds, "WindowWidth")
    if width < 1:
        raise SkipItem(f"bad window tags: WindowWidth = {width}")
    lo, hi = center - width // 2, center + width // 2
    clipped = np.clip(hu, lo, hi)
    mi, ma = clipped.min(), clipped.max()
    if ma == mi:  # a uniform image: the notebook would divide by zero; write black instead
        return np.zeros_like(clipped)
    return (clipped - mi) / (ma - mi) * 255


def fixed_window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    lo, hi = center - width / 2, center + width / 2
    return (np.clip(hu, lo, hi) - lo) / (hi - lo) * 255


def resize(channel_u8: np.ndarray, size: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(channel_u8).resize((size, size), Image.Resampling.BICUBIC))


def load_dicom(path: str, window: str = "dicom", size: int = 224) -> np.ndarray:
    """One DICOM -> uint8 [size, size, 1] (window 'multi': 3 channels). Raises SkipItem for unusable files."""
    try:
        from pydicom.pixels import apply_modality_lut
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import apply_modality_lut

    ds, pixels = read_pixels(path)
    hu = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float64)
    if window == "dicom":
        channels = [dicom_window(hu, ds)]
    else:
        channels = [fixed_window(hu, c, w) for c, w in FIXED_WINDOWS[window]]
    # truncation to uint8, as the notebook's cast; values are already within [0, 255]
    channels = [np.clip(c, 0, 255).astype(np.uint8) for c in channels]
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":  # low values are displayed bright
        channels = [255 - c for c in channels]
    return np.stack([resize(c, size) for c in channels], axis=-1)


# ---------------------------------------------------------------------------------------------- labels

def find_folder(root: Path) -> Path:
    for name in DICOM_FOLDERS:
        if (root / name).is_dir():
            return root / name
    return root


def find_dicoms(folder: Path) -> dict[str, Path]:
    """{image id: path} of the ``*.dcm`` files in ``folder``."""
    if not folder.is_dir():
        raise PipelineError(f"{folder}: no such folder")
    return {e.name[:-4]: Path(e.path) for e in os.scandir(folder) if e.name.endswith(".dcm")}


# Per image, the label rows seen so far packed in one int (the real file has 4.5 M rows for 750 k images):
# bit k = a row for SUBTYPES[k] was seen, bit 6 + k = it was 1, plus two flags.
_SEEN_ALL, _CONFLICT, _BAD = (1 << len(SUBTYPES)) - 1, 1 << 12, 1 << 13
_BIT = {s: 1 << k for k, s in enumerate(SUBTYPES)}


def _add_row(state: int, subtype: str, value: str) -> int:
    bit, positive = _BIT[subtype], value == "1"
    if state & bit and bool(state & (bit << 6)) != positive:
        return state | _CONFLICT  # stage_2_train.csv repeats some rows; repeats must agree
    return state | bit | ((bit << 6) if positive else 0)


def _classify(state: int) -> tuple[int | None, str | None]:
    """(class, None) for a single-subtype image, (None, reason) for a problem, (None, None) outside the task."""
    if state & _CONFLICT:
        return None, "conflicting repeated label rows"
    if state & _SEEN_ALL != _SEEN_ALL:
        missing = [s for s in SUBTYPES if not state & _BIT[s]]
        return None, f"incomplete labels: no row for {', '.join(missing)}"
    positive = [k for k in range(len(CLASS_NAMES)) if state & (1 << (6 + k))]
    if len(positive) == 1 and not state & (_BIT["any"] << 6):
        return None, "inconsistent labels: one subtype positive but 'any' is 0"
    return (positive[0], None) if len(positive) == 1 else (None, None)


def read_kaggle_labels(path: Path):
    """Parse the Kaggle label CSV. Returns ({image id: class} of single-subtype images, problems
    [(id, reason)], Counter of images outside the task, set of every labelled image id)."""
    seen: dict[str, int] = {}
    problems: list[tuple[str, str]] = []
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None
    with io.StringIO(text, newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or [h.strip() for h in header] != ["ID", "Label"]:
            raise PipelineError(f"{path}: line 1: expected header 'ID,Label', got {header!r}")
        for row in reader:
            if not row:
                continue
            image, _, subtype = row[0].strip().rpartition("_")
            if len(row) != 2 or not image or subtype not in _BIT:
                problems.append((row[0], f"malformed label row: {path.name} line {reader.line_num}: {row!r}"))
                continue
            value = row[1].strip()
            if value not in ("0", "1"):
                problems.append((image, f"malformed label row: {path.name} line {reader.line_num}: "
                                        f"label {value!r} is not 0 or 1"))
                seen[image] = seen.get(image, 0) | _BAD
                continue
            seen[image] = _add_row(seen.get(image, 0), subtype, value)
    single, outside = {}, Counter()
    for image, state in seen.items():
        if state & _BAD:
            continue
        label, problem = _classify(state)
        if problem:
            problems.append((image, problem))
        elif label is not None:
            single[image] = label
        else:
            several = sum(bool(state & (1 << (6 + k))) for k in range(len(CLASS_NAMES))) > 1
            outside["several subtypes" if several else "no hemorrhage"] += 1
    return single, problems, outside, set(seen)


def label_file(args) -> Path | None:
    if args.labels is not None:
        return args.labels
    return next((args.rsna_dir / n for n in LABEL_FILES if (args.rsna_dir / n).is_file()), None)


def dirichlet_items(args, files: dict[str, Path], skipped: list):
    path = label_file(args)
    if path is None:
        raise PipelineError(f"{args.rsna_dir}: no {' or '.join(LABEL_FILES)} (give --labels PATH)")
    single, problems, outside, labelled = read_kaggle_labels(path)
    skipped += [(i, "labels", r) for i, r in problems]
    ids = match_files(single, labelled, files, path.name, "DICOM", skipped)
    print(f"{path.name}: {len(single)} single-subtype images ({len(ids)} with a DICOM file); outside the task: "
          f"{outside['no hemorrhage']} without hemorrhage, {outside['several subtypes']} with several subtypes",
          file=sys.stderr)
    if args.limit is not None:
        ids = ids[: args.limit]
    return dirichlet_split([Item(i, single[i], str(files[i])) for i in ids], args)


def official_items(args, folder: Path):
    train, test, parts = official_split(args, lambda i: str(folder / f"{i}.dcm"), len(CLASS_NAMES))
    cross_check_official(args, train + test)
    return train, test, parts


def cross_check_official(args, items) -> None:
    """If the Kaggle label file is there, confirm the official class ids (§6.1's class order is inferred)."""
    path = label_file(args)
    if path is None:
        return
    single, _, _, _ = read_kaggle_labels(path)
    known = [it for it in items if it.id in single]
    wrong = [it.id for it in known if single[it.id] != it.label]
    print(f"{path.name}: {len(known)} of the {len(items)} official rows found, {len(wrong)} with another class"
          + (f" (first: {wrong[:3]})" if wrong else ""), file=sys.stderr)


def build_plan(args, made_by: dict) -> Plan:
    folder = find_folder(args.rsna_dir)
    skipped: list = []
    if args.partition == "official":
        train, test, parts = official_items(args, folder)
    else:
        train, test, parts = dirichlet_items(args, find_dicoms(folder), skipped)
    corruption, test_corruptions = corruptions_from_args(args)
    num_clients = len(parts)
    return Plan(
        dataset="rsna-ich", class_names=list(CLASS_NAMES),
        image_shape=(args.size, args.size, 3 if args.window == "multi" else 1),
        loader=functools.partial(load_dicom, window=args.window, size=args.size),
        train=train, parts=parts, corrupted_clients=list(range(num_clients - args.corrupted, num_clients)),
        corruption=corruption, test=test, test_corruptions=test_corruptions,
        corruption_seed=args.corruption_seed, skipped=skipped,
        compression=None if args.compression == "none" else args.compression, made_by=made_by,
        extra={"preprocessing": {"window": args.window, "size": args.size, "resize": "PIL bicubic",
                                 "scaling": "minmax" if args.window == "dicom" else "linear"},
               "partition": {"kind": args.partition, "alpha": args.alpha, "seed": args.seed}})


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m preprocess.ich", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rsna_dir", type=Path, help="the Kaggle RSNA folder (stage_2_train.csv, stage_2_train/)")
    add_common_arguments(p, partitions=["dirichlet", "official"])
    p.add_argument("--window", choices=["dicom", "brain", "multi"], default="dicom",
                   help="dicom: each image's own window, min-max (the reference); brain: 40/80; "
                        "multi: brain, subdural, bone as 3 channels (default dicom)")
    p.add_argument("--labels", type=Path, default=None,
                   help="the Kaggle label CSV (default RSNA_DIR/stage_2_train.csv or stage_1_train.csv)")
    return p


def main(argv=None) -> int:
    return run_cli("preprocess.ich", argv, parser(), build_plan)


if __name__ == "__main__":
    # Run the imported module's main: the loader sent to the workers is then preprocess.ich.load_*, not a
    # function of __main__ (which other start methods than fork cannot import, and which would change the
    # resume fingerprint).
    from preprocess.ich import main as module_main

    sys.exit(module_main())
