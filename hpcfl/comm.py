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
_NOTE_EVERY_S = 1.0  # a waiting client rank repeats its arrival note this often
_SILENT_AFTER_S = 3.0  # a rank not heard from for longer is not waiting in a collective


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

    def gather_rows(self, send: np.ndarray, rows: list[int]) -> np.ndarray | None:
        """Concatenate every rank's ``send`` (2-D float32, ``rows[r]`` rows of equal width on rank r) on the
        server, in rank order; None elsewhere."""
        raise NotImplementedError

    def local_client_rank(self) -> int:
        """Index of this rank among the client ranks on the same node (for GPU mapping)."""
        return 0

    def ranks_outnumber_cores(self, threads_per_rank: int = 1) -> bool:
        """Do the ranks on the server's node, ``threads_per_rank`` threads each, outnumber the cores they may run
        on (the union of their CPU affinities)? The same answer on every rank; a collective."""
        return False

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

    def gather_rows(self, send, rows):
        return send

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
        self._running = False  # every rank arrived: in the collective itself

    def watch(self, where) -> None:
        self.where = where
        self.notes = self.comm.Dup()  # arrival notes never match the collectives' traffic
        if self.is_server:  # [collective number, round, phase code] from each client rank; when heard
            self._note_buf = {r: np.zeros(3, dtype=np.float64) for r in range(1, self.size)}
            self._note_req = {r: self.notes.Irecv(self._note_buf[r], source=r, tag=1) for r in range(1, self.size)}
            self.last_note: dict[int, np.ndarray] = {}
            self.heard: dict[int, float] = {}
        self._sent: list = []

    def _send_note(self) -> None:
        """Client rank: tell the server this rank is at collective number ``collectives`` (on arrival, then every
        second while it waits, so that a rank that stops while waiting falls silent)."""
        w = self.where
        note = np.array([self.collectives, -1 if w.round is None else w.round, w.phase_code()], dtype=np.float64)
        self._sent = [(req, buf) for req, buf in self._sent if not req.Test()]  # keep buffers of sends in flight
        self._sent.append((self.notes.Isend(note, dest=SERVER, tag=1), note))

    def _read_notes(self) -> None:
        for r, req in self._note_req.items():
            while req.Test():
                self.last_note[r], self.heard[r] = self._note_buf[r].copy(), time.time()
                req = self._note_req[r] = self.notes.Irecv(self._note_buf[r], source=r, tag=1)

    def missing_ranks(self):
        """The ranks holding up the collective the server waits in: silent ones (computing, stopped or dead: a
        waiting rank repeats its note every second), or, if every rank is heard, those that have not arrived."""
        if not self.is_server or self.notes is None:
            return []
        if self._running:
            return [(r, "every rank arrived, but the collective itself did not complete") for r in range(1, self.size)]
        now, silent, behind = time.time(), [], []
        for r in range(1, self.size):
            note, heard = self.last_note.get(r), self.heard.get(r, 0.0)
            when = datetime.fromtimestamp(heard).strftime("%H:%M:%S")
            if note is None:
                silent.append((r, "not heard from since the start"))
                continue
            where = (f"its collective after phase {self.where.phase_name(int(note[2]))} of round "
                     f"{int(note[1]) if note[1] >= 0 else '-'}")
            arrived = int(note[0]) >= self.collectives
            if now - heard > _SILENT_AFTER_S:  # not waiting in any collective: computing, stopped or dead
                silent.append((r, f"silent in this collective since {when}" if arrived else
                                  f"last heard at {when}, arriving at {where}; not at the server's collective since"))
            elif not arrived:
                behind.append((r, f"alive, still waiting at {where}"))
        return silent or behind

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

    def _collective(self, run):
        """Wait, without burning a core, until every rank has reached this collective, then ``run()`` it. The
        rank counts as waiting until the collective has completed."""
        self.collectives += 1
        watched = self.where is not None and self.notes is not None
        if watched:
            self.where.waiting = True
            if not self.is_server:
                self._send_note()
        try:
            req = self.comm.Ibarrier()
            last_note = time.monotonic()
            while not req.Test():
                if watched and self.is_server:
                    self._read_notes()
                elif watched and time.monotonic() - last_note > _NOTE_EVERY_S:
                    self._send_note()
                    last_note = time.monotonic()
                time.sleep(_POLL_S)
            self._running = True
            return run()
        finally:
            self._running = False
            if watched:
                self.where.waiting = False

    def bcast(self, buf):
        return self._collective(lambda: self.comm.Bcast(buf, root=SERVER) or buf)

    def reduce_sum(self, send, recv):
        if self.rank != SERVER:
            return self._collective(lambda: self.comm.Reduce(send, None, op=self._MPI.SUM, root=SERVER))
        source = self._MPI.IN_PLACE if recv is send else send
        return self._collective(lambda: self.comm.Reduce(source, recv, op=self._MPI.SUM, root=SERVER) or recv)

    def barrier(self):
        self._collective(lambda: None)

    def gather_rows(self, send, rows):
        send = np.ascontiguousarray(send, dtype=np.float32)
        if self.rank != SERVER:
            return self._collective(lambda: self.comm.Gatherv(send, None, root=SERVER))
        out = np.empty((sum(rows), send.shape[1]), dtype=np.float32)
        counts = [r * send.shape[1] for r in rows]
        displacements = np.concatenate([[0], np.cumsum(counts)[:-1]]).tolist()
        return self._collective(lambda: self.comm.Gatherv(send, [out, counts, displacements, self._MPI.FLOAT],
                                                          root=SERVER) or out)

    def ranks_outnumber_cores(self, threads_per_rank=1):
        mine = np.zeros(os.cpu_count() or 1, dtype=np.int32)
        affinity = getattr(os, "sched_getaffinity", None)  # Linux; elsewhere every core counts
        mine[[c for c in (affinity(0) if affinity else range(len(mine))) if c < len(mine)]] = 1

        def ask():  # once every rank has arrived (a stopped rank is then named by the watchdog, as anywhere)
            node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
            usable = np.empty_like(mine)
            node.Allreduce(mine, usable, op=self._MPI.MAX)
            verdict = np.array([node.Get_size() * threads_per_rank > int(usable.sum())], dtype=np.int64)
            node.Free()
            self.comm.Bcast(verdict, root=SERVER)  # the server's node decides
            return bool(verdict[0])

        return self._collective(ask)

    def local_client_rank(self):
        # Ranks sharing a node (shared memory); the server, if on this node, does not count. A collective: every
        # rank must call it.
        def ask():  # once every rank has arrived, as every collective here
            node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
            found = np.empty(node.Get_size(), dtype=np.int64)
            node.Allgather(np.array([self.rank], dtype=np.int64), found)
            node.Free()
            return found

        ranks = self._collective(ask)
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
