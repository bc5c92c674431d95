"""Model factory: a small CNN for CPU runs and torchvision backbones with a new classification head.

Pretrained weights come only from a local file (``model.pretrained_path``); nothing is ever downloaded.
"""

from __future__ import annotations

import math
from pathlib import Path

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


# name -> (torchvision builder, attribute path of the classification head)
_TORCHVISION = {
    "resnet18": ("resnet18", "fc"),
    "densenet121": ("densenet121", "classifier"),
    "efficientnet_b0": ("efficientnet_b0", "classifier.1"),
}


def input_channels(model_name: str, data_channels: int) -> int:
    """Channels the model takes: torchvision backbones take RGB (grayscale is replicated, as the reference does)."""
    return 3 if model_name in _TORCHVISION else data_channels


def build_model(name: str, num_classes: int, data_channels: int, width: int = 32,
                pretrained_path: str = "", cnn_norm: str = "group") -> nn.Module:
    if name == "cnn":
        if pretrained_path:
            raise ValueError("model.pretrained_path: the small CNN has no pretrained weights")
        return SmallCNN(data_channels, num_classes, width, cnn_norm)
    if name not in _TORCHVISION:
        raise ValueError(f"model.name: unknown model {name!r} (known: cnn, {', '.join(_TORCHVISION)})")
    import torchvision

    builder, head_path = _TORCHVISION[name]
    model = getattr(torchvision.models, builder)(weights=None)
    if pretrained_path:
        p = Path(pretrained_path)
        if not p.is_file():
            raise FileNotFoundError(f"model.pretrained_path: no such file {p}")
        state = torch.load(p, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or [k for k in missing if not k.startswith(head_path.split(".")[0])]:
            raise ValueError(f"model.pretrained_path: {p} does not match {name} "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    # New head for our classes (the pretrained head, if any, is replaced).
    parent = model
    *path, last = head_path.split(".")
    for attr in path:
        parent = getattr(parent, attr)
    old = getattr(parent, last)
    setattr(parent, last, nn.Linear(old.in_features, num_classes))
    return model
