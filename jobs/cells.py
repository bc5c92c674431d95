"""The cells of a sweep: algorithms × grid values × seeds, their arguments and run directories, and cells.tsv,
the one file the job scripts read them from."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from hpcfl.errors import UsageError

CELLS_FILE = "cells.tsv"
CELLS_HEADER = "# index\trun directory\targuments of python -m hpcfl.run (shell-quoted)"
WORKDIR_HEADER = "# hpcfl sweep; relative paths are relative to: "
# Keys the sweep sets itself, and the option that sets them.
RESERVED = {"algorithm.name": "--algorithms", "run.seed": "--seeds", "run.out": "--out-root"}
TIME_RE = re.compile(r"^(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?$")


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
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith(WORKDIR_HEADER):
            workdir = Path(line[len(WORKDIR_HEADER):])
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 3 or not parts[0].isdigit():
            raise SweepError(f"{path}, line {n}: expected index<TAB>run directory<TAB>arguments")
        rows.append((int(parts[0]), parts[1], shlex.split(parts[2])))
    return workdir, rows
