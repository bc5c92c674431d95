"""Why the corrupted test set sat at chance: the centralised diagnostic behind docs/results.md ("How the benchmark
was tuned"). Not a speed benchmark: it prints accuracies.

Command::

    python -m benchmarks.norm_diagnostic [--size 32] [--severity 3] [--train 4000] [--epochs 20] [--noisy 0.2]
                                         [--batches shuffled|grouped] [--norm batch|group] [--width 32]

Renders the built-in benchmark's images (``hpcfl.data.render``), corrupts a ``--noisy`` share of the training
images with Gaussian noise of ``--severity``, and trains the small CNN centrally (Adam lr 3e-4, weight decay 5e-4,
batch 32, plain cross-entropy, no augmentation). ``--batches grouped`` makes every batch all-clean or all-noisy,
as a federated client's batches are. Prints balanced accuracy on the clean and the fully corrupted test set in
eval mode, and, for BatchNorm, again after re-estimating the running statistics on each test set.
"""

from __future__ import annotations

import argparse
import copy

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score

from hpcfl.data.transforms import BatchTransform
from hpcfl.models.nets import SmallCNN
from hpcfl.data.corrupt import corrupt
from hpcfl.data.render import render_images
from hpcfl.data.builtin import TEST_INDEX_OFFSET, sorted_labels

PRIOR = [0.022, 0.205, 0.13, 0.215, 0.428]


def bacc(model, x, y, reestimate: bool = False) -> float:
    model = copy.deepcopy(model)
    if reestimate:  # cumulative BatchNorm statistics over the whole set, then eval mode
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        model.train()
        with torch.no_grad():
            model(x)
    model.eval()
    with torch.no_grad():
        return balanced_accuracy_score(y, model(x).argmax(1).numpy())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.norm_diagnostic", description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--severity", type=int, default=3)
    p.add_argument("--train", type=int, default=4000)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--noisy", type=float, default=0.2, help="share of noisy training images")
    p.add_argument("--batches", choices=("shuffled", "grouped"), default="shuffled")
    p.add_argument("--norm", choices=("batch", "group"), default="batch")
    p.add_argument("--width", type=int, default=32)
    args = p.parse_args(argv)
    torch.set_num_threads(1)

    rng = np.random.default_rng(0)
    y_train, y_test = sorted_labels(args.train, PRIOR), sorted_labels(1000, PRIOR)
    x_train = render_images(y_train, args.size, 2024)
    x_test = render_images(y_test, args.size, 2024, start_index=TEST_INDEX_OFFSET)
    noisy = rng.permutation(args.train)[:int(args.noisy * args.train)]
    if len(noisy):
        x_train[noisy] = corrupt(x_train[noisy], "gaussian", args.severity, 1, noisy)
    x_test_noisy = corrupt(x_test, "gaussian", args.severity, 2, np.arange(len(y_test)))
    to_input = BatchTransform(1)
    xt, yt = to_input(torch.from_numpy(x_train)), torch.from_numpy(y_train)
    clean_in, noisy_in = to_input(torch.from_numpy(x_test)), to_input(torch.from_numpy(x_test_noisy))

    torch.manual_seed(0)
    model = SmallCNN(1, 5, args.width, args.norm)
    opt = torch.optim.Adam(model.parameters(), 3e-4, weight_decay=5e-4)
    is_noisy = np.zeros(args.train, bool)
    is_noisy[noisy] = True
    for _ in range(args.epochs):
        model.train()
        order = torch.randperm(args.train).numpy()
        if args.batches == "grouped":
            groups = [order[~is_noisy[order]], order[is_noisy[order]]]
            batches = [g[i:i + 32] for g in groups for i in range(0, len(g), 32)]
            batches = [batches[j] for j in np.random.default_rng(len(batches)).permutation(len(batches))]
        else:
            batches = [order[i:i + 32] for i in range(0, args.train, 32)]
        for b in batches:
            b = torch.as_tensor(b)
            opt.zero_grad()
            F.cross_entropy(model(xt[b]), yt[b]).backward()
            opt.step()

    print(f"{args.size} px, severity {args.severity}, {args.train} images ({args.noisy:.0%} noisy), {args.epochs} "
          f"epochs, {args.batches} batches, {args.norm} norm, width {args.width}")
    print(f"eval mode:            clean {bacc(model, clean_in, y_test):.3f}  noisy {bacc(model, noisy_in, y_test):.3f}")
    if args.norm == "batch":
        print(f"statistics re-estimated: clean {bacc(model, clean_in, y_test, True):.3f}  "
              f"noisy {bacc(model, noisy_in, y_test, True):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
