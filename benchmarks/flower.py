"""Ratio benchmark of a federated round: hpcfl under mpiexec against a Flower simulation doing the same work.

Command (the Flower side needs Flower, ``pip install "flwr[simulation]"``; ``--only hpcfl`` runs without it)::

    python -m benchmarks.flower [--rounds 6] [--workers 2] [--only hpcfl|flower] [--set KEY=VALUE ...]

The same work on both sides: the built-in benchmark (``configs/default.toml`` with ``runs.SMALL_CNN``, plus ``--set``
overrides: 20 clients, the last 4 corrupted, the small GroupNorm CNN of width 16 from scratch on 32-px grayscale
images), FedAvg with every client in
every round, each client's local training by hpcfl's ``train_client`` (Adam lr 2e-3, weight decay 5e-4, batch 16,
1 epoch, logit-adjusted CE with the client's class prior, ``BatchTransform``'s random affine + flip, generators
seeded by ``hpcfl.seeds``: round 1's client losses are the same on both sides), and after every round the global
model evaluated on the clean and the corrupted test set (``predict_proba`` + ``classification_metrics``). One
torch thread per process on both sides.

  hpcfl   ``mpiexec -n WORKERS+1 python -m hpcfl.run``: a server and WORKERS client ranks, each hosting a fixed
          share of the clients and training them one after another; a Reduce and a broadcast of the flat model
          per round; the server evaluates round t's model on the test sets during round t+1 (at once before a
          checkpoint: every 5 rounds by default). A round ends when its aggregate is on the server
          (metrics.jsonl's ``elapsed_s``, see runs.py). Run by hpcfl's own Python
          (``--hpcfl-python``: by default, from a Flower environment, the one whose packages hold mpi4py).
  flower  this script in a child process, running ``flwr.simulation.run_simulation`` (Flower's simulation engine
          with its Ray backend, telemetry off): one SuperNode per client, WORKERS Ray actors of 1 CPU. The
          ClientApp loads the message's global state_dict into its model, trains the client with
          ``train_client`` and replies with its state_dict and sample count; each actor process builds the model
          once and reads a client's shard (``load_client``) the first time it trains that client, then keeps
          both, as an hpcfl client rank does. The ServerApp runs Flower's message-API ``FedAvg`` (weighted by
          sample counts, no federated evaluation) with an ``evaluate_fn`` that evaluates centrally after every
          round (not w^0: hpcfl does not). A round ends when that evaluation ends.

Both sides are fresh launches, timed from the moment this script starts them (the built-in data is built before,
untimed). A round's time is the time between the ends of consecutive rounds; rounds 2..R are used (the first pays
for warm-up) and their medians compared: the ratio hpcfl round / Flower round, the goal of issue #14 is <= 0.5.
Also shown: the time from launch to the end of round 1 (hpcfl: when its rank 0 prints its "start-up" line, right
after round 1's aggregation) and the final model's balanced accuracy on the clean test set.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from statistics import median

from benchmarks.runs import REPO, SMALL_CNN, round_periods

GOAL = 0.5
INSTALL = ("Flower is not importable here. Install it into an environment that also sees this one's packages:\n"
           "  python3 -m venv /tmp/flwrenv && echo {} > /tmp/flwrenv/lib/python{}/site-packages/hpcfl.pth\n"
           '  /tmp/flwrenv/bin/pip install "flwr[simulation]"; /tmp/flwrenv/bin/python -m benchmarks.flower\n'
           "or run the hpcfl side alone: --only hpcfl")
_STATE: dict = {}  # per process (a Ray actor or the Flower server): config, model, transform, data


def launch(cmd: list[str], marker: str | None = None, timeout_s: int = 3600) -> tuple[float, float, str]:
    """Run ``cmd`` in the repository; returns (its start time, seconds until a stdout line held ``marker``, output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    print(f"running: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0, seen, out = time.time(), float("nan"), []
    proc = subprocess.Popen(["timeout", "-k", "10", str(timeout_s), *cmd], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if seen != seen and marker and marker in line:
            seen = time.time() - t0
        out.append(line)
    if proc.wait() != 0:
        sys.stderr.write("".join(out)[-6000:])
        raise SystemExit(f"{cmd[0]} ... failed (exit code {proc.returncode})")
    return t0, seen, "".join(out)


def hpcfl_python() -> str:
    """hpcfl's own Python: this one, or, from a Flower environment that sees hpcfl's packages through a .pth file,
    the one of the environment that holds mpi4py (its MPI library and mpiexec are there, not here)."""
    spec = importlib.util.find_spec("mpi4py")  # <env>/lib/pythonX.Y/site-packages/mpi4py/__init__.py
    other = Path(spec.origin).parents[4] / "bin" / "python" if spec and spec.origin else None
    mpi_here = (Path(sys.executable).parent / "mpiexec").exists()
    return str(other) if other and other.exists() and not mpi_here else sys.executable


def run_hpcfl(args) -> dict:
    python, mpiexec = args.hpcfl_python, Path(args.hpcfl_python).parent / "mpiexec"
    mpiexec = str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec") or "mpiexec"
    with tempfile.TemporaryDirectory(prefix="hpcfl-flower-") as tmp:
        cmd = [mpiexec, "-n", str(args.workers + 1), python, "-m", "hpcfl.run", "--out", f"{tmp}/run"]
        cmd += [a for s in [f"run.rounds={args.rounds}", "eval.every=1", *args.sets] for a in ("--set", s)]
        _, first, _ = launch(cmd, marker="start-up: ")
        lines = [json.loads(x) for x in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
    return {"periods": round_periods(lines), "first": first, "bacc": lines[-1]["metrics"]["clean"]["bacc"]}


def run_flower(args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.flower", "--flower-child", "--rounds", str(args.rounds),
           "--workers", str(args.workers), *[a for s in args.sets for a in ("--set", s)]]
    t0, _, out = launch(cmd)
    result = json.loads(next(x for x in out.splitlines() if x.startswith("flower result: ")).split(": ", 1)[1])
    ends = result["ends"]
    return {"periods": [b - a for a, b in zip(ends, ends[1:])], "first": ends[0] - t0, "bacc": result["bacc"]}


def state(sets: list[str]) -> dict:
    """This process's config, data directory, model (w^0 from the run seed, as hpcfl's) and transform, made once."""
    if not _STATE:
        import torch

        from hpcfl.config import load
        from hpcfl.data.builtin import builtin_dir
        from hpcfl.data.shards import Manifest
        from hpcfl.data.transforms import BatchTransform
        from hpcfl.models import build_model, input_channels
        from hpcfl.seeds import stream_seed

        torch.set_num_threads(1)
        cfg = load(None, sets)
        directory = builtin_dir(REPO / cfg.data.cache_dir, cfg.benchmark)  # Ray workers may not start in REPO
        manifest = Manifest.load(directory)
        channels = manifest.image_shape[2]
        torch.manual_seed(stream_seed(cfg.run.seed, -1, -1, "init"))
        model = build_model(cfg.model.name, manifest.num_classes, channels, cfg.model.width,
                            cfg.model.pretrained_path, cfg.model.cnn_norm)
        if cfg.train.channels_last:
            model.to(memory_format=torch.channels_last)
        transform = BatchTransform(input_channels(cfg.model.name, channels), "cpu", cfg.train.channels_last)
        _STATE.update(cfg=cfg, directory=directory, manifest=manifest, model=model, transform=transform, clients={})
    return _STATE


def client_train(msg, context):
    """The ClientApp's train: hpcfl's local work for the client of this SuperNode, from the message's model."""
    import torch
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from hpcfl.client.trainer import train_client
    from hpcfl.federation import load_client
    from hpcfl.seeds import generator, stream_seed

    conf = msg.content["config"]
    s = state(list(conf["sets"]))
    cfg, model, cid, t = s["cfg"], s["model"], int(context.node_config["partition-id"]), int(conf["server-round"]) - 1
    if cid not in s["clients"]:
        s["clients"][cid] = load_client(s["directory"], s["manifest"], cid, cfg.data.val_fraction, cfg.run.seed)[0]
    data = s["clients"][cid]
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    torch.manual_seed(stream_seed(cfg.run.seed, cid, t, "train"))
    loss, _ = train_client(model, data, cfg.train, s["transform"], generator(cfg.run.seed, cid, t, "train"),
                           cfg.local_optimizer())
    reply = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                        "metrics": MetricRecord({"train_loss": loss, "num-examples": data.n})})
    return Message(content=reply, reply_to=msg)


def flower_child(args) -> int:
    """The Flower side, in its own process; prints the rounds' end times (time.time()) and the final clean BACC."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from hpcfl.data.shards import read_checked
    from hpcfl.metrics import classification_metrics, predict_proba

    s = state(args.sets)
    cfg, model, n = s["cfg"], s["model"], s["cfg"].benchmark.num_clients
    tests = {e.name: read_checked(s["directory"], e, s["manifest"]) for e in s["manifest"].test_sets}
    ends, bacc = [], [float("nan")]

    def evaluate(server_round, arrays):
        if server_round == 0:
            return None
        model.load_state_dict(arrays.to_torch_state_dict())
        res = {name: classification_metrics(t.labels, predict_proba(model, torch.from_numpy(t.images), s["transform"],
                                                                    cfg.eval.batch_size)) for name, t in tests.items()}
        ends.append(time.time())
        bacc[0] = res["clean"]["bacc"]
        return MetricRecord({f"{name}_bacc": r["bacc"] for name, r in res.items()})

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        strategy.start(grid, ArrayRecord(model.state_dict()), num_rounds=args.rounds,
                       train_config=ConfigRecord({"sets": list(args.sets)}), evaluate_fn=evaluate)

    client_app = ClientApp()
    client_app.train()(client_train)
    run_simulation(server_app, client_app, num_supernodes=n, backend_config={
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {"num_cpus": args.workers, "num_gpus": 0, "logging_level": "error", "log_to_driver": False}})
    if len(ends) != args.rounds:
        raise SystemExit(f"Flower ran {len(ends)} of {args.rounds} rounds")
    print(f"flower result: {json.dumps({'ends': ends, 'bacc': bacc[0]})}", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flower", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds per run (default 6)")
    p.add_argument("--workers", type=int, default=2, help="hpcfl client ranks = Flower actors (default 2)")
    p.add_argument("--only", choices=("hpcfl", "flower"), help="run one side only")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="extra config override for both sides (repeatable)")
    p.add_argument("--hpcfl-python", default=hpcfl_python(), help="the Python of hpcfl's side (default: this one, "
                   "or the one of the environment that holds mpi4py when mpiexec is not beside this one)")
    p.add_argument("--flower-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    extra = list(args.sets)
    if not args.flower_child:  # both sides: the small CNN from scratch, whatever configs/default.toml says
        args.sets = [*SMALL_CNN, *args.sets]
    if args.rounds < 3 or args.workers < 1:
        p.error("--rounds must be at least 3 and --workers at least 1")
    if args.flower_child:
        return flower_child(args)
    sides = [args.only] if args.only else ["hpcfl", "flower"]
    if "flower" in sides and not all(importlib.util.find_spec(m) for m in ("flwr", "ray")):
        print(INSTALL.format(sysconfig.get_paths()["purelib"], sysconfig.get_python_version()), file=sys.stderr)
        return 2

    from hpcfl.config import load
    from hpcfl.data.builtin import build, builtin_dir

    cfg = load(None, args.sets)
    directory = builtin_dir(REPO / cfg.data.cache_dir, cfg.benchmark)
    if not (directory / "manifest.json").is_file():
        print(f"building the built-in benchmark in {directory}", file=sys.stderr, flush=True)
        build(directory, cfg.benchmark)
    results = {side: (run_hpcfl if side == "hpcfl" else run_flower)(args) for side in sides}

    print(subprocess.run([args.hpcfl_python, "-c", "from benchmarks.runs import machine_line; print(machine_line())"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout, end="")
    print(f"setup: built-in benchmark (configs/default.toml), {cfg.benchmark.num_clients} clients, FedAvg, "
          f"{args.rounds} rounds, medians over rounds 2..{args.rounds}; extra settings: {' '.join(extra) or 'none'}; "
          f"model: {' '.join(SMALL_CNN)}")
    if "hpcfl" in sides:
        print(f"  hpcfl   mpiexec -n {args.workers + 1}: a server and {args.workers} client ranks, "
              f"torch threads {cfg.run.torch_threads} ({args.hpcfl_python})")
    if "flower" in sides:
        import flwr
        import ray

        print(f"  flower  flwr {flwr.__version__} run_simulation, Ray {ray.__version__}: "
              f"{cfg.benchmark.num_clients} SuperNodes, {args.workers} actors of 1 CPU, torch threads 1")
    print(f"\n{'side':<8}{'round s':>10}{'first round from launch s':>28}{'final clean bacc':>18}")
    for side, r in results.items():
        print(f"{side:<8}{median(r['periods']):>10.3f}{r['first']:>28.2f}{r['bacc']:>18.3f}")
    for side, r in results.items():
        print(f"{side} rounds 2..{args.rounds} s: {' '.join(f'{x:.3f}' for x in r['periods'])}")
    if len(results) == 2:
        ratio = median(results["hpcfl"]["periods"]) / median(results["flower"]["periods"])
        print(f"\nratio hpcfl round / Flower round: {ratio:.3f}  (goal <= {GOAL}) "
              f"[{'ok' if ratio <= GOAL else 'MISS'}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
