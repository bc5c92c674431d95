"""Ratio benchmark of local training: hpcfl's ``train_client`` against a bare PyTorch loop doing the same work.

Command::

    python -m benchmarks.step [--images 1024] [--size 32] [--batch 16] [--width 16] [--epochs 2] [--repeats 3]

The same work on both sides: the built-in benchmark's images (``--images`` rendered grayscale images of ``--size``
px, in memory as uint8), its small CNN (3 conv-GroupNorm-ReLU-maxpool blocks of ``--width``, 2x and 4x channels),
Adam (lr 2e-3, weight decay 5e-4), logit-adjusted cross-entropy with the client's prior, shuffled mini-batches of
``--batch``, one torch thread:

  (1) bare    what a user writes: the model from ``torch.nn`` layers (``nn.MaxPool2d``), ``torch.optim.Adam`` with
              its defaults, batches cut from the uint8 tensor, scaled and normalised; with augmentation, every
              image of a batch goes through torchvision's ``v2.RandomAffine(10, translate=(0.02, 0.02))`` and
              ``v2.RandomHorizontalFlip()`` (the reference's augmentation, per image as a Dataset applies it);
  (2) hpcfl   ``hpcfl.client.trainer.train_client`` on a ``ClientData``, with ``BatchTransform`` (the same affine and
              flip per image, drawn for the whole batch at once, ``hpcfl/data/transforms.py``), model and batches
              in channels_last as a run has them by default (``train.channels_last``).

Each repeat runs every variant once, in a rotating order; rates are medians over repeats, in images per second.
The ratio hpcfl / bare with augmentation is the goal of issue #14 (>= 0.95); without augmentation it shows the
training step alone.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import numpy as np
import torch
from torch import nn

from benchmarks.runs import machine_line

GOAL = 0.95


def bare_model(width: int, classes: int) -> nn.Module:
    layers, c = [], 1
    for k in range(3):
        w = width * 2 ** k
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(8, w), w), nn.ReLU(inplace=True),
                   nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, classes))


def bare_epochs(images: torch.Tensor, labels: torch.Tensor, args, augment: bool) -> float:
    """Seconds for ``--epochs`` epochs of the bare loop."""
    from torchvision.transforms import v2

    torch.manual_seed(0)
    model = bare_model(args.width, 5)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=5e-4)
    counts = torch.bincount(labels, minlength=5).double()
    log_prior = torch.log((counts / counts.sum()).clamp_min(1e-12)).float()
    aug = v2.Compose([v2.RandomAffine(10, translate=(0.02, 0.02)), v2.RandomHorizontalFlip()])
    mean, std = 0.3893, 0.2253  # ImageNet's, averaged for one channel (as hpcfl's BatchTransform)
    g = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        for idx in torch.randperm(len(labels), generator=g).split(args.batch):
            x = images[idx].permute(0, 3, 1, 2)  # uint8 [B, 1, H, W]
            if augment:
                x = torch.stack([aug(img) for img in x])
            x = (x.float() / 255 - mean) / std
            loss = nn.functional.cross_entropy(model(x) + log_prior, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - t0


def hpcfl_epochs(images: torch.Tensor, labels: torch.Tensor, args, augment: bool) -> float:
    from hpcfl.client.trainer import ClientData, train_client
    from hpcfl.config import TrainConfig
    from hpcfl.data.transforms import BatchTransform
    from hpcfl.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", 5, 1, args.width, "", "group")
    cfg = TrainConfig(lr=2e-3, batch_size=args.batch, local_epochs=args.epochs, augment=augment)
    if cfg.channels_last:  # as a run sets up its model and batches (federation.py), by default
        model.to(memory_format=torch.channels_last)
    data = ClientData(0, images, labels, np.bincount(labels.numpy(), minlength=5))
    t0 = time.perf_counter()
    train_client(model, data, cfg, BatchTransform(1, "cpu", cfg.channels_last), torch.Generator().manual_seed(0),
                 "plain")
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step", description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    for name in ("images", "size", "batch", "width", "epochs", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    torch.set_num_threads(1)
    from hpcfl.data.render import render_images

    labels = np.arange(args.images) % 5
    images = torch.from_numpy(render_images(labels, args.size, 0))
    labels = torch.from_numpy(labels.astype(np.int64))
    variants = [("bare", bare_epochs, True), ("hpcfl", hpcfl_epochs, True), ("bare", bare_epochs, False),
                ("hpcfl", hpcfl_epochs, False)]
    for name, fn, augment in variants:  # warm-up: first calls pay for lazy imports and allocator growth
        fn(images[:4 * args.batch], labels[:4 * args.batch], argparse.Namespace(**{**vars(args), "epochs": 1}), augment)
    rates: dict[tuple[str, bool], list[float]] = {(n, a): [] for n, _, a in variants}
    for r in range(args.repeats):
        for k in range(len(variants)):
            name, fn, augment = variants[(k + r) % len(variants)]
            rates[(name, augment)].append(args.images * args.epochs / fn(images, labels, args, augment))
    print(machine_line())
    print(f"setup: {args.images} images {args.size}x{args.size} px, batch {args.batch}, small CNN width {args.width}, "
          f"{args.epochs} epoch(s), {args.repeats} repeat(s), torch threads {torch.get_num_threads()}")
    median = {k: statistics.median(v) for k, v in rates.items()}
    for (name, augment), rate in median.items():
        print(f"{name} {'with' if augment else 'without'} augmentation  {rate:.1f} images/s")
    for augment in (True, False):
        ratio = median[("hpcfl", augment)] / median[("bare", augment)]
        goal = f"  (goal >= {GOAL})" if augment else ""
        print(f"ratio hpcfl/bare {'with' if augment else 'without'} augmentation: {ratio:.3f}{goal}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
