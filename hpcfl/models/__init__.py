"""Model factory: a small CNN and a narrow BatchNorm ResNet for CPU runs (``nets.py``), and torchvision backbones,
each with a new classification head.

Pretrained weights come only from a local file (``model.pretrained_path``; "builtin" is the built-in pretrained
start, hpcfl/pretrain.py); nothing is ever downloaded. This module imports torch only when a model is built, so
that the config (which lists the names) stays light.
"""

from __future__ import annotations

from pathlib import Path

# name -> (torchvision builder, attribute path of the classification head)
_TORCHVISION = {
    "resnet18": ("resnet18", "fc"),
    "densenet121": ("densenet121", "classifier"),
    "efficientnet_b0": ("efficientnet_b0", "classifier.1"),
}
# hpcfl's own models: name -> its head's attribute
_OWN = {"cnn": "head", "resnet8": "head"}
MODEL_NAMES = ("cnn", "resnet8", *_TORCHVISION)


def input_channels(model_name: str, data_channels: int) -> int:
    """Channels the model takes: torchvision backbones take RGB (grayscale is replicated, as the reference does)."""
    return 3 if model_name in _TORCHVISION else data_channels


def head_name(name: str) -> str:
    """The attribute path of a model's classification head (never taken from pretrained weights)."""
    return _OWN[name] if name in _OWN else _TORCHVISION[name][1]


def build_model(name: str, num_classes: int, data_channels: int, width: int = 32,
                pretrained_path: str = "", cnn_norm: str = "group"):
    """A model with a new classification head for ``num_classes``; its other weights from ``pretrained_path`` when
    given (a state_dict file: ImageNet weights for a torchvision backbone, or the built-in pretrained start of
    hpcfl/pretrain.py; the file's own head, if any, is left out)."""
    from torch import nn

    from hpcfl.models.nets import SmallCNN, SmallResNet

    if name == "cnn":
        model = SmallCNN(data_channels, num_classes, width, cnn_norm)
    elif name == "resnet8":
        model = SmallResNet(data_channels, num_classes, width)
    elif name in _TORCHVISION:
        import torchvision

        model = getattr(torchvision.models, _TORCHVISION[name][0])(weights=None)
        parent, (*path, last) = model, head_name(name).split(".")
        for attr in path:
            parent = getattr(parent, attr)
        setattr(parent, last, nn.Linear(getattr(parent, last).in_features, num_classes))
    else:
        raise ValueError(f"model.name: unknown model {name!r} (known: {', '.join(MODEL_NAMES)})")
    if pretrained_path:
        load_pretrained(model, Path(pretrained_path), name)
    return model


def load_pretrained(model, path: Path, name: str) -> None:
    """Every weight but the head's from ``path``; refuses a file made for another model."""
    import torch

    if not path.is_file():
        raise FileNotFoundError(f"model.pretrained_path: no such file {path}")
    head = head_name(name)
    state = {k: v for k, v in torch.load(path, map_location="cpu", weights_only=True).items()
             if not k.startswith(head + ".")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(head + ".")]
    if missing or unexpected:
        raise ValueError(f"model.pretrained_path: {path} does not match {name} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
