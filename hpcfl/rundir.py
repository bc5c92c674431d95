"""The run directory: whether a run starts, resumes or is already complete, and its run.json.

What a run directory holds is listed in docs/outputs.md; ``--overwrite`` removes exactly ``RUN_FILES`` and
``RUN_DIRS`` and the checkpoints.
"""

from __future__ import annotations

import json
import logging
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hpcfl import __version__, checkpoint
from hpcfl.atomic import write_json, write_text
from hpcfl.config import Config, ConfigError, config_differences, load
from hpcfl.errors import UsageError
from hpcfl.supervise import previous_run_report

log = logging.getLogger("hpcfl")

RUN_FILES = ("config.toml", "run.json", "metrics.jsonl", "metrics.csv", "final_model.npy", checkpoint.POINTER)
RUN_DIRS = ("tensorboard",)  # logs/ stays: a new run appends to it

FRESH, RESUME, COMPLETE = 0, 1, 2


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


@dataclass
class Opening:
    """What the server decided about the run directory."""

    mode: int  # FRESH, RESUME or COMPLETE
    checkpoint: Path | None = None  # the checkpoint to resume from
    state: dict | None = None  # its state.json, checked
    overwrite: bool = False  # FRESH over an earlier run: clear it once the new run's setup has succeeded


def open_run_dir(cfg: Config, out_dir: Path, overwrite: bool, force: bool) -> Opening:
    """Server, holding the run directory's lock: decide what to do with it.

    Same config and a checkpoint: resume. Same config, finished: complete (nothing to do). A different config is
    refused with the keys that differ (``force`` resumes anyway); ``overwrite`` starts afresh, but the earlier
    run is removed only once the new one's data and model are set up (``clear_run_dir``). Nothing in the
    directory changes here."""
    stored = out_dir / "config.toml"
    if overwrite:
        return Opening(FRESH, overwrite=True)
    report = previous_run_report(out_dir)
    if report:
        log.warning("%s: %s", out_dir, report)
    if not stored.is_file():
        left = sorted(p.name for p in [*(out_dir / n for n in RUN_FILES), *out_dir.glob("checkpoint-*")]
                      if p.exists())
        if left:  # a run whose config.toml went missing: starting afresh would replace it
            raise UsageError(f"{out_dir} holds a run ({', '.join(left)}) but no config.toml: restore it to resume, "
                             "or pass --overwrite to start afresh")
        return Opening(FRESH)
    try:
        previous = load(stored)
    except ConfigError as e:
        raise UsageError(f"{stored} is not a readable hpcfl config ({e}); pass --overwrite to start afresh") from None
    differences = config_differences(previous, cfg)
    if differences and not force:
        raise UsageError(f"{out_dir} holds a run with a different config ({'; '.join(differences)}): "
                         "choose another --out, --force to resume it with the new values, or --overwrite")
    info = read_run_info(out_dir)
    if "finished" in info and not differences:
        return Opening(COMPLETE)
    ckpt = checkpoint.latest(out_dir)
    if ckpt is None:
        log.info("%s holds an unfinished run without a checkpoint: starting it again", out_dir)
        return Opening(FRESH)
    state = checkpoint.load_state(ckpt, previous.run.rounds, previous.eval.every)
    if state["round"] >= cfg.run.rounds:
        raise UsageError(f"{ckpt} is after round {state['round'] + 1}, beyond run.rounds = {cfg.run.rounds}")
    if state["config_digest"] != cfg.digest() and not force:
        raise UsageError(f"{ckpt / 'state.json'} was written under another config than {stored} holds now "
                         "(--force resumes anyway, --overwrite starts afresh)")
    return Opening(RESUME, ckpt, state)


def clear_run_dir(out_dir: Path) -> None:
    """``--overwrite``: remove the earlier run's files and checkpoints (the logs stay, and go on)."""
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    for d in [*RUN_DIRS, *(p.name for p in out_dir.glob("checkpoint-*")),
              *(p.name for p in out_dir.glob(".checkpoint-*.tmp"))]:
        shutil.rmtree(out_dir / d, ignore_errors=True)


def read_run_info(out_dir: Path) -> dict:
    """run.json, or {} when there is none; a run.json that is not ours is refused."""
    path = out_dir / "run.json"
    if not path.is_file():
        return {}
    try:
        info = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError) as e:
        raise UsageError(f"{path}: unreadable ({e}); pass --overwrite to start afresh") from None
    if not isinstance(info, dict):
        raise UsageError(f"{path}: not an hpcfl run.json; pass --overwrite to start afresh")
    return info


def write_run_info(out_dir: Path, info: dict, resumed_at: int | None, world_size: int) -> None:
    """run.json at the start of a run; a resumed run keeps its first start and lists every resumption."""
    info = {**info, "started": _now()}
    if resumed_at is not None:
        previous = read_run_info(out_dir)
        info["started"] = previous.get("started", info["started"])
        earlier = previous.get("resumed") if isinstance(previous.get("resumed"), list) else []
        info["resumed"] = earlier + [{"round": resumed_at, "at": _now(),
                                                          "world_size": world_size}]
    write_json(out_dir / "run.json", info)


def finish_run_info(out_dir: Path, wall_s: float) -> None:
    """Mark the run complete in run.json (after the final model is written)."""
    info = read_run_info(out_dir)
    info.update({"finished": _now(), "wall_s": wall_s,
                 "server_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
    write_json(out_dir / "run.json", info)


def record_start(fed, mode: int, start: int) -> None:
    """Server: config.toml, run.json and the log lines that describe the run."""
    cfg, comm = fed.cfg, fed.comm
    write_text(fed.out_dir / "config.toml", cfg.to_toml())
    first_rank = 1 if comm.size > 1 else 0
    write_run_info(fed.out_dir, {
        "hpcfl_version": __version__, "world_size": comm.size, "data_dir": str(fed.data_dir),
        "num_clients": fed.num_clients, "num_classes": fed.num_classes, "class_names": fed.manifest.class_names,
        "corrupted_clients": fed.corrupted, "test_sets": list(fed.test_sets), "num_parameters": fed.layout.size,
        "test_sets_on": "clients" if fed.test_on_clients else "server",
        "assignment": {str(r + first_rank): g for r, g in enumerate(fed.assignment)},
        "torch_version": torch.__version__}, resumed_at=start if mode == RESUME else None, world_size=comm.size)
    log.info("world size %d, %d clients (corrupted: %s), P = %d parameters, data %s", comm.size, fed.num_clients,
             fed.corrupted, fed.layout.size, fed.data_dir)
    for r, group in enumerate(fed.assignment):
        log.info("client rank %d hosts clients %s (%d samples)", r + first_rank, group, int(fed.sizes[group].sum()))
