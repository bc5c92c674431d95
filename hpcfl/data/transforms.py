"""Batch transforms on tensors: uint8 NHWC images -> normalised float NCHW, with the reference's augmentation.

Augmentation (reference §6.7): RandomAffine(degrees ±10, translate up to 2 % in x and y, no scale or shear,
nearest interpolation, fill 0) then RandomHorizontalFlip(p = 0.5), applied before normalisation, as
torchvision does it on PIL images. Here it is done for a whole batch at once with one sampling grid and
``grid_sample``, drawing every random number from the caller's ``torch.Generator`` so that a client's stream
does not depend on the rank layout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Grayscale models (the small CNN on 1-channel data) use the mean of ImageNet's statistics.
GRAY_MEAN, GRAY_STD = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)


def affine_grid(theta: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """``F.affine_grid(theta, [B, C, h, w], align_corners=False)`` by broadcasting over rows and columns.

    affine_grid multiplies a [B, h·w, 3] base grid by theta; this computes the two coordinates as outer sums,
    about 4× faster on one CPU thread at 224 px (benchmarks/loader.py). The values agree to a few ulp.
    """
    b = theta.shape[0]
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1  # pixel centres in [-1, 1]
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    grid = torch.empty(b, h, w, 2, device=theta.device, dtype=theta.dtype)
    for k in range(2):
        rows = theta[:, k, 1, None, None] * ys[:, None] + theta[:, k, 2, None, None]  # [B, h, 1]
        torch.add(theta[:, k, 0, None, None] * xs, rows, out=grid[..., k])
    return grid


def random_affine_flip(x: torch.Tensor, generator: torch.Generator, degrees: float = 10.0,
                       translate: float = 0.02, flip_p: float = 0.5) -> torch.Tensor:
    """x: float [B, C, H, W] (any range: the fill is 0). Rotation, integer-pixel translation and horizontal flip per sample."""
    b, _, h, w = x.shape
    u = torch.rand(b, 4, generator=generator)
    angle = (u[:, 0] * 2 - 1) * math.radians(degrees)
    # torchvision draws the shift in pixels uniformly in [-t·W, t·W] and rounds it to an integer.
    tx = torch.round((u[:, 1] * 2 - 1) * translate * w)
    ty = torch.round((u[:, 2] * 2 - 1) * translate * h)
    flip = (u[:, 3] < flip_p).to(x.dtype) * -2 + 1  # -1 flips, +1 keeps
    cos, sin = torch.cos(angle), torch.sin(angle)
    # affine_grid maps output to input coordinates in [-1, 1]: the inverse of the forward transform.
    # Flip after the affine map: input x-coordinate sign is flipped on the output side.
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = cos * flip
    theta[:, 0, 1] = -sin * (h / w)
    theta[:, 1, 0] = sin * (w / h) * flip
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = -(cos * tx - sin * ty) * 2 / w  # inverse translation, in normalised units
    theta[:, 1, 2] = -(sin * tx + cos * ty) * 2 / h
    grid = affine_grid(theta.to(x.device), h, w)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)


class BatchTransform:
    """uint8 [B, H, W, C] -> normalised float [B, C', H, W] on ``device`` (C' = the model's input channels)."""

    def __init__(self, model_channels: int, device: torch.device | str = "cpu", channels_last: bool = False):
        self.channels = model_channels
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if model_channels == 3 else (GRAY_MEAN, GRAY_STD)
        if model_channels not in (1, 3):
            raise ValueError(f"models with {model_channels} input channels are not supported")
        # (x / 255 - mean) / std as one multiply-add on the 0..255 values
        self.scale = (1.0 / (255.0 * torch.tensor(std, dtype=torch.float64))).float().to(device).view(1, -1, 1, 1)
        self.shift = (-torch.tensor(mean, dtype=torch.float64) / torch.tensor(std, dtype=torch.float64)).float() \
            .to(device).view(1, -1, 1, 1)
        self.device = device
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __call__(self, images_u8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = images_u8.to(self.device).permute(0, 3, 1, 2).float()  # 0..255; the zero fill of the affine is black
        if generator is not None:
            x = random_affine_flip(x, generator)
        if x.shape[1] != self.channels:
            if x.shape[1] != 1:
                raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {self.channels}-channel model")
            x = x.expand(-1, self.channels, -1, -1)
        # one pass writes the (expanded) output, in the memory format asked for: with one channel both formats are
        # "contiguous", and the strides the input happened to have would decide how the model computes
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=self.memory_format)
        return torch.addcmul(self.shift, x, self.scale, out=out)
