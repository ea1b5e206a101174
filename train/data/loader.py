"""The loader: each rank's per-epoch schedule, the slot streams its workers read, ActivationLoader, and
moving a position to another data-parallel layout (reshard_loader_states). The worker processes that
read those streams are workers.py's WorkerPool (which says why processes, and why not torch's DataLoader).

How samples reach the training process: with 0 workers, local shards are read in this process as views
of the mapped file (train/data/shards.py), their sha256 in a background thread. A worker hashes and
checks its samples and sends each as a SampleRef, (file, offsets), and this process maps the file
itself (WorkerPool.next): the bytes cross no process boundary and are never copied before the shuffle
gather, and the worker's CPU time goes to the hash and the NaN/Inf check. (Copying each sample into
shared memory instead cost a write and a fresh page of shared memory per byte, and made 1 or 2 workers
slower than none on a 2-core machine: benchmarks/data.md.) Samples from URLs have no file to map and
still come through shared memory. The shuffle gather, the one copy left, runs in this process.
"""
from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass
from typing import Iterator, NamedTuple

import torch

from cltrain.errors import ConfigError
from .format import DatasetError, DatasetInfo, is_url, seed_mix
from .shards import EmptySlot, read_shard
from .workers import InProcess, WorkerPool

log = logging.getLogger(__name__)

STATE_VERSION = 2


# ----------------------------------------------------------------------------------------------------
# The schedule: which samples a rank and each of its workers read in an epoch


def epoch_shards(records: list[dict], epoch: int, seed: int, dp_rank: int, dp_size: int) -> list[dict]:
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed_mix(seed, epoch, 1))).tolist()
    return [records[i] for i in perm[dp_rank::dp_size]]


def rr_consumed(counts: list[int], m: int) -> list[int]:
    """Slots taken from each worker after m slots of a round-robin over workers with `counts` slots."""
    lo, hi = 0, max(counts, default=0)
    while lo < hi:  # the largest number of full rounds r with sum(min(c, r)) <= m
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in counts) <= m:
            lo = mid
        else:
            hi = mid - 1
    used = [min(c, lo) for c in counts]
    rest = m - sum(used)
    for w, c in enumerate(counts):
        if rest and c > lo:
            used[w] += 1
            rest -= 1
    return used


def next_worker(used: list[int], counts: list[int]) -> int:
    """The next worker in the round-robin: the one with the fewest slots taken, lowest index first."""
    return min((u, w) for w, (u, c) in enumerate(zip(used, counts)) if u < c)[1]


# A piece of a schedule is [shard name, first sample, end sample, excluded rows or None]: samples
# first..end-1 of a shard. Only a resharded position has excluded rows (tokens delivered before the
# reshard), and only on one-sample pieces.

def _piece_len(p) -> int:
    return p[2] - p[1]


def split_pieces(pieces: list, parts: int) -> list[list]:
    """Cut a piece list into `parts` contiguous runs of (nearly) equal sample counts, in order."""
    total = sum(_piece_len(p) for p in pieces)
    bounds = [round(total * (j + 1) / parts) for j in range(parts)]
    out, pos, j = [[] for _ in range(parts)], 0, 0
    for p in pieces:
        name, a, b, rows = p
        while a < b:
            while j < parts - 1 and pos >= bounds[j]:
                j += 1
            take = b - a if j == parts - 1 else min(b - a, bounds[j] - pos)
            if take <= 0:
                j += 1
                continue
            out[j].append([name, a, a + take, rows])
            a += take
            pos += take
    return out


def drop_slots(pieces: list, k: int) -> list:
    """The pieces after their first k slots."""
    out = []
    for name, a, b, rows in pieces:
        if k >= b - a:
            k -= b - a
            continue
        out.append([name, a + k, b, rows])
        k = 0
    return out


def slot_at(pieces: list, j: int) -> tuple[str, int, list | None]:
    """(shard name, sample index, excluded rows) of slot j of a piece list."""
    for name, a, b, rows in pieces:
        if j < b - a:
            return name, a + j, rows
        j -= b - a
    raise IndexError(j)


@dataclass
class Schedule:
    """What rank dp_rank's workers read in each epoch: the shards of an epoch are permuted with
    seed+epoch, the rank takes every dp_size-th, its worker w every n_workers-th of those. A position
    moved from another layout (`leftover`) replaces one epoch's list by explicit pieces."""
    records: list[dict]
    tokens_per_sample: int
    seed: int
    dp_rank: int
    dp_size: int
    n_workers: int
    leftover: dict | None = None  # {"epoch": e, "pieces": [...]} (see split_pieces)

    def is_leftover(self, epoch: int) -> bool:
        return self.leftover is not None and epoch == self.leftover["epoch"]

    def worker_pieces(self, epoch: int) -> list[list]:
        if self.is_leftover(epoch):
            return split_pieces(self.leftover["pieces"], self.n_workers)
        mine = epoch_shards(self.records, epoch, self.seed, self.dp_rank, self.dp_size)
        T = self.tokens_per_sample
        return [[[r["name"], 0, r["n_tokens"] // T, None] for r in mine[w::self.n_workers]]
                for w in range(self.n_workers)]

    def counts(self, epoch: int) -> list[int]:
        return [sum(_piece_len(p) for p in ps) for ps in self.worker_pieces(epoch)]

    def window_seed(self, epoch: int, window: int) -> int:
        if self.is_leftover(epoch):
            return seed_mix(self.seed, epoch, self.dp_rank, window, 3, self.dp_size)
        return seed_mix(self.seed, epoch, self.dp_rank, window, 2)


def window_order(n_present: int, excluded: list[int], seed: int) -> torch.Tensor:
    """The order in which a window's tokens are delivered: a permutation of positions 0..n_present*T-1
    (present samples laid end to end) without the excluded positions."""
    g = torch.Generator().manual_seed(seed)
    if not excluded:
        return torch.randperm(n_present, generator=g)
    keep = torch.ones(n_present, dtype=torch.bool)
    keep[torch.tensor(excluded, dtype=torch.long)] = False
    valid = keep.nonzero().flatten()
    return valid[torch.randperm(len(valid), generator=g)]


def _window_slots(counts: list[int], start: int, count: int) -> list[tuple[int, int]]:
    """(worker, slot index in that worker's list) of `count` slots of the round-robin from slot `start`."""
    used, out = rr_consumed(counts, start), []
    for _ in range(count):
        w = next_worker(used, counts)
        out.append((w, used[w]))
        used[w] += 1
    return out


# ----------------------------------------------------------------------------------------------------
# Slot streams: what each worker reads, in this process (0 workers) or in a worker process (workers.py)


def _worker_items(info: DatasetInfo, sched: Schedule, w: int, start_epoch: int, start_slot: int, on_error: str,
                  verify: bool, epochs: int | None, shared: bool = False) -> Iterator:
    """Worker w's slot stream (Sample or EmptySlot) from (start_epoch, start_slot) on, epoch after epoch."""
    by_name = {r["name"]: r for r in sched.records}
    epoch = start_epoch
    while epochs is None or epoch < epochs:
        pieces = drop_slots(sched.worker_pieces(epoch)[w], start_slot if epoch == start_epoch else 0)
        for name, a, b, _rows in pieces:
            yield from read_shard(by_name[name], info, a, b, on_error, verify, shared)
        epoch += 1


def _worker_stream(info_doc: dict, base, sched: Schedule, w: int, start_epoch: int, start_slot: int, on_error: str,
                   verify: bool, epochs: int | None) -> Iterator:
    """What worker process w runs (a WorkerPool stream): its slot stream, samples by reference or in
    shared memory (shared=True), over the dataset rebuilt from its JSON."""
    info = DatasetInfo.from_json(info_doc, base)
    return _worker_items(info, sched, w, start_epoch, start_slot, on_error, verify, epochs, shared=True)


# ----------------------------------------------------------------------------------------------------
# Batches and normalization


class Batch(NamedTuple):
    """x, y [B, N, D] and token_ids [B]. From a loader with normalize=True (the default): float32, already
    multiplied by the dataset's scales. With normalize=False: the stored dtype (bf16/fp16, or int8 with
    float32 per-row scales x_scale, y_scale [B, N]); `to_training` normalizes them where they are."""
    x: torch.Tensor
    y: torch.Tensor
    token_ids: torch.Tensor
    x_scale: torch.Tensor | None = None
    y_scale: torch.Tensor | None = None


def _normalize(v: torch.Tensor, row_scale: torch.Tensor | None, scale: torch.Tensor, out: torch.Tensor | None = None):
    """float32 v * row_scale[..., None] * scale: the one definition both paths use (bit-identical results)."""
    out = v.to(torch.float32) if out is None else out.copy_(v)
    if row_scale is not None:
        out.mul_(row_scale.unsqueeze(-1))
    return out.mul_(scale)  # (one mixed-dtype torch.mul is 2x slower here)


def to_training(batch: Batch, scale_x: torch.Tensor, scale_y: torch.Tensor, dtype: torch.dtype = torch.float32,
                device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized (x, y) in `dtype` on `device` from a raw batch (ActivationLoader(normalize=False)).

    scale_x, scale_y: the dataset's scales as float32 tensors of shape [1, N, 1], best already on the
    device (`ActivationLoader.scales(device)`). The batch moves with non_blocking copies (it is in pinned
    memory when the loader's device is CUDA); the cast and the multiplications run where the data is.
    On CPU the float32 result equals the loader's own normalize=True batch bit for bit."""
    device = torch.device(device) if device is not None else batch.x.device
    out = []
    for v, row, s in ((batch.x, batch.x_scale, scale_x), (batch.y, batch.y_scale, scale_y)):
        v = v.to(device, non_blocking=True)
        row = row.to(device, non_blocking=True) if row is not None else None
        v = _normalize(v, row, s.to(device))
        out.append(v if dtype == torch.float32 else v.to(dtype))
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------
# The loader


class ActivationLoader:
    """Batches of activations for one data-parallel rank (train/data/__init__.py says in what order).

    Iterating yields `Batch`: with normalize=True (the default) float32 [batch_tokens, N, D] x and y
    already multiplied by the dataset's scales, on `device`; with normalize=False x and y stay in the
    stored dtype (half the bytes of float32 for bf16, a quarter for int8), in pinned memory and copied
    with non_blocking=True when `device` is CUDA, and the training step calls `self.to_training(batch)`
    (or `to_training`) to normalize them on the device. All ranks of a feature-parallel group pass the
    same dp_rank. epochs=None iterates forever (each epoch reshuffled); with epochs=k it stops after k
    epochs, the last batch holding the remainder unless drop_last. `epoch` is the epoch the next token
    comes from, `epoch_tokens(e)` this rank's tokens in epoch e.

    `state_dict()` is the position after the last batch yielded; `load_state_dict()` before iterating
    continues exactly there (same seed and data-parallel layout; another num_workers, shuffle_buffer or
    batch_tokens is accepted: the rest of the epoch is then read in the new layout's order, every token
    still once). A position from another data-parallel size goes through `reshard_loader_states`.
    `skipped` counts bad samples skipped (on_error="skip"); each is logged with its shard. `close()` stops
    the worker processes (also done when an iteration ends or the loader is collected).
    verify=True checks each shard's sha256 as it is read; `verified` ({shard name: identity}, from
    `verify_shards(...)["identities"]`) exempts the local shards hashed up front, as long as the file's
    device, inode, size and mtime are the ones hashed (the training job passes it: one hash per shard).
    Memory: the window being served holds shuffle_buffer x N x D x 4 bytes (x and y, bf16), each sample
    mapped on its own; workers prefetch up to `prefetch` samples each (default: the next window's worth)
    by reference, in their own processes.

    One window per feature-parallel group (fp_group, fp_rank, fp_size; docs/design.md section 3): the
    ranks of a group read the same batches, so each rank runs the same schedule (its workers still read
    and check every sample, and every rank knows the window's empty slots) but keeps only the present
    samples whose index in the window is fp_rank modulo fp_size; each batch is assembled with zeros for
    the other rows and summed over the group as bytes (each byte has one non-zero owner, so the sum is
    the batch bit for bit). Per rank the window costs 1/fp_size, and the group's host memory for data
    does not grow with fp_size. The iteration is then collective over the group.
    """

    def __init__(self, path_or_info, batch_tokens: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 16384, num_workers: int = 0, split: str = "train",
                 heldout_shards: int = 0, on_error: str = "raise", device="cpu", epochs: int | None = None,
                 drop_last: bool = False, prefetch: int | None = None, timeout: float = 600.0, verify: bool = True,
                 mp_context: str = "fork", normalize: bool = True, verified: dict | None = None,
                 fp_group=None, fp_rank: int = 0, fp_size: int = 1):
        self.info = DatasetInfo.load(path_or_info)
        for key, v in (("batch_tokens", batch_tokens), ("dp_size", dp_size), ("prefetch", prefetch or 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ActivationLoader: {key}={v!r}, expected a positive integer")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"ActivationLoader: dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"ActivationLoader: on_error={on_error!r}, expected 'raise' or 'skip'")
        if num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"ActivationLoader: num_workers={num_workers}, shuffle_buffer={shuffle_buffer}: expected >= 0")
        if not timeout > 0:
            raise ValueError(f"ActivationLoader: timeout={timeout!r}, expected a positive number of seconds")
        self.batch_tokens, self.dp_rank, self.dp_size, self.seed = batch_tokens, dp_rank, dp_size, seed
        self.num_workers, self.split, self.heldout_shards = num_workers, split, heldout_shards
        self.on_error, self.device, self.epochs, self.drop_last = on_error, torch.device(device), epochs, drop_last
        self.timeout, self.mp_context, self.verify, self.normalize = timeout, mp_context, verify, normalize
        if not 0 <= fp_rank < fp_size:
            raise ValueError(f"ActivationLoader: fp_rank={fp_rank} is not in [0, fp_size={fp_size})")
        if fp_size > 1 and fp_group is None:
            raise ValueError("ActivationLoader: fp_size > 1 needs the feature-parallel group (fp_group)")
        self.fp_group, self.fp_rank, self.fp_size = fp_group, fp_rank, fp_size
        self.records = self.info.shard_records(split, heldout_shards)
        if verified:  # shards verify_shards hashed: not hashed again while the file is the one it hashed
            self.records = [dict(r, verified_ident=tuple(verified[r["name"]])) if r["name"] in verified else r
                            for r in self.records]
        if len(self.records) < dp_size:
            raise DatasetError(f"{self.info.json_path}: the {split} split has {len(self.records)} shard(s), fewer "
                               f"than the {dp_size} data-parallel ranks; harvest with a smaller shard size")
        for r in self.records:  # a missing local shard is reported now, not hours into a run
            if not is_url(r["url"]) and not os.path.isfile(r["url"]):
                msg = f"shard {r['name']} ({r['url']}): missing (listed in {self.info.json_path})"
                if on_error == "raise":
                    raise DatasetError(msg)
                log.warning("%s; its samples will be skipped", msg)
        T = self.info.tokens_per_sample
        self.window_slots = max(1, math.ceil(shuffle_buffer / T))
        self.shuffle_buffer = shuffle_buffer
        self.schedule = Schedule(self.records, T, seed, dp_rank, dp_size, max(1, num_workers))
        # Workers read the next window while the current one is served: no stall at window boundaries.
        self.prefetch = prefetch or math.ceil(self.window_slots / self.schedule.n_workers) + 1
        self.scale_x = torch.tensor(self.info.scale_x, dtype=torch.float32).view(1, -1, 1)
        self.scale_y = torch.tensor(self.info.scale_y, dtype=torch.float32).view(1, -1, 1)
        self._device_scales: dict = {}
        self.skipped = 0
        self.skip_messages: list[str] = []
        self._pos = (0, 0, 0)  # (epoch, window, tokens taken from the window)
        self._skipped_at_window = 0
        self._holes: list[int] = []  # window positions of the current window's empty slots
        self._sources: WorkerPool | InProcess | None = None

    # --- schedule ---

    @property
    def n_logical_workers(self) -> int:
        return self.schedule.n_workers

    def worker_counts(self, epoch: int) -> list[int]:
        """Slots (samples declared) each worker of this rank reads in an epoch."""
        return self.schedule.counts(epoch)

    def epoch_tokens(self, epoch: int = 0) -> int:
        """Tokens this rank sees in an epoch (bad samples skipped excepted)."""
        excluded = sum(len(p[3]) for p in self.schedule.leftover["pieces"] if p[3]) \
            if self.schedule.is_leftover(epoch) else 0
        return sum(self.worker_counts(epoch)) * self.info.tokens_per_sample - excluded

    @property
    def epoch(self) -> int:
        """The epoch the next token comes from (0-based; for logging)."""
        e, k, _ = self._pos
        return e + 1 if k * self.window_slots >= sum(self.worker_counts(e)) else e

    # --- normalization on the consumer's device ---

    def scales(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale_x, scale_y) as float32 [1, N, 1] tensors on `device` (cached)."""
        device = torch.device(device) if device is not None else self.device
        if device not in self._device_scales:
            self._device_scales[device] = (self.scale_x.to(device), self.scale_y.to(device))
        return self._device_scales[device]

    def to_training(self, batch: Batch, dtype: torch.dtype = torch.float32, device=None):
        """Normalized (x, y) in `dtype` on `device` (default: the loader's) from a batch this loader yielded."""
        device = torch.device(device) if device is not None else self.device
        if self.normalize:  # already normalized float32
            return batch.x.to(device, dtype, non_blocking=True), batch.y.to(device, dtype, non_blocking=True)
        return to_training(batch, *self.scales(device), dtype=dtype, device=device)

    # --- state ---

    def state_dict(self) -> dict:
        e, k, off = self._pos
        state = {"version": STATE_VERSION, "epoch": e, "window": k, "offset": off, "skipped": self._skipped_at_window,
                 "holes": list(self._holes) if off else [], "seed": self.seed, "dp_rank": self.dp_rank,
                 "dp_size": self.dp_size, "num_workers": self.n_logical_workers, "batch_tokens": self.batch_tokens,
                 "window_slots": self.window_slots, "split": self.split, "heldout_shards": self.heldout_shards,
                 "n_tokens": self.info.n_tokens}
        if self.schedule.is_leftover(e):
            state["leftover"] = self.schedule.leftover
        return state

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        _check_same_data(state, mine, "ActivationLoader.load_state_dict")
        for key in ("dp_rank", "dp_size"):
            if state.get(key) != mine[key]:
                raise ValueError(f"ActivationLoader.load_state_dict: saved {key}={state.get(key)!r} but this loader "
                                 f"has {key}={mine[key]!r}; map the positions of all ranks with "
                                 f"reshard_loader_states(states, new_dp_size, dataset) first")
        self.close()
        e, k, off = int(state["epoch"]), int(state["window"]), int(state["offset"])
        leftover = state.get("leftover")
        same_order = (state.get("num_workers") == mine["num_workers"] and state.get("window_slots") == mine["window_slots"])
        if not same_order and (k or off):
            # Another worker count or window size orders the rest of the epoch differently: what this
            # rank has not yet delivered becomes an explicit list, read in this loader's order.
            e, pieces = remaining_pieces(state, self.info)
            leftover, k, off = {"epoch": e, "pieces": pieces}, 0, 0
        self.schedule.leftover = leftover
        self._pos = (e, k, off)
        self._holes = [int(h) for h in state.get("holes", [])]
        self._skipped_at_window = self.skipped = int(state["skipped"])

    # --- iteration ---

    def close(self):
        if self._sources is not None:
            self._sources.close()
            self._sources = None

    def _open_sources(self, epoch: int, starts: list[int]) -> WorkerPool | InProcess:
        """The workers' slot streams from `epoch`, worker w's from slot starts[w] of its list."""
        args = (self.on_error, self.verify, self.epochs)
        # 0 workers reads local files in-process. URLs (pipe:, http, ...) always go through a worker
        # process, whose queue has a timeout: a stalled stream is an error, not a hang. (0 and 1 worker
        # read in the same order.)
        if self.num_workers == 0 and not any(is_url(r["url"]) for r in self.records):
            return InProcess([_worker_items(self.info, self.schedule, 0, epoch, starts[0], *args)])
        streams = [functools.partial(_worker_stream, self.info.to_json(), self.info.path, self.schedule, w, epoch,
                                     starts[w], *args) for w in range(self.schedule.n_workers)]
        return WorkerPool(streams, rank=self.dp_rank, prefetch=self.prefetch, timeout=self.timeout,
                          mp_context=self.mp_context)

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _skip(self, msg: str):
        self.skipped += 1
        if len(self.skip_messages) < 1000:
            self.skip_messages.append(msg)
        log.warning("skipped a bad sample (%d so far): %s", self.skipped, msg)

    def _new_batch(self) -> dict:
        """Empty batch buffers (pinned when the batch goes to a GPU, so its copy can overlap the step)."""
        B, N, D = self.batch_tokens, self.info.n_layers, self.info.d_model
        pin = self.device.type == "cuda"
        dt = torch.float32 if self.normalize else self.info.torch_dtype
        # zeros where the group assembles the batch: the rows other ranks hold must add nothing
        new = torch.zeros if self.fp_size > 1 else torch.empty
        buf = {k: new((B, N, D), dtype=dt, pin_memory=pin) for k in ("x", "y")}
        buf["token_ids"] = new(B, dtype=torch.int64, pin_memory=pin)
        if self.info.quantized and not self.normalize:
            for k in ("x_scale", "y_scale"):
                buf[k] = new((B, N), dtype=torch.float32, pin_memory=pin)
        return buf

    def _finish(self, buf: dict, have: int) -> Batch:
        b = Batch(**{k: v[:have] if have < self.batch_tokens else v for k, v in buf.items()})
        if self.device.type != "cpu":
            b = Batch(*(v.to(self.device, non_blocking=True) if v is not None else None for v in b))
        if self.fp_size > 1:
            import torch.distributed as dist

            # Every byte is non-zero on at most one rank (the one holding its sample): an integer sum
            # of the bytes is the whole batch, exactly, on every rank of the group.
            for v in b:
                if v is not None:
                    dist.all_reduce(v.view(-1).view(torch.uint8), op=dist.ReduceOp.SUM, group=self.fp_group)
        return b

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        epoch, k, off = self._pos
        S, T, sched = self.window_slots, self.info.tokens_per_sample, self.schedule
        counts = sched.counts(epoch)
        M = sum(counts)
        if k * S >= M:  # a saved position at an epoch's very end
            epoch, k, off = epoch + 1, 0, 0
            counts = sched.counts(epoch)
            M = sum(counts)
        starts = rr_consumed(counts, k * S)
        self._sources = src = self._open_sources(epoch, starts)
        buf, have = self._new_batch(), 0
        # The loader's work is memory-bound: one thread does it as fast as two, and on a busy machine two
        # OpenMP threads contend (measured 3.5x slower). The caller's thread count is restored at each yield.
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            while self.epochs is None or epoch < self.epochs:
                pieces = sched.worker_pieces(epoch) if sched.is_leftover(epoch) else None
                delivered = 0
                while k * S < M:
                    self._skipped_at_window = self.skipped
                    window, holes, excluded = [], [], []
                    for pos, (w, j) in enumerate(_window_slots(counts, k * S, min(S, M - k * S))):
                        # a feature-parallel group: this rank holds present samples fp_rank, fp_rank + P, ...
                        own = len(window) % self.fp_size == self.fp_rank
                        item = src.next(w, keep=own)
                        if isinstance(item, EmptySlot):
                            self._skip(item.message)
                            holes.append(pos)
                            continue
                        if pieces is not None and (rows := slot_at(pieces[w], j)[2]):
                            excluded.extend(len(window) * T + r for r in rows)
                        window.append(item if own else None)
                    self._holes = holes
                    n_all = len(window) * T
                    if n_all:
                        wid = torch.cat([s.token_ids if s is not None else torch.zeros(T, dtype=torch.int64)
                                         for s in window])
                        perm = window_order(n_all, excluded, sched.window_seed(epoch, k))
                        n = len(perm)
                        delivered += n
                        while off < n:
                            take = min(self.batch_tokens - have, n - off)
                            self._gather(window, wid, perm[off:off + take], buf, have)
                            have += take
                            off += take
                            if have == self.batch_tokens:
                                batch = self._finish(buf, have)
                                buf, have = self._new_batch(), 0
                                self._pos = (epoch, k + 1, 0) if off == n else (epoch, k, off)
                                if off == n:
                                    self._skipped_at_window, self._holes = self.skipped, []
                                torch.set_num_threads(caller_threads)
                                yield batch
                                caller_threads = torch.get_num_threads()
                                torch.set_num_threads(1)
                    k, off = k + 1, 0
                if not delivered and self.skipped:  # every sample bad: stop rather than spin forever
                    raise DatasetError(f"{self.info.json_path}: rank {self.dp_rank} found no valid sample in a whole "
                                       f"epoch ({self.skipped} skipped; last: {self.skip_messages[-1]})")
                epoch, k, off = epoch + 1, 0, 0
                counts = sched.counts(epoch)
                M = sum(counts)
            if have and not self.drop_last:
                batch = self._finish(buf, have)
                self._pos = (epoch, 0, 0)
                torch.set_num_threads(caller_threads)
                yield batch
        finally:
            torch.set_num_threads(caller_threads)
            self.close()

    def _gather(self, window: list, wid: torch.Tensor, idx: torch.Tensor, buf: dict, at: int):
        """Rows idx of the window (its samples laid end to end) into buf[at:at + len(idx)]: normalized float32
        (normalize=True) or as stored. Rows are taken sample by sample (the batch's order is idx stably
        sorted by sample: still a random set, as deterministic as idx), copying through integer views:
        index_select on bf16 is ~25x slower here."""
        T, n = self.info.tokens_per_sample, len(idx)
        sample = idx // T
        idx = idx[torch.argsort(sample, stable=True)]
        sample, row = idx // T, idx % T
        uniq, counts = torch.unique_consecutive(sample, return_counts=True)
        spans = list(zip(uniq.tolist(), counts.tolist()))
        quantized = self.info.quantized

        def rows_of(tensors: list[torch.Tensor], out: torch.Tensor):
            """index_select of each sample's rows into out [n, ...] (a contiguous tensor)."""
            flat = out.view(n, -1)
            start = 0
            for u, c in spans:
                if tensors[u] is not None:  # None: a sample another rank of the group holds (rows stay 0)
                    torch.index_select(tensors[u].reshape(T, -1), 0, row[start:start + c],
                                       out=flat[start:start + c])
                start += c

        stored = self.info.torch_dtype
        bits_dtype = torch.int8 if quantized else torch.int16
        for key, scale_key, layer_scale in (("x", "x_scale", self.scale_x), ("y", "y_scale", self.scale_y)):
            src = [getattr(s, key).view(bits_dtype) if s is not None else None for s in window]
            dest = buf[key][at:at + n]
            if not self.normalize:
                rows_of(src, dest.view(bits_dtype))
                if quantized:
                    rows_of([getattr(s, scale_key) if s is not None else None for s in window],
                            buf[scale_key][at:at + n])
                continue
            raw = (torch.zeros if self.fp_size > 1 else torch.empty)(dest.shape, dtype=bits_dtype)
            rows_of(src, raw)
            row_scale = None
            if quantized:
                row_scale = (torch.zeros if self.fp_size > 1 else torch.empty)(dest.shape[:2], dtype=torch.float32)
                rows_of([getattr(s, scale_key) if s is not None else None for s in window], row_scale)
            _normalize(raw.view(stored), row_scale, layer_scale, out=dest)
        buf["token_ids"][at:at + n] = wid[idx]


def _check_same_data(state: dict, mine: dict, who: str):
    if state.get("version") not in (1, STATE_VERSION):
        raise ValueError(f"{who}: saved loader state version {state.get('version')!r}, expected 1 or {STATE_VERSION}")
    for key in ("seed", "split", "heldout_shards", "n_tokens"):
        if state.get(key) != mine[key]:
            raise ValueError(f"{who}: saved {key}={state.get(key)!r} but this loader has {key}={mine[key]!r}; "
                             f"resuming needs the same dataset, split and seed")


def _schedule_of(state: dict, info: DatasetInfo) -> Schedule:
    records = info.shard_records(state["split"], state["heldout_shards"])
    return Schedule(records, info.tokens_per_sample, int(state["seed"]), int(state["dp_rank"]), int(state["dp_size"]),
                    int(state["num_workers"]), state.get("leftover"))


def remaining_pieces(state: dict, info: DatasetInfo) -> tuple[int, list]:
    """(epoch, pieces): what the rank whose loader saved `state` has not yet delivered of its current epoch.
    Tokens already delivered from a partly served window are listed as excluded rows."""
    sched, T, S = _schedule_of(state, info), info.tokens_per_sample, int(state["window_slots"])
    e, k, off = int(state["epoch"]), int(state["window"]), int(state["offset"])
    counts = sched.counts(e)
    M = sum(counts)
    if k * S >= M:
        e, k, off = e + 1, 0, 0
        counts = sched.counts(e)
        M = sum(counts)
    pieces = sched.worker_pieces(e)
    out = []
    if off:  # window k is partly served: its present samples, less the delivered tokens
        holes = set(int(h) for h in state.get("holes", []))
        slots = [s for pos, s in enumerate(_window_slots(counts, k * S, min(S, M - k * S))) if pos not in holes]
        ids = [slot_at(pieces[w], j) for w, j in slots]
        excluded = [i * T + r for i, (_, _, rows) in enumerate(ids) for r in (rows or [])]
        delivered = window_order(len(ids) * T, excluded, sched.window_seed(e, k))[:off]
        gone = [set(rows or []) for _, _, rows in ids]
        for p in delivered.tolist():
            gone[p // T].add(p % T)
        for (name, sample, _), rows in zip(ids, gone):
            if len(rows) < T:
                out.append([name, sample, sample + 1, sorted(rows) or None])
        k += 1
    used = rr_consumed(counts, min(k * S, M))
    for w in range(sched.n_workers):
        out.extend(drop_slots(pieces[w], used[w]))
    return e, out


def reshard_loader_states(old_states: list[dict], new_dp_size: int, dataset) -> list[dict]:
    """Loader states for `new_dp_size` data-parallel ranks from the states of every old rank (in dp_rank
    order) such that the new ranks together deliver exactly the tokens of the current epoch the old ranks
    had not delivered yet, each once, then continue with the new layout's own schedule from the next
    epoch. (An old rank that was already in a later epoch than another contributes what it had left of
    its own epochs up to the latest one; the new ranks then start after that latest epoch.)
    dataset: the dataset folder/URL or DatasetInfo."""
    info = DatasetInfo.load(dataset)
    if isinstance(new_dp_size, bool) or not isinstance(new_dp_size, int) or new_dp_size <= 0:
        raise ValueError(f"reshard_loader_states: new_dp_size={new_dp_size!r}, expected a positive integer")
    if not old_states:
        raise ValueError("reshard_loader_states: no old states")
    first = old_states[0]
    if first.get("dp_size") != len(old_states):
        raise ValueError(f"reshard_loader_states: {len(old_states)} state(s) given but they were saved with "
                         f"dp_size={first.get('dp_size')}; pass every old rank's state")
    for r, s in enumerate(old_states):
        _check_same_data(s, first, "reshard_loader_states")
        if s.get("dp_rank") != r or s.get("dp_size") != first["dp_size"]:
            raise ValueError(f"reshard_loader_states: state {r} has dp_rank={s.get('dp_rank')}, dp_size="
                             f"{s.get('dp_size')}; expected dp_rank={r}, dp_size={first['dp_size']} (dp_rank order)")
    left = [remaining_pieces(s, info) for s in old_states]
    last = max(e for e, _ in left)
    pieces = []
    for s, (e, p) in zip(old_states, left):
        pieces.extend(p)
        sched = _schedule_of(s, info)
        for later in range(e + 1, last + 1):  # whole epochs this rank had not started
            pieces.extend(q for ws in sched.worker_pieces(later) for q in ws)
    return [{"version": STATE_VERSION, "epoch": last, "window": 0, "offset": 0, "skipped": 0, "holes": [],
             "seed": first["seed"], "dp_rank": r, "dp_size": new_dp_size, "num_workers": None,
             "batch_tokens": None, "window_slots": None, "split": first["split"],
             "heldout_shards": first["heldout_shards"], "n_tokens": first["n_tokens"],
             "leftover": {"epoch": last, "pieces": part}}
            for r, part in enumerate(split_pieces(pieces, new_dp_size))]


def loader_from_config(data_cfg, batch_tokens: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                       device="cpu", split: str = "train", **kw) -> ActivationLoader:
    """An ActivationLoader from the `data` config group (configs/data/default.yaml)."""
    if data_cfg.path is None:
        raise ConfigError("config key 'data.path' = None: expected the dataset folder or URL written by clt-harvest")
    return ActivationLoader(
        str(data_cfg.path), batch_tokens, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
        shuffle_buffer=int(data_cfg.shuffle_buffer), num_workers=int(data_cfg.num_workers), split=split,
        heldout_shards=int(data_cfg.heldout_shards), on_error=str(data_cfg.on_error), device=device,
        timeout=float(data_cfg.timeout), verify=bool(data_cfg.verify), **kw)
