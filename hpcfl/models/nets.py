"""hpcfl's own networks for CPU runs: a small CNN and a narrow BatchNorm ResNet (``hpcfl.models`` builds them)."""

from __future__ import annotations

import math

import torch
from torch import nn


def _norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":  # 8 groups where the channels allow it; no running statistics to go stale
        return nn.GroupNorm(math.gcd(8, channels), channels)
    raise ValueError(f"model.cnn_norm: unknown normalisation {kind!r} (known: group, batch)")


class MaxPool2x2(nn.Module):
    """``nn.MaxPool2d(2)``, computed in channels_last: the same values and the same gradients, in about half the
    time on the CPU (PyTorch's max pooling of contiguous NCHW tensors is its slowest kernel in this model: a third
    of a training step at 32 px). The output comes back in the input's memory format."""

    def forward(self, x):
        if x.is_contiguous(memory_format=torch.channels_last):
            return nn.functional.max_pool2d(x, 2)
        return nn.functional.max_pool2d(x.contiguous(memory_format=torch.channels_last), 2).contiguous()


class SmallCNN(nn.Module):
    """Three conv-norm-ReLU-pool blocks (width, 2·width, 4·width channels), global average pool, linear head.

    ``norm="group"`` (the default) uses GroupNorm. With BatchNorm, clients whose images are all corrupted
    normalise their batches with their own statistics in training, while the global model's averaged running
    statistics serve every input at test time; on the built-in benchmark that mismatch alone put the corrupted
    test set at chance (docs/results.md).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, norm: str = "group"):
        super().__init__()
        layers, c = [], in_channels
        for k in range(3):
            w = width * 2 ** k
            layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), _norm_layer(norm, w), nn.ReLU(inplace=True),
                       MaxPool2x2()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.features(x), 1), 1))


class SmallResNet(nn.Module):
    """A narrow BatchNorm ResNet for CPU runs at 32-64 px, in the image of the paper's ResNet-18: a 3x3 stem, three
    stages of torchvision's ``BasicBlock`` (width, 2·width, 4·width channels; each later stage halves the
    resolution), global average pooling, a linear head. ``blocks`` per stage: (1, 1, 1) is a ResNet-8 (78k
    parameters at width 16)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, blocks=(1, 1, 1)):
        super().__init__()
        from torchvision.models.resnet import BasicBlock, conv1x1

        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages, c = [], width
        for k, n in enumerate(blocks):
            out, stride = width * 2 ** k, 1 if k == 0 else 2
            down = None if stride == 1 and c == out else nn.Sequential(conv1x1(c, out, stride), nn.BatchNorm2d(out))
            layers = [BasicBlock(c, out, stride, down)] + [BasicBlock(out, out) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            c = out
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(self.stages(self.stem(x)), 1), 1))
