"""Local training of one client: from the broadcast model to the client's model, on the client's own shard.

Reference §3.3/§5.0: a new optimizer every round (Adam, lr 3e-4, weight decay 5e-4 as coupled L2; or SGD),
logit-adjusted CE with the client's class prior, batch 32, shuffled, the last partial batch kept, 1 epoch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hpcfl.data.transforms import BatchTransform
from hpcfl.client.losses import log_prior, logit_adjusted_ce
from hpcfl.client.sam import sam_step


@dataclass
class ClientData:
    """One client's shard, held in memory once as uint8 (a few MB at 32-64 px)."""

    client_id: int
    images: torch.Tensor  # uint8 [n, H, W, C]
    labels: torch.Tensor  # int64 [n]
    class_counts: np.ndarray  # [num_classes]

    @property
    def n(self) -> int:
        return int(self.labels.shape[0])


def make_optimizer(params, train_cfg) -> torch.optim.Optimizer:
    """The base optimizer, with PyTorch's multi-tensor ("foreach") kernels, which it uses by default on GPUs only:
    on the CPU too they give the same numbers as the per-tensor loop, faster."""
    if train_cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=train_cfg.lr, betas=(0.9, 0.999), weight_decay=train_cfg.weight_decay,
                                foreach=True)
    return torch.optim.SGD(params, lr=train_cfg.lr, momentum=train_cfg.momentum,
                           weight_decay=train_cfg.weight_decay, foreach=True)


def batches(n: int, batch_size: int, generator: torch.Generator, device=None):
    """Shuffled index batches covering all n samples. A trailing batch of one sample is merged into the one
    before it: BatchNorm cannot normalise a single sample whose feature maps are 1x1 (ResNet-18 at 32 px).
    The permutation is drawn on the CPU (the client's stream) and, for data on a GPU, moved there once per epoch:
    a CPU index per batch would be one more host-to-device copy, and wait, per step."""
    perm = torch.randperm(n, generator=generator)
    if device is not None and torch.device(device).type != "cpu":
        perm = perm.to(device)
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return [perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def train_client(model: torch.nn.Module, data: ClientData, train_cfg, transform: BatchTransform,
                 generator: torch.Generator, local_optimizer: str = "plain", rho: float = 0.0) -> tuple[float, int]:
    """Train ``model`` in place on ``data``; returns (mean mini-batch loss, number of steps).

    ``local_optimizer``: "plain" (one pass per batch), "sam" or "gsam" (two passes, radius ``rho``; sam.py)."""
    device = transform.device
    model.train()
    opt = make_optimizer(model.parameters(), train_cfg)
    prior = log_prior(data.class_counts).to(device)

    autocast = torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=train_cfg.amp == "bf16")

    def loss_on(x, y):
        def loss_fn(m):
            with autocast:
                logits = m(x)
            logits = logits.float()  # the loss (and its softmax) in float32 under bf16 autocast too
            if train_cfg.logit_adjust:
                return logit_adjusted_ce(logits, y, prior, train_cfg.tau)
            return torch.nn.functional.cross_entropy(logits, y)
        return loss_fn

    losses = []
    for _ in range(train_cfg.local_epochs):
        for idx in batches(data.n, train_cfg.batch_size, generator, data.images.device):
            x = transform(data.images[idx], generator if train_cfg.augment else None)
            loss_fn = loss_on(x, data.labels[idx].to(device))
            if local_optimizer == "plain":
                loss = loss_fn(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            else:
                alpha = train_cfg.gsam_alpha if local_optimizer == "gsam" else None
                loss = sam_step(model, loss_fn, opt, rho, alpha)
            losses.append(loss.detach())
    if not losses:
        return float("nan"), 0
    return float(torch.stack(losses).mean()), len(losses)
