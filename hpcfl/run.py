"""Entry point: ``python -m hpcfl.run [--config C] [--set section.key=value ...] [--out DIR]``.

Under ``mpirun -n W`` (W >= 2) rank 0 is the server and ranks 1..W-1 host the clients; without mpirun the one
process does everything (single-rank mode) and gives the same numbers.

Exit codes: 0 done; 2 bad input (config, data), one message and no traceback; 1 a failure during the run, after
which every rank is ended (MPI Abort) with a message naming the rank, client, round and phase.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import traceback
from pathlib import Path

DEFAULT_CONFIG = Path("configs/default.toml")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m hpcfl.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config (default: {DEFAULT_CONFIG} if present, else the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set run.rounds=5")
    p.add_argument("--out", type=Path, default=None, help="run directory (overrides run.out)")
    p.add_argument("--overwrite", action="store_true", help="reuse a run directory that already holds a run")
    return p.parse_args(argv)


def setup_logging(rank: int, size: int) -> None:
    fmt = "%(asctime)s [rank %(rank)d] %(message)s" if size > 1 else "%(asctime)s %(message)s"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(lambda record: setattr(record, "rank", rank) or True)
    root = logging.getLogger("hpcfl")
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to mix two runs in one directory (nothing is ever silently lost)."""
    if (out / "metrics.jsonl").exists() or (out / "run.json").exists():
        if not overwrite:
            from hpcfl.errors import UsageError

            raise UsageError(f"run directory {out} already holds a run: choose another --out, or pass --overwrite")
        for name in ("metrics.jsonl", "run.json", "final_model.npy"):
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    from hpcfl import config as config_mod
    from hpcfl.comm import world
    from hpcfl.errors import UsageError

    comm = world()
    setup_logging(comm.rank, comm.size)
    log = logging.getLogger("hpcfl")

    # Every rank reads and checks the same config before any communication, so a bad config ends every rank
    # the same way (exit 2) without a collective; only rank 0 says why.
    try:
        path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        cfg = config_mod.load(path, args.overrides)
    except UsageError as e:
        if comm.is_server:
            print(f"hpcfl: error: {e}", file=sys.stderr)
        return 2
    if args.out is not None:
        cfg.run.out = str(args.out)
    out_dir = Path(cfg.run.out)

    from hpcfl import protocol
    from hpcfl.io import write_text

    where = protocol.Where()
    try:
        if comm.is_server:
            prepare_run_dir(out_dir, args.overwrite)
            write_text(out_dir / "config.toml", cfg.to_toml())
            log.info("hpcfl: %s, %d rounds, run directory %s", cfg.algorithm.name, cfg.run.rounds, out_dir)
        protocol.run(cfg, comm, out_dir, where)
    except UsageError as e:
        if not comm.is_server:
            # Most bad input is seen by every rank alike; give the server time to report it and end the job,
            # so that the user reads one message rather than one per rank.
            time.sleep(1.0)
        where_text = f" (rank {comm.rank}, {where})" if comm.size > 1 else ""
        print(f"hpcfl: error{where_text}: {e}", file=sys.stderr, flush=True)
        if comm.size > 1:
            comm.abort(2)
        return 2
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank, not hang the job
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        traceback.print_exc()
        print(f"hpcfl: rank {comm.rank} failed in {where}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        if comm.size > 1:
            comm.abort(1)
        return 1
    if comm.is_server:
        log.info("done: %s", out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
