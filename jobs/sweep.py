"""Sweeps: algorithms × seeds × grid values → one hpcfl run per cell, as a Slurm job array or a local script.

    python -m jobs sweep --config C --algorithms fedavg fedism --seeds 0 1 2 \\
        [--set section.key=value ...] [--grid section.key=v1,v2,...] --out-root runs/sweep1 \\
        [--launcher srun|mpirun|local] [--ranks 6] [--nodes 1] [--gpus-per-node 0] [--time 04:00:00] \\
        [--partition P] [--account A] [--signal-seconds 300] [--max-parallel K] [--submit]
    python -m jobs status runs/sweep1

Every cell gets the run directory ``OUT_ROOT/<algorithm>[-<key>=<value>...]-s<seed>`` and the arguments
``--config C --set algorithm.name=A --set run.seed=S [--set ...] --out DIR`` of ``python -m hpcfl.run``. Each
cell's resolved config is checked with ``hpcfl.config.load`` before anything is written, so a typo is refused here
(exit 2) rather than on the cluster.

Written into OUT_ROOT:

* ``cells.tsv`` — one line per cell: array index, run directory, the shell-quoted arguments of hpcfl.run;
* ``sweep.sbatch`` (launchers srun and mpirun) — a Slurm job array, one task per cell; each task reads its line of
  cells.tsv, runs hpcfl with the chosen launcher, forwards Slurm's pre-emption warning (USR1) to it and requeues
  itself when hpcfl stopped at a checkpoint (exit code 3), so that the requeued task resumes;
* ``sweep.sh`` (launcher local) — runs the cells one after another on this machine with the environment's
  ``mpiexec`` (plain ``python -m hpcfl.run`` for one rank), goes on after a failure and prints a summary;
* ``logs/`` — the array tasks' output (``%A_%a.out``).

``--submit`` then runs sweep.sh (local) or hands sweep.sbatch to ``sbatch``. Running the same sweep again resumes
it: finished cells report "already complete", stopped or killed ones continue from their last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from jobs.cells import CELLS_FILE, Cell, SweepError, check_cells, cells_tsv, expand, parse_grid, parse_sets, \
    time_seconds
from jobs.scripts import LOCAL_FILE, SBATCH_FILE, _q, describe, render_local, render_sbatch

DEFAULT_CONFIG = Path("configs/default.toml")  # as hpcfl.run: used when present and no --config is given
MAX_SIGNAL_SECONDS = 65535  # Slurm's limit for --signal=...@seconds


def find_mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def num_clients(cfg) -> int | None:
    """The number of clients of a cell's data, when it can be known here (None: unknown)."""
    if cfg.data.source == "builtin":
        return cfg.benchmark.num_clients
    from hpcfl.data.shards import Manifest, ShardError

    try:
        return len(Manifest.load(cfg.data.source).clients)
    except ShardError:
        return None


def validate_options(opts) -> None:
    from hpcfl.algorithms import available

    unknown = [a for a in opts.algorithms if a not in available()]
    if unknown:
        raise SweepError(f"unknown algorithm(s) {', '.join(unknown)} (known: {', '.join(available())})")
    for name, values in (("--algorithms", opts.algorithms), ("--seeds", opts.seeds)):
        dup = sorted({str(v) for v in values if values.count(v) > 1})
        if dup:
            raise SweepError(f"duplicate cells: {name} lists {', '.join(dup)} more than once")
    if any(s < 0 for s in opts.seeds):
        raise SweepError(f"--seeds: seeds must be >= 0, got {' '.join(map(str, opts.seeds))}")
    for name, value, lo in (("--ranks", opts.ranks, 1), ("--nodes", opts.nodes, 1),
                            ("--gpus-per-node", opts.gpus_per_node, 0), ("--max-requeues", opts.max_requeues, 0)):
        if value < lo:
            raise SweepError(f"{name} must be >= {lo}, got {value}")
    if opts.max_parallel is not None and opts.max_parallel < 1:
        raise SweepError(f"--max-parallel must be >= 1, got {opts.max_parallel}")
    if opts.cpus_per_task is not None and opts.cpus_per_task < 1:
        raise SweepError(f"--cpus-per-task must be >= 1, got {opts.cpus_per_task}")
    if opts.launcher != "local":
        if opts.ranks < opts.nodes:
            raise SweepError(f"--ranks {opts.ranks} is fewer than --nodes {opts.nodes}: every node needs a rank")
        limit = time_seconds(opts.time)
        if not 1 <= opts.signal_seconds <= MAX_SIGNAL_SECONDS:
            raise SweepError(f"--signal-seconds must be in 1..{MAX_SIGNAL_SECONDS}, got {opts.signal_seconds}")
        if opts.signal_seconds >= limit:
            raise SweepError(f"--signal-seconds {opts.signal_seconds} is not shorter than --time {opts.time} "
                             f"({limit} s): the stop signal would come before the job starts working")
        for name in ("partition", "account", "srun_mpi"):
            value = getattr(opts, name)
            if value is not None and not re.fullmatch(r"[A-Za-z0-9_.,:+-]+", value):
                raise SweepError(f"--{name.replace('_', '-')} {value!r}: unexpected characters")
    for text in [*opts.sets, *opts.grid_specs, opts.out_root, opts.config or "", str(Path.cwd())]:
        if "\t" in text or "\n" in text:
            raise SweepError(f"{text!r}: tabs and newlines cannot go into cells.tsv")
    for line in opts.prelude:
        if "\n" in line:
            raise SweepError(f"--prelude {line!r}: one line per --prelude")
    if opts.launcher != "local":
        for name, path in (("--out-root", Path(opts.out_root).resolve()), ("the working directory", Path.cwd())):
            if re.search(r"[\s%]", str(path)):
                raise SweepError(f"{name} {str(path)!r} holds a space or '%', which #SBATCH lines cannot take: "
                                 "choose a plain path")


def check_resources(opts, cells: list[Cell], configs: list) -> None:
    for cell, cfg in zip(cells, configs):
        n = num_clients(cfg)
        if opts.ranks > 1 and n is not None and opts.ranks - 1 > n:
            raise SweepError(f"--ranks {opts.ranks} gives {opts.ranks - 1} client ranks but cell {cell.index} "
                             f"({cell.run_dir}) has only {n} clients: use --ranks {n + 1} or fewer")
        if opts.launcher != "local" and opts.gpus_per_node > 0 and cfg.run.device == "cpu":
            raise SweepError(f"--gpus-per-node {opts.gpus_per_node} but run.device is 'cpu' in cell {cell.index} "
                             f"({cell.run_dir}): add --set run.device=cuda (or auto), or ask for no GPUs")


def check_replace(path: Path, text: str, force: bool) -> None:
    if path.is_dir() or (path.exists() and path.read_text(encoding="utf-8") != text and not force):
        raise SweepError(f"{path} exists and differs from this sweep's: choose another --out-root, or --force to "
                         "replace it (only if none of its jobs is queued or running)")


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    os.replace(tmp, path)


def sweep(opts) -> int:
    validate_options(opts)
    grid = parse_grid(opts.grid_specs)
    opts.grid = grid
    sets = parse_sets(opts.sets, {k for k, _ in grid})
    config = opts.config
    if config is None and DEFAULT_CONFIG.is_file():
        config = str(DEFAULT_CONFIG)
    cells = expand(config, opts.algorithms, opts.seeds, sets, grid, opts.out_root)
    configs = check_cells(cells, config)
    check_resources(opts, cells, configs)

    mpiexec = None
    if opts.launcher == "local" and opts.ranks > 1:
        mpiexec = find_mpiexec()
        if mpiexec is None:
            raise SweepError("--launcher local with --ranks > 1 needs mpiexec: none beside this Python nor on PATH "
                             "(install the 'mpich' extra, load an MPI module, or use --ranks 1)")
    if opts.submit and opts.launcher != "local" and shutil.which("sbatch") is None:
        raise SweepError("--submit: sbatch is not on PATH (no Slurm here). Generate without --submit and submit "
                         "OUT_ROOT/sweep.sbatch on the cluster's login node, or use --launcher local")

    workdir = Path.cwd()
    out_root = Path(opts.out_root)
    # The command that makes these files (without --submit/--force, which do not change them).
    command = "python -m jobs sweep " + shlex.join(a for a in opts.argv if a not in ("--submit", "--force"))
    text = cells_tsv(cells, workdir)
    if opts.launcher == "local":
        script_name, script = LOCAL_FILE, render_local(cells, opts, workdir, text, mpiexec, command)
    else:
        script_name, script = SBATCH_FILE, render_sbatch(cells, opts, workdir, text, command)
    # Refuse to change an existing sweep before writing anything.
    for name, content in ((CELLS_FILE, text), (script_name, script)):
        check_replace(out_root / name, content, opts.force)
    (out_root / "logs").mkdir(parents=True, exist_ok=True)
    write_atomic(out_root / CELLS_FILE, text)
    write_atomic(out_root / script_name, script, 0o755)
    print(f"{len(cells)} cells ({describe(opts, len(cells))})")
    print(f"wrote {out_root / CELLS_FILE} and {out_root / script_name}")

    if not opts.submit:
        if opts.launcher == "local":
            print(f"run it: bash {_q(out_root / script_name)}")
        else:
            print(f"submit it: sbatch {_q(out_root / script_name)}")
        return 0
    sys.stdout.flush()
    if opts.launcher == "local":
        return run_forwarding_signals(["bash", str(out_root / script_name)])
    p = subprocess.run(["sbatch", "--parsable", str(out_root / script_name)], capture_output=True, text=True)
    if p.returncode != 0:
        print(f"jobs sweep: sbatch refused the job (exit {p.returncode}): {p.stderr.strip()}", file=sys.stderr)
        return 1
    job = p.stdout.strip().split(";")[0]
    print(f"submitted job array {job}: {len(cells)} tasks; logs in {out_root / 'logs'}; "
          f"progress: python -m jobs status {_q(out_root)}")
    return 0


def run_forwarding_signals(cmd: list[str]) -> int:
    """Run ``cmd``, passing USR1 and TERM on to it (the script then stops after its running cell, at a
    checkpoint); Ctrl-C reaches it from the terminal by itself."""
    proc = subprocess.Popen(cmd)
    forward = lambda signum, frame: proc.send_signal(signum)  # noqa: E731
    old = {s: signal.signal(s, forward) for s in (signal.SIGUSR1, signal.SIGTERM)}
    try:
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def add_sweep_parser(sub) -> None:
    p = sub.add_parser("sweep", help="generate (and submit) a sweep of hpcfl runs",
                       description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="Each cell's run directory: OUT_ROOT/<algorithm>[-<key>=<value>...]-s<seed>. "
                              "See docs/cluster.md.")
    p.add_argument("--config", default=None, help=f"TOML config of every cell (default: {DEFAULT_CONFIG} if present)")
    p.add_argument("--algorithms", nargs="+", required=True, metavar="NAME", help="aggregation rules")
    p.add_argument("--seeds", nargs="+", type=int, default=[0], metavar="S", help="run seeds (default 0)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override for every cell (repeatable)")
    p.add_argument("--grid", dest="grid_specs", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="a key swept over values (repeatable: the cross product)")
    p.add_argument("--out-root", required=True, help="directory of the sweep: its cells' run directories, "
                                                     "cells.tsv, the job script, logs/")
    p.add_argument("--launcher", choices=("srun", "mpirun", "local"), default="srun",
                   help="srun or mpirun: a Slurm job array (sweep.sbatch); local: sweep.sh on this machine")
    p.add_argument("--ranks", type=int, default=6, help="MPI ranks per run: 1 server + client ranks (default 6)")
    p.add_argument("--nodes", type=int, default=1, help="nodes per run (default 1)")
    p.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node (--gres=gpu:G; default 0)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per rank (--cpus-per-task)")
    p.add_argument("--time", default="04:00:00", help="time limit of each array task (default 04:00:00)")
    p.add_argument("--partition", default=None, help="Slurm partition (--partition)")
    p.add_argument("--account", default=None, help="Slurm account to charge (--account)")
    p.add_argument("--signal-seconds", type=int, default=300,
                   help="USR1 this many seconds before the time limit: hpcfl stops at a checkpoint and the task "
                        "requeues itself (default 300; make it longer than one round plus a checkpoint)")
    p.add_argument("--max-parallel", type=int, default=None, metavar="K", help="at most K array tasks at once")
    p.add_argument("--max-requeues", type=int, default=20, help="stop requeueing a task after this many restarts")
    p.add_argument("--srun-mpi", default="pmi2",
                   help="srun --mpi=... (default pmi2, which the MPICH of the README speaks; docs/cluster.md)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the jobs (default: this one)")
    p.add_argument("--prelude", action="append", default=[], metavar="LINE",
                   help="a shell line run before the launch, e.g. 'module load openmpi' (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing, different cells.tsv and script")
    p.add_argument("--submit", action="store_true", help="local: run sweep.sh now; srun/mpirun: sbatch it")
    p.set_defaults(func=sweep)
