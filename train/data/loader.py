"""The loader: the per-epoch schedule, worker processes, ActivationLoader."""
from __future__ import annotations

import hashlib
import logging
import math
import os
import queue as queue_mod
import time
from typing import Iterator, NamedTuple

import torch

from ..config import ConfigError
from .format import DatasetError, DatasetInfo, is_url
from .shards import read_shard

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# The schedule: which shards a rank and worker read in an epoch, and where a window starts


def _mix(*xs: int) -> int:
    """A seed from several integers (stable across runs and processes, unlike hash())."""
    h = hashlib.sha256(",".join(str(int(x)) for x in xs).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def epoch_shards(records: list[dict], epoch: int, seed: int, dp_rank: int, dp_size: int) -> list[dict]:
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(_mix(seed, epoch, 1))).tolist()
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


class Batch(NamedTuple):
    x: torch.Tensor  # [B, N, D] float32, normalized
    y: torch.Tensor  # [B, N, D] float32, normalized
    token_ids: torch.Tensor  # [B] int64


def _worker_items(info: DatasetInfo, records: list[dict], params: dict, w: int, n_workers: int,
                  start_epoch: int, start_slot: int, shared: bool = False) -> Iterator[tuple]:
    """Worker w's slot stream from (start_epoch, start_slot) on, epoch after epoch."""
    T, epoch = info.tokens_per_sample, start_epoch
    while params["epochs"] is None or epoch < params["epochs"]:
        mine = epoch_shards(records, epoch, params["seed"], params["dp_rank"], params["dp_size"])[w::n_workers]
        skip = start_slot if epoch == start_epoch else 0
        for rec in mine:
            n = rec["n_tokens"] // T
            if skip >= n:
                skip -= n
                continue
            yield from read_shard(rec, info, skip, params["on_error"], params["verify"], shared)
            skip = 0
        epoch += 1


def _worker_main(q, stop, info_doc, base, records, params, w, n_workers, start_epoch, start_slot):
    """A loader worker: samples are read straight into shared memory and passed by handle (no copy)."""
    torch.set_num_threads(1)
    parent = os.getppid()
    try:
        info = DatasetInfo.from_json(info_doc, base)
        for item in _worker_items(info, records, params, w, n_workers, start_epoch, start_slot, shared=True):
            q.put(item)
    except Exception as e:
        q.put(("e", f"{type(e).__name__}: {e}" if not isinstance(e, DatasetError) else str(e)))
    q.put(("end",))
    # Stay alive until the loader is done: the consumer fetches shared-memory handles from this process.
    while not stop.wait(1.0) and os.getppid() == parent:
        pass


class _Sources:
    """Slot streams of the logical workers: generators in-process (0 workers) or worker processes."""

    def __init__(self, loader: "ActivationLoader", epoch: int, starts: list[int]):
        self.loader, self.procs, self.queues = loader, [], []
        L = loader
        # 0 workers reads local files in-process. URLs (pipe:, http, ...) always go through a worker
        # process, whose queue has a timeout: a stalled stream is an error, not a hang. (0 and 1 worker
        # read in the same order.)
        if L.num_workers == 0 and not any(is_url(r["url"]) for r in L.records):
            self.gens = [_worker_items(L.info, L.records, L._params, 0, 1, epoch, starts[0])]
            return
        ctx = torch.multiprocessing.get_context(L.mp_context)
        self.stop = ctx.Event()
        for w in range(L.n_logical_workers):
            q = ctx.Queue(maxsize=L.prefetch)
            p = ctx.Process(target=_worker_main, daemon=True, name=f"cltrain-loader-{L.dp_rank}-{w}",
                            args=(q, self.stop, L.info.to_json(), L.info.path, L.records, L._params, w,
                                  L.n_logical_workers, epoch, starts[w]))
            p.start()
            self.procs.append(p)
            self.queues.append(q)

    def next(self, w: int) -> tuple:
        if not self.procs:
            return next(self.gens[w])
        q, p, t0 = self.queues[w], self.procs[w], time.monotonic()
        while True:
            try:
                item = q.get(timeout=1.0)
                break
            except (ConnectionError, EOFError, OSError) as e:  # a handle of a worker that is gone
                p.join(timeout=5)
                raise DatasetError(f"loader worker {w} (rank {self.loader.dp_rank}) died with exit code "
                                   f"{p.exitcode} before delivering its data ({type(e).__name__})") from None
            except queue_mod.Empty:
                if not p.is_alive() and q.empty():
                    raise DatasetError(f"loader worker {w} (rank {self.loader.dp_rank}) died with exit code "
                                       f"{p.exitcode} before delivering its data") from None
                if time.monotonic() - t0 > self.loader.timeout:
                    raise DatasetError(f"loader worker {w} (rank {self.loader.dp_rank}) delivered nothing for "
                                       f"{self.loader.timeout:.0f} s (a shard URL that never answers?)") from None
        if item[0] == "e":
            raise DatasetError(item[1])
        if item[0] == "end":
            raise DatasetError(f"loader worker {w} stopped before the end of its schedule (internal error)")
        return item

    def close(self):
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


class ActivationLoader:
    """Batches (x, y, token_ids) of normalized activations for one data-parallel rank (module docstring).

    Iterating yields `Batch(x, y, token_ids)`: float32 [batch_tokens, N, D] x and y already multiplied by
    the dataset's scales, on `device`. All ranks of a feature-parallel group must pass the same dp_rank.
    epochs=None iterates forever (each epoch reshuffled); with epochs=k it stops after k epochs, the last
    batch holding the remainder unless drop_last. `state_dict()` is the position after the last batch
    yielded; `load_state_dict()` before iterating continues exactly there (same seed, dp_size,
    num_workers, batch_tokens and shuffle_buffer required); iterating again also continues from there.
    `skipped` counts bad samples skipped (on_error="skip"); each is logged with its shard. `close()` stops
    the worker processes (also done when an iteration ends or the loader is collected).
    Memory: the window being served holds shuffle_buffer x N x D x 4 bytes (x and y, bf16); workers
    prefetch up to `prefetch` samples each (default: the next window's worth), as much again.
    """

    def __init__(self, path_or_info, batch_tokens: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 16384, num_workers: int = 0, split: str = "train",
                 heldout_shards: int = 0, on_error: str = "raise", device="cpu", epochs: int | None = None,
                 drop_last: bool = False, prefetch: int | None = None, timeout: float = 600.0, verify: bool = True,
                 mp_context: str = "fork"):
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
        self.batch_tokens, self.dp_rank, self.dp_size, self.seed = batch_tokens, dp_rank, dp_size, seed
        self.num_workers, self.split, self.heldout_shards = num_workers, split, heldout_shards
        self.on_error, self.device, self.epochs, self.drop_last = on_error, torch.device(device), epochs, drop_last
        self.timeout, self.mp_context = timeout, mp_context
        self.records = self.info.shard_records(split, heldout_shards)
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
        # Workers read the next window while the current one is served: no stall at window boundaries.
        self.prefetch = prefetch or math.ceil(self.window_slots / self.n_logical_workers) + 1
        self._params = dict(seed=seed, dp_rank=dp_rank, dp_size=dp_size, on_error=on_error, epochs=epochs,
                            verify=verify)
        self.scale_x = torch.tensor(self.info.scale_x, dtype=torch.float32).view(1, -1, 1)
        self.scale_y = torch.tensor(self.info.scale_y, dtype=torch.float32).view(1, -1, 1)
        self.skipped = 0
        self.skip_messages: list[str] = []
        self._pos = (0, 0, 0)  # (epoch, window, tokens taken from the window)
        self._skipped_at_window = 0
        self._sources: _Sources | None = None

    # --- schedule ---

    @property
    def n_logical_workers(self) -> int:
        return max(1, self.num_workers)

    def worker_counts(self, epoch: int) -> list[int]:
        """Slots (samples declared) each worker of this rank reads in an epoch."""
        mine = epoch_shards(self.records, epoch, self.seed, self.dp_rank, self.dp_size)
        W, T = self.n_logical_workers, self.info.tokens_per_sample
        return [sum(r["n_tokens"] // T for r in mine[w::W]) for w in range(W)]

    def epoch_tokens(self, epoch: int = 0) -> int:
        """Tokens this rank sees in an epoch (bad samples skipped excepted)."""
        return sum(self.worker_counts(epoch)) * self.info.tokens_per_sample

    # --- state ---

    def state_dict(self) -> dict:
        e, k, off = self._pos
        return {"version": 1, "epoch": e, "window": k, "offset": off, "skipped": self._skipped_at_window,
                "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_workers": self.n_logical_workers, "batch_tokens": self.batch_tokens,
                "window_slots": self.window_slots, "split": self.split, "heldout_shards": self.heldout_shards,
                "n_tokens": self.info.n_tokens}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        for key in ("seed", "dp_rank", "dp_size", "num_workers", "batch_tokens", "window_slots", "split",
                    "heldout_shards", "n_tokens"):
            if state.get(key) != mine[key]:
                raise ValueError(f"ActivationLoader.load_state_dict: saved {key}={state.get(key)!r} but this "
                                 f"loader has {key}={mine[key]!r}; resuming needs the same data layout")
        self.close()
        self._pos = (int(state["epoch"]), int(state["window"]), int(state["offset"]))
        self._skipped_at_window = self.skipped = int(state["skipped"])

    # --- iteration ---

    def close(self):
        if self._sources is not None:
            self._sources.close()
            self._sources = None

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

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        epoch, k, off = self._pos
        S, T = self.window_slots, self.info.tokens_per_sample
        counts = self.worker_counts(epoch)
        M = sum(counts)
        if k * S >= M:  # a saved position at an epoch's very end
            epoch, k, off, counts = epoch + 1, 0, 0, self.worker_counts(epoch + 1)
            M = sum(counts)
        starts = rr_consumed(counts, k * S)
        self._sources = src = _Sources(self, epoch, starts)
        carry: list[tuple] = []
        have = 0
        # The loader's work is memory-bound: one thread does it as fast as two, and on a busy machine two
        # OpenMP threads contend (measured 3.5x slower). The caller's thread count is restored at each yield.
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            while self.epochs is None or epoch < self.epochs:
                used = rr_consumed(counts, k * S)
                delivered = 0
                while k * S < M:
                    self._skipped_at_window = self.skipped
                    xs, ys, ids = [], [], []
                    for _ in range(min(S, M - k * S)):
                        # next in round-robin: the worker with the fewest slots taken, lowest index first
                        w = min((u, w) for w, (u, c) in enumerate(zip(used, counts)) if u < c)[1]
                        used[w] += 1
                        item = src.next(w)
                        if item[0] == "h":
                            self._skip(item[1])
                        else:
                            xs.append(item[1]), ys.append(item[2]), ids.append(item[3])
                    n = len(ids) * T
                    delivered += n
                    if n:
                        wid = torch.cat(ids)
                        perm = torch.randperm(n, generator=torch.Generator().manual_seed(
                            _mix(self.seed, epoch, self.dp_rank, k, 2)))
                        while off < n:
                            take = min(self.batch_tokens - have, n - off)
                            idx = perm[off:off + take]
                            carry.append(self._gather(xs, ys, wid, idx))
                            have += take
                            off += take
                            if have == self.batch_tokens:
                                batch = self._make_batch(carry)
                                carry, have = [], 0
                                self._pos = (epoch, k + 1, 0) if off == n else (epoch, k, off)
                                if off == n:
                                    self._skipped_at_window = self.skipped
                                torch.set_num_threads(caller_threads)
                                yield batch
                                caller_threads = torch.get_num_threads()
                                torch.set_num_threads(1)
                    k, off = k + 1, 0
                if not delivered and self.skipped:  # every sample bad: stop rather than spin forever
                    raise DatasetError(f"{self.info.json_path}: rank {self.dp_rank} found no valid sample in a whole "
                                       f"epoch ({self.skipped} skipped; last: {self.skip_messages[-1]})")
                epoch, k, off = epoch + 1, 0, 0
                counts = self.worker_counts(epoch)
                M = sum(counts)
            if carry and not self.drop_last:
                batch = self._make_batch(carry)
                self._pos = (epoch, 0, 0)
                torch.set_num_threads(caller_threads)
                yield batch
        finally:
            torch.set_num_threads(caller_threads)
            self.close()

    def _gather(self, xs: list[torch.Tensor], ys: list[torch.Tensor], wid: torch.Tensor, idx: torch.Tensor):
        """Rows idx of the window (samples xs/ys laid end to end), normalized float32, and their token ids. Rows are
        taken sample by sample (the batch's order is idx stably sorted by sample: still a random set, as
        deterministic as idx), copying through int16 views: index_select on bf16 is ~25x slower here."""
        T = self.info.tokens_per_sample
        sample = idx // T
        idx = idx[torch.argsort(sample, stable=True)]
        sample, row = idx // T, idx % T
        uniq, counts = torch.unique_consecutive(sample, return_counts=True)
        out = []
        for src in (xs, ys):
            shape = src[0].shape
            bits = torch.empty((len(idx), shape[1:].numel()), dtype=torch.int16)  # 2-D: the fast path
            start = 0
            for u, c in zip(uniq.tolist(), counts.tolist()):
                torch.index_select(src[u].view(shape[0], -1).view(torch.int16), 0, row[start:start + c],
                                   out=bits[start:start + c])
                start += c
            raw = bits.view(src[0].dtype).view((len(idx),) + tuple(shape[1:]))
            scale = self.scale_x if src is xs else self.scale_y
            out.append(raw.float().mul_(scale))  # (one mixed-dtype torch.mul is 2x slower here)
        return out[0], out[1], wid[idx]

    def _make_batch(self, parts: list[tuple]) -> Batch:
        x, y, t = (torch.cat(v) if len(parts) > 1 else v[0] for v in zip(*parts))
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap the previous step
            x, y, t = (v.pin_memory().to(self.device, non_blocking=True) for v in (x, y, t))
        elif self.device.type != "cpu":
            x, y, t = x.to(self.device), y.to(self.device), t.to(self.device)
        return Batch(x, y, t)


def loader_from_config(data_cfg, batch_tokens: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                       device="cpu", split: str = "train", **kw) -> ActivationLoader:
    """An ActivationLoader from the `data` config group (configs/data/default.yaml)."""
    if data_cfg.get("path") is None:
        raise ConfigError("config key 'data.path' = None: expected the dataset folder or URL written by clt-harvest")
    return ActivationLoader(
        str(data_cfg.path), batch_tokens, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
        shuffle_buffer=int(data_cfg.shuffle_buffer), num_workers=int(data_cfg.num_workers), split=split,
        heldout_shards=int(data_cfg.heldout_shards), on_error=str(data_cfg.on_error), device=device,
        timeout=float(data_cfg.get("timeout", 600)), verify=bool(data_cfg.get("verify", True)), **kw)

