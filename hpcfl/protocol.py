"""The round protocol (design.md): what every rank does in each round, and what travels.

World size 1: this process is the server and hosts every client. World size W >= 2: rank 0 is the server,
ranks 1..W-1 host the clients (``comm.my_clients``). Every rank makes the same collective calls in the same order:

    round t:  1. Bcast control [t, action, rho_t]     (server -> all, float64)
              2. Bcast w^t, one float32 vector        (server -> all)
              3. statistics at w^t, if the algorithm needs any this round: Reduce of an N x k float64 table
                 (each rank fills its clients' rows, zeros elsewhere)
              4. local training of each hosted client, from w^t, on its own shard (no communication)
                 -> Reduce of an N x 4 table [train loss, steps, max |w_i|, ||w_i - w^t||^2]
              4b. FedCE only: Bcast of the fixed-point exponent, Reduce + Bcast of the consensus model,
                 Reduce of an N x 1 table of update cosines
              5. the server's algorithm turns statistics into a decision: Bcast [a_1..a_N, keep, exponent]
              6. each client rank sums a_i * w_i over its clients; one Reduce(SUM) -> w^{t+1} = keep w^t + sum
                 (in fixed point by default, so the sum is the same for any grouping: hpcfl/aggregate.py)
              7. evaluation and metrics on the server every ``eval.every`` rounds

The server holds one global vector, one accumulator and one model: its memory does not grow with the
number of clients. Randomness comes from streams keyed by (seed, client, round, purpose), never from the rank
layout, so single-rank mode and any world size give the same numbers.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hpcfl import __version__
from hpcfl.aggregate import add_fixed_point, fixed_point_exponent, fixed_point_to_float64
from hpcfl.algorithms import build_algorithm
from hpcfl.comm import Comm, assign_clients
from hpcfl.data.shards import client_file, load_manifest, read_checked
from hpcfl.data.transforms import BatchTransform
from hpcfl.errors import UsageError
from hpcfl.flat import FlatLayout
from hpcfl.io import atomic_path, write_json, write_text
from hpcfl.local.stats import StatsContext, measure
from hpcfl.local.trainer import ClientData, train_client
from hpcfl.metrics import classification_metrics, predict_proba
from hpcfl.models import build_model, input_channels

log = logging.getLogger("hpcfl")

ACTION_TRAIN, ACTION_STOP = 0, 1
_PURPOSES = {"init": 0, "train": 1, "stats": 2}


@dataclass
class Where:
    """Where this rank is, for the message that ends the job when something fails."""

    round: int | None = None
    client: int | None = None
    phase: str = "setup"

    def __str__(self):
        return f"round {self.round if self.round is not None else '-'}, " \
               f"client {self.client if self.client is not None else '-'}, phase {self.phase}"


def stream_seed(seed: int, client: int, round_idx: int, purpose: str) -> int:
    """A 63-bit seed for the random stream of (seed, client, round, purpose)."""
    state = np.random.SeedSequence([seed, client + 1, round_idx + 1, _PURPOSES[purpose]]).generate_state(2)
    return int((int(state[0]) << 31 | int(state[1])) & (2 ** 63 - 1))


def generator(seed: int, client: int, round_idx: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, client, round_idx, purpose))


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
    from preprocess.synthetic import builtin_dir, build

    directory = builtin_dir(cfg.data.cache_dir, cfg.benchmark)
    if comm.is_server and not (directory / "manifest.json").is_file():
        log.info("building the built-in benchmark in %s", directory)
        build(directory, cfg.benchmark)
    comm.barrier()
    return directory


def load_client(directory: Path, manifest: dict, client_id: int) -> ClientData:
    shard = read_checked(directory, manifest["clients"][client_id], manifest["num_classes"])
    counts = np.bincount(shard.labels, minlength=manifest["num_classes"])
    return ClientData(client_id, torch.from_numpy(shard.images), torch.from_numpy(shard.labels), counts)


def weighted_sum(comm: Comm, layout: FlatLayout, vectors: dict[int, np.ndarray], weights: np.ndarray,
                 keep: float, global_vec: np.ndarray, exponent: int, exact: bool) -> np.ndarray:
    """keep·w^t + Σ_i weights_i·vectors_i over every client of every rank: each rank sums its own clients, one
    Reduce brings the sums to the server. Returns the result on the server (float32), zeros elsewhere."""
    if exact:
        acc = np.zeros(layout.size, dtype=np.int64)
        for cid in sorted(vectors):
            add_fixed_point(acc, weights[cid], vectors[cid], exponent)
    else:
        acc = np.zeros(layout.size, dtype=np.float32)
        for cid in sorted(vectors):
            acc += np.float32(weights[cid]) * vectors[cid]
    comm.reduce_sum(acc, acc)
    out = layout.empty()
    if not comm.is_server:
        return out
    total = fixed_point_to_float64(acc, exponent) if exact else acc.astype(np.float64)
    if keep:
        total += keep * global_vec.astype(np.float64)
    out[:] = total
    return out


def update_cosine(local: np.ndarray, global_vec: np.ndarray, consensus: np.ndarray, weight: float,
                  mask: np.ndarray) -> float:
    """FedCE's cos(Δ_i, Δ_c − c_i·Δ_i) with Δ_i = w_i − w^t and Δ_c = consensus − w^t, over parameters only."""
    g = global_vec[mask].astype(np.float64)
    d_i = local[mask] - g
    d_rest = (consensus[mask] - g) - weight * d_i
    denom = np.linalg.norm(d_i) * np.linalg.norm(d_rest)
    return float(np.dot(d_i, d_rest) / denom) if denom > 0 else 0.0


def check_finite(train_table: np.ndarray) -> None:
    bad = [c for c in range(len(train_table)) if not np.isfinite(train_table[c]).all()]
    if bad:
        raise FloatingPointError(f"client(s) {bad} sent non-finite parameters or training loss")


def maybe_fail(cfg, comm: Comm, round_idx: int) -> None:
    """``debug.fail_at = 'RANK:ROUND'``: raise on that rank in that round (to test that the job aborts)."""
    if cfg.debug.fail_at:
        rank, rnd = (int(x) for x in cfg.debug.fail_at.split(":"))
        if rank == comm.rank and rnd == round_idx:
            raise RuntimeError(f"injected failure (debug.fail_at = {cfg.debug.fail_at!r})")


def run(cfg, comm: Comm, out_dir: Path, where: Where) -> dict:
    """Run the whole federation; returns a summary (on the server; an empty dict elsewhere)."""
    t_start = time.time()
    torch.set_num_threads(cfg.run.torch_threads)
    data_dir = prepare_data(cfg, comm, where)

    where.phase = "setup"
    manifest = load_manifest(data_dir)
    sizes = np.array([c["n"] for c in manifest["clients"]], dtype=np.int64)
    num_clients, num_classes = len(sizes), int(manifest["num_classes"])
    empty = [c for c in range(num_clients) if sizes[c] == 0]
    if empty:
        raise UsageError(f"client(s) {empty} of {data_dir} have no training samples: use more samples or fewer "
                         "clients (benchmark.num_train, benchmark.num_clients)")
    try:
        assignment = assign_clients(sizes, comm.num_client_ranks)
    except ValueError as e:
        raise UsageError(str(e)) from None
    my_clients = comm.my_clients(sizes)
    device = pick_device(cfg, comm)
    if device.type == "cuda" or comm.is_server:
        log.log(logging.WARNING if comm.rank else logging.INFO, "rank %d computes on %s", comm.rank, device)
    data_channels = int(manifest["image_shape"][2])
    model_channels = input_channels(cfg.model.name, data_channels)

    # The initial model w^0 is made on the server from the run seed and broadcast; other ranks' initial values
    # are overwritten by the first broadcast.
    torch.manual_seed(stream_seed(cfg.run.seed, -1, -1, "init"))
    model = build_model(cfg.model.name, num_classes, data_channels, cfg.model.width, cfg.model.pretrained_path)
    layout = FlatLayout(model)
    global_vec = layout.to_vector(model) if comm.is_server else layout.empty()
    model.to(device)
    transform = BatchTransform(model_channels, device)
    algorithm = build_algorithm(cfg)

    where.phase = "data"
    clients = {}
    for cid in my_clients:
        where.client = cid
        clients[cid] = load_client(data_dir, manifest, cid)
    where.client = None
    test_sets = {}
    if comm.is_server:
        for entry in manifest["test_sets"]:
            shard = read_checked(data_dir, entry, num_classes)
            test_sets[entry["name"]] = (torch.from_numpy(shard.images), shard.labels)
        log.info("world size %d, %d clients, P = %d parameters, data %s", comm.size, num_clients, layout.size,
                 data_dir)
        for r, group in enumerate(assignment):
            log.info("client rank %d hosts clients %s (%d samples)", r + (comm.size > 1), group,
                     int(sizes[group].sum()))
        write_json(out_dir / "run.json", {
            "hpcfl_version": __version__, "world_size": comm.size, "data_dir": str(data_dir),
            "num_clients": num_clients, "num_parameters": layout.size,
            "assignment": {str(r + (comm.size > 1)): g for r, g in enumerate(assignment)},
            "torch_version": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})

    metrics_lines: list[str] = []
    summary: dict = {}
    exact = cfg.run.aggregation == "exact"
    local_optimizer = cfg.local_optimizer()
    prev_local: dict[int, np.ndarray] = {}  # w_i^{t-1} of hosted clients, for algorithms that need it
    prev_weights = np.full(num_clients, 1.0 / num_clients)  # a^{t-1} (FedCE's c), known to every rank
    for t in range(cfg.run.rounds):
        t_round = time.time()
        where.round, where.client = t, None

        # 1-2. control (round, action, search distance) and the global model
        where.phase = "broadcast"
        control = comm.bcast(np.array([t, ACTION_TRAIN, algorithm.rho(t)], dtype=np.float64))
        if control[1] == ACTION_STOP:
            break
        rho = float(control[2])
        comm.bcast(global_vec)

        # 3. statistics at w^t, only those the algorithm asks for this round
        stat_names = algorithm.stats_before(t)
        stats: dict[str, np.ndarray] = {}
        if stat_names:
            where.phase = "statistics"
            table = np.zeros((num_clients, len(stat_names)))
            for cid in my_clients:
                where.client = cid
                table[cid] = measure(stat_names, StatsContext(
                    model, layout, clients[cid], transform, global_vec,
                    generator(cfg.run.seed, cid, t, "stats") if cfg.algorithm.stats_augment else None,
                    cfg.eval.batch_size, rho, prev_local.get(cid), prev_weights[cid]))
            where.client = None
            comm.reduce_sum(table, table)
            stats = {name: table[:, k] for k, name in enumerate(stat_names)}

        # 4. local training, each hosted client from w^t
        where.phase = "local training"
        trained: dict[int, np.ndarray] = {}
        train_table = np.zeros((num_clients, 4))  # [mean train loss, steps, max |w_i|, ‖w_i − w^t‖² (params)]
        for cid in my_clients:
            where.client = cid
            maybe_fail(cfg, comm, t)
            layout.load_vector(model, global_vec)
            torch.manual_seed(stream_seed(cfg.run.seed, cid, t, "train"))  # dropout etc., if a model has it
            loss, steps = train_client(model, clients[cid], cfg.train, transform,
                                       generator(cfg.run.seed, cid, t, "train"), local_optimizer, rho)
            trained[cid] = layout.to_vector(model)
            update = (trained[cid] - global_vec)[layout.param_mask]
            train_table[cid] = (loss, steps, np.abs(trained[cid]).max(), float(np.dot(update, update)))
        where.client = None
        comm.reduce_sum(train_table, train_table)
        stats.update(train_loss=train_table[:, 0], steps=train_table[:, 1], update_sq_norm=train_table[:, 3])
        if comm.is_server:
            check_finite(train_table)
        exponent = fixed_point_exponent(float(train_table[:, 2].max()), num_clients) if comm.is_server else 0

        # 4b. FedCE only: cosine of each update to the consensus of the others (one more P-vector each way)
        if algorithm.needs_cosines:
            where.phase = "cosines"
            exponent = int(comm.bcast(np.array([exponent], dtype=np.int64))[0])
            consensus = weighted_sum(comm, layout, trained, prev_weights, 0.0, global_vec, exponent, exact)
            comm.bcast(consensus)
            table = np.zeros((num_clients, 1))
            for cid in my_clients:
                table[cid] = update_cosine(trained[cid], global_vec, consensus, prev_weights[cid], layout.param_mask)
            comm.reduce_sum(table, table)
            stats["cosine"] = table[:, 0]
            del consensus

        # 5. aggregation weights, decided by the server: [a_1..a_N, keep, fixed-point exponent]
        where.phase = "weights"
        decision = np.zeros(num_clients + 2)
        if comm.is_server:
            if not my_clients:  # a server that hosts no client fails here when asked to
                maybe_fail(cfg, comm, t)
            d = algorithm.aggregate(t, sizes, stats)
            largest_term = float(train_table[:, 2].max()) * max(1.0, float(np.abs(d.weights).max()))
            exponent = fixed_point_exponent(largest_term, num_clients)  # the range must hold every a_i * w_i
            decision[:num_clients], decision[-2], decision[-1] = d.weights, d.keep, exponent
        comm.bcast(decision)
        weights, keep, exponent = decision[:num_clients], float(decision[-2]), int(decision[-1])

        # 6. aggregation: per-rank weighted sum, one Reduce to the server -> w^{t+1}
        where.phase = "aggregation"
        new_global = weighted_sum(comm, layout, trained, weights, keep, global_vec, exponent, exact)
        if comm.is_server:
            global_vec[:] = new_global
        if algorithm.keeps_local_model:
            prev_local = trained
        prev_weights = weights.copy()
        del trained, new_global

        # 7. evaluation and metrics (server)
        if comm.is_server:
            where.phase = "evaluation"
            train_loss = float(np.average(train_table[:, 0], weights=np.maximum(train_table[:, 1], 1e-12)))
            last = t == cfg.run.rounds - 1
            if (t + 1) % cfg.eval.every == 0 or last:
                layout.load_vector(model, global_vec)
                results = {name: classification_metrics(labels, predict_proba(model, images, transform,
                                                                              cfg.eval.batch_size))
                           for name, (images, labels) in test_sets.items()}
                line = {"round": t, "algorithm": cfg.algorithm.name, "metrics": results,
                        "weights": [float(w) for w in weights], "keep": keep, "rho": rho,
                        "stats": {k: [float(x) for x in v] for k, v in stats.items()},
                        "train_loss": train_loss, "time_s": time.time() - t_round,
                        "elapsed_s": time.time() - t_start}
                metrics_lines.append(json.dumps(line))
                write_text(out_dir / "metrics.jsonl", "\n".join(metrics_lines) + "\n")
                summary = line
                shown = "  ".join(f"{name} bacc {m['bacc']:.3f}" for name, m in results.items())
                log.info("round %d/%d  loss %.4f  %s  (%.1f s)", t + 1, cfg.run.rounds, train_loss, shown,
                         time.time() - t_round)
            else:
                log.info("round %d/%d  loss %.4f  (%.1f s)", t + 1, cfg.run.rounds, train_loss,
                         time.time() - t_round)

    where.phase = "finish"
    comm.barrier()
    if comm.is_server:
        info = json.loads((out_dir / "run.json").read_text())
        info.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": time.time() - t_start,
                     "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        write_json(out_dir / "run.json", info)
        with atomic_path(out_dir / "final_model.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, global_vec)  # a plain array: loads with allow_pickle=False
    return summary
