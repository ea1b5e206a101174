"""clt-harvest: run a language model over text and write its MLP inputs and outputs as activation shards.

    clt-harvest base_model=smollm2 max_tokens=2000000 out_dir=acts/smollm2          (configs/harvest.yaml)
    torchrun --nproc_per_node 4 -m cltrain.train.harvest base_model=... out_dir=...

Pipeline per rank: documents (train/text.py) -> tokens -> contexts of `context` tokens, each starting with
BOS and with documents separated by BOS -> rank r takes contexts r, r + W, r + 2W, ... (W = WORLD_SIZE) ->
forward passes of `batch_size` contexts with hooks on every MLP site (train/lm.py), x_l and y_l captured
and cast to the storage dtype -> BOS positions dropped (bos=drop) -> a buffer of `shuffle_buffer` tokens is
shuffled across documents and written as shards of `shard_tokens` tokens (train/data/format.py; int8 with dtype=int8).
Rank r's j-th shard is NAME-{j*W + r:06d}.tar, so ranks never collide.

Resume: after every flush a rank records, atomically, the shards it wrote, the next context it owes, and
the shuffled tokens left over (< shard_tokens, saved to a carry file); a restarted harvest with the same
settings continues from there and writes byte-identical shards (the shuffle is seeded per flush). A shard
written but not yet recorded is simply written again under the same name.

When every rank is done, rank 0 writes dataset.json: shards, token counts, sha256, hooks, and the
normalization scales s[l] = sqrt(D) / E||v_l||, estimated on the first `scale_tokens` tokens rank 0
harvested (stored dtype, BOS dropped), recorded as `scale_tokens` / `scale_source`.

The stages, in the order of this file (`_run` strings them together for one rank, `harvest` around it):
  1. text -> contexts:      `contexts` (tokens, fixed-length windows, BOS), `rank_batches` (this rank's share)
  2. forward and capture:   train/capture.py's `Capture` (the LM with hooks, stopping after the last
                            captured layer) -> `Rows`, shared with the live data source
  3. shard writer:          `ShardBuffer` (shuffle buffer, shards, carry, progress record) with `ScaleStats`
                            (normalization scales); `merge` (every rank's record -> dataset.json)
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator

import hydra
import torch
from safetensors.torch import load_file, save as st_save
from tqdm import tqdm

from .capture import Capture, CaptureSpec, Rows, contexts, model_width
from .config import CONFIG_DIR, HarvestSettings
from cltrain.errors import ConfigError
from .data import (DATASET_JSON, QUANTIZED_DTYPES, STORAGE_DTYPES, DatasetError, DatasetInfo, ShardWriter,
                   seed_mix, shard_name)
from .lifecycle import ctrl_c_at_safe_points, run_command, stop_if_ctrl_c
from .lm import TINY, tiny_config
from cltrain.files import atomic_write_bytes
from cltrain.rank_env import dist_env
from .parallel import resolve_device
from .text import describe, documents

log = logging.getLogger(__name__)

# Settings that must be equal to resume a harvest (anything that changes which tokens land where).
RESUME_KEYS = ("base_model", "text.source", "text.key", "text.hf_config", "text.hf_split", "max_tokens", "context",
               "batch_size", "layers", "x_source", "bos", "model_dtype", "dtype", "name", "tokens_per_sample",
               "shard_tokens", "shuffle_buffer", "scale_tokens", "seed")


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment (torchrun's or SLURM's, see cltrain.rank_env);
    (0, 1) otherwise."""
    rank, size, _ = dist_env()
    if not 0 <= rank < size:
        raise ValueError(f"environment RANK={rank} is not in [0, WORLD_SIZE={size})")
    return rank, size


def settings(cfg: HarvestSettings) -> dict:
    """The RESUME_KEYS' values, as plain Python values."""
    return {k: cfg.select(k) for k in RESUME_KEYS}


# ----------------------------------------------------------------------------------------------------
# Stage 1: text -> contexts



def rank_batches(cfg: HarvestSettings, tok, rank: int, size: int, prog: dict) -> Iterator[list[tuple]]:
    """Batches of `batch_size` (context index, token ids, documents) of this rank's contexts (r, r + W, ...
    among the first max_tokens // context), from the first one its progress record does not count as done.
    Sets prog["text_exhausted"] when the text ran out before max_tokens."""
    n_ctx_total = cfg.max_tokens // cfg.context
    batch = []
    for i, (ids, doc) in enumerate(contexts(documents(cfg.text.source, cfg.text.key, cfg.text.hf_config,
                                                      cfg.text.hf_split), tok, cfg.context)):
        if i >= n_ctx_total:
            break
        if i % size != rank or i < prog["contexts_done"]:
            continue
        batch.append((i, ids, doc))
        if len(batch) == cfg.batch_size:
            yield batch
            batch = []
    else:
        prog["text_exhausted"] = True
    if batch:
        yield batch


def _warn_if_text_ran_out(cfg: HarvestSettings, rank: int, size: int, prog: dict):
    """Say so when the text ended before the contexts max_tokens asked for."""
    n_ctx_total = cfg.max_tokens // cfg.context
    if prog["text_exhausted"] and prog["contexts"] * size < n_ctx_total:
        log.warning("rank %d: the text ran out after %d contexts; max_tokens=%d asked for %d contexts",
                    rank, prog["contexts_done"], cfg.max_tokens, n_ctx_total)


# ----------------------------------------------------------------------------------------------------
# Stage 2: forward and capture



# ----------------------------------------------------------------------------------------------------
# Stage 3: shard writer (shuffle buffer, shards, normalization scales, progress records, dataset.json)


class ScaleStats:
    """Sums of ||x_l|| and ||y_l|| (float64) over the first `limit` tokens added: the estimate behind the
    normalization scales. Rank 0 counts scale_tokens tokens, the other ranks none (limit 0)."""

    def __init__(self, record: dict, n_layers: int, limit: int):
        self.limit = limit
        self.count = record["count"]
        self.sum_x = torch.tensor(record["sum_x"] or [0.0] * n_layers, dtype=torch.float64)
        self.sum_y = torch.tensor(record["sum_y"] or [0.0] * n_layers, dtype=torch.float64)

    def add(self, data: dict[str, torch.Tensor]):
        if self.count < self.limit:
            take = min(self.limit - self.count, data["ids"].shape[0])
            self.sum_x.add_(data["x"][:take].double().norm(dim=-1).sum(0))
            self.sum_y.add_(data["y"][:take].double().norm(dim=-1).sum(0))
            self.count += take

    def record(self) -> dict:
        return {"sum_x": self.sum_x.tolist(), "sum_y": self.sum_y.tolist(), "count": self.count}


class ShardBuffer:
    """This rank's shuffle buffer and its progress record. `add` takes Rows (and counts them in the record
    and the scale estimate); once `full`, `flush` shuffles the buffer, writes its full shards, keeps the
    rest as the carry (on disk too, for a resume) and records all of it atomically. The carry of an
    earlier run comes back first."""

    def __init__(self, cfg: HarvestSettings, out: Path, rank: int, size: int, prog: dict, n_layers: int):
        self.cfg, self.out, self.rank, self.size, self.prog = cfg, out, rank, size, prog
        self.buf: list[dict[str, torch.Tensor]] = []
        if prog["carry"]:
            self.buf.append(load_file(str(out / prog["carry"])))
        self.scale = ScaleStats(prog["scale"], n_layers, limit=cfg.scale_tokens if rank == 0 else 0)
        self.buffered = sum(b["ids"].shape[0] for b in self.buf)
        self.t_last = time.monotonic()  # model loading excluded from the recorded seconds

    def add(self, rows: Rows):
        prog = self.prog
        self.scale.add(rows.data)
        self.buf.append(rows.data)
        self.buffered += rows.data["ids"].shape[0]
        prog["contexts_done"] = rows.last_context + 1
        prog["contexts"] += rows.contexts
        prog["tokens_fed"] += rows.fed
        prog["bos_dropped"] += rows.dropped

    @property
    def full(self) -> bool:
        return self.buffered >= self.cfg.shuffle_buffer

    def _shuffled(self) -> tuple[dict[str, torch.Tensor], int]:
        """The buffer as one batch of n rows, permuted with a generator seeded by (seed, rank, flush)."""
        data = {k: torch.cat([b[k] for b in self.buf]) for k in self.buf[0]} if self.buf else {}
        n = data["ids"].shape[0] if data else 0
        seed = seed_mix(self.cfg.seed, self.rank, self.prog["flushes"], 3)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return {k: v[perm] for k, v in data.items()}, n

    def flush(self, final: bool):
        """Write the shuffled buffer's full shards (the final flush: also a last one of whole samples, the
        rest dropped), keep the remainder as the carry, record progress, then drop the previous carry."""
        cfg, prog, T = self.cfg, self.prog, self.cfg.tokens_per_sample
        data, n = self._shuffled()
        start = 0
        while n - start >= cfg.shard_tokens or (final and n - start >= T):
            m = min(cfg.shard_tokens, (n - start) // T * T)
            _write_shard(cfg, self.out, self.rank, self.size, prog, {k: v[start:start + m] for k, v in data.items()})
            start += m
        old = prog["carry"]
        prog["carry"], self.buf = None, []
        if final:
            prog["tail_dropped"] += n - start
        elif n - start:  # the shuffled remainder stays in the buffer, and on disk for a resume
            self.buf = [{k: v[start:].contiguous() for k, v in data.items()}]
            prog["carry"] = f".carry-rank{self.rank:04d}-{prog['flushes']:06d}.safetensors"
            atomic_write_bytes(self.out / prog["carry"], st_save(self.buf[0]))
        self._record(final)
        if old and old != prog["carry"]:
            (self.out / old).unlink(missing_ok=True)
        self.buffered = sum(b["ids"].shape[0] for b in self.buf)

    def _record(self, final: bool):
        """Write the progress record (seconds spent, flushes, scale sums, done) atomically."""
        prog = self.prog
        prog["seconds"] = prog.get("seconds", 0.0) + time.monotonic() - self.t_last
        self.t_last = time.monotonic()
        prog["flushes"] += 1
        prog["scale"] = self.scale.record()
        prog["done"] = final
        _write_progress(self.out, self.rank, prog)


def _write_shard(cfg: HarvestSettings, out: Path, rank: int, size: int, prog: dict, data: dict[str, torch.Tensor]):
    """Write rows as this rank's next shard (samples of tokens_per_sample tokens) and count it in prog."""
    index = len(prog["shards"]) * size + rank
    name = shard_name(cfg.name, index)
    w = ShardWriter(out, name, dtype=cfg.dtype)
    T = cfg.tokens_per_sample
    try:
        for j in range(0, data["ids"].shape[0], T):
            sl = slice(j, j + T)
            w.add(f"{index:06d}-{j // T:06d}", data["x"][sl], data["y"][sl], data["ids"][sl], doc=data["doc"][sl],
                  ctx=data["ctx"][sl], pos=data["pos"][sl],
                  metadata={"model": cfg.base_model, "rank": rank, "shard": index})
        rec = w.close()
    except BaseException:
        w.abort()
        raise
    prog["shards"].append({**rec, "index": index})
    prog["tokens_written"] += rec["n_tokens"]
    prog["bytes_written"] += (out / name).stat().st_size


def progress_path(out: Path, rank: int) -> Path:
    return out / f".progress-rank{rank:04d}.json"


def read_progress(out: Path, rank: int) -> dict | None:
    p = progress_path(out, rank)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: unreadable progress record ({e}); delete it to restart this rank") from None


def _write_progress(out: Path, rank: int, prog: dict):
    atomic_write_bytes(progress_path(out, rank), json.dumps(prog, indent=1).encode())


def merge(out_dir: str | os.PathLike, timeout: float = 0.0) -> DatasetInfo:
    """Write dataset.json from the ranks' progress records, waiting up to `timeout` s for them to finish."""
    out = Path(out_dir)
    first, progs = _finished_progress(out, timeout)
    size = first["world"]
    for r, p in enumerate(progs):
        if p["settings"] != first["settings"] or p["world"] != size:
            raise ValueError(f"{progress_path(out, r)}: harvested with other settings than rank 0")
    shards = sorted((s for p in progs for s in p["shards"]), key=lambda s: s["index"])
    if not shards:
        raise ValueError(f"{out}: the harvest wrote no shard (too few tokens for one sample of "
                         f"{first['settings']['tokens_per_sample']}? raise max_tokens)")
    sc = first["scale"]
    if not sc["count"]:
        raise ValueError(f"{progress_path(out, 0)}: rank 0 harvested no token to estimate scales on")
    meta = first["meta"]
    d = meta["d_model"]
    info = DatasetInfo(
        model=first["settings"]["base_model"], layers=meta["layers"], n_layers=len(meta["layers"]), d_model=d,
        dtype=first["settings"]["dtype"], tokens_per_sample=first["settings"]["tokens_per_sample"],
        n_tokens=sum(s["n_tokens"] for s in shards), hooks=meta["hooks"],
        scale_x=[math.sqrt(d) * sc["count"] / s for s in sc["sum_x"]],
        scale_y=[math.sqrt(d) * sc["count"] / s for s in sc["sum_y"]],
        shards=[{k: s[k] for k in ("name", "n_tokens", "sha256")} for s in shards],
        scale_tokens=sc["count"],
        scale_source=f"the first {sc['count']} tokens harvested by rank 0 (its contexts 0, {size}, {2 * size}, ...; "
                     f"stored dtype, BOS {'dropped' if first['settings']['bos'] == 'drop' else 'kept'})",
        harvest={**first["settings"], "text_description": describe(first["settings"]["text.source"]),
                 "world_size": size, "tokenizer": meta["tokenizer"], "bos_token_id": meta.get("bos_token_id"),
                 **{k: sum(p[k] for p in progs) for k in ("tokens_fed", "bos_dropped", "tail_dropped", "contexts")},
                 "text_exhausted": any(p["text_exhausted"] for p in progs),
                 "seconds_per_rank": [round(p.get("seconds", 0.0), 3) for p in progs]},
        path=str(out))
    info.validate(str(out / DATASET_JSON))
    info.save(out)
    return info


def _finished_progress(out: Path, timeout: float) -> tuple[dict, list[dict]]:
    """(rank 0's record, every rank's record) once every rank's says done, polling up to `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        first = read_progress(out, 0)
        if first is None:
            raise FileNotFoundError(f"{progress_path(out, 0)}: no harvest progress record; run clt-harvest first")
        size = first["world"]
        progs = [read_progress(out, r) for r in range(size)]
        pending = [r for r, p in enumerate(progs) if p is None or not p.get("done")]
        if not pending:
            return first, progs
        if time.monotonic() > deadline:
            raise TimeoutError(f"{out}: harvest rank(s) {pending} of {size} have not finished (no 'done' in "
                               f"{progress_path(out, pending[0]).name}); rerun them, then clt-harvest again")
        time.sleep(2.0)


# ----------------------------------------------------------------------------------------------------
# Harvest: the stages strung together for one rank, with its progress record, a dry run and the merge


def _model_shape(cfg: HarvestSettings) -> tuple[int, int]:
    """(layer count, width) from the model's config alone (no weights): for --dry-run."""
    spec = str(cfg.base_model)
    if spec in TINY:
        c = tiny_config(spec)
    else:
        from transformers import AutoConfig
        from .lm import smollm2_path
        if spec == "smollm2" or spec.endswith(".gguf"):
            p = smollm2_path() if spec == "smollm2" else Path(spec)
            c = AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        else:
            c = AutoConfig.from_pretrained(spec)
    c = getattr(c, "text_config", c)
    n = next(getattr(c, k) for k in ("num_hidden_layers", "n_layer", "num_layers") if hasattr(c, k))
    return n, model_width(c)


def estimate(cfg: HarvestSettings, n_layers: int, d_model: int) -> dict:
    """Disk size of a harvest before it runs (x and y, provenance, tar and safetensors headers)."""
    lo, hi = (0, n_layers - 1) if cfg.layers is None else tuple(cfg.layers)
    n = hi - lo + 1
    n_ctx = cfg.max_tokens // cfg.context
    kept = n_ctx * (cfg.context - (1 if cfg.bos == "drop" else 0))  # at least one BOS per context dropped
    per_token = 2 * n * d_model * STORAGE_DTYPES[cfg.dtype].itemsize + 4 * 8
    if cfg.dtype in QUANTIZED_DTYPES:
        per_token += 2 * n * 4  # a float32 scale per row of x and y
    per_sample = 512 + 512  # tar header + safetensors header (approx.)
    total = kept * per_token + kept // cfg.tokens_per_sample * per_sample
    return {"contexts": n_ctx, "tokens": kept, "layers": [lo, hi], "d_model": d_model,
            "bytes": total, "shards": math.ceil(kept / cfg.shard_tokens), "bytes_per_token": per_token}


def _dry_run(cfg: HarvestSettings, out: Path):
    """Print the estimated size of the harvest; nothing is written."""
    est = estimate(cfg, *_model_shape(cfg))
    print(f"clt-harvest dry run: {est['contexts']} contexts -> ~{est['tokens']:,} tokens x layers "
          f"{est['layers'][0]}..{est['layers'][1]} x D={est['d_model']} x (x, y) in {cfg.dtype} = "
          f"~{est['bytes'] / 1e9:.3f} GB ({est['bytes_per_token'] / 1e3:.1f} kB/token) in ~{est['shards']} "
          f"shard(s) under {out}")


def harvest(cfg, rank: int | None = None, world_size: int | None = None) -> DatasetInfo | None:
    """Run (or resume) this rank's part of a harvest from its settings (or composed config); rank 0 then
    writes dataset.json and returns it (other ranks and dry runs return None). rank/world_size default to
    the torchrun/SLURM environment."""
    cfg = HarvestSettings.from_config(cfg)
    if rank is None or world_size is None:
        rank, world_size = world()
    out = Path(cfg.out_dir)
    if cfg.dry_run:
        _dry_run(cfg, out)
        return None
    out.mkdir(parents=True, exist_ok=True)
    prog = _open_progress(cfg, out, rank, world_size)
    if not prog["done"]:
        caller_threads = torch.get_num_threads()
        try:
            _run(cfg, out, rank, world_size, prog)
        finally:
            torch.set_num_threads(caller_threads)
    if rank != 0:
        return None
    return merge(out, timeout=cfg.merge_timeout)


def _open_progress(cfg: HarvestSettings, out: Path, rank: int, world_size: int) -> dict:
    """This rank's progress record: a new one, or the recorded one when its settings and world size match."""
    want = settings(cfg)
    prog = read_progress(out, rank)
    if prog is None:
        if rank == 0 and (out / DATASET_JSON).exists():
            raise ConfigError(f"{out / DATASET_JSON}: out_dir already holds a dataset this harvest did not write; "
                              f"choose another out_dir")
        return {"settings": want, "rank": rank, "world": world_size, "contexts_done": 0, "shards": [],
                "carry": None, "flushes": 0, "tokens_fed": 0, "tokens_written": 0, "bos_dropped": 0,
                "tail_dropped": 0, "bytes_written": 0, "contexts": 0, "text_exhausted": False, "done": False,
                "scale": {"sum_x": None, "sum_y": None, "count": 0}, "meta": None}
    for k in RESUME_KEYS:
        if prog["settings"].get(k) != want[k]:
            raise ConfigError(f"config key '{k}' = {want[k]!r} but {progress_path(out, rank)} was harvested "
                              f"with {k}={prog['settings'].get(k)!r}; resume with the same settings or "
                              f"choose another out_dir")
    if prog["world"] != world_size:
        raise ConfigError(f"{progress_path(out, rank)}: harvested with {prog['world']} rank(s), this run has "
                          f"{world_size}; resume with the same number of processes")
    if not prog["done"]:
        log.info("rank %d: resuming at context %d with %d shard(s) written", rank, prog["contexts_done"],
                 len(prog["shards"]))
    return prog


def _clean_leftovers(cfg: HarvestSettings, out: Path, rank: int, size: int, prog: dict):
    """Remove what an interrupted run of this rank left half-written: temporary shards, unrecorded carries."""
    prefix = f".{cfg.name}-"
    for f in out.glob(f"{prefix}*.tar.tmp-*"):
        index = f.name[len(prefix):].split(".", 1)[0]
        if index.isdigit() and int(index) % size == rank:
            f.unlink(missing_ok=True)
    for pattern in (f".carry-rank{rank:04d}-*", f"..carry-rank{rank:04d}-*"):  # carries, their temporary files
        for f in out.glob(pattern):
            if f.name != prog["carry"]:
                f.unlink(missing_ok=True)


def _record_meta(out: Path, rank: int, prog: dict, meta: dict):
    """Record the captured layers/width/hooks; a resumed rank must capture the same ones."""
    if prog["meta"] not in (None, meta):
        raise ConfigError(f"{progress_path(out, rank)}: the model's layers/width/hooks differ from the ones "
                          f"recorded ({prog['meta']} vs {meta})")
    prog["meta"] = meta


def _progress_bar(cfg: HarvestSettings, rank: int, size: int, prog: dict) -> tqdm:
    """Tokens fed by this rank, out of its share of max_tokens, starting at what it had done."""
    C = cfg.context
    n_ctx_total = cfg.max_tokens // C
    return tqdm(total=len(range(rank, n_ctx_total, size)) * C,
                initial=len(range(rank, min(prog["contexts_done"], n_ctx_total), size)) * C,
                unit="tok", unit_scale=True, desc=f"harvest rank {rank}/{size}", position=rank, dynamic_ncols=True)


def _run(cfg: HarvestSettings, out: Path, rank: int, size: int, prog: dict):
    """One rank's pipeline: its contexts -> forward and capture -> shard buffer, flushed whenever full
    and once more at the end."""
    _clean_leftovers(cfg, out, rank, size, prog)
    device = resolve_device(str(cfg.device), dist_env()[2])
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    capture = Capture(CaptureSpec.of(cfg), device)
    _record_meta(out, rank, prog, capture.meta)
    shards = ShardBuffer(cfg, out, rank, size, prog, n_layers=len(capture.sites))
    with (capture.hooked(), _progress_bar(cfg, rank, size, prog) as bar, torch.inference_mode(),
          ctrl_c_at_safe_points()):
        for batch in rank_batches(cfg, capture.tok, rank, size, prog):
            stop_if_ctrl_c()  # between batches: a Ctrl-C inside the model's forward can break torch's vmap
            rows = capture(batch)
            shards.add(rows)
            bar.update(rows.fed)
            if shards.full:
                shards.flush(final=False)
                bar.set_postfix_str(f"{prog['bytes_written'] / 1e6:,.1f} MB written, {len(prog['shards'])} shards")
        _warn_if_text_ran_out(cfg, rank, size, prog)
        shards.flush(final=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="harvest", version_base="1.3")
def _hydra_main(cfg: HarvestSettings):
    def job():
        info = harvest(cfg)
        if info is not None:
            print(f"clt-harvest: wrote {info.n_tokens:,} tokens in {len(info.shards)} shard(s) of "
                  f"{info.n_layers} layers x D={info.d_model} to {info.path} (dataset.json)")

    run_command(job, "clt-harvest", bad_input=(ConfigError, DatasetError),
                interrupted="stopped; the shards it recorded are kept: rerun the same command to continue")


def main():
    # `clt-harvest --dry-run ...` is the spelling users expect; Hydra knows it as dry_run=true.
    sys.argv = [("dry_run=true" if a == "--dry-run" else a) for a in sys.argv]
    _hydra_main()


if __name__ == "__main__":
    main()
