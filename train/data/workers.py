"""The loader's worker processes: WorkerPool starts one process per slot stream, feeds each stream's
items to the training process through a bounded queue, watches the processes (a dead or stalled worker
is a DatasetError naming the rank and worker, never a hang), maps the shards of the samples they send
by reference, and stops and joins them. What each worker reads (the schedule) is the loader's
business (loader.py); this module knows only "worker w runs stream w and yields samples", and does
not import the loader.

Why processes, not threads: a worker can be stopped at any point. A stalled URL or a blocked `pipe:`
command is a worker that delivers nothing for `timeout` seconds; the pool reports it and terminates
the process (its SIGTERM handler kills its pipe: commands too), where a thread stuck in a read could
be neither interrupted nor joined. A worker that dies (the OOM killer, a crash in a decoder) takes only
itself down and is reported with its exit code. The Python-level part of reading (tar and safetensors
parsing, the checks' bookkeeping) runs under another interpreter's GIL, not beside the training loop.
The price is that the processes must not outlive the training process: each asks the kernel for
SIGKILL when its parent dies (PR_SET_PDEATHSIG) and also polls the parent's pid.

Why a hand-made pool and not torch's DataLoader over an IterableDataset: the schedule assigns each
worker its own shard list per epoch and the consumer takes one sample from each worker in turn,
skipping workers whose epoch is done; the shuffle windows, and therefore exact resume, are defined on
that per-epoch order. DataLoader also takes from its workers in turn, but across epoch boundaries (a
worker that finished its epoch is asked again and answers with the next epoch), so matching the
schedule would need one DataLoader pass per epoch, re-forking the workers and losing the prefetch at
every epoch boundary, and a worker error or a stalled URL surfaces there as a RuntimeError with a
reformatted message. The pool is this module, ~130 lines of code.

Local samples arrive as SampleRef, (file, offsets), and `WorkerPool.next` maps the file in the training
process, one mapping per shard a worker reads (loader.py says how samples reach the training process);
samples from URLs come through shared memory by handle, so a worker whose stream has ended stays alive
until the pool is closed.
"""
from __future__ import annotations

import ctypes
import os
import queue as queue_mod
import signal
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch

from .format import DatasetError, kill_pipes
from .shards import SampleRef, map_sample


class WorkerFailed(NamedTuple):
    message: str


class WorkerDone(NamedTuple):
    pass


def _die_with_parent(parent: int):
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), so a killed training
    process never leaves a worker behind holding memory and pipes. (The kernel means the thread that
    forked: iterate the loader from a thread that outlives it, e.g. the main thread.)"""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass  # not Linux: the polling in _worker_main still ends the worker
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _end_worker(signum, frame):
    kill_pipes()
    os._exit(128 + signum)


def _worker_main(q, stop, parent, stream):
    """A loader worker: it runs its stream (which reads and checks its samples: sha256, shapes, NaN/Inf)
    and passes each item on by reference (SampleRef: the training process maps the local shard itself)
    or, from a URL, in shared memory by handle."""
    _die_with_parent(parent)
    # close() stops a worker with SIGTERM, possibly mid-read from a pipe: command: end that too
    signal.signal(signal.SIGTERM, _end_worker)
    torch.set_num_threads(1)
    try:
        for item in stream():
            while True:  # a full queue while the parent is gone must not block forever
                try:
                    q.put(item, timeout=1.0)
                    break
                except queue_mod.Full:
                    if os.getppid() != parent or stop.is_set():
                        os._exit(0)
    except Exception as e:
        q.put(WorkerFailed(f"{type(e).__name__}: {e}" if not isinstance(e, DatasetError) else str(e)))
    q.put(WorkerDone())
    # Stay alive until the loader is done: the consumer fetches shared-memory handles from this process.
    while not stop.wait(1.0) and os.getppid() == parent:
        pass


class WorkerPool:
    """One worker process per stream, started now: process w calls streams[w]() and sends the items it
    yields (Sample, SampleRef or EmptySlot), at most `prefetch` ahead, until `next(w)` takes them.

    streams: zero-argument callables run in the worker processes (picklable for mp_context "spawn" or
    "forkserver", e.g. functools.partial of a module-level function); what one raises is a DatasetError
    for the consumer, raised by `next`. A stream must yield as long as the consumer asks: its end is an
    internal error. rank: the data-parallel rank, for process names and messages. `procs` are the
    processes (tests kill them); `close()` stops and joins them all."""

    def __init__(self, streams: list[Callable[[], Iterable]], *, rank: int, prefetch: int, timeout: float,
                 mp_context: str = "fork"):
        self.rank, self.timeout = rank, timeout
        self.procs, self.queues = [], []
        ctx = torch.multiprocessing.get_context(mp_context)
        self.stop = ctx.Event()
        for w, stream in enumerate(streams):
            q = ctx.Queue(maxsize=prefetch)
            p = ctx.Process(target=_worker_main, daemon=True, name=f"cltrain-loader-{rank}-{w}",
                            args=(q, self.stop, os.getpid(), stream))
            p.start()
            self.procs.append(p)
            self.queues.append(q)

    def next(self, w: int, keep: bool = True):
        """Worker w's next item, a local SampleRef as a Sample over its mapped bytes (keep=False: left
        unmapped, for a sample another rank of the feature-parallel group holds). DatasetError if the
        worker failed, died, or delivered nothing for `timeout` seconds."""
        q, p, t0 = self.queues[w], self.procs[w], time.monotonic()
        rank = self.rank
        while True:
            try:
                item = q.get(timeout=1.0)
                break
            except (ConnectionError, EOFError, OSError) as e:  # a handle of a worker that is gone
                p.join(timeout=5)
                raise DatasetError(f"loader worker {w} (rank {rank}) died with exit code "
                                   f"{p.exitcode} before delivering its data ({type(e).__name__})") from None
            except queue_mod.Empty:
                if not p.is_alive() and q.empty():
                    raise DatasetError(f"loader worker {w} (rank {rank}) died with exit code "
                                       f"{p.exitcode} before delivering its data") from None
                if time.monotonic() - t0 > self.timeout:
                    raise DatasetError(f"loader worker {w} (rank {rank}) delivered nothing for "
                                       f"{self.timeout:.0f} s (a shard URL that never answers?)") from None
        if isinstance(item, WorkerFailed):
            raise DatasetError(item.message)
        if isinstance(item, WorkerDone):
            raise DatasetError(f"loader worker {w} stopped before the end of its schedule (internal error)")
        if isinstance(item, SampleRef) and keep:
            # One mapping per sample, released with it: the process maps only the window's samples it keeps.
            item = map_sample(item)
        return item

    def close(self):
        """Stop the workers (SIGTERM; what they still hold is not needed) and join them."""
        if self.procs:
            self.stop.set()
        for q in self.queues:
            q.cancel_join_thread()
            q.close()
        for p in self.procs:  # what they still hold is not needed: no graceful drain
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
        self.procs, self.queues = [], []


class InProcess:
    """The pool's twin without processes: stream w's items made in this process, on demand (0 workers).
    The same interface as WorkerPool."""
    procs: tuple = ()  # no worker processes

    def __init__(self, gens: list[Iterable]):
        self.gens = gens

    def next(self, w: int, keep: bool = True):
        return next(self.gens[w])

    def close(self):
        for g in self.gens:
            close = getattr(g, "close", None)
            if close is not None:
                close()
