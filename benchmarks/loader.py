"""Ratio benchmark of the training input pipeline: hpcfl's in-memory shard path vs a PNG-folder DataLoader.

Command::

    python -m benchmarks.loader [--images 512] [--size 224] [--batch 32] [--epochs 2] [--workers 0 2]
                                [--repeats 3] [--seed 0]

Both paths turn the same ``--images`` grayscale images (rendered by ``hpcfl.data.render``, ``--size`` px) into
augmented, normalised 3-channel float batches [B, 3, S, S] of ``--batch`` images, shuffled, for ``--epochs``
epochs, as a client's local training consumes them:

  (1) hpcfl       the images are written once to an HDF5 shard (``hpcfl.data.shards.write_shard``, uncompressed,
                  chunked by image, as ``preprocess.synthetic`` writes them). The client reads the shard into
                  memory once (``read_shard``, uint8), then every epoch draws ``hpcfl.client.trainer.batches`` and
                  applies ``hpcfl.data.transforms.BatchTransform(3)`` with augmentation (``random_affine_flip``)
                  from a ``torch.Generator``: what ``train_client`` does per epoch. One torch thread, as every
                  hpcfl rank uses. Reported without and with the one-time shard read (amortised over the epochs).
  (2) png W=w     a loader like the reference's: a ``torch.utils.data.Dataset`` that opens ``<id>.png`` with PIL,
                  converts it to RGB and applies torchvision ``Compose([RandomAffine(10, translate=(0.02, 0.02)),
                  RandomHorizontalFlip(), ToTensor(), Normalize(ImageNet mean/std)])``, through ``DataLoader(
                  batch_size, shuffle=True, num_workers=w)``, a new iterator (and new worker processes) per epoch
                  as the reference does. The reference uses 4 workers; ``--workers`` picks the counts measured.
                  The main process uses one torch thread as well; workers use one each (torch's default there).

The PNGs and the shard are written to a temporary directory just before the timing, so both are read from the
page cache. Each repeat runs every path once, in a rotating order, so that noise from other processes hits them
alike; the rates are medians over repeats, in images per second (images x epochs / seconds). The ratios are
hpcfl (with the read) / png for every W; the goal is >= 5x.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.runs import cpu_model

GOAL = 5.0


def machine_line() -> str:
    import h5py
    import PIL
    import torchvision

    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    return (f"machine: {platform.node()} | {cpu_model()} | {os.cpu_count()} logical CPUs | load average {load}\n"
            f"software: Python {platform.python_version()}, torch {torch.__version__}, torchvision "
            f"{torchvision.__version__}, Pillow {PIL.__version__}, h5py {h5py.__version__}, numpy {np.__version__}")


def make_images(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from hpcfl.data.render import CLASS_NAMES, render_images

    labels = np.arange(n) % len(CLASS_NAMES)
    return render_images(labels, size, seed), labels.astype(np.int64)


def write_inputs(directory: Path, images: np.ndarray, labels: np.ndarray) -> tuple[Path, Path, list[str]]:
    """The shard (one client's file) and the PNG folder (8-bit single-channel PNGs, as the reference's ICH)."""
    from PIL import Image

    from hpcfl.data.shards import write_shard

    ids = [f"img_{j:06d}" for j in range(len(images))]
    shard = directory / "client_000.h5"
    write_shard(shard, images, labels, ids, {"dataset": "benchmark"})
    png_dir = directory / "png"
    png_dir.mkdir()
    for image, image_id in zip(images, ids):
        Image.fromarray(np.ascontiguousarray(image[:, :, 0])).save(png_dir / f"{image_id}.png")
    return shard, png_dir, ids


def run_hpcfl(shard: Path, batch: int, epochs: int, seed: int) -> tuple[float, float, int]:
    """(seconds to read the shard, seconds for the epochs, images delivered)."""
    from hpcfl.data.shards import read_shard
    from hpcfl.data.transforms import BatchTransform
    from hpcfl.client.trainer import batches

    t0 = time.perf_counter()
    s = read_shard(shard)
    images, labels = torch.from_numpy(s.images), torch.from_numpy(s.labels)
    t_read = time.perf_counter() - t0

    transform = BatchTransform(3)
    generator = torch.Generator().manual_seed(seed)
    delivered = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for idx in batches(len(labels), batch, generator):
            x = transform(images[idx], generator)
            y = labels[idx]
            delivered += x.shape[0]
            assert x.shape[1] == 3 and y.shape[0] == x.shape[0]
    return t_read, time.perf_counter() - t0, delivered


class PngFolder(torch.utils.data.Dataset):
    """The reference's loader: ``<id>.png`` opened with PIL, converted to RGB, then the torchvision transform."""

    def __init__(self, root: Path, ids: list[str], labels: np.ndarray, transform):
        self.root, self.ids, self.labels, self.transform = root, ids, labels, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.root / f"{self.ids[i]}.png") as im:
            image = im.convert("RGB")
        return self.transform(image), int(self.labels[i])


def reference_transform():
    from torchvision import transforms

    from hpcfl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    return transforms.Compose([
        transforms.RandomAffine(degrees=10, translate=(0.02, 0.02)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def run_png(png_dir: Path, ids: list[str], labels: np.ndarray, batch: int, epochs: int, workers: int,
            seed: int) -> tuple[float, int]:
    """(seconds for the epochs, images delivered); a new DataLoader iterator (new workers) every epoch."""
    dataset = PngFolder(png_dir, ids, labels, reference_transform())
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed))
    delivered = 0
    t0 = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            delivered += x.shape[0]
            assert x.shape[1] == 3 and y.shape[0] == x.shape[0]
    return time.perf_counter() - t0, delivered


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.loader",
                                     description="hpcfl's shard input path vs a PNG-folder DataLoader")
    parser.add_argument("--images", type=int, default=512, help="images (default 512)")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels (default 224, >= 16)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs per measurement (default 2)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader worker counts of the PNG loader (default 0 2; the reference uses 4)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats, median reported (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("images", "batch", "epochs", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.size < 16:
        parser.error("--size must be >= 16")
    if any(w < 0 for w in args.workers):
        parser.error("--workers must be >= 0")

    torch.set_num_threads(1)  # hpcfl: one thread per rank; the PNG loader's main process gets the same
    print(machine_line())
    print(f"setup: {args.images} grayscale images {args.size}x{args.size} px, batch {args.batch}, "
          f"{args.epochs} epochs, {args.repeats} repeats (median), torch threads {torch.get_num_threads()} "
          f"(hpcfl path and the PNG loader's main process); PNG DataLoader workers {args.workers} "
          f"(the reference uses 4; this machine has {os.cpu_count()} logical CPUs)", flush=True)

    t0 = time.perf_counter()
    images, labels = make_images(args.images, args.size, args.seed)
    methods = ["hpcfl"] + [f"png_w{w}" for w in args.workers]
    times: dict[str, list[float]] = {m: [] for m in methods + ["hpcfl_read"]}
    expected = args.images * args.epochs
    with tempfile.TemporaryDirectory(prefix="hpcfl-loader-") as tmp:
        shard, png_dir, ids = write_inputs(Path(tmp), images, labels)
        shard_mb = shard.stat().st_size / 2 ** 20
        png_mb = sum(p.stat().st_size for p in png_dir.iterdir()) / 2 ** 20
        print(f"inputs: shard {shard_mb:.1f} MiB (uncompressed uint8), PNG folder {png_mb:.1f} MiB; "
              f"generated and written in {time.perf_counter() - t0:.1f} s", flush=True)
        for r in range(args.repeats):
            order = methods[r % len(methods):] + methods[:r % len(methods)]
            for m in order:
                if m == "hpcfl":
                    t_read, t_epochs, n = run_hpcfl(shard, args.batch, args.epochs, args.seed + r)
                    times["hpcfl_read"].append(t_read)
                else:
                    t_epochs, n = run_png(png_dir, ids, labels, args.batch, args.epochs, int(m[5:]), args.seed + r)
                if n != expected:
                    raise RuntimeError(f"{m} delivered {n} images, expected {expected}")
                times[m].append(t_epochs)

    def rate(seconds: float) -> float:
        return expected / seconds

    t_read = statistics.median(times["hpcfl_read"])
    t_hpcfl = statistics.median(times["hpcfl"])
    rates = {"hpcfl (epochs only)": rate(t_hpcfl), "hpcfl (incl. shard read)": rate(t_hpcfl + t_read)}
    for w in args.workers:
        rates[f"png DataLoader W={w}"] = rate(statistics.median(times[f"png_w{w}"]))

    print()
    print(f"{'path':<28} {'samples/s':>10}")
    for name, value in rates.items():
        print(f"{name:<28} {value:>10.1f}")
    print(f"(hpcfl one-time shard read: {1000 * t_read:.1f} ms, amortised over {args.epochs} epochs)")
    print()
    print(f"ratios hpcfl / png (goal >= {GOAL:g}x):")
    with_read = rates["hpcfl (incl. shard read)"]
    without = rates["hpcfl (epochs only)"]
    for w in args.workers:
        png = rates[f"png DataLoader W={w}"]
        verdict = "PASS" if with_read / png >= GOAL else "MISS"
        print(f"  ratio hpcfl/png W={w}: {with_read / png:.2f}x incl. shard read, {without / png:.2f}x epochs only"
              f"  [{verdict}]")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
