"""GPU benchmark (a few minutes on one GPU): hpcfl's local GSAM step against a bare PyTorch loop, and the time of
one ICH-sized FedISM round with 1 and with several client ranks sharing the GPU.

Command (on a machine with a CUDA GPU; ``--quick`` runs a tiny CPU version that only checks the plumbing)::

    python -m benchmarks.gpu [--ranks 2 5] [--steps 40] [--quick]

Part 1, one process. ResNet-18 (5 classes) on 224-px grayscale images held on the GPU as uint8, Adam, GSAM
(rho 0.05, alpha 0.1), at batch 32 in float32 and at batch 128 with bf16 autocast and channels_last:

  hpcfl     ``hpcfl.client.trainer.train_client`` on one client of ``steps x batch`` images with
            ``local_optimizer="gsam"``: batch cutting from the device shard, the uint8 -> normalised 3-channel
            transform, GSAM through ``hpcfl.client.sam``. Once without augmentation (the same work as the bare
            loop) and once with it (what FedISM runs);
  bare      the loop a researcher would write: inputs already normalised, 3-channel float on the GPU, the same
            GSAM update inlined (two forward/backward passes, perturb, decompose, restore, Adam step).

The ratio hpcfl / bare in images per second, without augmentation, has the goal >= 0.9. A plain (one-pass)
step is measured both ways too, for scale.

Part 2: ``hpcfl.run`` under ``mpiexec -n R`` for each R of ``--ranks`` (default 2 and 5: 1 and 4 client ranks on
the one GPU) on an ICH-sized built-in benchmark: 20 clients, 20,000 training and 2,000 test images of 224 px,
ResNet-18, FedISM, device cuda, 2 rounds; the time of round 2 (round 1 pays for the CUDA context and the allocator's warm-up; hpcfl.run keeps cuDNN
deterministic, without autotuning, while part 1 lets cuDNN pick its fastest kernels for both loops alike).
The benchmark's images are rendered once in parallel into ``data/`` (about 1 GB).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from statistics import median

import numpy as np
import torch
import torch.nn.functional as F

from benchmarks.runs import machine_line, round_periods, run_federation


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}, cuDNN " \
               f"{torch.backends.cudnn.version()}"
    return "device: cpu (--quick: plumbing check only, not a measurement)"


def bare_gsam_loop(model, x_all, y_all, batch, steps, amp, channels_last, rho=0.05, alpha=0.1, sam=True):
    """Images per second of a minimal GSAM (or plain, ``sam=False``) loop over pre-normalised inputs."""
    opt = torch.optim.Adam(model.parameters(), lr=3e-4, weight_decay=5e-4)
    device_type = x_all.device.type
    params = list(model.parameters())

    def loss_of(x, y):
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        return F.cross_entropy(logits.float(), y)

    def step(k):
        x, y = x_all[k * batch:(k + 1) * batch], y_all[k * batch:(k + 1) * batch]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        opt.zero_grad(set_to_none=True)
        loss_of(x, y).backward()
        if sam:
            g = [p.grad.clone() for p in params]
            g_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in g]))
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, t in zip(params, g):
                    p.add_(t * (rho / (g_norm + 1e-12)))
            opt.zero_grad(set_to_none=True)
            loss_of(x, y).backward()
            with torch.no_grad():
                gp = [p.grad for p in params]
                gp_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in gp]))
                cos = sum((a * b).sum() for a, b in zip(g, gp)) / (g_norm * gp_norm + 1e-12)
                for p, a, b, w in zip(params, g, gp, saved):
                    p.copy_(w)
                    p.grad = b - alpha * (a - cos * g_norm * b / (gp_norm + 1e-12))
        opt.step()

    sync = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    for k in range(3):
        step(k % steps)
    sync()
    t0 = time.perf_counter()
    for k in range(steps):
        step(k)
    sync()
    return steps * batch / (time.perf_counter() - t0)


def hpcfl_rate(model, images_u8, labels, batch, steps, amp, channels_last, augment, local_optimizer):
    from hpcfl.config import TrainConfig
    from hpcfl.data.transforms import BatchTransform
    from hpcfl.client.trainer import ClientData, train_client

    device = images_u8.device
    cfg = TrainConfig(lr=3e-4, batch_size=batch, augment=augment, amp="bf16" if amp else "off",
                      channels_last=channels_last, logit_adjust=True)
    counts = np.bincount(labels.cpu().numpy(), minlength=5)
    warm = ClientData(0, images_u8[:3 * batch], labels[:3 * batch], counts)
    data = ClientData(0, images_u8, labels, counts)
    transform = BatchTransform(3, device, channels_last)
    gen = torch.Generator().manual_seed(0)
    train_client(model, warm, cfg, transform, gen, local_optimizer, 0.05)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    _, done = train_client(model, data, cfg, transform, gen, local_optimizer, 0.05)
    sync()
    return done * batch / (time.perf_counter() - t0)


def part1(device, size, steps, settings):
    from hpcfl.data.transforms import BatchTransform
    from hpcfl.models import build_model
    from hpcfl.data.render import render_images

    rows = []
    for batch, amp, channels_last in settings:
        n = steps * batch
        pool = render_images(np.arange(min(n, 256)) % 5, size, 0)  # a pool of images, tiled: content is irrelevant
        images = torch.from_numpy(np.resize(pool, (n, size, size, 1))).to(device)
        labels = (torch.arange(n) % 5).to(device)
        x_all = BatchTransform(3, device)(images)  # the bare loop's inputs, normalised beforehand
        result = {}
        for name, fn in [
            ("bare gsam", lambda m: bare_gsam_loop(m, x_all, labels, batch, steps, amp, channels_last)),
            ("hpcfl gsam", lambda m: hpcfl_rate(m, images, labels, batch, steps, amp, channels_last, False, "gsam")),
            ("hpcfl gsam+aug", lambda m: hpcfl_rate(m, images, labels, batch, steps, amp, channels_last, True,
                                                    "gsam")),
            ("bare plain", lambda m: bare_gsam_loop(m, x_all, labels, batch, steps, amp, channels_last, sam=False)),
            ("hpcfl plain", lambda m: hpcfl_rate(m, images, labels, batch, steps, amp, channels_last, False,
                                                 "plain")),
        ]:
            torch.manual_seed(0)
            model = build_model("resnet18", 5, 1).to(device)
            if channels_last:
                model.to(memory_format=torch.channels_last)
            result[name] = fn(model)
        rows.append(((batch, amp, channels_last), result))
        del images, x_all
    return rows


def part2(ranks, quick):
    if quick:
        bench = dict(num_train=400, num_test=100, image_size=32)
        extra = ["run.device=cpu", "model.name=resnet18"]
    else:
        bench = dict(num_train=20000, num_test=2000, image_size=224)
        extra = ["run.device=cuda", "model.name=resnet18", "train.batch_size=32", "train.lr=0.0003"]
    from hpcfl.config import load
    from hpcfl.data.builtin import build, builtin_dir

    cfg = load(None, [f"benchmark.{k}={v}" for k, v in bench.items()])
    directory = builtin_dir(cfg.data.cache_dir, cfg.benchmark)
    if not (directory / "manifest.json").is_file():
        t0 = time.time()
        build(directory, cfg.benchmark, workers=os.cpu_count() or 1)
        print(f"built {directory} in {time.time() - t0:.0f} s", file=sys.stderr)
    times = {}
    for r in ranks:
        run = run_federation(r, ["algorithm.name=fedism", "run.rounds=2", "eval.every=1",
                                 *[f"benchmark.{k}={v}" for k, v in bench.items()], *extra], timeout_s=1500)
        times[r] = (median(round_periods(run["lines"])), max(run["lines"][-1]["rank_compute_s"]))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="+", default=[2, 5], help="world sizes of part 2 (default 2 5)")
    p.add_argument("--steps", type=int, default=40, help="measured steps per setting in part 1 (default 40)")
    p.add_argument("--quick", action="store_true", help="tiny CPU version: checks the script, measures nothing")
    p.add_argument("--skip-round", action="store_true", help="part 1 only")
    args = p.parse_args(argv)
    torch.set_num_threads(1 if args.quick else torch.get_num_threads())
    if args.quick:
        device, size, steps, settings = torch.device("cpu"), 32, 3, [(8, False, False), (8, True, True)]
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks.gpu needs a CUDA GPU (or --quick for a CPU plumbing check)")
        device, size, steps = torch.device("cuda"), 224, args.steps
        settings = [(32, False, False), (128, True, True)]
        torch.backends.cudnn.benchmark = True

    rows = part1(device, size, steps, settings)
    times = {} if args.skip_round else part2(args.ranks, args.quick)

    print(machine_line())
    print(device_line(device))
    print(f"\npart 1: ResNet-18, {size} px, {steps} measured steps, images/s")
    names = list(rows[0][1])
    print(f"{'batch, precision':<26}" + "".join(f"{n:>16}" for n in names) + f"{'gsam ratio':>12}")
    for (batch, amp, cl), result in rows:
        label = f"{batch}, {'bf16' if amp else 'fp32'}{' + channels_last' if cl else ''}"
        ratio = result["hpcfl gsam"] / result["bare gsam"]
        print(f"{label:<26}" + "".join(f"{result[n]:>16.0f}" for n in names)
              + f"{ratio:>11.3f} [{'ok' if ratio >= 0.9 else 'MISS'}]")
    print("goal: hpcfl gsam / bare gsam >= 0.9 (same work: no augmentation)")
    if times:
        print(f"\npart 2: one FedISM round, ICH-sized ({'tiny CPU stand-in' if args.quick else '20 clients, 20k images of 224 px, ResNet-18'})")
        print(f"{'ranks':<8}{'client ranks':>14}{'round s':>10}{'slowest rank compute s':>25}")
        for r, (wall, compute) in times.items():
            print(f"{r:<8}{r - 1:>14}{wall:>10.2f}{compute:>25.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
