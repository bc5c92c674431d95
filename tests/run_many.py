"""Run several hpcfl jobs one after another in one launch (one MPI world, imports paid once).

``python tests/run_many.py JOBS.json [--forbid-pickle]`` (or under mpiexec), JOBS.json holding a list of
argument lists for ``hpcfl.run``. Exits with the first non-zero exit code. Used by the integration tests to keep
the number of (expensive) mpiexec launches small; each job goes through the real entry point and round protocol.

``--forbid-pickle`` makes every pickling by mpi4py (its lowercase, object-based calls) raise: a run that
completes under it moved nothing but raw buffers (design invariant 1).
"""

import json
import sys


def forbidden_dumps(*args, **kwargs):
    raise AssertionError("mpi4py was asked to pickle an object: hpcfl must move raw buffers only")


if __name__ == "__main__":
    if "--forbid-pickle" in sys.argv[2:]:
        import pickle

        from mpi4py import MPI

        MPI.pickle.__init__(forbidden_dumps, pickle.loads)
    from hpcfl.run import main

    for argv in json.loads(open(sys.argv[1]).read()):
        code = main(argv)
        if code:
            sys.exit(code)
