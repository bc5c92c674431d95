"""Before the first round: everything a rank holds for the whole run (the :class:`Federation`).

The data (built-in benchmark built on first use), the clients' placement on ranks, the device, the model and its
flat layout, the algorithm, the hosted clients' shards and, on the server, the test sets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcfl.algorithms import Algorithm, build_algorithm
from hpcfl.client.trainer import ClientData
from hpcfl.comm import Comm, assign_clients
from hpcfl.config import Config
from hpcfl.data.builtin import build, builtin_dir
from hpcfl.data.shards import Manifest, check_directory, read_checked, read_rows
from hpcfl.data.transforms import BatchTransform
from hpcfl.errors import UsageError
from hpcfl.flat import FlatLayout
from hpcfl.models import build_model, input_channels
from hpcfl.pretrain import pretrain, pretrained_file
from hpcfl.seeds import stream_seed
from hpcfl.supervise import DebugHooks, Where

log = logging.getLogger("hpcfl")


@dataclass
class Federation:
    """What this rank knows and holds for the whole run; fixed after setup."""

    cfg: Config
    comm: Comm
    out_dir: Path
    where: Where
    hooks: DebugHooks
    data_dir: Path
    manifest: Manifest
    sizes: np.ndarray  # training samples per client (without the held-out parts)
    corrupted: list[int]  # clients with corrupted training data
    assignment: list[list[int]]  # clients of each client rank
    my_clients: list[int]  # clients this rank hosts
    device: torch.device
    model: torch.nn.Module
    train_model: torch.nn.Module  # the model, or a compiled view of it for local training
    layout: FlatLayout
    transform: BatchTransform
    algorithm: Algorithm
    clients: dict[int, ClientData] = field(default_factory=dict)  # hosted clients' training parts
    val_parts: dict[int, ClientData | None] = field(default_factory=dict)  # and held-out parts
    # The server: each test set's images and labels (images None when the client ranks test). Under
    # eval.placement 'clients': rows of each test set per rank (rank order; 0 for the server) and this client
    # rank's share of the images.
    test_sets: dict[str, tuple[torch.Tensor | None, np.ndarray]] = field(default_factory=dict)
    test_on_clients: bool = False
    test_rows: dict[str, list[int]] = field(default_factory=dict)
    test_shares: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def num_clients(self) -> int:
        return len(self.sizes)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def is_server(self) -> bool:
        return self.comm.is_server

    @property
    def local_optimizer(self) -> str:
        return self.cfg.local_optimizer()

    @property
    def exact(self) -> bool:
        return self.cfg.run.aggregation == "exact"

    def enter(self, phase: str) -> None:
        self.hooks.enter(phase)


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


def test_on_clients(cfg, comm: Comm, device: torch.device) -> bool:
    """eval.placement: do the client ranks test the global model (not the server)? 'auto' says yes when client
    ranks compute on a GPU (the server would test on its CPU, far slower) or when the ranks on the server's node,
    run.torch_threads each, outnumber its cores (the server's evaluation would take a core from training).
    Every rank calls this (under 'auto', two collectives)."""
    if comm.size == 1:
        return False
    if cfg.eval.placement != "auto":
        return cfg.eval.placement == "clients"
    on_gpu = comm.reduce_sum(np.array([float(device.type == "cuda")]), np.zeros(1))
    verdict = comm.bcast(np.array([bool(comm.is_server and on_gpu[0] > 0)], dtype=np.int64))
    return bool(verdict[0]) or comm.ranks_outnumber_cores(cfg.run.torch_threads)


def split_rows(n: int, batch_size: int, parts: int) -> list[int]:
    """Rows of ``parts`` consecutive shares of ``n`` rows, cut at multiples of ``batch_size``: every share's
    evaluation batches are batches of the whole set's, so the predictions are the same bits as the server's."""
    batches = -(-n // batch_size)
    bounds = [min(n, (k * batches // parts) * batch_size) for k in range(parts + 1)]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def prepare_data(cfg, comm: Comm, where: Where) -> Path:
    """The shard directory; the built-in benchmark is built by the server on first use, the others wait."""
    where.phase = "data"
    if cfg.data.source != "builtin":
        return Path(cfg.data.source)
    directory = builtin_dir(cfg.data.cache_dir, cfg.benchmark)
    if comm.is_server and not (directory / "manifest.json").is_file():
        log.info("building the built-in benchmark in %s", directory)
        build(directory, cfg.benchmark)
    comm.barrier()
    return directory


def prepare_pretrained(cfg, comm: Comm, where: Where, manifest: Manifest) -> str:
    """The pretrained weights' file: the user's, or the built-in start, which the server makes on first use while
    the others wait (hpcfl/pretrain.py)."""
    if cfg.model.pretrained_path != "builtin":
        return cfg.model.pretrained_path
    where.phase = "pretrain"
    path = pretrained_file(cfg.data.cache_dir, cfg.model, manifest.image_shape, manifest.num_classes, cfg.pretrain)
    if comm.is_server and not path.is_file():
        log.info("building the pretrained start %s", path)
        pretrain(path, cfg.model, manifest.image_shape, manifest.num_classes, cfg.pretrain, cfg.train.channels_last)
    comm.barrier()
    where.phase = "setup"
    return str(path)


def validation_count(n: int, fraction: float) -> int:
    """Samples of a client's shard held out for its per-client metrics (at least one stays for training)."""
    return min(int(round(n * fraction)), n - 1) if fraction > 0 else 0


def load_client(directory: Path, manifest: Manifest, client_id: int, val_fraction: float, seed: int,
                device: torch.device | str = "cpu") -> tuple[ClientData, ClientData | None]:
    """A client's training part and its held-out validation part (None when ``val_fraction`` is 0).

    The split is a permutation keyed by (seed, client): the same whichever rank hosts the client. On a GPU the
    training images are held on the device (uint8: about 50 MB per ICH client at 224 px), so batches are cut
    and augmented there without a host-to-device copy per step."""
    shard = read_checked(directory, manifest.clients[client_id], manifest)
    images, labels = torch.from_numpy(shard.images), torch.from_numpy(shard.labels)
    n_val = validation_count(len(labels), val_fraction)
    order = np.random.default_rng([seed, client_id, 7]).permutation(len(labels)) if n_val else np.arange(len(labels))
    train_idx, val_idx = torch.from_numpy(np.sort(order[n_val:])), torch.from_numpy(np.sort(order[:n_val]))

    def part(idx):
        part_labels = labels[idx]
        counts = np.bincount(part_labels.numpy(), minlength=manifest.num_classes)
        return ClientData(client_id, images[idx], part_labels, counts)

    train = part(train_idx)
    if torch.device(device).type == "cuda":
        train = ClientData(client_id, train.images.to(device), train.labels.to(device), train.class_counts)
    return train, (part(val_idx) if n_val else None)


def setup_federation(cfg: Config, comm: Comm, out_dir: Path, where: Where) -> Federation:
    """Every rank: the data, the placement, the device, the model w^0 (made from the run seed; the server's is
    broadcast later), the algorithm and this rank's shards."""
    hooks = DebugHooks(cfg.debug, comm.rank, comm.size, where)
    data_dir = prepare_data(cfg, comm, where)

    where.phase = "setup"
    manifest = Manifest.load(data_dir)
    if comm.is_server:  # every shard's labels and shapes, once, before any rank trains
        check_directory(data_dir, manifest)
    shard_sizes = np.array([c.n for c in manifest.clients], dtype=np.int64)
    empty = [c for c in range(len(shard_sizes)) if shard_sizes[c] == 0]
    if empty:
        raise UsageError(f"client(s) {empty} of {data_dir} have no training samples: use more samples or fewer "
                         "clients (benchmark.num_train, benchmark.num_clients)")
    sizes = shard_sizes - np.array([validation_count(n, cfg.data.val_fraction) for n in shard_sizes])
    corrupted = manifest.corrupted_clients
    try:
        assignment = assign_clients(sizes, comm.num_client_ranks)
    except ValueError as e:
        raise UsageError(str(e)) from None
    device = pick_device(cfg, comm)
    log.info("rank %d computes on %s", comm.rank, device)
    data_channels = manifest.image_shape[2]
    pretrained = prepare_pretrained(cfg, comm, where, manifest)

    torch.manual_seed(stream_seed(cfg.run.seed, -1, -1, "init"))
    model = build_model(cfg.model.name, manifest.num_classes, data_channels, cfg.model.width, pretrained,
                        cfg.model.cnn_norm)
    layout = FlatLayout(model)
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    # Local training may run a compiled view of the same modules (same parameters); the rest uses the model.
    train_model = model if cfg.train.compile == "off" else torch.compile(model, mode=cfg.train.compile)
    fed = Federation(
        cfg=cfg, comm=comm, out_dir=out_dir, where=where, hooks=hooks, data_dir=data_dir, manifest=manifest,
        sizes=sizes, corrupted=corrupted, assignment=assignment, my_clients=comm.my_clients(sizes), device=device,
        model=model, train_model=train_model, layout=layout,
        transform=BatchTransform(input_channels(cfg.model.name, data_channels), device, cfg.train.channels_last),
        algorithm=build_algorithm(cfg))

    fed.enter("data")
    for cid in fed.my_clients:
        where.client = cid
        fed.clients[cid], fed.val_parts[cid] = load_client(data_dir, manifest, cid, cfg.data.val_fraction,
                                                           cfg.run.seed, device)
    where.client = None
    fed.test_on_clients = test_on_clients(cfg, comm, device)
    for entry in manifest.test_sets:
        if fed.test_on_clients:
            rows = [0, *split_rows(entry.n, cfg.eval.batch_size, comm.num_client_ranks)]
            fed.test_rows[entry.name] = rows
            if not comm.is_server:
                start = sum(rows[:comm.rank])
                fed.test_shares[entry.name] = torch.from_numpy(read_rows(data_dir, entry, start,
                                                                         start + rows[comm.rank]))
        if comm.is_server:
            shard = read_checked(data_dir, entry, manifest)
            images = None if fed.test_on_clients else torch.from_numpy(shard.images)
            fed.test_sets[entry.name] = (images, shard.labels)
    if comm.is_server and fed.test_on_clients:
        log.info("the client ranks test the global model on the test sets, each its share of the rows "
                 "(eval.placement = %s)", cfg.eval.placement)
    return fed
