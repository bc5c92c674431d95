"""Ratio benchmark of one round's model exchange: hpcfl's comm layer vs raw mpi4py vs pickled state_dicts.

Command (launches itself under ``mpiexec -n W`` once per W, then prints a table and the ratios)::

    python -m benchmarks.comm [--ranks 3 6] [--params 11200000] [--repeats 5] [--clients 20] [--json PATH]

or one world size directly: ``mpirun -n 6 python -m benchmarks.comm``.

For a model of P float32 values (default 11.2M, the size of the ResNet-18 hpcfl trains), each method does what
travels in steps 5-6 of a round (hpcfl/protocol.py): the server sends the global model to every rank, then
the client ranks' contributions are summed on the server.

  (a) hpcfl_exact   ``MPIComm.bcast(float32 P)`` + ``MPIComm.reduce_sum(int64 P)``, the server's accumulator
                    passed in place, exactly as protocol.py does with ``aggregation = "exact"``;
  (b) hpcfl_f32     the same with a float32 accumulator (``aggregation = "float32"``);
  (c) raw_f32       ``COMM_WORLD.Bcast(float32)`` + ``COMM_WORLD.Reduce(float32, SUM)``: no arrival barrier;
  (d) raw_int64     (c) with the int64 payload of (a) in the Reduce, so (a)/(d) is hpcfl's own overhead
                    (the arrival Ibarrier and the Python around it) and (a)/(c) adds the price of exactness
                    (twice the bytes in the Reduce);
  (e) pickled       what a naive implementation does: ``COMM_WORLD.bcast(state_dict)`` (lowercase, pickled) of a
                    torch state_dict holding the same values, then ``COMM_WORLD.gather(state_dict)`` of every
                    client rank's state_dict to the server (one model per rank, as hpcfl sends);
  (f) pickled_clients  the naive design: the same bcast, then every *client's* state_dict gathered to the server
                    (``--clients``, 20 by default, spread over the client ranks as hpcfl spreads them), which then
                    averages N models itself. (e) isolates the price of pickling, (f) that of pickling plus
                    moving N models instead of one partial sum per rank.

The state_dict of (e) is shaped like a real torchvision ResNet-18 whenever P allows one (from 11,186,625 to
11,699,112 values: the classifier head takes the rest, 513 values per class; the 1000-class ImageNet model is
``--params 11699112``). P is then rounded to that model's size and every method uses the rounded P. Other P
give a few tensors summing to P.

Every method runs once to warm up, then ``--repeats`` times; the methods take turns within each repeat (in a
rotating order) so that noise from other processes on the machine hits them alike. A measurement starts when
a rank leaves an opening ``Barrier`` and ends when that rank's part of the exchange returns; the time of a
repeat is the maximum over ranks (the server's time alone would miss a Bcast still arriving elsewhere), and the
table shows the median over repeats. Goals: hpcfl / raw <= 1.2, pickled / hpcfl >= 10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PARAMS = 11_200_000
METHODS = ["hpcfl_exact", "hpcfl_f32", "raw_f32", "raw_int64", "pickled", "pickled_clients"]
LABELS = {
    "hpcfl_exact": "(a) hpcfl exact (int64 reduce)",
    "hpcfl_f32": "(b) hpcfl float32",
    "raw_f32": "(c) raw mpi4py float32",
    "raw_int64": "(d) raw mpi4py int64 reduce",
    "pickled": "(e) pickled state_dict bcast+gather",
    "pickled_clients": "(f) pickled, one state_dict per client",
}
# (numerator, denominator, goal kind, goal value)
RATIOS = [
    ("hpcfl_exact", "raw_f32", "<=", 1.2),
    ("hpcfl_f32", "raw_f32", "<=", 1.2),
    ("hpcfl_exact", "raw_int64", "<=", 1.2),
    ("pickled", "hpcfl_exact", ">=", 10.0),
    ("pickled", "hpcfl_f32", ">=", 10.0),
    ("pickled_clients", "hpcfl_exact", ">=", 10.0),
    ("pickled_clients", "hpcfl_f32", ">=", 10.0),
]
# The worker's result reaches the parent as one stdout line with this prefix (MPI's own output may surround it).
MARKER = "BENCHMARKS_COMM_RESULT "

# ResNet-18 (torchvision) float values: 11,186,112 in the backbone, 513 per class in the head (512 weights + bias).
_RESNET18_BACKBONE, _RESNET18_PER_CLASS = 11_186_112, 513


# ---------------------------------------------------------------------------------------------------------------
# The payload


def resnet18_classes(params: int) -> int | None:
    """The number of classes that makes a ResNet-18 state_dict hold about ``params`` floats, or None if no
    ResNet-18 between 1 and 1000 classes comes within half a class of it."""
    k = round((params - _RESNET18_BACKBONE) / _RESNET18_PER_CLASS)
    return k if 1 <= k <= 1000 else None


def effective_params(params: int) -> int:
    """P as measured: rounded to a whole ResNet-18 when (e) uses one, so that every method moves the same P."""
    k = resnet18_classes(params)
    return params if k is None else _RESNET18_BACKBONE + _RESNET18_PER_CLASS * k


def make_state_dict(params: int) -> dict:
    """A torch state_dict holding ``effective_params(params)`` float32 values, shaped like the real thing when
    possible: the number and sizes of tensors drive pickling costs."""
    import torch

    k = resnet18_classes(params)
    if k is not None:
        import torchvision

        model = torchvision.models.resnet18(num_classes=k)
        return {name: t.detach().clone() for name, t in model.state_dict().items()}
    # A few tensors of a conv net's usual ranks; the last one takes the remainder so the total is exactly P.
    sizes = [params // 2, params // 4, params // 8]
    sizes.append(params - sum(sizes))
    return {f"layer{i}.weight": torch.randn(n) * 0.05 for i, n in enumerate(sizes)}


# ---------------------------------------------------------------------------------------------------------------
# Worker: runs on every rank under mpiexec


def launched_by_mpi() -> bool:
    """True under an MPI launcher (MPICH/Hydra, Open MPI, Slurm's srun with PMI), without initialising MPI:
    a singleton MPI_Init in the parent would be pointless and may confuse the mpiexec it starts."""
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"):
        if var in os.environ:
            return True
    return False


def machine_info() -> dict:
    import mpi4py
    import torch
    from mpi4py import MPI

    try:
        cores = len(os.sched_getaffinity(0))  # what this process may use, e.g. inside a batch job
    except AttributeError:  # not Linux
        cores = os.cpu_count()
    library = " ".join(MPI.Get_library_version().strip().splitlines()[0].split())
    return {
        "cores": cores, "cpu_count": os.cpu_count(), "machine": platform.machine(), "platform": platform.platform(),
        "python": platform.python_version(), "mpi_library": library, "mpi_standard": "%d.%d" % MPI.Get_version(),
        "mpi4py": mpi4py.__version__, "numpy": np.__version__, "torch": torch.__version__,
    }


def worker(args) -> dict | None:
    """Measure every method on this world; returns the result on rank 0, None elsewhere."""
    from mpi4py import MPI
    import torch

    from hpcfl.comm import SERVER, MPIComm, assign_clients, world

    torch.set_num_threads(1)  # as hpcfl does: 6 ranks share 2 cores
    mpi = MPI.COMM_WORLD
    if mpi.Get_size() < 2:
        raise SystemExit("benchmarks.comm: needs at least 2 ranks (a server and a client rank)")
    comm = world()
    if not isinstance(comm, MPIComm):
        raise SystemExit("benchmarks.comm: HPCFL_NO_MPI=1 is set: unset it to benchmark the MPI comm layer")
    rank, size = comm.rank, comm.size
    root = rank == SERVER
    P = effective_params(args.params)

    # Buffers as protocol.py has them: one global float32 vector everywhere; an accumulator per rank, zero on the
    # server (it hosts no client in a multi-rank job). Random contents: summing them costs what real ones do.
    rng = np.random.default_rng(rank)
    global_vec = rng.standard_normal(P, dtype=np.float32) * np.float32(0.05)
    if root:
        acc_i64, acc_f32 = np.zeros(P, np.int64), np.zeros(P, np.float32)
        recv_i64, recv_f32 = np.empty(P, np.int64), np.empty(P, np.float32)
    else:
        # Fixed-point terms are large integers; 2^50 leaves room for any world size's sum in int64.
        acc_i64 = rng.integers(-2 ** 50, 2 ** 50, P, dtype=np.int64)
        acc_f32 = rng.standard_normal(P, dtype=np.float32) * np.float32(0.05)
        recv_i64 = recv_f32 = None
    torch.manual_seed(rank)
    state_dict = make_state_dict(args.params)
    sd_values = sum(t.numel() for t in state_dict.values() if t.is_floating_point())
    assert sd_values == P, (sd_values, P)
    # (f): this rank's clients, each with its own copy (pickle would send one shared object only once)
    my_count = 0 if root else len(assign_clients([1] * args.clients, size - 1)[rank - 1])
    client_sds = [{k: v.clone() for k, v in state_dict.items()} for _ in range(my_count)]

    def hpcfl_exact():
        comm.bcast(global_vec)
        comm.reduce_sum(acc_i64, acc_i64)

    def hpcfl_f32():
        comm.bcast(global_vec)
        comm.reduce_sum(acc_f32, acc_f32)

    def raw_f32():
        mpi.Bcast(global_vec, root=SERVER)
        mpi.Reduce(acc_f32, recv_f32, op=MPI.SUM, root=SERVER)

    def raw_int64():
        mpi.Bcast(global_vec, root=SERVER)
        mpi.Reduce(acc_i64, recv_i64, op=MPI.SUM, root=SERVER)

    def pickled():
        got = mpi.bcast(state_dict if root else None, root=SERVER)
        gathered = mpi.gather(None if root else state_dict, root=SERVER)
        return got, gathered  # freed by the caller, after the clock stops

    def pickled_clients():
        got = mpi.bcast(state_dict if root else None, root=SERVER)
        gathered = mpi.gather(None if root else client_sds, root=SERVER)
        return got, gathered

    run = {"hpcfl_exact": hpcfl_exact, "hpcfl_f32": hpcfl_f32, "raw_f32": raw_f32, "raw_int64": raw_int64,
           "pickled": pickled, "pickled_clients": pickled_clients}
    times = np.zeros((len(METHODS), args.repeats + 1))  # column 0: warm-up
    for rep in range(args.repeats + 1):
        # Rotate the order so no method always follows the memory churn of the pickled one.
        order = METHODS[rep % len(METHODS):] + METHODS[:rep % len(METHODS)]
        for name in order:
            if root:  # the in-place reductions leave sums in the server's accumulators
                acc_i64.fill(0)
                acc_f32.fill(0)
            mpi.Barrier()
            t0 = time.perf_counter()
            out = run[name]()
            times[METHODS.index(name), rep] = time.perf_counter() - t0
            del out
            mpi.Barrier()

    worst = np.empty_like(times) if root else None
    mpi.Reduce(times, worst, op=MPI.MAX, root=SERVER)
    if not root:
        return None
    samples = {name: [1e3 * float(x) for x in worst[i, 1:]] for i, name in enumerate(METHODS)}
    return {
        "world_size": size, "params": P, "repeats": args.repeats, "machine": machine_info(),
        "ms": {name: statistics.median(s) for name, s in samples.items()},
        "samples_ms": samples, "warmup_ms": {name: 1e3 * float(worst[i, 0]) for i, name in enumerate(METHODS)},
    }


def worker_main(args) -> int:
    from mpi4py import MPI

    try:
        result = worker(args)
    except BaseException:
        # An exception on one rank would leave the others waiting in a collective forever: end the job.
        sys.stderr.write(f"benchmarks.comm: rank {MPI.COMM_WORLD.Get_rank()} failed\n{traceback.format_exc()}")
        sys.stderr.flush()
        MPI.COMM_WORLD.Abort(1)
        return 1
    if result is not None:
        if args.worker:
            print(MARKER + json.dumps(result), flush=True)
        else:  # launched by hand under mpiexec: report this one world size
            finish(args, {str(result["world_size"]): result})
    return 0


# ---------------------------------------------------------------------------------------------------------------
# Parent: launches the workers and reports


def find_mpiexec(given: str | None) -> str:
    from benchmarks.runs import find_mpiexec as beside_python_or_on_path

    return given or beside_python_or_on_path()


def launch(args, ranks: int) -> dict:
    cmd = [find_mpiexec(args.mpiexec), "-n", str(ranks), sys.executable, "-m", "benchmarks.comm", "--worker",
           "--params", str(args.params), "--repeats", str(args.repeats), "--clients", str(args.clients)]
    # `timeout` sends TERM first: the launcher then ends every rank (a KILL may leave orphans).
    timeout = shutil.which("timeout")
    if timeout:
        cmd = [timeout, "-k", "10", str(args.timeout), *cmd]
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"running {ranks} ranks: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=None if timeout else args.timeout + 10)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-5000:])
        raise SystemExit(f"benchmarks.comm: the {ranks}-rank run failed (exit code {proc.returncode}"
                         f"{', timed out' if proc.returncode in (124, 137) else ''})")
    result = json.loads(lines[-1][len(MARKER):])
    result["launch_s"] = time.time() - t0
    return result


def ratios(result: dict) -> dict:
    ms = result["ms"]
    return {f"{a}/{b}": ms[a] / ms[b] for a, b, _, _ in RATIOS}


def passes(kind: str, goal: float, value: float) -> bool:
    return value <= goal if kind == "<=" else value >= goal


def report(results: dict) -> tuple[str, dict]:
    """The printed table and the JSON document, from {world size: worker result}."""
    sizes = sorted(results, key=int)
    first = results[sizes[0]]
    m, P = first["machine"], first["params"]
    k = resnet18_classes(P)
    shape = f"ResNet-18 state_dict with a {k}-class head" if k is not None else "a few tensors"
    lines = [
        f"hpcfl comm benchmark: one round's model exchange, P = {P:,} float32 values ({4 * P / 2 ** 20:.1f} MiB; "
        f"pickled as {shape})",
        f"machine: {m['cores']} cores ({m['machine']}, {m['platform']}), Python {m['python']}, {m['mpi_library']} "
        f"(MPI {m['mpi_standard']}), mpi4py {m['mpi4py']}, numpy {m['numpy']}, torch {m['torch']}",
        f"time: median over {first['repeats']} repeats (after 1 warm-up) of the max over ranks, from leaving an "
        "opening barrier to the end of the exchange; methods interleaved",
        "",
    ]
    width = 38
    head = f"{'ms':<{width}}" + "".join(f"{f'W={w}':>12}" for w in sizes)
    lines += [head, "-" * len(head)]
    for name in METHODS:
        lines.append(f"{LABELS[name]:<{width}}" + "".join(f"{results[w]['ms'][name]:>12.1f}" for w in sizes))
    lines += ["", f"{'ratio (goal)':<{width}}" + "".join(f"{f'W={w}':>12}" for w in sizes),
              "-" * len(head)]
    table_ratios = {w: ratios(results[w]) for w in sizes}
    verdicts: dict = {w: {} for w in sizes}
    for a, b, kind, goal in RATIOS:
        key = f"{a}/{b}"
        cells = ""
        for w in sizes:
            value = table_ratios[w][key]
            ok = passes(kind, goal, value)
            verdicts[w][key] = "PASS" if ok else "MISS"
            cells += f"{value:>7.2f} {'PASS' if ok else 'MISS'}"
        lines.append(f"{f'{key} ({kind} {goal:g})':<{width}}" + cells)
    lines += [
        "",
        "goals: hpcfl / raw <= 1.2 (the comm layer costs little over bare mpi4py); "
        "pickled / hpcfl >= 10 (flat buffers beat pickled state_dicts).",
        "hpcfl_exact/raw_f32 includes the price of exactness (the int64 Reduce moves twice the bytes); "
        "hpcfl_exact/raw_int64 is the comm layer's own overhead.",
    ]
    doc = {
        "params": P, "repeats": first["repeats"], "machine": m,
        "timing": "median over repeats of the max over ranks (ms), from leaving an opening barrier to the end of "
                  "the exchange",
        "goals": {f"{a}/{b}": f"{kind} {goal:g}" for a, b, kind, goal in RATIOS},
        "runs": results, "ratios": table_ratios, "verdicts": verdicts,
    }
    return "\n".join(lines), doc


def finish(args, results: dict) -> None:
    text, doc = report(results)
    print(text, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.comm", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[3, 6], help="world sizes to run (default: 3 6)")
    p.add_argument("--params", type=int, default=DEFAULT_PARAMS,
                   help=f"model size in float32 values (default {DEFAULT_PARAMS:,}, ResNet-18)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up (default 5)")
    p.add_argument("--clients", type=int, default=20, help="clients of the naive per-client gather (f) (default 20)")
    p.add_argument("--json", help="also write the results as JSON to this path")
    p.add_argument("--mpiexec", help="launcher (default: the mpiexec beside this Python, else on PATH)")
    p.add_argument("--timeout", type=int, default=900, help="seconds allowed per world size (default 900)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # set on the ranks the parent starts
    args = p.parse_args(argv)
    if min(args.ranks) < 2:
        p.error("--ranks: every world size needs at least 2 ranks (a server and a client rank)")
    if args.repeats < 1 or args.params < 1000:
        p.error("--repeats must be >= 1 and --params >= 1000")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker or launched_by_mpi():
        return worker_main(args)
    results = {str(w): launch(args, w) for w in args.ranks}
    finish(args, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
