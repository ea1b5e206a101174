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
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save as st_save
from tqdm import tqdm

from .config import CONFIG_DIR, require_choice, require_positive_int, validate_harvest_config
from cltrain.errors import ConfigError
from .data import (DATASET_JSON, DTYPES, QUANTIZED_DTYPES, STORAGE_DTYPES, DatasetError, DatasetInfo, ShardWriter,
                   seed_mix, all_finite, shard_name)
from .lifecycle import run_command
from .lm import TINY, hook_mlp_sites, hook_names, load_lm, mlp_sites, tiny_config
from cltrain.files import atomic_write_bytes
from .parallel import resolve_device
from .text import describe, documents

log = logging.getLogger(__name__)

# Settings that must be equal to resume a harvest (anything that changes which tokens land where).
RESUME_KEYS = ("base_model", "text.source", "text.key", "text.hf_config", "text.hf_split", "max_tokens", "context",
               "batch_size", "layers", "x_source", "bos", "model_dtype", "dtype", "name", "tokens_per_sample",
               "shard_tokens", "shuffle_buffer", "scale_tokens", "seed")


class _StopForward(Exception):
    """Raised by the last captured layer's hook: the rest of the model (and the LM head) is not needed."""


def world() -> tuple[int, int]:
    """(rank, world size) from torchrun's or SLURM's environment; (0, 1) otherwise."""
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in os.environ and w in os.environ:
            rank, size = int(os.environ[r]), int(os.environ[w])
            if not 0 <= rank < size:
                raise ValueError(f"environment {r}={rank} is not in [0, {w}={size})")
            return rank, size
    return 0, 1


def validate_harvest(cfg: DictConfig):
    validate_harvest_config(cfg)
    for key in ("max_tokens", "context", "batch_size", "tokens_per_sample", "shard_tokens", "shuffle_buffer",
                "scale_tokens", "merge_timeout"):
        require_positive_int(cfg, key)
    require_positive_int(cfg, "threads", allow_none=True)
    require_choice(cfg, "x_source", ("resid", "normalized"))
    require_choice(cfg, "bos", ("drop", "keep"))
    require_choice(cfg, "model_dtype", ("fp32", "bf16"))
    require_choice(cfg, "dtype", tuple(STORAGE_DTYPES))
    require_choice(cfg, "device", ("auto", "cpu", "cuda"))
    if cfg.shard_tokens % cfg.tokens_per_sample:
        raise ConfigError(f"config key 'shard_tokens' = {cfg.shard_tokens}: expected a multiple of "
                          f"tokens_per_sample={cfg.tokens_per_sample}")
    if cfg.shuffle_buffer < cfg.shard_tokens:
        raise ConfigError(f"config key 'shuffle_buffer' = {cfg.shuffle_buffer}: expected at least "
                          f"shard_tokens={cfg.shard_tokens} (a shard is cut from one shuffled buffer)")
    if cfg.context < 2:
        raise ConfigError(f"config key 'context' = {cfg.context}: expected at least 2 (BOS + a token)")
    layers = cfg.layers
    if layers is not None and (len(layers) != 2 or not all(isinstance(l, int) and l >= 0 for l in layers)
                               or layers[0] > layers[1]):
        raise ConfigError(f"config key 'layers' = {OmegaConf.to_object(layers)!r}: expected null or "
                          f"[first, last] with 0 <= first <= last")
    if not str(cfg.name) or "/" in str(cfg.name):
        raise ConfigError(f"config key 'name' = {cfg.name!r}: expected a file name prefix")


def settings(cfg: DictConfig) -> dict:
    return {k: OmegaConf.to_object(v) if OmegaConf.is_config(v := OmegaConf.select(cfg, k)) else v
            for k in RESUME_KEYS}


# ----------------------------------------------------------------------------------------------------
# Text -> contexts


def contexts(docs: Iterator[str], tok, context: int) -> Iterator[tuple[list[int], list[int]]]:
    """(token ids, document index per token) of consecutive contexts; each starts with the separator
    (BOS, else EOS) and documents are separated by it. The separator's document is the next token's."""
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    ids: list[int] = []
    doc: list[int] = []
    for d, text in enumerate(docs):
        t = tok.encode(text, add_special_tokens=False, verbose=False)
        if sep is not None:
            t = [sep] + t
        ids += t
        doc += [d] * len(t)
        while True:
            lead = [] if sep is None or ids[:1] == [sep] else [sep]
            n = context - len(lead)
            if len(ids) < n:
                break
            yield lead + ids[:n], doc[:1] * len(lead) + doc[:n]
            del ids[:n], doc[:n]


# ----------------------------------------------------------------------------------------------------
# Progress records (one per rank) and the merge into dataset.json


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
    deadline = time.monotonic() + timeout
    while True:
        first = read_progress(out, 0)
        if first is None:
            raise FileNotFoundError(f"{progress_path(out, 0)}: no harvest progress record; run clt-harvest first")
        size = first["world"]
        progs = [read_progress(out, r) for r in range(size)]
        pending = [r for r, p in enumerate(progs) if p is None or not p.get("done")]
        if not pending:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"{out}: harvest rank(s) {pending} of {size} have not finished (no 'done' in "
                               f"{progress_path(out, pending[0]).name}); rerun them, then clt-harvest again")
        time.sleep(2.0)
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


# ----------------------------------------------------------------------------------------------------
# Harvest


def _model_shape(cfg: DictConfig) -> tuple[int, int]:
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
    return n, _width(c)


def estimate(cfg: DictConfig, n_layers: int, d_model: int) -> dict:
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


def harvest(cfg: DictConfig, rank: int | None = None, world_size: int | None = None) -> DatasetInfo | None:
    """Run (or resume) this rank's part of a harvest; rank 0 then writes dataset.json and returns it
    (other ranks and dry runs return None). rank/world_size default to the torchrun/SLURM environment."""
    validate_harvest(cfg)
    if rank is None or world_size is None:
        rank, world_size = world()
    out = Path(cfg.out_dir)
    if cfg.dry_run:
        est = estimate(cfg, *_model_shape(cfg))
        print(f"clt-harvest dry run: {est['contexts']} contexts -> ~{est['tokens']:,} tokens x layers "
              f"{est['layers'][0]}..{est['layers'][1]} x D={est['d_model']} x (x, y) in {cfg.dtype} = "
              f"~{est['bytes'] / 1e9:.3f} GB ({est['bytes_per_token'] / 1e3:.1f} kB/token) in ~{est['shards']} "
              f"shard(s) under {out}")
        return None
    out.mkdir(parents=True, exist_ok=True)
    want = settings(cfg)
    prog = read_progress(out, rank)
    if prog is None:
        if rank == 0 and (out / DATASET_JSON).exists():
            raise ConfigError(f"{out / DATASET_JSON}: out_dir already holds a dataset this harvest did not write; "
                              f"choose another out_dir")
        prog = {"settings": want, "rank": rank, "world": world_size, "contexts_done": 0, "shards": [],
                "carry": None, "flushes": 0, "tokens_fed": 0, "tokens_written": 0, "bos_dropped": 0,
                "tail_dropped": 0, "bytes_written": 0, "contexts": 0, "text_exhausted": False, "done": False,
                "scale": {"sum_x": None, "sum_y": None, "count": 0}, "meta": None}
    else:
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
    if not prog["done"]:
        caller_threads = torch.get_num_threads()
        try:
            _run(cfg, out, rank, world_size, prog)
        finally:
            torch.set_num_threads(caller_threads)
    if rank != 0:
        return None
    return merge(out, timeout=cfg.merge_timeout)


def _clean_leftovers(cfg: DictConfig, out: Path, rank: int, size: int, prog: dict):
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


def _run(cfg: DictConfig, out: Path, rank: int, size: int, prog: dict):
    _clean_leftovers(cfg, out, rank, size, prog)
    device = resolve_device(str(cfg.device), int(os.environ.get("LOCAL_RANK", 0)))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    model, tok = load_lm(cfg.base_model, dtype=torch.float32 if cfg.model_dtype == "fp32" else torch.bfloat16,
                         seed=cfg.seed, device=device)
    sites = mlp_sites(model)
    lo, hi = (0, len(sites) - 1) if cfg.layers is None else tuple(cfg.layers)
    if hi >= len(sites):
        raise ConfigError(f"config key 'layers' = {[lo, hi]}: {cfg.base_model} has {len(sites)} MLP layers (0..{len(sites) - 1})")
    sites = sites[lo:hi + 1]
    if cfg.x_source == "normalized" and not all(s.input_is_norm for s in sites):
        raise ConfigError(f"config key 'x_source' = 'normalized': {cfg.base_model}'s MLPs have no norm before them")
    d_model = _width(model.config)
    sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    meta = {"layers": list(range(lo, hi + 1)), "d_model": d_model, "hooks": hook_names(sites, cfg.x_source),
            "tokenizer": f"{type(tok).__name__}, vocabulary {len(tok)}", "bos_token_id": sep}
    if prog["meta"] not in (None, meta):
        raise ConfigError(f"{progress_path(out, rank)}: the model's layers/width/hooks differ from the ones "
                          f"recorded ({prog['meta']} vs {meta})")
    prog["meta"] = meta
    # int8 shards are quantized per row when a shard is written; until then tokens wait in bf16.
    store = DTYPES.get(cfg.dtype, torch.bfloat16)
    T, C, W = cfg.tokens_per_sample, cfg.context, size

    # Hooks: x_l (the MLP site's input, or its norm's output) and y_l; stop after the last layer.
    cap: dict[str, list] = {"x": [None] * len(sites), "y": [None] * len(sites)}

    def on_y(i, y):
        cap["y"][i] = y.detach()
        if i == len(sites) - 1:
            raise _StopForward
    hooks = hook_mlp_sites(sites, lambda i, x: cap["x"].__setitem__(i, x.detach()), on_y,
                           x_from_output=cfg.x_source != "resid")

    # Carry (tokens shuffled in the last flush but not yet written) comes back first.
    buf: list[dict[str, torch.Tensor]] = []
    if prog["carry"]:
        buf.append(load_file(str(out / prog["carry"])))
    n_ctx_total = cfg.max_tokens // C
    mine_total = len(range(rank, n_ctx_total, W))
    scale_n, sums = prog["scale"]["count"], prog["scale"]
    sum_x = torch.tensor(sums["sum_x"] or [0.0] * len(sites), dtype=torch.float64)
    sum_y = torch.tensor(sums["sum_y"] or [0.0] * len(sites), dtype=torch.float64)

    def flush(final: bool):
        nonlocal buf, t_last
        if buf:
            data = {k: torch.cat([b[k] for b in buf]) for k in buf[0]}
        else:
            data = {}
        n = data["ids"].shape[0] if data else 0
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed_mix(cfg.seed, rank, prog["flushes"], 3)))
        data = {k: v[perm] for k, v in data.items()}
        start = 0
        while n - start >= cfg.shard_tokens or (final and n - start >= T):
            m = min(cfg.shard_tokens, (n - start) // T * T)
            _write_shard(cfg, out, rank, W, prog, {k: v[start:start + m] for k, v in data.items()})
            start += m
        old = prog["carry"]
        prog["carry"], buf = None, []
        if final:
            prog["tail_dropped"] += n - start
        elif n - start:  # the shuffled remainder stays in the buffer, and on disk for a resume
            buf = [{k: v[start:].contiguous() for k, v in data.items()}]
            prog["carry"] = f".carry-rank{rank:04d}-{prog['flushes']:06d}.safetensors"
            atomic_write_bytes(out / prog["carry"], st_save(buf[0]))
        prog["seconds"] = prog.get("seconds", 0.0) + time.monotonic() - t_last  # model loading excluded
        t_last = time.monotonic()
        prog["flushes"] += 1
        prog["scale"] = {"sum_x": sum_x.tolist(), "sum_y": sum_y.tolist(), "count": scale_n}
        prog["done"] = final
        _write_progress(out, rank, prog)
        if old and old != prog["carry"]:
            (out / old).unlink(missing_ok=True)

    def my_batches():
        batch = []
        for i, (ids, doc) in enumerate(contexts(documents(cfg.text.source, cfg.text.key, cfg.text.hf_config,
                                                          cfg.text.hf_split), tok, C)):
            if i >= n_ctx_total:
                break
            if i % W != rank or i < prog["contexts_done"]:
                continue
            batch.append((i, ids, doc))
            if len(batch) == cfg.batch_size:
                yield batch
                batch = []
        else:
            prog["text_exhausted"] = True
        if batch:
            yield batch

    bar = tqdm(total=mine_total * C, initial=len(range(rank, min(prog["contexts_done"], n_ctx_total), W)) * C,
               unit="tok", unit_scale=True, desc=f"harvest rank {rank}/{W}", position=rank, dynamic_ncols=True)
    buffered = sum(b["ids"].shape[0] for b in buf)
    t_last = time.monotonic()
    try:
        with torch.inference_mode():
            for batch in my_batches():
                ids = torch.tensor([b[1] for b in batch], dtype=torch.long, device=device)
                try:
                    model(input_ids=ids, use_cache=False)
                except _StopForward:
                    pass
                x = torch.stack(cap["x"], dim=2).to(store).flatten(0, 1).cpu()  # [B*C, N, D]
                y = torch.stack(cap["y"], dim=2).to(store).flatten(0, 1).cpu()
                if not (all_finite(x) and all_finite(y)):
                    raise FloatingPointError(
                        f"{cfg.base_model}: non-finite activations in contexts {batch[0][0]}..{batch[-1][0]} after casting "
                        f"to {cfg.dtype}" + (" (overflow: use dtype=bfloat16)" if cfg.dtype == "float16" else ""))
                tok_ids = ids.flatten().cpu()
                doc = torch.tensor([b[2] for b in batch], dtype=torch.long).flatten()
                ctx = torch.tensor([b[0] for b in batch], dtype=torch.long).repeat_interleave(C)
                pos = torch.arange(C).repeat(len(batch))
                keep = tok_ids != sep if (cfg.bos == "drop" and sep is not None) else torch.ones_like(tok_ids, dtype=torch.bool)
                item = {"x": x[keep], "y": y[keep], "ids": tok_ids[keep], "doc": doc[keep], "ctx": ctx[keep],
                        "pos": pos[keep]}
                if rank == 0 and scale_n < cfg.scale_tokens:
                    take = min(cfg.scale_tokens - scale_n, item["ids"].shape[0])
                    sum_x.add_(item["x"][:take].double().norm(dim=-1).sum(0))
                    sum_y.add_(item["y"][:take].double().norm(dim=-1).sum(0))
                    scale_n += take
                buf.append(item)
                buffered += item["ids"].shape[0]
                prog["contexts_done"] = batch[-1][0] + 1
                prog["contexts"] += len(batch)
                prog["tokens_fed"] += ids.numel()
                prog["bos_dropped"] += int((~keep).sum())
                bar.update(ids.numel())
                if buffered >= cfg.shuffle_buffer:
                    flush(final=False)
                    buffered = sum(b["ids"].shape[0] for b in buf)
                    bar.set_postfix_str(f"{prog['bytes_written'] / 1e6:,.1f} MB written, {len(prog['shards'])} shards")
            if prog["text_exhausted"] and prog["contexts"] * W < n_ctx_total:
                log.warning("rank %d: the text ran out after %d contexts; max_tokens=%d asked for %d contexts",
                            rank, prog["contexts_done"], cfg.max_tokens, n_ctx_total)
            flush(final=True)
    finally:
        bar.close()
        hooks.remove()


def _width(c) -> int:
    """The residual stream width from a model config."""
    return next(getattr(c, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(c, k))


def _write_shard(cfg: DictConfig, out: Path, rank: int, size: int, prog: dict, data: dict[str, torch.Tensor]):
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


@hydra.main(config_path=str(CONFIG_DIR), config_name="harvest", version_base="1.3")
def _hydra_main(cfg: DictConfig):
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
