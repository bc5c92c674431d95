"""``python -m preprocess.corrupt [--images 200] [--size 32 224] [--seed 0]``: the pixel-level harm (mean absolute
change, PSNR) of every corruption kind and severity of ``hpcfl.data.corrupt`` on rendered benchmark images.

A sanity check of the severity tables; the calibration against a CNN is in docs/corruptions.md.
"""

from __future__ import annotations

import argparse

import numpy as np

from hpcfl.data.corrupt import KINDS, N_SEVERITIES, SEVERITIES, corrupt
from hpcfl.data.render import render_images


def harm_table(images: np.ndarray, seed: int = 0) -> list[tuple[str, int, object, float, float]]:
    """(kind, severity, parameter, mean |x' - x| in grey levels, PSNR in dB) for every kind and severity."""
    rows = []
    ids = np.arange(len(images))
    ref = images.astype(np.float64)
    for kind in KINDS:
        for s in range(1, N_SEVERITIES + 1):
            out = corrupt(images, kind, s, seed, ids).astype(np.float64)
            mae = float(np.abs(out - ref).mean())
            mse = float(((out - ref) ** 2).mean())
            psnr = float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)
            rows.append((kind, s, SEVERITIES[kind][s - 1], mae, psnr))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m preprocess.corrupt", description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=200, help="rendered benchmark images (default 200)")
    parser.add_argument("--size", type=int, nargs="+", default=[32, 224], help="image sides (default 32 224)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    labels = np.arange(args.images) % 5
    for size in args.size:
        images = render_images(labels, size, args.seed)
        print(f"{args.images} rendered images, {size}x{size} px, corruption seed {args.seed}")
        print(f"{'kind':<11} {'sev':>3} {'parameter':>9} {'mean|dx|':>9} {'PSNR dB':>8}")
        for kind, s, param, mae, psnr in harm_table(images, args.seed):
            print(f"{kind:<11} {s:>3} {param:>9} {mae:>9.2f} {psnr:>8.2f}")
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
