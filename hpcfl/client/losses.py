"""Losses of local training."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# log-prior of a class the client does not have: the reference's log(0) = -inf, made finite so that nothing
# can become NaN; exp(-30) ~ 1e-13 keeps that class's probability at practically zero, as in the reference.
ABSENT_CLASS_LOG_PRIOR = -30.0


def log_prior(class_counts) -> torch.Tensor:
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    prior = counts / counts.sum()
    return torch.where(counts > 0, torch.log(prior.clamp_min(1e-300)),
                       torch.full_like(prior, ABSENT_CLASS_LOG_PRIOR)).float()


def logit_adjusted_ce(logits: torch.Tensor, target: torch.Tensor, log_prior: torch.Tensor,
                      tau: float = 1.0) -> torch.Tensor:
    """Logit-adjusted cross-entropy (Menon et al., ICLR'21): CE(softmax(z + tau·log pi)) with the local prior."""
    return F.cross_entropy(logits + tau * log_prior.to(logits.device), target)
