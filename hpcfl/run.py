"""Entry point: ``python -m hpcfl.run [--config C] [--set section.key=value ...] [--out DIR]``.

Under ``mpirun -n W`` (W >= 2) rank 0 is the server and ranks 1..W-1 host the clients; without mpirun the one
process does everything (single-rank mode) and gives the same numbers.

Running the same command again in the same run directory resumes from the last checkpoint (or says the run is
complete). Exit codes: 0 done; 2 bad input (config, data, run directory) or environment (permissions, a full
disk, encodings), one message and no traceback; 1 a failure during the run, after which every rank is ended (MPI
Abort) with a message naming the rank, client, round and phase; 3 stopped at a checkpoint on SIGUSR1/SIGTERM or
Ctrl-C (run again to resume; a second Ctrl-C stops at once). docs/reliability.md lists every promise.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import sys
import time
import traceback
from pathlib import Path

DEFAULT_CONFIG = Path("configs/default.toml")
EXIT_DEADLINE: list[float] = []  # set by a run that got through: how long leaving (MPI's shutdown) may take


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m hpcfl.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help=f"TOML config (default: {DEFAULT_CONFIG} if present, else the built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value (repeatable), e.g. --set run.rounds=5")
    p.add_argument("--out", type=Path, default=None, help="run directory (overrides run.out)")
    p.add_argument("--overwrite", action="store_true", help="start afresh in a run directory that holds a run")
    p.add_argument("--force", action="store_true", help="resume a run whose config differs from the stored one")
    return p.parse_args(argv)


def setup_logging(rank: int, size: int) -> None:
    """Console: rank 0 tells the progress; other ranks only warnings. Each rank's full log also goes to its file
    in the run directory (supervise.add_rank_log)."""
    from hpcfl.outputs import Progress

    fmt = "%(asctime)s [rank %(rank)d] %(message)s" if size > 1 else "%(asctime)s %(message)s"
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))
    handler.addFilter(lambda record: setattr(record, "rank", rank) or True)
    # while rank 0 shows a progress bar, its round lines go to the log file only
    handler.addFilter(lambda record: not (record.name == "hpcfl.progress" and Progress.active_bar))
    handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root = logging.getLogger("hpcfl")
    for old in root.handlers:
        old.close()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    root.propagate = False


def main(argv=None) -> int:
    from hpcfl.supervise import RoundWatchdog, install_signal_handlers, launcher_rank, launcher_size

    install_signal_handlers(speaks=launcher_rank() == 0)  # first: a Ctrl-C during the imports is ours too
    args = parse_args(argv)
    from hpcfl import config as config_mod
    from hpcfl.errors import UsageError, describe_os_error

    # Every rank reads and checks the same config before MPI starts (the config needs neither MPI nor torch), so
    # a bad config ends every rank the same way (exit 2) without a collective; only rank 0 says why.
    try:
        path = args.config if args.config is not None else (DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None)
        cfg = config_mod.load(path, args.overrides)
        if args.out is not None:
            config_mod.toml_string(str(args.out))  # refuses a path that config.toml could not hold
            cfg.run.out = str(args.out)
    except UsageError as e:
        if launcher_rank() == 0:
            print(f"hpcfl: error: {e}", file=sys.stderr)
        return 2
    out_dir = Path(cfg.run.out)
    EXIT_DEADLINE.clear()
    # A rank stuck before the round watchdog runs (a hung file system here, or MPI's start-up, which holds the
    # interpreter, so no Python thread could speak): a timer outside the interpreter ends this process, with where
    # it was, after the setup's limit.
    deadline = cfg.run.round_timeout_s or RoundWatchdog.FIRST_ROUND * cfg.run.watchdog_floor_s
    faulthandler.dump_traceback_later(deadline, exit=True)

    # A user's shard directory too (manifest, and each shard's labels and shapes, not its images: h5py, no torch),
    # so that bad data is refused in a fraction of a second, before MPI and torch start; the server checks it
    # again in setup (the built-in benchmark exists only once it is built).
    if cfg.data.source != "builtin":
        try:
            from hpcfl.data.shards import Manifest, check_directory

            check_directory(cfg.data.source, Manifest.load(cfg.data.source))
        except (UsageError, OSError, UnicodeError) as e:
            faulthandler.cancel_dump_traceback_later()
            text = describe_os_error(e) if isinstance(e, OSError) else str(e)
            if launcher_rank() == 0:  # every rank sees the same files, as a rule: one message, as for the config
                print(f"hpcfl: error: {text}", file=sys.stderr, flush=True)
            return 2

    from hpcfl.comm import world

    comm = world()
    from hpcfl import protocol  # torch and the rest: most of a rank's start-up
    from hpcfl.supervise import Where, process_age, to_rank_log

    protocol.STARTUP["imports_s"] = process_age()
    started = launcher_size()
    if comm.size == 1 and started is not None and started > 1:
        # each process sees a world of one: N separate runs would start; refuse rather than run them
        if launcher_rank() == 0:
            print(f"hpcfl: error: the launcher started {started} processes but MPI sees each as a world of 1: the "
                  "launcher and the MPI that mpi4py uses do not match (with srun and the README's MPICH use "
                  "--mpi=pmi2; docs/cluster.md, \"Which --mpi\")", file=sys.stderr)
        faulthandler.cancel_dump_traceback_later()
        return 2
    install_signal_handlers(speaks=comm.is_server)
    setup_logging(comm.rank, comm.size)
    log = logging.getLogger("hpcfl")

    where = Where()
    try:
        if comm.is_server:
            log.info("hpcfl: %s, %d rounds, run directory %s", cfg.algorithm.name, cfg.run.rounds, out_dir)
        result = protocol.run(cfg, comm, out_dir, where, overwrite=args.overwrite, force=args.force)
    except (UsageError, OSError, UnicodeError) as e:  # bad input or environment: one line, exit 2
        if not comm.is_server:
            # Most bad input is seen by every rank alike; give the server time to report it and end the job,
            # so that the user reads one message rather than one per rank.
            time.sleep(1.0)
        text = describe_os_error(e) if isinstance(e, OSError) else str(e)
        where_text = f" (rank {comm.rank}, {where})" if comm.size > 1 else ""
        print(f"hpcfl: error{where_text}: {text}", file=sys.stderr, flush=True)
        detail = "" if isinstance(e, UsageError) else traceback.format_exc()  # for whoever debugs it, in the log
        to_rank_log(f"{detail}hpcfl: error{where_text}: {text}")
        where.end("failed", f"rank {comm.rank} stopped in {where}: {text}")
        if comm.size > 1 or not isinstance(e, UsageError):
            comm.abort(2)  # ends every rank; alone, ends at once (a failed HDF5 write can crash the interpreter's exit)
        return 2
    except BaseException as e:  # noqa: BLE001 - any failure must end every rank, not hang the job
        if isinstance(e, SystemExit) and e.code in (0, None):
            raise
        traceback.print_exc()
        message = f"hpcfl: rank {comm.rank} failed in {where}: {type(e).__name__}: {e}"
        print(message, file=sys.stderr, flush=True)
        to_rank_log(traceback.format_exc() + message)
        where.end("failed", message)
        if comm.size > 1:
            comm.abort(1)
        return 1
    EXIT_DEADLINE.append(deadline)
    if result.get("stopped"):
        return 3
    if comm.is_server:
        log.info("done: %s", out_dir)
    return 0


if __name__ == "__main__":
    code = main()
    if EXIT_DEADLINE:
        # MPI's shutdown waits for every rank, and a rank stopped there would hang the job after its work is safe:
        # a timer outside the interpreter ends the process if leaving takes longer than a round may
        faulthandler.dump_traceback_later(EXIT_DEADLINE[0], exit=True)
    sys.exit(code)
