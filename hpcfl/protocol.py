"""The round protocol (design.md): what every rank does in each round, and what travels.

World size 1: this process is the server and hosts every client. World size W >= 2: rank 0 is the server,
ranks 1..W-1 host the clients (``comm.my_clients``). Every rank makes the same collective calls in the same order:

    before:   Bcast the run mode (fresh / resume / complete), [resume: start round + last weights], Bcast w^start
    round t:  1. Bcast control [t, rho_t]                                          (server -> all, float64)
              2. statistics at w^t, if the algorithm asks for any this round: a client table (N rows, one
                 column per statistic) summed to the server by one Reduce (each rank fills its clients' rows)
              3. local training of each hosted client, from w^t, on its own shard (no communication)
                 -> the training table [train_loss, steps, max_abs, update_sq_norm, compute_s], one Reduce
              3b. if the algorithm asks for a consensus (FedCE): Bcast of the fixed-point exponent, Reduce + Bcast
                 of the consensus model, one Reduce of the clients' statistics against it
              4. the server's algorithm turns statistics into a decision: Bcast [a_1..a_N, keep, exponent]
              5. each client rank sums a_i * w_i over its clients; one Reduce(SUM) -> w^{t+1} = keep w^t + sum
                 (in fixed point by default, so the sum is the same for any grouping: hpcfl/aggregate.py)
              6. Bcast w^{t+1}: the next round's model, and the model of the per-client evaluation
              7. evaluation on evaluated rounds: each client on its held-out part (a table of [bacc, acc], one
                 Reduce), the server on every test set (deferred under MPI while the clients train round t+1);
                 under eval.placement 'clients' each client rank on its share of the rows, one Gatherv per set
              8. Bcast [checkpoint?, stop?]; checkpoint: each rank writes its part, the server commits

The server holds one global vector, one accumulator and one model: its memory does not grow with the
number of clients. Randomness comes from streams keyed by (seed, client, round, purpose) (hpcfl/seeds.py), never
from the rank layout, so single-rank mode and any world size give the same numbers, and a resumed run the same
as an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hpcfl import __version__, checkpoint, supervise
from hpcfl.aggregate import add_fixed_point, fixed_point_exponent, fixed_point_to_float64
from hpcfl.client.stats import StatsContext, measure
from hpcfl.client.trainer import train_client
from hpcfl.federation import Federation, setup_federation
from hpcfl.metrics import classification_metrics, client_summary, predict_proba
from hpcfl.outputs import ServerRecord
from hpcfl.rundir import (COMPLETE, FRESH, RESUME, Opening, clear_run_dir, finish_run_info, open_run_dir,
                          record_start)
from hpcfl.runlock import RunLock
from hpcfl.seeds import generator, stream_seed
from hpcfl.supervise import RoundWatchdog, Where, add_rank_log, trace_path

log = logging.getLogger("hpcfl")

TRAINING_COLUMNS = ("train_loss", "steps", "max_abs", "update_sq_norm", "compute_s")
STARTUP: dict[str, float] = {}  # this process's start-up, in seconds since it started (benchmarks/launch.py)


class ClientTable:
    """N rows (one per client) × named float64 columns. Each rank fills the rows of the clients it hosts and
    leaves the others zero; ``sum_to_server`` adds every rank's table into the server's (one Reduce), exactly."""

    def __init__(self, num_clients: int, columns: tuple[str, ...]):
        self.columns = tuple(columns)
        self.values = np.zeros((num_clients, len(self.columns)))

    def __setitem__(self, client: int, row) -> None:
        self.values[client] = row

    def __getitem__(self, column: str) -> np.ndarray:
        return self.values[:, self.columns.index(column)]

    def finite(self, client: int) -> bool:
        return bool(np.isfinite(self.values[client]).all())

    def sum_to_server(self, comm) -> ClientTable:
        comm.reduce_sum(self.values, self.values)
        return self

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: self[name] for name in self.columns}


@dataclass
class RoundState:
    """What changes from round to round. Every rank holds w^t; the server also the metrics."""

    global_vec: np.ndarray  # w^t, and w^{t+1} once aggregated
    prev_weights: np.ndarray  # a^{t-1} (FedCE's c), known to every rank
    prev_local: dict[int, np.ndarray] = field(default_factory=dict)  # w_i^{t-1} of hosted clients, if kept
    t: int = 0
    rho: float = 0.0
    started_s: float = 0.0
    stats: dict[str, np.ndarray] = field(default_factory=dict)  # this round's statistics (server: all clients)
    compute_s: np.ndarray | None = None  # seconds of statistics + training per hosted client
    trained: dict[int, np.ndarray] = field(default_factory=dict)  # w_i^t of hosted clients
    training: ClientTable | None = None  # TRAINING_COLUMNS per client
    bad_here: set[int] = field(default_factory=set)  # hosted clients with non-finite models
    weights: np.ndarray | None = None  # a^t
    keep: float = 0.0
    exponent: int = 0  # of the fixed-point sum


# ------------------------------------------------------------------------------------------------ the phases

def weighted_sum(fed: Federation, vectors: dict[int, np.ndarray], weights: np.ndarray, keep: float,
                 global_vec: np.ndarray, exponent: int, skip=()) -> np.ndarray:
    """keep·w^t + Σ_i weights_i·vectors_i over every client of every rank: each rank sums its own clients, one
    Reduce brings the sums to the server. Returns the result on the server (float32), zeros elsewhere.
    Clients in ``skip`` (non-finite models) and clients of weight 0 add nothing."""
    terms = [cid for cid in sorted(vectors) if cid not in skip and weights[cid] != 0]
    size = fed.layout.size
    if fed.exact:
        acc = np.zeros(size, dtype=np.int64)
        for cid in terms:
            add_fixed_point(acc, weights[cid], vectors[cid], exponent)
    else:
        acc = np.zeros(size, dtype=np.float32)
        for cid in terms:
            acc += np.float32(weights[cid]) * vectors[cid]
    fed.comm.reduce_sum(acc, acc)
    out = np.zeros(size, dtype=np.float32)
    if fed.is_server:
        total = fixed_point_to_float64(acc, exponent) if fed.exact else acc.astype(np.float64)
        if keep:
            total += keep * global_vec.astype(np.float64)
        out[:] = total
    return out


def start_round(fed: Federation, s: RoundState, t: int, record: ServerRecord | None) -> None:
    """1. control: the round and its search distance ρ_t."""
    s.t, s.started_s = t, time.time()
    fed.where.round, fed.where.client = t, None
    fed.enter("broadcast")
    control = fed.comm.bcast(np.array([t, fed.algorithm.rho(t)], dtype=np.float64))
    s.rho = float(control[1])
    s.stats, s.compute_s = {}, np.zeros(fed.num_clients)
    if record is not None:  # the previous round's test-set evaluation, while the clients work
        record.catch_up()


def measure_statistics(fed: Federation, s: RoundState) -> None:
    """2. the statistics the algorithm asks for at w^t."""
    names = fed.algorithm.stats_before(s.t)
    if not names:
        return
    fed.enter("statistics")
    cfg, table = fed.cfg, ClientTable(fed.num_clients, names)
    for cid in fed.my_clients:
        fed.where.client = cid
        t0 = time.perf_counter()
        table[cid] = measure(names, StatsContext(
            fed.model, fed.layout, fed.clients[cid], fed.transform, s.global_vec,
            generator(cfg.run.seed, cid, s.t, "stats") if cfg.algorithm.stats_augment else None,
            cfg.eval.batch_size, s.rho, s.prev_local.get(cid), s.prev_weights[cid]))
        s.compute_s[cid] += time.perf_counter() - t0
    fed.where.client = None
    s.stats.update(table.sum_to_server(fed.comm).as_dict())


def train_clients(fed: Federation, s: RoundState) -> None:
    """3. local training of each hosted client from w^t."""
    cfg, layout = fed.cfg, fed.layout
    fed.where.phase = "local training"
    s.trained, s.training = {}, ClientTable(fed.num_clients, TRAINING_COLUMNS)
    for cid in fed.my_clients:
        fed.where.client = cid
        fed.enter("local training")
        t0 = time.perf_counter()
        layout.load_vector(fed.model, s.global_vec)
        torch.manual_seed(stream_seed(cfg.run.seed, cid, s.t, "train"))  # dropout etc., if a model has it
        loss, steps = train_client(fed.train_model, fed.clients[cid], cfg.train, fed.transform,
                                   generator(cfg.run.seed, cid, s.t, "train"), fed.local_optimizer, s.rho)
        vec = s.trained[cid] = layout.to_vector(fed.model)
        if cfg.debug.nan_at == f"{cid}:{s.t}":
            vec[0] = np.nan
        update = (vec - s.global_vec)[layout.param_mask]
        s.compute_s[cid] += time.perf_counter() - t0
        s.training[cid] = (loss, steps, np.abs(vec).max(), float(np.dot(update, update)), s.compute_s[cid])
    fed.where.client = None
    s.bad_here = {cid for cid in fed.my_clients if not s.training.finite(cid)}
    s.training.sum_to_server(fed.comm)
    s.stats.update({k: s.training[k] for k in ("train_loss", "steps", "update_sq_norm")})


def exchange_consensus(fed: Federation, s: RoundState) -> None:
    """3b. statistics of each client's update against a consensus of every client's, if the algorithm asks."""
    weights = fed.algorithm.consensus_weights(s.t, s.prev_weights)
    if weights is None:
        return
    fed.enter("cosines")
    comm = fed.comm
    exponent = fixed_point_exponent(finite_max(s.training["max_abs"]), fed.num_clients) if fed.is_server else 0
    exponent = int(comm.bcast(np.array([exponent], dtype=np.int64))[0])
    consensus = comm.bcast(weighted_sum(fed, s.trained, weights, 0.0, s.global_vec, exponent, skip=s.bad_here))
    names = fed.algorithm.consensus_stats
    table = ClientTable(fed.num_clients, names)
    for cid in fed.my_clients:
        table[cid] = fed.algorithm.consensus_statistics(s.trained[cid], s.global_vec, consensus, weights[cid],
                                                        fed.layout.param_mask)
    s.stats.update(table.sum_to_server(comm).as_dict())


def decide_weights(fed: Federation, s: RoundState) -> None:
    """4. the server's decision [a_1..a_N, keep, fixed-point exponent], broadcast."""
    fed.enter("weights")
    n = fed.num_clients
    decision = np.zeros(n + 2)
    if fed.is_server:
        bad = nonfinite_clients(s.training, s.stats)
        if bad and fed.cfg.run.on_nonfinite == "abort":
            raise FloatingPointError(f"client(s) {bad} sent non-finite parameters, loss or statistics "
                                     "(run.on_nonfinite = 'skip' leaves such clients out of the round)")
        rule_stats = s.stats
        if bad:  # the rule sees a neutral value for them (the mean of the others), then they get no weight
            log.warning("round %d: client(s) %s non-finite, left out of this round", s.t, bad)
            rule_stats = {k: np.where(np.isfinite(v), v, np.nanmean(np.where(np.isfinite(v), v, np.nan)))
                          for k, v in s.stats.items()}
        d = fed.algorithm.aggregate(s.t, fed.sizes, rule_stats)
        weights = leave_out(d.weights, bad) if bad else d.weights
        largest_term = finite_max(s.training["max_abs"]) * max(1.0, float(np.abs(weights).max()))
        exponent = fixed_point_exponent(largest_term, n)  # the range must hold every a_i * w_i
        decision[:n], decision[-2], decision[-1] = weights, d.keep, exponent
    fed.comm.bcast(decision)
    s.weights, s.keep, s.exponent = decision[:n], float(decision[-2]), int(decision[-1])


def aggregate(fed: Federation, s: RoundState) -> None:
    """5-6. per-rank weighted sums, one Reduce to the server; w^{t+1} back to everyone."""
    fed.enter("aggregation")
    s.global_vec = fed.comm.bcast(weighted_sum(fed, s.trained, s.weights, s.keep, s.global_vec, s.exponent,
                                               skip=s.bad_here))
    if fed.algorithm.keeps_local_model:
        s.prev_local = s.trained
    s.prev_weights = s.weights.copy()
    s.trained = {}


def evaluate(fed: Federation, s: RoundState, record: ServerRecord | None, t_start: float) -> None:
    """7. on evaluated rounds: each client on its held-out part; the server's metrics line (test sets later)."""
    cfg, t = fed.cfg, s.t
    if not ((t + 1) % cfg.eval.every == 0 or t == cfg.run.rounds - 1):
        if record is not None:
            record.progress.round_done(f"round {t + 1}/{cfg.run.rounds}  ({time.time() - s.started_s:.1f} s)")
        return
    fed.enter("evaluation")
    held_out = ClientTable(fed.num_clients, ("bacc", "acc"))  # w^{t+1} on each held-out part
    if (cfg.data.val_fraction > 0 and fed.my_clients) or fed.test_shares:  # w^{t+1}, for what this rank tests
        fed.layout.load_vector(fed.model, s.global_vec)
    if cfg.data.val_fraction > 0:
        for cid in fed.my_clients:
            fed.where.client = cid
            part = fed.val_parts[cid]
            if part is None:  # a shard too small to hold anything out
                held_out[cid] = np.nan
                continue
            m = classification_metrics(part.labels.numpy(), predict_proba(fed.model, part.images, fed.transform,
                                                                          cfg.eval.batch_size))
            held_out[cid] = (m["bacc"], m["acc"])
        fed.where.client = None
        held_out.sum_to_server(fed.comm)
    probabilities = test_on_client_ranks(fed) if fed.test_on_clients else None
    if record is None:
        return
    line = {"round": t, "algorithm": cfg.algorithm.name, "weights": [float(w) for w in s.weights], "keep": s.keep,
            "rho": s.rho, "stats": {k: [float(x) for x in v] for k, v in s.stats.items()},
            "train_loss": mean_train_loss(s.training)}
    if cfg.data.val_fraction > 0:
        line["clients"] = {"bacc": held_out["bacc"].tolist(), "acc": held_out["acc"].tolist()}
        line["client_summary"] = {k: client_summary(held_out[k], fed.corrupted) for k in ("bacc", "acc")}
    # where the round's time went: each client rank's own computing, the rest is protocol and waiting
    line["rank_compute_s"] = [float(s.training["compute_s"][group].sum()) for group in fed.assignment]
    line.update(time_s=time.time() - s.started_s, elapsed_s=time.time() - t_start)
    record.add(s.global_vec, line, probabilities)


def test_on_client_ranks(fed: Federation) -> dict[str, np.ndarray] | None:
    """eval.placement 'clients': each client rank predicts its share of every test set's rows with w^{t+1} (loaded
    by ``evaluate``), at once (no rank waits for a core the server's evaluation holds); the server gathers the
    probabilities."""
    probabilities = {}
    for name, rows in fed.test_rows.items():
        share = fed.test_shares.get(name)
        mine = np.zeros((0, fed.num_classes), dtype=np.float32)
        if share is not None and len(share):
            mine = predict_proba(fed.model, share, fed.transform, fed.cfg.eval.batch_size)
        probabilities[name] = fed.comm.gather_rows(mine, rows)
    return probabilities if fed.is_server else None


def checkpoint_or_stop(fed: Federation, s: RoundState, record: ServerRecord | None) -> bool:
    """8. checkpoint when due, at the end, or when a stop was requested; True: stop now."""
    fed.enter("checkpoint")
    cfg, t = fed.cfg, s.t
    last = t == cfg.run.rounds - 1
    asked = fed.comm.reduce_sum(np.array([float(supervise.stop_requested)]), np.zeros(1))  # on any rank
    plan = np.array([0, 0], dtype=np.int64)
    if fed.is_server:
        every, stop = cfg.run.checkpoint_every, bool(asked[0] > 0)
        plan[:] = (last or stop or (every > 0 and (t + 1) % every == 0)), (stop and not last)
    fed.comm.bcast(plan)
    if plan[0]:
        if record is not None:  # the checkpoint carries every metrics line up to this round
            record.catch_up()
        save_checkpoint(fed, s, record.runlog.lines if record else [])
    return bool(plan[1])


def save_checkpoint(fed: Federation, s: RoundState, lines: list[dict]) -> None:
    """Every rank writes its clients' kept models into the staging directory; the server completes it."""
    comm, out_dir, t = fed.comm, fed.out_dir, s.t
    if comm.is_server:
        checkpoint.begin(out_dir, t)
    comm.barrier()
    staging = checkpoint.staging_dir(out_dir, t)
    kept = s.prev_local if fed.algorithm.keeps_local_model else {}
    digests = np.zeros((fed.num_clients, 32), dtype=np.int64)  # each file's sha256, summed to the server
    for cid, vec in kept.items():
        checkpoint.save_array(checkpoint.client_path(staging, cid), vec)
        digests[cid] = checkpoint.digest(checkpoint.client_path(staging, cid))
    comm.reduce_sum(digests, digests)  # (also the barrier before the server completes the checkpoint)
    if comm.is_server:
        state = {"config_digest": fed.cfg.digest(), "hpcfl_version": __version__,
                 "algorithm": fed.algorithm.state_dict(), "prev_weights": s.prev_weights.tolist(), "metrics": lines}
        if fed.algorithm.keeps_local_model:
            state["client_sha256"] = [bytes(row.astype(np.uint8)).hex() for row in digests]
        checkpoint.commit(out_dir, t, state, s.global_vec)


# ----------------------------------------------------------------------------------------------- helpers

def nonfinite_clients(training: ClientTable, stats: dict[str, np.ndarray]) -> list[int]:
    """Clients whose training row (loss, parameters) or any statistic is NaN or infinite."""
    bad = ~np.isfinite(training.values).all(axis=1)
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


def mean_train_loss(training: ClientTable) -> float:
    """Step-weighted mean of the clients' training losses (clients with a non-finite loss left out)."""
    loss, steps = training["train_loss"], training["steps"]
    ok = np.isfinite(loss) & (steps > 0)
    return float(np.average(loss[ok], weights=steps[ok])) if ok.any() else float("nan")


def finite_max(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0


# ------------------------------------------------------------------------------------------------- the run

def start_state(fed: Federation, opening: Opening) -> tuple[RoundState, int, list[dict]]:
    """w^start on every rank, from the initial model or the checkpoint the server chose and checked: (state, first
    round, metrics lines). A checkpoint that does not fit this data and model is refused before anything is
    written (checkpoint.check_sizes); each client rank checks the kept models it reads."""
    comm, layout, n = fed.comm, fed.layout, fed.num_clients
    fed.where.phase = "resume"
    s = RoundState(global_vec=layout.to_vector(fed.model) if comm.is_server else layout.empty(),
                   prev_weights=np.full(n, 1.0 / n))
    start, lines = 0, []
    if opening.mode == RESUME:
        resume = np.zeros(n + 1)
        digests = np.zeros((n, 32), dtype=np.uint8)  # the kept client models' sha256, where recorded
        if comm.is_server:
            state, directory = opening.state, opening.checkpoint
            s.global_vec[:] = checkpoint.check_sizes(directory, state, n, layout.size,
                                                     fed.algorithm.keeps_local_model, fed.algorithm.check_state)
            fed.algorithm.load_state_dict(state["algorithm"])
            lines = state["metrics"]
            resume[0], resume[1:] = state["round"] + 1, state["prev_weights"]
            for cid, hexdigest in enumerate(state.get("client_sha256") or []):
                digests[cid] = np.frombuffer(bytes.fromhex(hexdigest), dtype=np.uint8)
        comm.bcast(resume)
        start, s.prev_weights = int(resume[0]), resume[1:].copy()
        if fed.algorithm.keeps_local_model:
            comm.bcast(digests)
            directory = fed.out_dir / f"checkpoint-{start - 1:06d}"
            for cid in fed.my_clients:
                path = checkpoint.client_path(directory, cid)
                checkpoint.check_digest(path, digests[cid].tobytes().hex() if digests[cid].any() else None)
                s.prev_local[cid] = checkpoint.load_array(path, layout.size)
        log.info("resuming %s after round %d", fed.out_dir, start)
    return s, start, lines


def run(cfg, comm, out_dir: Path, where: Where, overwrite: bool = False, force: bool = False) -> dict:
    """Run (or resume) the whole federation. Returns {"stopped": True} when stopped at a checkpoint on request."""
    import faulthandler

    lock = RunLock(out_dir) if comm.is_server else None
    # from here to the end a stuck rank cannot hang the job; the start-up timer of hpcfl.run hands over to it
    watchdog = RoundWatchdog(cfg.run.round_timeout_s, cfg.run.watchdog_floor_s, comm, where)
    faulthandler.cancel_dump_traceback_later()
    try:
        return _run(cfg, comm, out_dir, where, lock, overwrite, force, watchdog)
    finally:
        watchdog.stop()
        if lock is not None:
            lock.release()
        comm.close()


def _run(cfg, comm, out_dir: Path, where: Where, lock: RunLock | None, overwrite: bool, force: bool,
         watchdog: RoundWatchdog) -> dict:
    t_start = time.time()
    torch.set_num_threads(cfg.run.torch_threads)
    where.phase = "setup"
    opening = Opening(FRESH)
    if comm.is_server:  # the server decides, holding the run directory's lock; everyone follows
        out_dir.mkdir(parents=True, exist_ok=True)
        replaced = lock.acquire()
        if replaced:
            log.info("%s: took over the lock of a run that is gone (%s)", out_dir, replaced["stale"])
        opening = open_run_dir(cfg, out_dir, overwrite, force)
    mode = int(comm.bcast(np.array([opening.mode], dtype=np.int64))[0])
    if mode == COMPLETE:
        log.info("%s: this run is already complete (--overwrite to run it again)", out_dir)
        return {}
    add_rank_log(out_dir, comm.rank)
    where.trace_to(trace_path(out_dir, comm.rank), comm.rank)
    comm.watch(where)
    return _rounds(cfg, comm, out_dir, where, opening, mode, watchdog, t_start)


def _rounds(cfg, comm, out_dir: Path, where: Where, opening: Opening, mode: int, watchdog: RoundWatchdog,
            t_start: float) -> dict:
    fed = setup_federation(cfg, comm, out_dir, where)
    s, start, lines = start_state(fed, opening if comm.is_server else Opening(mode))
    comm.bcast(s.global_vec)  # w^start: from here on every rank has checked its part of the checkpoint
    STARTUP["ready_s"] = supervise.process_age()
    record = None
    if comm.is_server:
        if opening.overwrite:  # only now, with the data and any checkpoint checked, may the old run go
            clear_run_dir(out_dir)
        record_start(fed, mode, start)
        record = ServerRecord(fed, lines, start)

    for t in range(start, cfg.run.rounds):
        watchdog.new_round()
        start_round(fed, s, t, record)
        measure_statistics(fed, s)
        train_clients(fed, s)
        exchange_consensus(fed, s)
        decide_weights(fed, s)
        aggregate(fed, s)
        evaluate(fed, s, record, t_start)
        if "first_round_s" not in STARTUP:
            STARTUP["first_round_s"] = supervise.process_age()
            log.info("start-up: imports done %.2f s, ready to train %.2f s, first round done %.2f s after the process "
                     "started", STARTUP.get("imports_s", float("nan")), STARTUP["ready_s"], STARTUP["first_round_s"])
        if checkpoint_or_stop(fed, s, record):
            if record:
                record.progress.close()
            where.end("stopped")
            log.info("stopped after round %d at a checkpoint: run the same command again to resume", t + 1)
            return {"stopped": True}

    where.phase = "finish"
    comm.barrier()
    if record is not None:
        record.progress.close()
        record.runlog.close()
        checkpoint.save_array(out_dir / "final_model.npy", s.global_vec)  # before "finished" marks the run complete
        finish_run_info(out_dir, time.time() - t_start)
    where.end("finished")
    return {}
