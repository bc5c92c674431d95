"""The communication layer: the only module of hpcfl that imports mpi4py and knows about ranks.

Two implementations of one small interface:

- ``MPIComm``: world size >= 2. Rank 0 is the server, ranks 1..W-1 host the clients.
- ``SingleProcessComm``: single-rank mode (``python -m hpcfl.run`` without mpirun): one process is the server and hosts
  every client; the collectives are copies.

Everything travels through mpi4py's uppercase, buffer-based collectives on contiguous NumPy arrays (the model
as one float32 vector, statistics as float64 arrays): nothing is ever pickled.

MPICH busy-polls inside blocking calls. With more ranks than cores (6 ranks on 2 cores), ranks waiting in a
collective would steal the cores of the ranks still computing. So every collective here first waits for all
ranks to arrive on a tiny ``Ibarrier`` polled with ``Test()`` and short sleeps, and only then enters the real
(blocking) collective, which then completes quickly. (Never sleep-poll a *large* non-blocking collective:
MPICH only makes progress inside ``Test``.)

While it waits, a rank is marked as waiting (``Where.waiting``), and every client rank sends the server a tiny
*arrival note* (collective number, round, phase) on a communicator of its own: when a rank never arrives, the
server's watchdog can say which one, and where it was last seen (``missing_ranks``).
"""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime

import numpy as np

SERVER = 0
_POLL_S = 0.002


def assign_clients(sizes: list[int] | np.ndarray, num_client_ranks: int) -> list[list[int]]:
    """Deterministic, sample-balanced assignment of clients to client ranks.

    Greedy longest-processing-time: clients in decreasing size (ties by id) go to the least-loaded rank (ties by
    rank index). Returns, for each client rank, its client ids in increasing order. Depends only on the sizes and
    the number of ranks, so every rank computes the same table without communicating.
    """
    sizes = [int(s) for s in sizes]
    if num_client_ranks < 1:
        raise ValueError("need at least one client rank")
    if len(sizes) < num_client_ranks:
        raise ValueError(
            f"{num_client_ranks} client ranks but only {len(sizes)} clients: every client rank needs a client "
            f"(launch with at most {len(sizes) + 1} ranks)")
    load = [0] * num_client_ranks
    groups: list[list[int]] = [[] for _ in range(num_client_ranks)]
    for cid in sorted(range(len(sizes)), key=lambda c: (-sizes[c], c)):
        r = min(range(num_client_ranks), key=lambda k: (load[k], len(groups[k]), k))
        groups[r].append(cid)
        load[r] += sizes[cid]
    return [sorted(g) for g in groups]


class Comm:
    """The interface the round protocol uses: the server/client roles, the clients of this rank, collectives."""

    rank: int = 0
    size: int = 1

    @property
    def is_server(self) -> bool:
        return self.rank == SERVER

    @property
    def num_client_ranks(self) -> int:
        return max(1, self.size - 1)

    @property
    def client_rank_index(self) -> int | None:
        """This rank's index among the client ranks (0-based), or None on a server that hosts no client."""
        if self.size == 1:
            return 0
        return None if self.rank == SERVER else self.rank - 1

    def my_clients(self, sizes) -> list[int]:
        idx = self.client_rank_index
        return [] if idx is None else assign_clients(sizes, self.num_client_ranks)[idx]

    def bcast(self, buf: np.ndarray) -> np.ndarray:
        """Broadcast ``buf`` from the server into every rank's ``buf`` (in place); returns it."""
        raise NotImplementedError

    def reduce_sum(self, send: np.ndarray, recv: np.ndarray | None) -> np.ndarray | None:
        """Element-wise sum of every rank's ``send`` into the server's ``recv``.

        The server contributes ``send`` too (pass zeros when it hosts no client). ``recv`` is needed on the server
        only; it may be ``send`` itself (in place)."""
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def local_client_rank(self) -> int:
        """Index of this rank among the client ranks on the same node (for GPU mapping)."""
        return 0

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now."""
        raise NotImplementedError

    def watch(self, where) -> None:
        """Mark ``where.waiting`` while in a collective and, under MPI, send arrival notes from it (``where``:
        hpcfl.supervise.Where, whose phase travels as ``phase_code()``)."""
        self.where = where

    def missing_ranks(self) -> list[tuple[int, str]]:
        """Server, while waiting in a collective: the ranks that have not arrived, with where each was last seen."""
        return []

    def close(self) -> None:
        """Release what ``watch`` holds (before the next run in the same process)."""


class SingleProcessComm(Comm):
    """Single-rank mode: the server hosts every client; collectives are identities."""

    def bcast(self, buf):
        return buf

    def reduce_sum(self, send, recv):
        if recv is not None and recv is not send:
            np.copyto(recv, send)
        return recv if recv is not None else send

    def barrier(self):
        pass

    def abort(self, code=1):
        sys.stderr.flush()
        os._exit(code)


class MPIComm(Comm):
    def __init__(self, mpi_comm):
        from mpi4py import MPI

        self._MPI = MPI
        self.comm = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.where, self.notes = None, None
        self.collectives = 0  # collectives this rank has entered

    def watch(self, where) -> None:
        self.where = where
        self.notes = self.comm.Dup()  # arrival notes never match the collectives' traffic
        if self.is_server:  # [collective number, round, phase index, unix time] from each client rank
            self._note_buf = {r: np.zeros(4, dtype=np.float64) for r in range(1, self.size)}
            self._note_req = {r: self.notes.Irecv(self._note_buf[r], source=r, tag=1) for r in range(1, self.size)}
            self.last_note: dict[int, np.ndarray] = {}
        self._sent: list = []

    def _note_arrival(self) -> None:
        self.collectives += 1
        w = self.where
        if w is None:
            return
        if self.is_server:
            self._read_notes()
            return
        note = np.array([self.collectives, -1 if w.round is None else w.round, w.phase_code(), time.time()])
        self._sent = [(req, buf) for req, buf in self._sent if not req.Test()]  # keep buffers of sends in flight
        self._sent.append((self.notes.Isend(note, dest=SERVER, tag=1), note))

    def _read_notes(self) -> None:
        for r, req in self._note_req.items():
            while req.Test():
                self.last_note[r] = self._note_buf[r].copy()
                req = self._note_req[r] = self.notes.Irecv(self._note_buf[r], source=r, tag=1)

    def missing_ranks(self):
        if not self.is_server or self.notes is None:
            return []
        out = []
        for r in range(1, self.size):
            note = self.last_note.get(r)
            if note is not None and int(note[0]) >= self.collectives:
                continue
            if note is None:
                out.append((r, "nowhere since the start"))
                continue
            phase = self.where.phase_name(int(note[2]))
            when = datetime.fromtimestamp(note[3]).strftime("%H:%M:%S")
            out.append((r, f"arriving after phase {phase} of round {int(note[1]) if note[1] >= 0 else '-'} at "
                           f"{when}, collective {int(note[0])} of the server's {self.collectives}"))
        return out

    def close(self) -> None:
        if self.notes is None:
            return
        if self.is_server:
            for req in self._note_req.values():
                req.Cancel()
                req.Wait()
        for req, _ in self._sent:
            req.Wait()
        self.notes.Free()
        self.notes, self.where = None, None

    def _arrive(self):
        """Wait, without burning a core, until every rank has reached this collective."""
        self._note_arrival()
        req = self.comm.Ibarrier()
        if self.where is not None:
            self.where.waiting = True
        while not req.Test():
            if self.is_server and self.notes is not None:
                self._read_notes()
            time.sleep(_POLL_S)
        if self.where is not None:
            self.where.waiting = False

    def bcast(self, buf):
        self._arrive()
        self.comm.Bcast(buf, root=SERVER)
        return buf

    def reduce_sum(self, send, recv):
        self._arrive()
        if self.rank == SERVER:
            if recv is send:
                self.comm.Reduce(self._MPI.IN_PLACE, recv, op=self._MPI.SUM, root=SERVER)
            else:
                self.comm.Reduce(send, recv, op=self._MPI.SUM, root=SERVER)
            return recv
        self.comm.Reduce(send, None, op=self._MPI.SUM, root=SERVER)
        return None

    def barrier(self):
        self._arrive()

    def local_client_rank(self):
        # Ranks sharing a node (shared memory); the server, if on this node, does not count. A collective: every
        # rank must call it.
        node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
        ranks = np.empty(node.Get_size(), dtype=np.int64)
        node.Allgather(np.array([self.rank], dtype=np.int64), ranks)
        node.Free()
        clients_here = [int(r) for r in sorted(ranks) if r != SERVER]
        return clients_here.index(self.rank) if self.rank in clients_here else 0

    def abort(self, code=1):
        sys.stdout.flush()
        sys.stderr.flush()
        # The launcher forwards a rank's output through a proxy that Abort kills: give it a moment to pass on
        # the message that says why (without this the message was sometimes lost).
        time.sleep(0.5)
        self.comm.Abort(code)


def world() -> Comm:
    """The communicator of this process: MPI when launched with more than one rank, else single-rank mode.

    ``HPCFL_NO_MPI=1`` skips importing mpi4py altogether (for machines without an MPI runtime)."""
    if os.environ.get("HPCFL_NO_MPI") == "1":
        return SingleProcessComm()
    from mpi4py import MPI

    if MPI.COMM_WORLD.Get_size() == 1:
        return SingleProcessComm()
    return MPIComm(MPI.COMM_WORLD)
