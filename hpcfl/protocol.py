"""The round protocol (design.md): what every rank does in each round, and what travels.

World size 1: this process is the server and hosts every client. World size W >= 2: rank 0 is the server,
ranks 1..W-1 host the clients (``comm.my_clients``). Every rank makes the same collective calls in the same order:

    before:   Bcast the run mode (fresh / resume / complete), [resume: start round + last weights], Bcast w^start
    round t:  1. Bcast control [t, rho_t]                        (server -> all, float64)
              2. statistics at w^t, if the algorithm needs any this round: Reduce of an N x k float64 table
                 (each rank fills its clients' rows, zeros elsewhere)
              3. local training of each hosted client, from w^t, on its own shard (no communication)
                 -> Reduce of an N x 4 table [train loss, steps, max |w_i|, ||w_i - w^t||^2]
              3b. FedCE only: Bcast of the fixed-point exponent, Reduce + Bcast of the consensus model,
                 Reduce of an N x 1 table of update cosines
              4. the server's algorithm turns statistics into a decision: Bcast [a_1..a_N, keep, exponent]
              5. each client rank sums a_i * w_i over its clients; one Reduce(SUM) -> w^{t+1} = keep w^t + sum
                 (in fixed point by default, so the sum is the same for any grouping: hpcfl/aggregate.py)
              6. Bcast w^{t+1}: the next round's model, and the model of the per-client evaluation
              7. evaluation on evaluated rounds: each client on its held-out part (Reduce N x 2), the server on
                 every test set
              8. Bcast [checkpoint?, stop?]; checkpoint: each rank writes its part, the server commits

The server holds one global vector, one accumulator and one model: its memory does not grow with the
number of clients. Randomness comes from streams keyed by (seed, client, round, purpose), never from the rank
layout, so single-rank mode and any world size give the same numbers, and a resumed run the same as an
uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hpcfl import __version__, checkpoint
from hpcfl.aggregate import add_fixed_point, fixed_point_exponent, fixed_point_to_float64
from hpcfl.algorithms import build_algorithm
from hpcfl.comm import Comm, assign_clients
from hpcfl.data.shards import load_manifest, read_checked
from hpcfl.data.transforms import BatchTransform
from hpcfl.errors import UsageError
from hpcfl.flat import FlatLayout
from hpcfl.io import write_json, write_text
from hpcfl.client.stats import StatsContext, measure
from hpcfl.client.trainer import train_client
from hpcfl.metrics import classification_metrics, client_summary, gaps, predict_proba
from hpcfl.models import build_model, input_channels
from hpcfl.outputs import Progress, RunLog, progress_text
from hpcfl.setup import COMPLETE, FRESH, RESUME, Where, load_client, open_run_dir, pick_device, prepare_data
from hpcfl.setup import validation_count

log = logging.getLogger("hpcfl")

_PURPOSES = {"init": 0, "train": 1, "stats": 2}
# Set by a signal handler (SLURM's pre-emption warning, SIGTERM): checkpoint after this round and stop.
stop_requested = False


def stream_seed(seed: int, client: int, round_idx: int, purpose: str) -> int:
    """A 63-bit seed for the random stream of (seed, client, round, purpose)."""
    state = np.random.SeedSequence([seed, client + 1, round_idx + 1, _PURPOSES[purpose]]).generate_state(2)
    return int((int(state[0]) << 31 | int(state[1])) & (2 ** 63 - 1))


def generator(seed: int, client: int, round_idx: int, purpose: str) -> torch.Generator:
    return torch.Generator().manual_seed(stream_seed(seed, client, round_idx, purpose))


def weighted_sum(comm: Comm, layout: FlatLayout, vectors: dict[int, np.ndarray], weights: np.ndarray,
                 keep: float, global_vec: np.ndarray, exponent: int, exact: bool, skip=()) -> np.ndarray:
    """keep·w^t + Σ_i weights_i·vectors_i over every client of every rank: each rank sums its own clients, one
    Reduce brings the sums to the server. Returns the result on the server (float32), zeros elsewhere.
    Clients in ``skip`` (non-finite models) and clients of weight 0 add nothing."""
    terms = [cid for cid in sorted(vectors) if cid not in skip and weights[cid] != 0]
    if exact:
        acc = np.zeros(layout.size, dtype=np.int64)
        for cid in terms:
            add_fixed_point(acc, weights[cid], vectors[cid], exponent)
    else:
        acc = np.zeros(layout.size, dtype=np.float32)
        for cid in terms:
            acc += np.float32(weights[cid]) * vectors[cid]
    comm.reduce_sum(acc, acc)
    out = np.zeros(layout.size, dtype=np.float32)
    if comm.is_server:
        total = fixed_point_to_float64(acc, exponent) if exact else acc.astype(np.float64)
        if keep:
            total += keep * global_vec.astype(np.float64)
        out[:] = total
    return out


def nonfinite_clients(train_table: np.ndarray, stats: dict[str, np.ndarray]) -> list[int]:
    """Clients whose training row (loss, parameters) or any statistic is NaN or infinite."""
    bad = ~np.isfinite(train_table).all(axis=1)
    for values in stats.values():
        bad |= ~np.isfinite(values)
    return [int(c) for c in np.flatnonzero(bad)]


def leave_out(weights: np.ndarray, bad: list[int]) -> np.ndarray:
    """The weights without the ``bad`` clients, rescaled to the same total."""
    out = weights.copy()
    out[bad] = 0.0
    if out.sum() <= 0:
        raise FloatingPointError(f"every client with weight was left out (non-finite: {bad})")
    return out * (weights.sum() / out.sum())


def mean_train_loss(train_table: np.ndarray) -> float:
    """Step-weighted mean of the clients' training losses (clients with a non-finite loss left out)."""
    ok = np.isfinite(train_table[:, 0]) & (train_table[:, 1] > 0)
    return float(np.average(train_table[ok, 0], weights=train_table[ok, 1])) if ok.any() else float("nan")


def finite_max(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0


def debug_hooks(cfg, comm: Comm, where: Where):
    """``enter(phase)``: mark the phase this rank is in, and honour ``debug.fail_at = 'RANK:ROUND[:PHASE]'`` (raise
    there) and ``debug.hang_at = 'RANK:ROUND'`` (never return from local training there): the tests of fail-fast
    and of the round watchdog. Without a phase, a client rank fails in local training, a server in weights."""
    fail = cfg.debug.fail_at.split(":") if cfg.debug.fail_at else None
    hang = cfg.debug.hang_at.split(":") if cfg.debug.hang_at else None

    def enter(phase: str) -> None:
        where.phase = phase
        rnd = where.round if where.round is not None else 0
        if fail and int(fail[0]) == comm.rank and int(fail[1]) == rnd:
            wanted = fail[2] if len(fail) > 2 else ("weights" if comm.size > 1 and comm.is_server else "local training")
            if phase == wanted:
                raise RuntimeError(f"injected failure (debug.fail_at = {cfg.debug.fail_at!r})")
        if hang and int(hang[0]) == comm.rank and int(hang[1]) == rnd and phase == "local training":
            while True:  # a rank that never reaches the next collective
                time.sleep(1)

    return enter


class RoundWatchdog:
    """Ends the job when a round runs longer than ``run.round_timeout_s`` (a stuck collective, a hung rank)."""

    def __init__(self, timeout_s: float, comm: Comm, where: Where):
        import threading

        self.timeout_s, self.comm, self.where = timeout_s, comm, where
        self.round_started = time.time()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)
        if timeout_s > 0:
            self.thread.start()

    def new_round(self) -> None:
        self.round_started = time.time()

    def _watch(self) -> None:
        while not self.done.wait(1.0):
            if time.time() - self.round_started > self.timeout_s:
                import sys

                print(f"hpcfl: rank {self.comm.rank}: round {self.where.round} exceeded run.round_timeout_s = "
                      f"{self.timeout_s:g} s ({self.where}); ending the job", file=sys.stderr, flush=True)
                self.comm.abort(1)

    def stop(self) -> None:
        self.done.set()


def add_rank_log(out_dir: Path, rank: int) -> None:
    """Every rank also logs to ``logs/rank_<r>.log`` in the run directory, the rank in each line."""
    path = out_dir / "logs" / f"rank_{rank}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(message)s", datefmt="%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    log.addHandler(handler)
    log.setLevel(logging.INFO)


def run(cfg, comm: Comm, out_dir: Path, where: Where, overwrite: bool = False, force: bool = False) -> dict:
    """Run (or resume) the whole federation. Returns {"stopped": True} when stopped at a checkpoint on request."""
    t_start = time.time()
    torch.set_num_threads(cfg.run.torch_threads)
    enter = debug_hooks(cfg, comm, where)

    # The run directory: fresh, resumed or already complete. The server decides, everyone follows.
    where.phase = "setup"
    mode, ckpt_dir = open_run_dir(cfg, out_dir, overwrite, force) if comm.is_server else (FRESH, None)
    mode = int(comm.bcast(np.array([mode], dtype=np.int64))[0])
    if mode == COMPLETE:
        log.info("%s: this run is already complete (--overwrite to run it again)", out_dir)
        return {}
    add_rank_log(out_dir, comm.rank)
    data_dir = prepare_data(cfg, comm, where)

    where.phase = "setup"
    manifest = load_manifest(data_dir)
    shard_sizes = np.array([c["n"] for c in manifest["clients"]], dtype=np.int64)
    num_clients, num_classes = len(shard_sizes), int(manifest["num_classes"])
    empty = [c for c in range(num_clients) if shard_sizes[c] == 0]
    if empty:
        raise UsageError(f"client(s) {empty} of {data_dir} have no training samples: use more samples or fewer "
                         "clients (benchmark.num_train, benchmark.num_clients)")
    sizes = shard_sizes - np.array([validation_count(n, cfg.data.val_fraction) for n in shard_sizes])
    corrupted = [c for c, entry in enumerate(manifest["clients"]) if entry.get("corruption")]
    try:
        assignment = assign_clients(sizes, comm.num_client_ranks)
    except ValueError as e:
        raise UsageError(str(e)) from None
    my_clients = comm.my_clients(sizes)
    device = pick_device(cfg, comm)
    log.info("rank %d computes on %s", comm.rank, device)
    data_channels = int(manifest["image_shape"][2])

    # The initial model w^0 is made on the server from the run seed and broadcast; other ranks' initial values
    # are overwritten by the first broadcast.
    torch.manual_seed(stream_seed(cfg.run.seed, -1, -1, "init"))
    model = build_model(cfg.model.name, num_classes, data_channels, cfg.model.width, cfg.model.pretrained_path,
                        cfg.model.cnn_norm)
    layout = FlatLayout(model)
    global_vec = layout.to_vector(model) if comm.is_server else layout.empty()
    model.to(device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    transform = BatchTransform(input_channels(cfg.model.name, data_channels), device, cfg.train.channels_last)
    # Local training may run a compiled view of the same modules (same parameters); the rest uses the model.
    train_model = model if cfg.train.compile == "off" else torch.compile(model, mode=cfg.train.compile)
    algorithm = build_algorithm(cfg)

    enter("data")
    clients, val_parts = {}, {}
    for cid in my_clients:
        where.client = cid
        clients[cid], val_parts[cid] = load_client(data_dir, manifest, cid, cfg.data.val_fraction, cfg.run.seed,
                                                   device)
    where.client = None
    test_sets = {}
    if comm.is_server:
        for entry in manifest["test_sets"]:
            shard = read_checked(data_dir, entry, num_classes, manifest["image_shape"])
            test_sets[entry["name"]] = (torch.from_numpy(shard.images), shard.labels)

    # Where to start: round 0, or after the last checkpoint.
    where.phase = "resume"
    start, lines = 0, []
    prev_weights = np.full(num_clients, 1.0 / num_clients)  # a^{t-1} (FedCE's c), known to every rank
    prev_local: dict[int, np.ndarray] = {}  # w_i^{t-1} of hosted clients, for algorithms that keep it
    if mode == RESUME:
        resume = np.zeros(num_clients + 1)
        if comm.is_server:
            state = checkpoint.load_state(ckpt_dir)
            global_vec[:] = checkpoint.load_array(ckpt_dir / "global.npy", layout.size)
            algorithm.load_state_dict(state["algorithm"])
            lines = state["metrics"]
            resume[0], resume[1:] = state["round"] + 1, state["prev_weights"]
        comm.bcast(resume)
        start, prev_weights = int(resume[0]), resume[1:].copy()
        if algorithm.keeps_local_model:
            directory = out_dir / f"checkpoint-{start - 1:06d}"
            prev_local = {cid: checkpoint.load_array(checkpoint.client_path(directory, cid), layout.size)
                          for cid in my_clients}
        log.info("resuming %s after round %d", out_dir, start)

    runlog = None
    if comm.is_server:
        write_text(out_dir / "config.toml", cfg.to_toml())
        info = {"hpcfl_version": __version__, "world_size": comm.size, "data_dir": str(data_dir),
                "num_clients": num_clients, "num_classes": num_classes, "class_names": manifest["class_names"],
                "corrupted_clients": corrupted, "test_sets": list(test_sets), "num_parameters": layout.size,
                "assignment": {str(r + (comm.size > 1)): g for r, g in enumerate(assignment)},
                "torch_version": torch.__version__, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        if mode == RESUME:
            previous = json.loads((out_dir / "run.json").read_text()) if (out_dir / "run.json").is_file() else {}
            info["started"] = previous.get("started", info["started"])
            this_resume = {"round": start, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "world_size": comm.size}
            info["resumed"] = previous.get("resumed", []) + [this_resume]
        write_json(out_dir / "run.json", info)
        runlog = RunLog(out_dir, lines)
        log.info("world size %d, %d clients (corrupted: %s), P = %d parameters, data %s", comm.size, num_clients,
                 corrupted, layout.size, data_dir)
        for r, group in enumerate(assignment):
            log.info("client rank %d hosts clients %s (%d samples)", r + (comm.size > 1), group,
                     int(sizes[group].sum()))

    exact = cfg.run.aggregation == "exact"
    local_optimizer = cfg.local_optimizer()
    comm.bcast(global_vec)  # w^start
    watchdog = RoundWatchdog(cfg.run.round_timeout_s, comm, where)
    pending = None  # server: (model, metrics line) of an evaluation not done yet

    def server_evaluation(job):
        """Test w^{t+1} on every test set, complete the round's metrics line, log it. Returns None (done)."""
        vec, partial = job
        layout.load_vector(model, vec)
        results = {name: classification_metrics(labels, predict_proba(model, images, transform,
                                                                      cfg.eval.batch_size))
                   for name, (images, labels) in test_sets.items()}
        line = {"round": partial["round"], "algorithm": partial["algorithm"], "metrics": results,
                "gap": gaps(results), **partial}
        runlog.add(line)
        progress.round_done(progress_text(line, cfg.run.rounds))
        return None

    progress = Progress(cfg.run.rounds, start, enabled=comm.is_server and sys.stderr.isatty())
    for t in range(start, cfg.run.rounds):
        t_round = time.time()
        watchdog.new_round()
        where.round, where.client = t, None

        # 1. control: the round and its search distance
        enter("broadcast")
        control = comm.bcast(np.array([t, algorithm.rho(t)], dtype=np.float64))
        rho = float(control[1])
        if pending is not None:  # the previous round's test-set evaluation, while the clients work
            pending = server_evaluation(pending)

        # 2. statistics at w^t, only those the algorithm asks for this round
        stat_names = algorithm.stats_before(t)
        stats: dict[str, np.ndarray] = {}
        compute_s = np.zeros(num_clients)  # seconds of statistics + local training per hosted client
        if stat_names:
            enter("statistics")
            table = np.zeros((num_clients, len(stat_names)))
            for cid in my_clients:
                where.client = cid
                t_client = time.perf_counter()
                table[cid] = measure(stat_names, StatsContext(
                    model, layout, clients[cid], transform, global_vec,
                    generator(cfg.run.seed, cid, t, "stats") if cfg.algorithm.stats_augment else None,
                    cfg.eval.batch_size, rho, prev_local.get(cid), prev_weights[cid]))
                compute_s[cid] += time.perf_counter() - t_client
            where.client = None
            comm.reduce_sum(table, table)
            stats = {name: table[:, k] for k, name in enumerate(stat_names)}

        # 3. local training, each hosted client from w^t
        where.phase = "local training"
        trained: dict[int, np.ndarray] = {}
        # [mean train loss, steps, max |w_i|, ‖w_i − w^t‖² (params), compute seconds]
        train_table = np.zeros((num_clients, 5))
        for cid in my_clients:
            where.client = cid
            enter("local training")
            t_client = time.perf_counter()
            layout.load_vector(model, global_vec)
            torch.manual_seed(stream_seed(cfg.run.seed, cid, t, "train"))  # dropout etc., if a model has it
            loss, steps = train_client(train_model, clients[cid], cfg.train, transform,
                                       generator(cfg.run.seed, cid, t, "train"), local_optimizer, rho)
            trained[cid] = layout.to_vector(model)
            if cfg.debug.nan_at == f"{cid}:{t}":
                trained[cid][0] = np.nan
            update = (trained[cid] - global_vec)[layout.param_mask]
            compute_s[cid] += time.perf_counter() - t_client
            train_table[cid] = (loss, steps, np.abs(trained[cid]).max(), float(np.dot(update, update)), compute_s[cid])
        where.client = None
        local_bad = {cid for cid in my_clients if not np.isfinite(train_table[cid]).all()}
        comm.reduce_sum(train_table, train_table)
        stats.update(train_loss=train_table[:, 0], steps=train_table[:, 1], update_sq_norm=train_table[:, 3])

        # 3b. FedCE only: cosine of each update to the consensus of the others (one more P-vector each way)
        consensus_weights = algorithm.consensus_weights(t, prev_weights)
        if consensus_weights is not None:
            enter("cosines")
            exponent = fixed_point_exponent(finite_max(train_table[:, 2]), num_clients) if comm.is_server else 0
            exponent = int(comm.bcast(np.array([exponent], dtype=np.int64))[0])
            consensus = comm.bcast(weighted_sum(comm, layout, trained, consensus_weights, 0.0, global_vec, exponent,
                                                exact, skip=local_bad))
            table = np.zeros((num_clients, len(algorithm.consensus_stats)))
            for cid in my_clients:
                table[cid] = algorithm.consensus_statistics(trained[cid], global_vec, consensus,
                                                            consensus_weights[cid], layout.param_mask)
            comm.reduce_sum(table, table)
            stats.update({name: table[:, k] for k, name in enumerate(algorithm.consensus_stats)})
            del consensus

        # 4. aggregation weights, decided by the server: [a_1..a_N, keep, fixed-point exponent]
        enter("weights")
        decision = np.zeros(num_clients + 2)
        if comm.is_server:
            bad = nonfinite_clients(train_table, stats)
            if bad and cfg.run.on_nonfinite == "abort":
                raise FloatingPointError(f"client(s) {bad} sent non-finite parameters, loss or statistics "
                                         "(run.on_nonfinite = 'skip' leaves such clients out of the round)")
            rule_stats = stats
            if bad:  # the rule sees a neutral value for them (the mean of the others), then they get no weight
                log.warning("round %d: client(s) %s non-finite, left out of this round", t, bad)
                rule_stats = {k: np.where(np.isfinite(v), v, np.nanmean(np.where(np.isfinite(v), v, np.nan)))
                              for k, v in stats.items()}
            d = algorithm.aggregate(t, sizes, rule_stats)
            client_weights = leave_out(d.weights, bad) if bad else d.weights
            largest_term = finite_max(train_table[:, 2]) * max(1.0, float(np.abs(client_weights).max()))
            exponent = fixed_point_exponent(largest_term, num_clients)  # the range must hold every a_i * w_i
            decision[:num_clients], decision[-2], decision[-1] = client_weights, d.keep, exponent
        comm.bcast(decision)
        weights, keep, exponent = decision[:num_clients], float(decision[-2]), int(decision[-1])

        # 5-6. aggregation: per-rank weighted sum, one Reduce to the server; w^{t+1} back to everyone
        enter("aggregation")
        global_vec = comm.bcast(weighted_sum(comm, layout, trained, weights, keep, global_vec, exponent, exact,
                                             skip=local_bad))
        if algorithm.keeps_local_model:
            prev_local = trained
        prev_weights = weights.copy()
        del trained

        # 7. evaluation: per client on its held-out part, on the server on every test set
        if (t + 1) % cfg.eval.every == 0 or t == cfg.run.rounds - 1:
            enter("evaluation")
            client_table = np.zeros((num_clients, 2))  # [bacc, acc] of w^{t+1} on each held-out part
            if cfg.data.val_fraction > 0:
                layout.load_vector(model, global_vec)
                for cid in my_clients:
                    where.client = cid
                    part = val_parts[cid]
                    if part is None:  # a shard too small to hold anything out
                        client_table[cid] = np.nan
                        continue
                    m = classification_metrics(part.labels.numpy(), predict_proba(model, part.images, transform,
                                                                                  cfg.eval.batch_size))
                    client_table[cid] = (m["bacc"], m["acc"])
                where.client = None
                comm.reduce_sum(client_table, client_table)
            if comm.is_server:
                line = {"round": t, "algorithm": cfg.algorithm.name,
                        "weights": [float(w) for w in weights], "keep": keep, "rho": rho,
                        "stats": {k: [float(x) for x in v] for k, v in stats.items()},
                        "train_loss": mean_train_loss(train_table)}
                if cfg.data.val_fraction > 0:
                    line["clients"] = {"bacc": client_table[:, 0].tolist(), "acc": client_table[:, 1].tolist()}
                    line["client_summary"] = {k: client_summary(client_table[:, j], corrupted)
                                              for j, k in enumerate(("bacc", "acc"))}
                # where the round's time went: each client rank's own computing, the rest is protocol and waiting
                line["rank_compute_s"] = [float(train_table[group, 4].sum()) for group in assignment]
                line.update(time_s=time.time() - t_round, elapsed_s=time.time() - t_start)
                # Under MPI the server would otherwise sit idle while the clients train the next round: it tests
                # w^{t+1} then (before a checkpoint or at the end at the latest). Alone, it tests it now.
                pending = (global_vec.copy(), line)
                if comm.size == 1 or t == cfg.run.rounds - 1:
                    pending = server_evaluation(pending)
        elif comm.is_server:
            progress.round_done(f"round {t + 1}/{cfg.run.rounds}  ({time.time() - t_round:.1f} s)")

        # 8. checkpoint when due, at the end, or when a stop was requested (then stop)
        enter("checkpoint")
        last = t == cfg.run.rounds - 1
        plan = np.array([0, 0], dtype=np.int64)
        if comm.is_server:
            every = cfg.run.checkpoint_every
            plan[:] = (last or stop_requested or (every > 0 and (t + 1) % every == 0)), (stop_requested and not last)
        comm.bcast(plan)
        if plan[0]:
            if pending is not None:  # the checkpoint carries every metrics line up to this round
                pending = server_evaluation(pending)
            save_checkpoint(comm, out_dir, t, cfg, algorithm, prev_weights,
                            prev_local if algorithm.keeps_local_model else {},
                            runlog.lines if runlog else [], global_vec)
        if plan[1]:
            watchdog.stop()
            progress.close()
            log.info("stopped after round %d at a checkpoint: run the same command again to resume", t + 1)
            return {"stopped": True}

    watchdog.stop()
    progress.close()
    where.phase = "finish"
    comm.barrier()
    if comm.is_server:
        runlog.close()
        checkpoint.save_array(out_dir / "final_model.npy", global_vec)  # before "finished" marks the run complete
        info = json.loads((out_dir / "run.json").read_text())
        info.update({"finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "wall_s": time.time() - t_start,
                     "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        write_json(out_dir / "run.json", info)
    return {}


def save_checkpoint(comm: Comm, out_dir: Path, t: int, cfg, algorithm, prev_weights: np.ndarray,
                    prev_local: dict[int, np.ndarray], lines: list[dict], global_vec: np.ndarray) -> None:
    """Every rank writes its clients' kept models into the staging directory; the server completes it."""
    if comm.is_server:
        checkpoint.begin(out_dir, t)
    comm.barrier()
    staging = checkpoint.staging_dir(out_dir, t)
    for cid, vec in prev_local.items():
        checkpoint.save_array(checkpoint.client_path(staging, cid), vec)
    comm.barrier()
    if comm.is_server:
        checkpoint.commit(out_dir, t, {"config_digest": cfg.digest(), "hpcfl_version": __version__,
                                       "algorithm": algorithm.state_dict(), "prev_weights": prev_weights.tolist(),
                                       "metrics": lines}, global_vec)
