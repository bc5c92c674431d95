"""Client-side statistics: the scalars an algorithm needs, measured by each client on its own shard.

Each statistic is a function of a :class:`StatsContext`, registered under its name with ``@statistic``; an
algorithm asks for statistics by name (``Algorithm.stats_before``).

All of them use the plain cross-entropy (no logit adjustment) in eval mode (BatchNorm with running statistics),
over the client's whole training shard, as the reference does on the server (§3.4, §5). With
``algorithm.stats_augment = true`` (the reference) every pass sees its own random augmentation of the images,
drawn from the client's ``stats`` stream; with ``false`` the images are used as they are.

| name              | value                                                                       | used by        |
|-------------------|-----------------------------------------------------------------------------|----------------|
| `loss`            | L_i(w^t), mean CE of the broadcast model                                     | qfedavg, afl, fedga |
| `sharpness`       | max(L_i(w^t + ε) − L_i(w^t), 1e-10), ε = ρ_t·g/(‖g‖ + 1e-12), g = ∇ Σ CE     | fedism(+)      |
| `bacc`            | balanced accuracy of w^t                                                     | fairfed        |
| `loss_prev_local` | L_i(w_i^{t−1}), the client's own previous local model                        | fedga          |
| `loo_bacc`        | balanced accuracy of w_{−i} = (w^t − c_i w_i^{t−1}) / (1 − c_i)              | fedce          |
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from hpcfl.flat import FlatLayout
from hpcfl.client.sam import global_grad_norm, perturbed
from hpcfl.client.trainer import ClientData

STATISTICS: dict[str, Callable[["StatsContext"], float]] = {}


def statistic(name: str):
    """Register a client statistic under ``name``."""
    def deco(fn):
        if name in STATISTICS:
            raise ValueError(f"client statistic {name!r} registered twice")
        STATISTICS[name] = fn
        return fn
    return deco


@dataclass
class StatsContext:
    """What a client has at hand to measure its statistics."""

    model: torch.nn.Module
    layout: FlatLayout
    data: ClientData
    transform: object
    global_vec: np.ndarray  # w^t
    generator: torch.Generator | None  # None: no augmentation
    batch_size: int
    rho: float = 0.0
    prev_local: np.ndarray | None = None  # w_i^{t-1}
    prev_weight: float | None = None  # c_i, the client's weight in the last aggregation

    def load(self, vec: np.ndarray) -> None:
        """Put the model at ``vec``."""
        self.layout.load_vector(self.model, vec)


def _batches(ctx: StatsContext):
    for a in range(0, ctx.data.n, ctx.batch_size):
        x = ctx.transform(ctx.data.images[a:a + ctx.batch_size], ctx.generator)
        yield x, ctx.data.labels[a:a + ctx.batch_size].to(x.device)


@torch.inference_mode()
def mean_loss(ctx: StatsContext) -> float:
    ctx.model.eval()
    total = sum(float(F.cross_entropy(ctx.model(x), y, reduction="sum")) for x, y in _batches(ctx))
    return total / ctx.data.n


@torch.inference_mode()
def balanced_accuracy(ctx: StatsContext) -> float:
    ctx.model.eval()
    preds, labels = [], []
    for x, y in _batches(ctx):
        preds.append(ctx.model(x).argmax(1).cpu())
        labels.append(y.cpu())
    from sklearn.metrics import balanced_accuracy_score  # here: only the ranks that measure it pay its import

    with warnings.catch_warnings():  # a client's shard often lacks a class the model predicts: sklearn warns
        warnings.simplefilter("ignore", UserWarning)
        return float(balanced_accuracy_score(torch.cat(labels).numpy(), torch.cat(preds).numpy()))


@statistic("loss")
def loss(ctx: StatsContext) -> float:
    ctx.load(ctx.global_vec)
    return mean_loss(ctx)


@statistic("bacc")
def bacc(ctx: StatsContext) -> float:
    ctx.load(ctx.global_vec)
    return balanced_accuracy(ctx)


@statistic("sharpness")
def sharpness(ctx: StatsContext) -> float:
    """S = L(w + ε) − L(w), clipped at 1e-10: three passes (loss, gradient, perturbed loss), as the reference."""
    ctx.load(ctx.global_vec)
    model = ctx.model
    loss = mean_loss(ctx)
    model.eval()
    model.zero_grad(set_to_none=True)
    for x, y in _batches(ctx):
        F.cross_entropy(model(x), y, reduction="sum").backward()
    params = [p for p in model.parameters() if p.grad is not None]
    scale = ctx.rho / (float(global_grad_norm(params)) + 1e-12)
    with perturbed(params, [p.grad for p in params], scale):
        model.zero_grad(set_to_none=True)
        loss_perturbed = mean_loss(ctx)
    return max(loss_perturbed - loss, 1e-10)


@statistic("loss_prev_local")
def loss_prev_local(ctx: StatsContext) -> float:
    ctx.load(ctx.prev_local)
    return mean_loss(ctx)


@statistic("loo_bacc")
def loo_bacc(ctx: StatsContext) -> float:
    c = float(ctx.prev_weight)
    if c < 1.0 - 1e-12:
        loo = (ctx.global_vec.astype(np.float64) - c * ctx.prev_local) / (1.0 - c)
    else:  # the only client with weight: there is no "rest of the federation" to measure
        loo = ctx.global_vec
    ctx.load(loo.astype(np.float32))
    return balanced_accuracy(ctx)


def measure(names: tuple[str, ...], ctx: StatsContext) -> list[float]:
    """The statistics ``names`` of one client, in that order. Leaves the model holding w^t."""
    unknown = [n for n in names if n not in STATISTICS]
    if unknown:
        raise ValueError(f"unknown client statistic(s) {unknown} (known: {', '.join(STATISTICS)})")
    out = [STATISTICS[name](ctx) for name in names]
    ctx.load(ctx.global_vec)
    return out
