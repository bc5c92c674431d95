"""Decoding a plan's items in worker processes, in order, with a bounded number of chunks in flight
(``preprocess.pipeline`` writes what comes out).

An item whose image cannot be used (unreadable, no pixel data, undecodable, wrong shape, even a decoder that kills
its process) comes out as the reason it is skipped, never as an error of the run. Chunks are fixed
(``pipeline.CHUNK`` items) and results come back in item order, so any number of workers gives the same output.
"""

from __future__ import annotations

import os
import signal
import sys
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from hpcfl.data.corrupt import corrupt
from preprocess.items import CHUNK, MAX_REASON, Corruption, Item, Job, SkipItem


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."


def load_item(loader, item: Item) -> np.ndarray:
    return item.source() if callable(item.source) else loader(item.source)


def check_image(image, shape) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.shape != tuple(shape):
        raise SkipItem(f"wrong dimensions: decoded {image.dtype} {list(image.shape)}, expected uint8 {list(shape)}")
    return image


def decode_chunk(loader, items: Sequence[Item], corruptions: Sequence[Corruption | None], seed: int,
                 shape) -> list:
    """In a worker: per item, the list of output images (one per corruption), or the reason it is skipped."""
    out = []
    for item in items:
        try:
            image = check_image(load_item(loader, item), shape)
        except SkipItem as e:
            out.append(one_line(e))
            continue
        except Exception as e:  # anything a decoder raises on a bad file is that file's problem, not the run's
            out.append(one_line(f"{type(e).__name__}: {e}"))
            continue
        out.append([image if c is None else corrupt(image[None], c.kind, c.severity, seed, [item.id])[0]
                    for c in corruptions])
    return out


def init_worker(parent_pid: int) -> None:
    """In each worker: leave Ctrl-C to the main process (it stops the pool cleanly) and, on Linux, die with the
    main process, so that a killed run leaves no orphan decoders."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Only a forked worker is the main process's child (forkserver/spawn workers are the server's).
    if sys.platform.startswith("linux") and os.getppid() == parent_pid:
        try:
            import ctypes

            ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass
        if os.getppid() != parent_pid:  # the main process died before prctl took effect
            os._exit(1)


class Decoder:
    """Decodes items in worker processes, in order, with a bounded number of chunks in flight."""

    def __init__(self, loader, shape, seed: int, workers: int):
        self.loader, self.shape, self.seed, self.workers = loader, tuple(shape), seed, workers
        self.pool = None

    def __enter__(self):
        if self.workers > 1:
            self.pool = self._new_pool()
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def _new_pool(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, initializer=init_worker, initargs=(os.getpid(),))

    def _restart(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.pool = self._new_pool()

    def _submit(self, chunk, corruptions) -> Future:
        try:
            return self.pool.submit(decode_chunk, self.loader, chunk, corruptions, self.seed, self.shape)
        except BrokenProcessPool as e:  # a worker died since the last result: handled when this chunk is due
            failed: Future = Future()
            failed.set_exception(e)
            return failed

    def run(self, jobs: Sequence[Job]) -> Iterator[tuple[Item, object]]:
        """(item, output images or skip reason) for every item of ``jobs``, in order. Chunks of the next jobs
        are decoded while the current one is written, so the workers never wait for a job boundary."""
        tasks = [(job.items[i:i + CHUNK], [o.corruption for o in job.outputs])
                 for job in jobs for i in range(0, len(job.items), CHUNK)]
        if self.pool is None:
            for chunk, corruptions in tasks:
                yield from zip(chunk, decode_chunk(self.loader, chunk, corruptions, self.seed, self.shape))
            return
        todo = deque(tasks)
        pending: deque = deque()
        while todo or pending:
            while todo and len(pending) < 2 * self.workers:
                task = todo.popleft()
                pending.append((task, self._submit(*task)))
            (chunk, corruptions), future = pending.popleft()
            try:
                results = future.result()
            except BrokenProcessPool:
                # A decoder killed its process (e.g. a C library crashing on a bad file): find the culprit one
                # item at a time, then send the chunks that were in flight again.
                self._restart()
                results = self._one_by_one(chunk, corruptions)
                todo.extendleft(reversed([task for task, _ in pending]))
                pending.clear()
            yield from zip(chunk, results)

    def _one_by_one(self, chunk, corruptions) -> list:
        results = []
        for item in chunk:
            try:
                results.extend(self._submit([item], corruptions).result())
            except BrokenProcessPool:
                self._restart()
                results.append("the decoder process died on this file (crash or out of memory)")
        return results
