"""The built-in pretrained start (``model.pretrained_path = "builtin"``): a stand-in for ImageNet pre-training.

The paper fine-tunes an ImageNet-pretrained ResNet-18; ImageNet weights cannot be downloaded here, and a model
trained from scratch for a few rounds is in another regime (docs/results.md). So the built-in start is a model
trained centrally, once, on a pool of clean rendered images that no client and no test set holds (their own seed
and their own range of image indices), with every class equally frequent, then saved as a state_dict. A run
loads it like a user's ``model.pretrained_path``: every weight but the classification head, which starts anew.

It is cached beside the built-in data, under a key of everything that decides it (the model, the image shape,
the ``[pretrain]`` settings, the torch version); the server makes it on first use while the other ranks wait.
It is closer to the federation's task than ImageNet is to ICH: the pool holds the same five kinds of lesion.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch

from hpcfl.atomic import atomic_path

log = logging.getLogger("hpcfl")

FORMAT = 1  # bump when the same settings would train a different model
POOL_INDEX_OFFSET = 20_000_000  # the pool's images have their own range of render indices (tests: 10M, train: 0)


def pretrained_file(cache_dir: str | Path, model_cfg, image_shape, num_classes: int, pretrain_cfg) -> Path:
    """Where the pretrained start for these settings is (or will be) cached."""
    key = json.dumps({"format": FORMAT, "model": model_cfg.name, "width": model_cfg.width,
                      "cnn_norm": model_cfg.cnn_norm, "image_shape": list(image_shape), "classes": num_classes,
                      "pretrain": dataclasses.asdict(pretrain_cfg), "torch": torch.__version__}, sort_keys=True)
    return Path(cache_dir) / f"pretrained-{model_cfg.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"


def pretrain(path: Path, model_cfg, image_shape, num_classes: int, pretrain_cfg, channels_last: bool) -> dict:
    """Train the start centrally on the pool and save it to ``path``; returns what it measured."""
    from hpcfl.client.trainer import ClientData, train_client
    from hpcfl.config import TrainConfig
    from hpcfl.data.render import render_images
    from hpcfl.data.transforms import BatchTransform
    from hpcfl.models import build_model, input_channels
    from hpcfl.seeds import generator, stream_seed

    t0 = time.time()
    size, channels = image_shape[0], image_shape[2]
    if channels != 1 or image_shape[0] != image_shape[1]:
        raise ValueError(f"the built-in pretrained start renders square grayscale images, not {list(image_shape)}")
    labels = np.arange(pretrain_cfg.images) % num_classes  # every class equally often
    images = render_images(labels, size, pretrain_cfg.seed, POOL_INDEX_OFFSET)
    torch.manual_seed(stream_seed(pretrain_cfg.seed, -1, -1, "init"))
    model = build_model(model_cfg.name, num_classes, channels, model_cfg.width, "", model_cfg.cnn_norm)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    data = ClientData(-1, torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                      np.bincount(labels, minlength=num_classes))
    cfg = TrainConfig(lr=pretrain_cfg.lr, batch_size=pretrain_cfg.batch_size, local_epochs=pretrain_cfg.epochs,
                      logit_adjust=False, augment=True, channels_last=channels_last)
    transform = BatchTransform(input_channels(model_cfg.name, channels), "cpu", channels_last)
    loss, steps = train_client(model, data, cfg, transform, generator(pretrain_cfg.seed, -1, 0, "train"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, tmp)
    norm = float(torch.linalg.vector_norm(torch.cat([p.detach().flatten() for p in model.parameters()])))
    info = {"images": pretrain_cfg.images, "epochs": pretrain_cfg.epochs, "mean_loss": loss, "steps": steps,
            "weight_norm": norm, "seconds": time.time() - t0}
    log.info("built the pretrained start %s: %d images x %d epochs, mean training loss %.3f, |w| = %.2f, %.0f s",
             path.name, pretrain_cfg.images, pretrain_cfg.epochs, loss, norm, info["seconds"])
    return info
