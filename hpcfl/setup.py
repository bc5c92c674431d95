"""Before the first round: the run directory (fresh, resumed or complete), the device, the data of each rank."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpcfl import checkpoint
from hpcfl.comm import Comm
from hpcfl.config import Config, ConfigError, config_differences, load
from hpcfl.data.shards import read_checked
from hpcfl.errors import UsageError
from hpcfl.client.trainer import ClientData

log = logging.getLogger("hpcfl")

# What a run directory holds; --overwrite removes exactly these.
RUN_FILES = ("config.toml", "run.json", "metrics.jsonl", "metrics.csv", "final_model.npy", checkpoint.POINTER)
RUN_DIRS = ("logs", "tensorboard")

FRESH, RESUME, COMPLETE = 0, 1, 2


@dataclass
class Where:
    """Where this rank is, for the message that ends the job when something fails."""

    round: int | None = None
    client: int | None = None
    phase: str = "setup"

    def __str__(self):
        return f"round {self.round if self.round is not None else '-'}, " \
               f"client {self.client if self.client is not None else '-'}, phase {self.phase}"


def open_run_dir(cfg: Config, out_dir: Path, overwrite: bool, force: bool) -> tuple[int, Path | None]:
    """Server: decide what to do with the run directory: (FRESH | RESUME | COMPLETE, checkpoint directory).

    Same config and a checkpoint: resume. Same config, finished: complete (nothing to do). A different config is
    refused with the keys that differ (``force`` resumes anyway); ``overwrite`` always starts afresh."""
    stored = out_dir / "config.toml"
    if overwrite or not stored.is_file():
        if overwrite:
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
            for d in [*RUN_DIRS, *(p.name for p in out_dir.glob("checkpoint-*")),
                      *(p.name for p in out_dir.glob(".checkpoint-*.tmp"))]:
                shutil.rmtree(out_dir / d, ignore_errors=True)
        out_dir.mkdir(parents=True, exist_ok=True)
        return FRESH, None
    try:
        previous = load(stored)
    except ConfigError as e:
        raise UsageError(f"{stored} is not a readable hpcfl config ({e}); pass --overwrite to start afresh") from None
    differences = config_differences(previous, cfg)
    if differences and not force:
        raise UsageError(f"{out_dir} holds a run with a different config ({'; '.join(differences)}): "
                         "choose another --out, --force to resume it with the new values, or --overwrite")
    info_path = out_dir / "run.json"
    if info_path.is_file() and "finished" in json.loads(info_path.read_text()) and not differences:
        return COMPLETE, None
    ckpt = checkpoint.latest(out_dir)
    if ckpt is not None and not force:
        stored_digest = checkpoint.load_state(ckpt).get("config_digest")
        if stored_digest != cfg.digest():
            raise UsageError(f"{ckpt / 'state.json'} was written under another config than {stored} holds now "
                             "(--force resumes anyway, --overwrite starts afresh)")
    if ckpt is None:
        log.info("%s holds an unfinished run without a checkpoint: starting it again", out_dir)
        return FRESH, None
    return RESUME, ckpt


def pick_device(cfg, comm: Comm) -> torch.device:
    """Client ranks take GPU ``local_client_rank % gpus``; the server of a multi-rank job stays on the CPU.

    Every rank calls this (the node-local rank is a collective)."""
    want = cfg.run.device
    if want == "cpu":
        return torch.device("cpu")
    local = comm.local_client_rank()
    if comm.size > 1 and comm.is_server:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if want == "cuda":
            raise UsageError("run.device = 'cuda' but no CUDA device is visible on this node")
        return torch.device("cpu")
    device = torch.device(f"cuda:{local % torch.cuda.device_count()}")
    torch.cuda.set_device(device)  # before any other CUDA call of this rank
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False  # as the reference
    return device


def prepare_data(cfg, comm: Comm, where: Where) -> Path:
    """The shard directory; the built-in benchmark is built by the server on first use, the others wait."""
    where.phase = "data"
    if cfg.data.source != "builtin":
        return Path(cfg.data.source)
    from preprocess.synthetic import build, builtin_dir

    directory = builtin_dir(cfg.data.cache_dir, cfg.benchmark)
    if comm.is_server and not (directory / "manifest.json").is_file():
        log.info("building the built-in benchmark in %s", directory)
        build(directory, cfg.benchmark)
    comm.barrier()
    return directory


def validation_count(n: int, fraction: float) -> int:
    """Samples of a client's shard held out for its per-client metrics (at least one stays for training)."""
    return min(int(round(n * fraction)), n - 1) if fraction > 0 else 0


def load_client(directory: Path, manifest: dict, client_id: int, val_fraction: float, seed: int,
                device: torch.device | str = "cpu") -> tuple[ClientData, ClientData | None]:
    """A client's training part and its held-out validation part (None when ``val_fraction`` is 0).

    The split is a permutation keyed by (seed, client): the same whichever rank hosts the client. On a GPU the
    training images are held on the device (uint8: about 50 MB per ICH client at 224 px), so batches are cut
    and augmented there without a host-to-device copy per step."""
    shard = read_checked(directory, manifest["clients"][client_id], manifest["num_classes"], manifest["image_shape"])
    images, labels = torch.from_numpy(shard.images), torch.from_numpy(shard.labels)
    n_val = validation_count(len(labels), val_fraction)
    order = np.random.default_rng([seed, client_id, 7]).permutation(len(labels)) if n_val else np.arange(len(labels))
    train_idx, val_idx = torch.from_numpy(np.sort(order[n_val:])), torch.from_numpy(np.sort(order[:n_val]))

    def part(idx):
        part_labels = labels[idx]
        counts = np.bincount(part_labels.numpy(), minlength=manifest["num_classes"])
        return ClientData(client_id, images[idx], part_labels, counts)

    train = part(train_idx)
    if torch.device(device).type == "cuda":
        train = ClientData(client_id, train.images.to(device), train.labels.to(device), train.class_counts)
    return train, (part(val_idx) if n_val else None)
