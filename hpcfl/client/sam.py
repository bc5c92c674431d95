"""Sharpness-aware local steps: SAM (Foret et al., ICLR'21) and GSAM (Zhuang et al., ICLR'22).

One step on a mini-batch, as FedISM's local trainer does it (reference §3.3, sam-notes §5.2):

1. forward + backward at w in train mode (BatchNorm running statistics updated once): g = ∇ℓ(w);
2. ε = ρ·g/(‖g‖₂ + 1e-12), ‖g‖₂ one global L2 norm over every parameter that has a gradient; w ← w + ε;
3. forward + backward at w + ε on the *same* batch with BatchNorm momentum 0 (its running statistics stay as
   after pass 1; it still normalises with the batch's statistics): g_p = ∇ℓ(w + ε);
4. SAM: d = g_p. GSAM: cos θ = ⟨g, g_p⟩/(‖g‖‖g_p‖ + 1e-12), g_⊥ = g − cos θ·‖g‖·g_p/(‖g_p‖ + 1e-12),
   d = g_p − α·g_⊥ (descend the perturbed loss, ascend the surrogate gap along g_⊥);
5. w is restored from an exact copy (the reference subtracts ε, which drifts by rounding), the base optimizer
   steps from w with gradient d, BatchNorm momentum is restored.

Weight decay stays inside the base optimizer, so ε ignores it (as in davda54/sam and the reference's GSAM).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

_EPS = 1e-12


def _batchnorms(model: nn.Module):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class FrozenBNStats:
    """Context: BatchNorm momentum 0, so a forward pass in train mode leaves the running statistics unchanged."""

    def __init__(self, model: nn.Module):
        self.layers = _batchnorms(model)

    def __enter__(self):
        self.saved = [m.momentum for m in self.layers]
        for m in self.layers:
            m.momentum = 0.0
        return self

    def __exit__(self, *exc):
        for m, mom in zip(self.layers, self.saved):
            m.momentum = mom


def global_grad_norm(params) -> torch.Tensor:
    """One L2 norm over the gradients of every parameter in ``params``."""
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))


@contextlib.contextmanager
def perturbed(params, directions, scale: float | torch.Tensor):
    """Within the block, w = w + scale·d for each parameter w and its direction d; on leaving, w is restored from
    an exact copy (subtracting the step again would drift by rounding). Serves local SAM/GSAM and the sharpness
    measurement alike; each computes its own scale ρ/‖g‖.

    ``scale`` may be a 0-d tensor: on a GPU it then stays there (reading it into Python would make the host wait
    for the first backward pass every step); on the CPU it is read, for PyTorch's fused add."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        if isinstance(scale, torch.Tensor) and scale.device.type != "cpu":
            torch._foreach_add_(params, torch._foreach_mul(directions, scale))
        else:
            for p, d in zip(params, directions):
                p.add_(d, alpha=float(scale))
    try:
        yield
    finally:
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)


def sam_step(model: nn.Module, loss_fn, optimizer: torch.optim.Optimizer, rho: float, alpha: float | None
             ) -> torch.Tensor:
    """One SAM (``alpha=None``) or GSAM (``alpha`` given) step; ``loss_fn(model)`` computes the mini-batch loss.

    Returns the loss at w (the value reported for the step)."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(model)
    loss.backward()
    params = [p for p in params if p.grad is not None]  # the same set in the norm, the perturbation and restore
    g = [p.grad.detach().clone() for p in params]
    g_norm = global_grad_norm(params)
    scale = rho / (g_norm + _EPS)
    with perturbed(params, g, scale):
        optimizer.zero_grad(set_to_none=True)
        with FrozenBNStats(model):
            loss_fn(model).backward()
    if alpha is not None:
        with torch.no_grad():
            gp_norm = global_grad_norm(params)
            inner = sum((gi * p.grad).sum() for gi, p in zip(g, params))
            cos = inner / (g_norm * gp_norm + _EPS)
            coef = cos * g_norm / (gp_norm + _EPS)
            for p, gi in zip(params, g):
                # d = g_p - alpha * (g - coef * g_p)
                p.grad.mul_(1 + alpha * coef).sub_(gi, alpha=alpha)
    optimizer.step()
    return loss.detach()
