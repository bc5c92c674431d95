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
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hpcfl.errors import UsageError

TEMPLATES = Path(__file__).resolve().parent / "templates"
BLOCK_START = "# >>> hpcfl launch"
BLOCK_END = "# <<< hpcfl launch <<<"
DEFAULT_CONFIG = Path("configs/default.toml")  # as hpcfl.run: used when present and no --config is given
CELLS_FILE, SBATCH_FILE, LOCAL_FILE = "cells.tsv", "sweep.sbatch", "sweep.sh"
CELLS_HEADER = "# index\trun directory\targuments of python -m hpcfl.run (shell-quoted)"
WORKDIR_HEADER = "# hpcfl sweep; relative paths are relative to: "
# Keys the sweep sets itself, and the option that sets them.
RESERVED = {"algorithm.name": "--algorithms", "run.seed": "--seeds", "run.out": "--out-root"}
TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")
MAX_SIGNAL_SECONDS = 65535  # Slurm's limit for --signal=...@seconds


class SweepError(UsageError):
    """Bad sweep input: one message, exit code 2."""


@dataclass(frozen=True)
class Cell:
    index: int
    algorithm: str
    seed: int
    grid: tuple[tuple[str, str], ...]  # (section.key, value as given)
    run_dir: str
    args: tuple[str, ...]  # the arguments of python -m hpcfl.run


# ------------------------------------------------------------------------------------------------ parsing

def split_values(text: str) -> list[str]:
    """``'1,2,[3, 4],"a,b"'`` -> ``['1', '2', '[3, 4]', '"a,b"']``: commas inside brackets or quotes stay."""
    out, depth, quote, cur = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if quote or depth:
        raise SweepError(f"--grid value list {text!r}: unbalanced brackets or quotes")
    out.append("".join(cur).strip())
    return out


def _check_key(key: str, option: str, text: str) -> None:
    parts = key.split(".")
    if len(parts) != 2 or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", p) for p in parts):
        raise SweepError(f"{option} {text!r}: the key must be section.key, e.g. benchmark.num_corrupted")
    if key in RESERVED:
        raise SweepError(f"{option} {text!r}: the sweep sets {key} itself (use {RESERVED[key]})")


def parse_grid(specs: list[str]) -> list[tuple[str, list[str]]]:
    """``['benchmark.num_corrupted=2,4,6']`` -> ``[('benchmark.num_corrupted', ['2', '4', '6'])]``."""
    grid: list[tuple[str, list[str]]] = []
    for text in specs:
        key, eq, values = text.partition("=")
        key = key.strip()
        if not eq or not values.strip():
            raise SweepError(f"--grid {text!r}: expected section.key=v1,v2,... (e.g. benchmark.num_corrupted=2,4,6)")
        _check_key(key, "--grid", text)
        if any(key == k for k, _ in grid):
            raise SweepError(f"--grid {key} is given twice: list all its values in one --grid")
        vals = split_values(values)
        if any(v == "" for v in vals):
            raise SweepError(f"--grid {text!r}: an empty value (two commas in a row, or a trailing comma)")
        dup = sorted({v for v in vals if vals.count(v) > 1})
        if dup:
            raise SweepError(f"--grid {text!r}: value(s) {', '.join(dup)} listed twice")
        grid.append((key, vals))
    return grid


def parse_sets(sets: list[str], grid_keys: set[str]) -> list[str]:
    out = []
    for text in sets:
        key, eq, _ = text.partition("=")
        key = key.strip()
        if not eq:
            raise SweepError(f"--set {text!r}: expected section.key=value")
        _check_key(key, "--set", text)
        if key in grid_keys:
            raise SweepError(f"{key} is given both in --set and in --grid: keep one")
        out.append(text)
    return out


def time_seconds(text: str) -> int:
    """Slurm's time formats: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S -> seconds."""
    m = TIME_RE.match(text.strip())
    if not m:
        raise SweepError(f"--time {text!r}: use a Slurm time such as 04:00:00, 90 (minutes) or 1-12:00:00")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H[:M[:S]]
        h, mi, s = a, b or 0, c or 0
    elif b is None:  # M
        h, mi, s = 0, a, 0
    elif c is None:  # M:S
        h, mi, s = 0, a, b
    else:  # H:M:S
        h, mi, s = a, b, c
    total = (days or 0) * 86400 + h * 3600 + mi * 60 + s
    if total <= 0:
        raise SweepError(f"--time {text!r}: must be longer than zero")
    return total


def _label_value(text: str) -> str:
    label = re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_.")
    return label or "empty"


# ------------------------------------------------------------------------------------------------- cells

def expand(config: str | None, algorithms: list[str], seeds: list[int], sets: list[str],
           grid: list[tuple[str, list[str]]], out_root: str) -> list[Cell]:
    """The cells in array order: algorithms, then grid values (in the order given), then seeds, fastest last."""
    short = [k.split(".")[1] for k, _ in grid]
    names = [k if short.count(k.split(".")[1]) > 1 else k.split(".")[1] for k, _ in grid]
    combos: list[tuple] = [()]
    for key, values in grid:
        combos = [c + ((key, v),) for c in combos for v in values]
    cells = []
    for algorithm in algorithms:
        for combo in combos:
            for seed in seeds:
                parts = [algorithm] + [f"{name}={_label_value(v)}" for name, (_, v) in zip(names, combo)]
                run_dir = str(Path(out_root) / ("-".join(parts) + f"-s{seed}"))
                args = ([] if config is None else ["--config", config])
                args += ["--set", f"algorithm.name={algorithm}", "--set", f"run.seed={seed}"]
                for text in sets:
                    args += ["--set", text]
                for key, value in combo:
                    args += ["--set", f"{key}={value}"]
                args += ["--out", run_dir]
                cells.append(Cell(len(cells), algorithm, seed, combo, run_dir, tuple(args)))
    return cells


def check_cells(cells: list[Cell], config: str | None) -> list:
    """Load every cell's config (refusing the first bad one, named) and refuse cells that are the same run."""
    from hpcfl import config as config_mod

    resolved, seen, dirs = [], {}, {}
    for cell in cells:
        overrides = [cell.args[i + 1] for i, a in enumerate(cell.args) if a == "--set"]
        try:
            cfg = config_mod.load(config, overrides)
        except config_mod.ConfigError as e:
            raise SweepError(f"cell {cell.index} ({cell.run_dir}): {e}") from None
        if cell.run_dir in dirs:
            raise SweepError(f"cells {dirs[cell.run_dir]} and {cell.index} would share the run directory "
                             f"{cell.run_dir}: their grid values differ only in characters a directory name "
                             "cannot hold")
        dirs[cell.run_dir] = cell.index
        d = cfg.to_dict()
        d["run"].pop("out")
        key = json.dumps(d, sort_keys=True)
        if key in seen:
            raise SweepError(f"duplicate cells: {seen[key]} and {cell.run_dir} resolve to the same config "
                             "(an algorithm, seed or grid value listed twice, or the same value spelt twice)")
        seen[key] = cell.run_dir
        resolved.append(cfg)
    return resolved


def cells_tsv(cells: list[Cell], workdir: Path) -> str:
    lines = [f"{WORKDIR_HEADER}{workdir}", CELLS_HEADER]
    lines += [f"{c.index}\t{c.run_dir}\t{shlex.join(c.args)}" for c in cells]
    return "\n".join(lines) + "\n"


def read_cells(out_root: Path) -> tuple[Path | None, list[tuple[int, str, list[str]]]]:
    """cells.tsv -> (the directory the jobs run in, [(index, run directory, arguments)])."""
    path = out_root / CELLS_FILE
    if not path.is_file():
        raise SweepError(f"{path} not found: is {out_root} a sweep directory (made by python -m jobs sweep)?")
    rows, workdir = [], None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.startswith(WORKDIR_HEADER):
            workdir = Path(line[len(WORKDIR_HEADER):])
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not parts[0].isdigit():
            raise SweepError(f"{path}, line {n}: expected index<TAB>run directory<TAB>arguments")
        rows.append((int(parts[0]), parts[1], shlex.split(parts[2])))
    return workdir, rows


# ---------------------------------------------------------------------------------------------- scripts

def launch_block() -> str:
    """The signal-forwarding, exit-code and requeue block shared by the templates and generated job scripts."""
    text = (TEMPLATES / "single_node.sbatch").read_text()
    start, end = text.index(BLOCK_START), text.index(BLOCK_END) + len(BLOCK_END)
    return text[start:end] + "\n"


def _q(text) -> str:
    return shlex.quote(str(text))


def render_sbatch(cells: list[Cell], opts, workdir: Path, cells_text: str, command: str) -> str:
    n = len(cells)
    out_root = Path(opts.out_root)
    logs = out_root / "logs" if out_root.is_absolute() else workdir / out_root / "logs"
    array = f"0-{n - 1}" + (f"%{opts.max_parallel}" if opts.max_parallel else "")
    name = "hpcfl-" + (re.sub(r"[^A-Za-z0-9_.-]+", "_", out_root.name) or "sweep")
    directives = [f"--job-name={name}", f"--array={array}", f"--nodes={opts.nodes}", f"--ntasks={opts.ranks}"]
    if opts.nodes > 1:
        directives.append(f"--ntasks-per-node={math.ceil(opts.ranks / opts.nodes)}")
    if opts.cpus_per_task:
        directives.append(f"--cpus-per-task={opts.cpus_per_task}")
    if opts.gpus_per_node > 0:
        directives.append(f"--gres=gpu:{opts.gpus_per_node}")
    directives.append(f"--time={opts.time}")
    if opts.partition:
        directives.append(f"--partition={opts.partition}")
    if opts.account:
        directives.append(f"--account={opts.account}")
    directives += [f"--chdir={workdir}", f"--output={logs}/%A_%a.out", "--open-mode=append",
                   f"--signal=B:USR1@{opts.signal_seconds}", "--requeue"]
    summary = describe(opts, n)
    lines = [
        "#!/bin/bash",
        f"# hpcfl sweep: {summary}; one array task per cell.",
        f"# Generated by: {command}",
        "# Regenerate rather than edit (the cells live in cells.tsv beside this script; docs/cluster.md).",
        f"# Submit: sbatch {_q(out_root / SBATCH_FILE)}    Progress: python -m jobs status {_q(out_root)}",
        f"# Resubmitting the same script resumes every unfinished cell; finished ones report 'already complete'.",
        *[f"#SBATCH {d}" for d in directives],
        "",
        "export PYTHONUNBUFFERED=1",
        *opts.prelude,
        f"cd {_q(workdir)} || exit 2",
        f"LAUNCHER={opts.launcher}",
        f"RANKS={opts.ranks}",
        f"SRUN_MPI={_q(opts.srun_mpi)}",
        f"PYTHON={_q(opts.python)}",
        f"MAX_REQUEUES={opts.max_requeues}",
        f"CELLS={_q(out_root / CELLS_FILE)}",
        f"CELLS_SHA256={hashlib.sha256(cells_text.encode()).hexdigest()}",
        "",
        "# This task's cell: the line of cells.tsv whose index is SLURM_ARRAY_TASK_ID.",
        'task=${SLURM_ARRAY_TASK_ID:?"this script is a job array: submit it with sbatch"}',
        'if command -v sha256sum >/dev/null 2>&1 && [ "$(sha256sum < "$CELLS" | cut -d" " -f1)" != "$CELLS_SHA256" ]; then',
        '    echo "hpcfl job: $CELLS changed after this script was written: regenerate both (python -m jobs sweep)" >&2',
        "    exit 2",
        "fi",
        'row=$(awk -F "\\t" -v i="$task" \'$1 == i { print $2 "\\t" $3; found = 1 } END { exit !found }\' "$CELLS") || {',
        '    echo "hpcfl job: no cell $task in $CELLS" >&2',
        "    exit 2",
        "}",
        "IFS=$'\\t' read -r RUN_DIR cell_args <<< \"$row\"",
        'eval "HPCFL_ARGS=($cell_args)"',
        'echo "hpcfl job: cell $task of ' + str(n) + ': $RUN_DIR"',
        "",
        launch_block(),
    ]
    return "\n".join(lines)


def render_local(cells: list[Cell], opts, workdir: Path, mpiexec: str | None, command: str) -> str:
    out_root = Path(opts.out_root)
    launch = "" if opts.ranks == 1 else f"{_q(mpiexec)} -n {opts.ranks} "
    body = f'''#!/bin/bash
# hpcfl sweep: {describe(opts, len(cells))}, run one after another on this machine.
# Generated by: {command}
# A failed cell does not stop the others; a summary comes at the end. Exit code: 0 every cell done, 1 a cell
# failed, 3 a cell stopped at a checkpoint (none failed). Run this script again to resume: finished cells report
# "already complete", stopped or killed ones continue from their last checkpoint.
# USR1, TERM or Ctrl-C: the running cell stops at a checkpoint after its current round and no further cell
# starts; a second signal kills the running cell (it resumes from its last checkpoint).
set -u
export PYTHONUNBUFFERED=1
cd {_q(workdir)} || exit 2
CELLS={_q(out_root / CELLS_FILE)}
launch=({launch}{_q(opts.python)} -m hpcfl.run)
setsid=$(command -v setsid || true)

pid=""
signals=0
stop=0
on_signal() {{
    signals=$((signals + 1))
    stop=1
    if [ -z "$pid" ]; then return; fi
    if [ "$signals" = 1 ]; then
        echo "hpcfl sweep: stopping: the running cell stops at a checkpoint after its current round (exit code 3)," \
             "no further cell starts (signal again to kill it now)"
        kill -USR1 "$pid" 2>/dev/null
    else
        echo "hpcfl sweep: killing the running cell (it resumes from its last checkpoint)"
        kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null
    fi
}}
trap on_signal USR1 TERM INT

summary=()
failed=0
stopped=0
while IFS=$'\\t' read -r index run_dir args <&3; do
    case "$index" in ''|'#'*) continue ;; esac
    if [ "$stop" = 1 ]; then
        summary+=("$(printf '%4s  %-26s %s' "$index" "not started" "$run_dir")")
        stopped=1
        continue
    fi
    eval "cell_args=($args)"
    echo "=== hpcfl sweep: cell $index of {len(cells)}: $run_dir"
    # In a session of its own, so that Ctrl-C reaches this script only, which asks the cell to stop at a checkpoint.
    $setsid "${{launch[@]}}" "${{cell_args[@]}}" </dev/null &
    pid=$!
    # Poll, then collect the exit code: bash loses the exit code of a child that ends while a trap has
    # interrupted `wait`.
    while kill -0 "$pid" 2>/dev/null; do sleep 1; done
    wait "$pid"
    rc=$?
    pid=""
    case "$rc" in
        0) what="done" ;;
        3) what="stopped at a checkpoint"; stopped=1 ;;
        2) what="bad input (exit 2)"; failed=1 ;;
        *) if [ "$rc" -gt 128 ]; then what="killed (exit $rc)"; else what="FAILED (exit $rc)"; fi; failed=1 ;;
    esac
    summary+=("$(printf '%4s  %-26s %s' "$index" "$what" "$run_dir")")
done 3< "$CELLS"

echo "=== hpcfl sweep summary ({_q(out_root)}, {len(cells)} cells)"
printf '%s\\n' "${{summary[@]}}"
if [ "$failed" = 1 ]; then exit 1; fi
if [ "$stopped" = 1 ]; then echo "run this script again to resume"; exit 3; fi
exit 0
'''
    return body


def describe(opts, n: int) -> str:
    parts = [f"{n} cells = {len(opts.algorithms)} algorithm(s) ({' '.join(opts.algorithms)})",
             f"{len(opts.seeds)} seed(s) ({' '.join(map(str, opts.seeds))})"]
    parts += [f"{len(vals)} value(s) of {key} ({','.join(vals)})" for key, vals in opts.grid]
    where = f"{opts.ranks} rank(s)" + (f" on {opts.nodes} nodes" if opts.nodes > 1 else "")
    if opts.gpus_per_node:
        where += f", {opts.gpus_per_node} GPU(s) per node"
    return " x ".join(parts) + f"; {where}"


# ----------------------------------------------------------------------------------------------- commands

def find_mpiexec() -> str | None:
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def num_clients(cfg) -> int | None:
    """The number of clients of a cell's data, when it can be known here (None: unknown)."""
    if cfg.data.source == "builtin":
        return cfg.benchmark.num_clients
    try:
        return len(json.loads((Path(cfg.data.source) / "manifest.json").read_text())["clients"])
    except (OSError, ValueError, KeyError, TypeError):
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
    if path.is_dir() or (path.exists() and path.read_text() != text and not force):
        raise SweepError(f"{path} exists and differs from this sweep's: choose another --out-root, or --force to "
                         "replace it (only if none of its jobs is queued or running)")


def write_atomic(path: Path, text: str, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
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
        script_name, script = LOCAL_FILE, render_local(cells, opts, workdir, mpiexec, command)
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


def cell_state(run_dir: Path) -> tuple[str, bool]:
    """(a short description of the run directory's state, finished?)."""
    info_path, pointer = run_dir / "run.json", run_dir / "checkpoint.json"
    rounds = "?"
    try:
        import tomllib

        rounds = tomllib.loads((run_dir / "config.toml").read_text())["run"]["rounds"]
    except Exception:  # noqa: BLE001 - a state report never fails on one odd directory
        pass
    try:
        info = json.loads(info_path.read_text()) if info_path.is_file() else None
    except ValueError:
        info = {}
    if info is not None and "finished" in info:
        return "finished", True
    if pointer.is_file():
        try:
            done = json.loads(pointer.read_text())["round"] + 1
        except (ValueError, KeyError, TypeError):
            done = "?"
        return f"checkpoint after round {done}/{rounds}", False
    if info is not None:
        return "started, no checkpoint yet", False
    return "not started", False


def status(opts) -> int:
    out_root = Path(opts.out_root)
    workdir, rows = read_cells(out_root)
    unfinished = []
    for index, run_dir, _ in rows:
        state, finished = cell_state(Path(run_dir) if workdir is None else workdir / run_dir)
        if not finished:
            unfinished.append(index)
        print(f"{index:4d}  {state:32s} {run_dir}")
    print(f"{len(rows) - len(unfinished)} of {len(rows)} cells finished")
    if not unfinished:
        # The cells' directories only: the glob leaves out cells.tsv, the job script and logs/.
        print(f"report: python -m hpcfl.report {_q(out_root)}")
    elif (out_root / SBATCH_FILE).is_file():
        ranges = compress(unfinished)
        print(f"(re)submit the unfinished cells once no task of an earlier submission is queued or running "
              f"(squeue --me): sbatch --array={ranges} {_q(out_root / SBATCH_FILE)}")
    elif (out_root / LOCAL_FILE).is_file():
        print(f"run the unfinished cells: bash {_q(out_root / LOCAL_FILE)}")
    return 0 if not unfinished else 1


def compress(indices: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, start = [], None
    for i, x in enumerate(indices):
        if start is None:
            start = x
        if i + 1 == len(indices) or indices[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)


# ---------------------------------------------------------------------------------------------------- CLI

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
    p.add_argument("--srun-mpi", default="pmix", help="srun --mpi=... (default pmix)")
    p.add_argument("--python", default=sys.executable, help="interpreter of the jobs (default: this one)")
    p.add_argument("--prelude", action="append", default=[], metavar="LINE",
                   help="a shell line run before the launch, e.g. 'module load openmpi' (repeatable)")
    p.add_argument("--force", action="store_true", help="replace an existing, different cells.tsv and script")
    p.add_argument("--submit", action="store_true", help="local: run sweep.sh now; srun/mpirun: sbatch it")
    p.set_defaults(func=sweep)


def add_status_parser(sub) -> None:
    p = sub.add_parser("status", help="the state of every cell of a sweep",
                       description="The state of every cell of a sweep (finished, checkpointed, not started); "
                                   "exit code 0 when all are finished, else 1.")
    p.add_argument("out_root", help="the sweep directory (its --out-root)")
    p.set_defaults(func=status)
