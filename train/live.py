"""Live activations: the base model runs over text while the CLT trains, so a run needs no shards first
(data=live; docs/design.md section 2). `LiveLoader` has the shard loader's interface (iteration yields the
same `Batch`, in the same storage dtype, normalized by `to_training`; `state_dict` / `load_state_dict`;
`close`), so the training loop does not know which one it reads.

The stream, defined so that it can be regenerated from any point:
- contexts: the text cut into contexts exactly as clt-harvest cuts it (train/capture.py); the text starts
  again from its beginning when it runs out (said once per pass, in the log);
- data parallel: replica r takes contexts r, r + R, r + 2R, ... (R replicas: disjoint documents' tokens);
- windows: a replica's contexts in groups of ceil(shuffle_buffer / context); window k is generated, its
  rows (one per token, BOS dropped with bos=drop) sorted by (context, position) and shuffled with a
  permutation seeded by (seed, replica, k), then served in order; a batch may span two windows;
- feature parallel: the P ranks of a group train on the same rows. Each generates the contexts of the
  window whose index within the window is its FP rank modulo P, and the group all-gathers the rows:
  the base model's cost is split P ways, and the sort makes the window independent of P;
- generation processes (data.num_workers >= 1): worker w generates windows w, w + W, ... with its own copy
  of the base model and its own torch threads (data.live.threads, default half of this rank's cores: the
  base model's forward and the CLT's step then overlap, each on its half); with 0 the windows are made in
  the training process, between steps (the choice on a GPU, where the base model shares the device).
A checkpoint records (window, offset); a resume regenerates that window and continues from the offset,
so a resumed run equals the uninterrupted one batch for batch. The normalization scales are estimated on
the first `scale_tokens` tokens of the text (rank 0's estimate, sent to every rank), recorded in the run
(model.json's dataset block) and reused by a resume.

data.live.write_to=DIR also writes every window as a shard (the replica's rows in served order, whole
samples of WRITE_TOKENS_PER_SAMPLE tokens; in data.live.write_dtype, default the live dtype, int8 as
clt-harvest quantizes) with a sidecar record, and `finish` writes DIR/dataset.json over all of them at the
end of the run, so later runs (a sweep, clt-eval) read the same activations as shards.
"""
from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from cltrain.files import atomic_write_bytes

from .capture import Capture, CaptureSpec, contexts
from .config import LiveSettings
from .data import (DATASET_JSON, Batch, DatasetError, DatasetInfo, ShardWriter, normalization_scales, seed_mix,
                   to_training)
from .data.workers import InProcess, WorkerPool
from .text import describe, documents

log = logging.getLogger(__name__)

STATE_VERSION = 1
PREFETCH_WINDOWS = 1  # per generation process: the window being served and one more per process
RECORD_SUFFIX = ".record.json"  # write_to: a shard's dataset.json entry beside it, written after the shard
# write_to: tokens per sample. Shards hold whole samples, so a window's last (rows mod 16) rows are not
# written: at most 15 of a window's ~shuffle_buffer tokens (0.1% at the default 16384).
WRITE_TOKENS_PER_SAMPLE = 16


def window_contexts(window_tokens: int, context: int) -> int:
    """Contexts per window: enough for `window_tokens` tokens (at least one context)."""
    return max(1, math.ceil(window_tokens / context))


def generation_threads(threads: int | None, n_workers: int) -> int:
    """torch threads per generation process: the setting, else half of this rank's cores split over the
    processes (the training process keeps the other half)."""
    if threads is not None:
        return threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return max(1, cores // 2 // max(n_workers, 1))


def context_stream(live: LiveSettings, tok) -> Iterator[tuple[int, list, list]]:
    """(global context index, token ids, documents) of every context of the text, passing over the text
    again and again (the log says when a pass ends)."""
    def docs():
        for n in itertools.count():
            if n:
                log.warning("live activations: the text %s ran out; starting it again (pass %d)",
                            describe(live.text.source), n + 1)
            count = 0
            for d in documents(live.text.source, live.text.key, live.text.hf_config, live.text.hf_split):
                count += 1
                yield d
            if count == 0:
                raise DatasetError(f"data.live.text.source = {live.text.source!r}: no documents")

    for i, (ids, doc) in enumerate(contexts(docs(), tok, live.context)):
        yield i, ids, doc


def _capture_rows(capture: Capture, batch: list[tuple]) -> dict[str, torch.Tensor]:
    """x, y (storage dtype), ids and key (context * C + position, the row's place in the text) of a batch
    of contexts, BOS positions dropped with bos=drop."""
    rows = capture(batch).data
    return {"x": rows["x"], "y": rows["y"], "ids": rows["ids"],
            "key": rows["ctx"] * capture.cfg.context + rows["pos"]}


def _concat(parts: list[dict], like: dict | None = None) -> dict[str, torch.Tensor]:
    """The rows of several parts as one; no parts: `like`'s empty rows."""
    if not parts:
        return like
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def _no_rows(capture: Capture) -> dict[str, torch.Tensor]:
    """A window share without rows (an FP rank whose share of a short window is empty)."""
    n, d = len(capture.sites), capture.meta["d_model"]
    return {"x": torch.empty(0, n, d, dtype=capture.store), "y": torch.empty(0, n, d, dtype=capture.store),
            "ids": torch.empty(0, dtype=torch.long), "key": torch.empty(0, dtype=torch.long)}


def generate_windows(spec: CaptureSpec, live: LiveSettings, device, *, dp_rank: int, dp_size: int, fp_rank: int,
                     fp_size: int, window: int, worker: int, n_workers: int, start: int,
                     threads: int | None = None, capture: Capture | None = None) -> Iterator[tuple[int, dict]]:
    """(k, rows) for this rank's share of windows start', start' + n_workers, ... where start' is the first
    window >= start that is this worker's: of each window, the contexts whose index within the window is
    fp_rank modulo fp_size. Runs in a generation process (or in the training process with capture given)."""
    if threads is not None:
        torch.set_num_threads(threads)
    capture = capture or Capture(spec, device)
    k = start + (worker - start) % n_workers
    batch, parts, empty = [], [], _no_rows(capture)
    with capture.hooked():
        for i, ids, doc in context_stream(live, capture.tok):
            if i % dp_size != dp_rank:
                continue
            j = i // dp_size  # this replica's context number
            if j // window < k:
                continue
            if j // window > k:  # window k is complete
                if batch:
                    parts.append(_capture_rows(capture, batch))
                    batch = []
                yield k, _concat(parts, empty)
                parts, k = [], k + n_workers
                if j // window < k:
                    continue
            if (j % window) % fp_size == fp_rank:
                batch.append((i, ids, doc))
                if len(batch) == live.batch_size:
                    parts.append(_capture_rows(capture, batch))
                    batch = []


def _gen_stream(spec, live, dp_rank, dp_size, fp_rank, fp_size, window, worker, n_workers, start, threads):
    """A generation process's stream (WorkerPool: module level, so that it pickles)."""
    return generate_windows(spec, live, torch.device("cpu"), dp_rank=dp_rank, dp_size=dp_size, fp_rank=fp_rank,
                            fp_size=fp_size, window=window, worker=worker, n_workers=n_workers, start=start,
                            threads=threads)


def all_gather_rows(rows: dict[str, torch.Tensor], group) -> dict[str, torch.Tensor]:
    """Every FP rank's rows of a window, concatenated (rank order): sizes first, then padded tensors."""
    n = torch.tensor([rows["ids"].shape[0]], dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, n, group=group)
    sizes = [int(s) for s in sizes]
    most = max(sizes)
    out = {}
    for key, v in rows.items():
        pad = v.new_zeros((most - v.shape[0],) + tuple(v.shape[1:]))
        padded = torch.cat([v, pad])
        # gloo has no 16-bit types: bf16/fp16 travel as their bytes
        wire = padded.contiguous().view(torch.uint8) if padded.dtype in (torch.bfloat16, torch.float16) else padded
        got = [torch.empty_like(wire) for _ in sizes]
        dist.all_gather(got, wire.contiguous(), group=group)
        got = [g.view(v.dtype) for g in got]
        out[key] = torch.cat([g[:s] for g, s in zip(got, sizes)])
    return out


class LiveLoader:
    """Batches of live activations for one rank (the module docstring says in what order). Build it with
    `LiveLoader.open`, which loads the base model in the training process to read its shape and estimate
    the normalization scales (or take them from a resumed run); it keeps the model to generate with, or
    frees it when generation processes load their own."""

    def __init__(self, live: LiveSettings, spec: CaptureSpec, info: DatasetInfo, batch_tokens: int, window_tokens: int,
                 seed: int, *, dp_rank: int = 0, dp_size: int = 1, fp_rank: int = 0, fp_size: int = 1, fp_group=None,
                 num_workers: int = 0, timeout: float = 600, device="cpu", capture: Capture | None = None):
        self.live, self.spec, self.info = live, spec, info
        self.batch_tokens, self.seed = batch_tokens, seed
        self.window = window_contexts(window_tokens, live.context)
        self.dp_rank, self.dp_size, self.fp_rank, self.fp_size, self.fp_group = dp_rank, dp_size, fp_rank, fp_size, fp_group
        self.num_workers, self.timeout = num_workers, timeout
        self.device = torch.device(device)
        self._capture = capture  # the training process's model, kept only with num_workers=0
        self._pos = (0, 0)  # (window, offset) of the next row to serve
        self._sources = None
        self.skipped = 0
        self._scales = {}

    # --- building ---

    @classmethod
    def open(cls, live: LiveSettings, batch_tokens: int, window_tokens: int, seed: int, *, layout=None,
             num_workers: int = 0, timeout: float = 600, device="cpu", scales: tuple | None = None) -> "LiveLoader":
        """Load the base model, read its shape, estimate the scales (rank 0's, broadcast; or `scales` from
        a resumed run) and describe the stream as a DatasetInfo (no shards; path: write_to or None)."""
        device = torch.device(device)
        spec = CaptureSpec.of(live, seed=seed)
        gen_device = device if num_workers == 0 else torch.device("cpu")
        capture = Capture(spec, gen_device)
        n_layers = len(capture.meta["layers"])
        if scales is None:
            scales = _estimate_scales(capture, live)
        scales = _broadcast(scales)
        if len(scales[0]) != n_layers:
            raise DatasetError(f"data.live.base_model = {live.base_model!r}: {n_layers} layers captured, but the run "
                               f"being resumed was trained on {len(scales[0])}: resume it with its own base model "
                               f"and layers, or start a new run")
        info = live_info(live, seed, capture.meta["layers"], capture.meta["d_model"], capture.meta["hooks"], scales)
        info.harvest.update(tokenizer=capture.meta["tokenizer"], bos_token_id=capture.meta["bos_token_id"])
        if live.write_to is not None:
            Path(live.write_to).mkdir(parents=True, exist_ok=True)
        L = layout
        kw = dict(dp_rank=L.dp_rank, dp_size=L.dp_size, fp_rank=L.fp_rank, fp_size=L.fp_size,
                  fp_group=L.fp_group) if L is not None else {}
        generator_bytes = sum(p.numel() * p.element_size() for p in capture.model.parameters())
        if num_workers > 0:
            del capture  # each generation process loads its own copy
            capture = None
        loader = cls(live, spec, info, batch_tokens, window_tokens, seed, num_workers=num_workers, timeout=timeout,
                     device=device, capture=capture, **kw)
        loader.generator_bytes = generator_bytes * max(num_workers, 1)
        return loader

    # --- serving ---

    @property
    def epoch(self) -> int:
        return 0

    def scales(self, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        device = torch.device(device) if device is not None else self.device
        if device not in self._scales:
            self._scales[device] = tuple(torch.tensor(s, dtype=torch.float32, device=device).view(1, -1, 1)
                                         for s in (self.info.scale_x, self.info.scale_y))
        return self._scales[device]

    def to_training(self, batch: Batch, dtype: torch.dtype = torch.float32, device=None):
        """Normalized (x, y) in `dtype` on `device` (default: the loader's), as the shard loader's."""
        return to_training(batch, *self.scales(device or self.device), dtype=dtype, device=device or self.device)

    def _open_sources(self, start: int):
        args = (self.spec, self.live, self.dp_rank, self.dp_size, self.fp_rank, self.fp_size, self.window)
        if self.num_workers == 0:
            gen = generate_windows(self.spec, self.live, self._capture.device, dp_rank=self.dp_rank,
                                   dp_size=self.dp_size, fp_rank=self.fp_rank, fp_size=self.fp_size,
                                   window=self.window, worker=0, n_workers=1, start=start, capture=self._capture)
            return InProcess([gen])
        threads = generation_threads(self.live.threads, self.num_workers)
        streams = [functools.partial(_gen_stream, *args, w, self.num_workers, start, threads)
                   for w in range(self.num_workers)]
        # spawn, not fork: the pool starts at the first batch, after the CLT and its optimizer state are
        # allocated; a forked process would inherit that heap and copy the pages its allocator reuses
        return WorkerPool(streams, rank=self.dp_rank, prefetch=PREFETCH_WINDOWS, timeout=self.timeout,
                          mp_context="spawn")

    def _window(self, k: int) -> dict[str, torch.Tensor]:
        """Window k as served: every FP rank's rows, sorted by their place in the text, then shuffled."""
        got_k, rows = self._sources.next(k % max(self.num_workers, 1))
        if got_k != k:
            raise DatasetError(f"live activations: window {got_k} arrived where {k} was expected (internal error)")
        if self.fp_size > 1:
            rows = all_gather_rows(rows, self.fp_group)
        order = torch.argsort(rows["key"])
        n = order.numel()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_mix(self.seed, self.dp_rank, k, 7)))
        served = order[perm]  # sorted by place in the text, then shuffled: one gather of the window's rows
        rows = {key: v[served] for key, v in rows.items()}
        if self.live.write_to is not None and self.fp_rank == 0 and n:
            self._write_window(k, rows)
        return rows

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        k, off = self._pos
        self._sources = self._open_sources(k)
        rows = self._window(k)
        while True:
            need, parts = self.batch_tokens, []
            while need:
                take = rows["ids"][off:off + need].shape[0]
                if take:
                    parts.append({key: v[off:off + take] for key, v in rows.items()})
                    off, need = off + take, need - take
                if need:
                    k, off = k + 1, 0
                    rows = self._window(k)
            self._pos = (k, off)
            batch = _concat(parts)
            yield Batch(batch["x"], batch["y"], batch["ids"])

    # --- write-through ---

    @property
    def write_dtype(self) -> str:
        return self.live.write_dtype or self.live.dtype

    def _write_window(self, k: int, rows: dict[str, torch.Tensor]):
        """Window k of this replica, in served order, as one shard NAME-<k * R + r>.tar of samples of
        WRITE_TOKENS_PER_SAMPLE tokens (replicas never collide; a resumed run rewrites a window with the same
        bytes), then its dataset.json entry beside it."""
        folder = Path(self.live.write_to)
        name = f"{self.live.name}-{k * self.dp_size + self.dp_rank:06d}.tar"
        writer = ShardWriter(folder, name, dtype=self.write_dtype)
        try:
            T, C = WRITE_TOKENS_PER_SAMPLE, self.live.context
            for s in range(0, rows["ids"].shape[0] // T * T, T):
                key = rows["key"][s:s + T]
                writer.add(f"{k:06d}-{self.dp_rank:04d}-{s // T:06d}", rows["x"][s:s + T], rows["y"][s:s + T],
                           rows["ids"][s:s + T], ctx=key // C, pos=key % C,
                           metadata={"model": self.live.base_model, "rank": self.dp_rank, "window": k})
            record = writer.close()
        except BaseException:
            writer.abort()
            raise
        atomic_write_bytes(folder / (name + RECORD_SUFFIX), json.dumps(record).encode())

    def finish(self):
        """End of the run: with write_to, rank 0 writes dataset.json over every window shard written
        (collective: every rank's shards are on disk first)."""
        if self.live.write_to is None:
            return
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()
        if (dist.get_rank() if dist.is_initialized() else 0) != 0:
            return
        folder = Path(self.live.write_to)
        records = sorted((json.loads(p.read_text()) for p in folder.glob(f"{self.live.name}-*.tar{RECORD_SUFFIX}")),
                         key=lambda r: r["name"])
        info = DatasetInfo(**{**self.info.to_json(), "shards": records, "n_tokens": sum(r["n_tokens"] for r in records),
                              "tokens_per_sample": WRITE_TOKENS_PER_SAMPLE, "dtype": self.write_dtype})
        info.save(folder)
        log.info("live activations: %d shards, %d tokens in %s", len(records), info.n_tokens, folder / DATASET_JSON)

    # --- state ---

    def state_dict(self) -> dict:
        k, off = self._pos
        return {"version": STATE_VERSION, "source": "live", "window": k, "offset": off, "seed": self.seed,
                "dp_rank": self.dp_rank, "dp_size": self.dp_size, "window_contexts": self.window,
                "batch_tokens": self.batch_tokens}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        if state.get("source") != "live":
            raise DatasetError("LiveLoader.load_state_dict: the checkpoint was written by a run on shards, not "
                               "live activations (data.source differs)")
        for key in ("seed", "dp_rank", "dp_size", "window_contexts"):
            if state.get(key) != mine[key]:
                raise DatasetError(f"LiveLoader.load_state_dict: saved {key}={state.get(key)!r} but this run has "
                                   f"{mine[key]!r}: the live stream's windows would differ")
        self.close()
        self._pos = (int(state["window"]), int(state["offset"]))

    def close(self):
        if self._sources is not None:
            self._sources.close()
            self._sources = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


def live_description(live: LiveSettings, seed: int) -> dict:
    """What decides the live stream, from the settings alone (it enters the run's dataset digest, so a
    resume with another text, model or context is refused by name)."""
    return {"base_model": live.base_model, "text": live.text.to_dict(), "context": live.context,
            "layers": live.layers, "x_source": live.x_source, "bos": live.bos, "model_dtype": live.model_dtype,
            "dtype": live.dtype, "seed": seed}


def live_info(live: LiveSettings, seed: int, layers: list[int], d_model: int, hooks: dict,
              scales: tuple[list[float], list[float]]) -> DatasetInfo:
    """The live stream described as a dataset without shards (path: write_to, where they will be)."""
    return DatasetInfo(model=live.base_model, layers=list(layers), n_layers=len(layers), d_model=d_model,
                       dtype=live.dtype, tokens_per_sample=live.context, n_tokens=0, hooks=hooks,
                       scale_x=list(scales[0]), scale_y=list(scales[1]), shards=[], scale_tokens=live.scale_tokens,
                       scale_source=f"the first {live.scale_tokens} tokens of the text (live, rank 0)",
                       harvest={"live": live_description(live, seed)}, path=live.write_to)


def live_info_of_checkpoint(live: LiveSettings, seed: int, path: Path) -> DatasetInfo:
    """The live stream a checkpoint was trained on, as these settings would describe it (its shape and
    scales from the checkpoint's model.json): what a resubmitted run compares without loading the model."""
    ds = _dataset_block(path)
    return live_info(live, seed, ds["layers"], ds["d_model"], ds["hooks"], (ds["scale_x"], ds["scale_y"]))


def _dataset_block(path: Path) -> dict:
    """The dataset block of a live run's checkpoint (its model/model.json): shape, hooks and scales."""
    try:
        ds = json.loads((Path(path) / "model" / "model.json").read_text())["dataset"]
        return {k: ds[k] for k in ("layers", "d_model", "hooks", "scale_x", "scale_y")}
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise DatasetError(f"{path}: cannot read the live run's dataset block ({e})") from None


def _estimate_scales(capture: Capture, live: LiveSettings) -> tuple[list[float], list[float]]:
    """s[l] = sqrt(D) / E||v_l|| on the first scale_tokens tokens of the text (BOS dropped as served)."""
    got, n, batch = [], 0, []
    with capture.hooked():
        for i, ids, doc in context_stream(live, capture.tok):
            batch.append((i, ids, doc))
            if len(batch) == live.batch_size:
                rows = _capture_rows(capture, batch)
                got.append(rows)
                n += rows["ids"].shape[0]
                batch = []
                if n >= live.scale_tokens:
                    break
    rows = _concat(got)
    return normalization_scales(rows["x"][:live.scale_tokens], rows["y"][:live.scale_tokens])


def _broadcast(scales: tuple[list[float], list[float]]) -> tuple[list[float], list[float]]:
    """Rank 0's scales on every rank (every FP rank must normalize identically)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return scales
    box = [scales]
    dist.broadcast_object_list(box, src=0)
    return tuple(list(s) for s in box[0])


def scales_of_checkpoint(path: Path) -> tuple[list[float], list[float]]:
    """The live run's scales recorded in a checkpoint (its model/model.json dataset block)."""
    ds = _dataset_block(path)
    return list(ds["scale_x"]), list(ds["scale_y"])
