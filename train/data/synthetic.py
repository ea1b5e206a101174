"""A dataset without a language model (tests and benchmarks)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .format import DTYPES, SCALE_TOKENS, STORAGE_DTYPES, DatasetInfo, normalization_scales
from .shards import ShardWriter, shard_name


def write_synthetic_dataset(path: str | os.PathLike, n_layers: int, d_model: int, n_tokens: int,
                            tokens_per_sample: int = 16, seed: int = 0, shard_tokens: int = 1024,
                            dtype: str = "bfloat16", generator: str | Callable | None = None,
                            n_true_features: int = 64, active: int = 4, name: str = "synthetic") -> DatasetInfo:
    """Write a valid dataset (shards + dataset.json) without a language model, for tests and benchmarks.

    generator:
      None / "sparse": a known sparse CLT generates the data. Per token and layer, `active` of
          `n_true_features` features fire with magnitudes in [0.5, 2]; x_l = a_l E_l * (1 + l) and
          y_l = sum_{s <= l} a_s D_{s,l} (E, D unit-norm random directions). A CLT can fit it exactly; the
          per-layer factor (1 + l) makes normalization matter.
      "gaussian": x, y i.i.d. standard normal (fast; for benchmarks of the loader).
      a callable f(n, torch.Generator) -> (x, y) of shape [n, n_layers, d_model].
    token_ids are 0..n_tokens-1 in the order written (unique, so tests can count them); doc/pos give the
    sample and row. Scales are estimated on the first SCALE_TOKENS tokens, as clt-harvest does.
    """
    T = int(tokens_per_sample)
    if n_tokens <= 0 or n_tokens % T:
        raise ValueError(f"n_tokens={n_tokens} must be a positive multiple of tokens_per_sample={T}")
    if dtype not in STORAGE_DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(STORAGE_DTYPES)}")
    per_shard = max(1, int(shard_tokens) // T) * T
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    if generator in (None, "sparse"):
        n, F = n_layers, n_true_features
        enc = torch.nn.functional.normalize(torch.randn(n, F, d_model, generator=g), dim=-1)
        dec = torch.nn.functional.normalize(torch.randn(n, n, F, d_model, generator=g), dim=-1)

        def make(count, g):
            idx = torch.rand(count, n, F, generator=g).argsort(dim=-1)[..., :active]
            a = torch.zeros(count, n, F).scatter_(-1, idx, 0.5 + 1.5 * torch.rand(count, n, active, generator=g))
            x = torch.einsum("tnf,nfd->tnd", a, enc) * torch.arange(1, n + 1).view(1, n, 1)
            y = torch.zeros(count, n, d_model)
            for s in range(n):
                y[:, s:] += torch.einsum("tf,lfd->tld", a[:, s], dec[s, s:])
            return x, y
    elif generator == "gaussian":
        def make(count, g):
            return (torch.randn(count, n_layers, d_model, generator=g),
                    torch.randn(count, n_layers, d_model, generator=g))
    elif callable(generator):
        make = generator
    else:
        raise ValueError(f"generator={generator!r}: expected None, 'sparse', 'gaussian' or a callable")

    tdt = DTYPES.get(dtype, torch.bfloat16)  # int8 is quantized from bf16 values, as clt-harvest does
    shards, head_x, head_y, written = [], [], [], 0
    while written < n_tokens:
        count = min(per_shard, n_tokens - written)
        x, y = make(count, g)
        x, y = x.to(tdt), y.to(tdt)
        if sum(h.shape[0] for h in head_x) < SCALE_TOKENS:
            head_x.append(x), head_y.append(y)
        w = ShardWriter(folder, shard_name(name, len(shards)), dtype=dtype)
        for i in range(0, count, T):
            ids = torch.arange(written + i, written + i + T)
            w.add(f"{len(shards):06d}-{i // T:06d}", x[i:i + T], y[i:i + T], ids,
                  doc=ids // T, ctx=ids // T, pos=ids % T, metadata={"source": "synthetic", "seed": seed})
        shards.append(w.close())
        written += count
    hx, hy = torch.cat(head_x)[:SCALE_TOKENS], torch.cat(head_y)[:SCALE_TOKENS]
    sx, sy = normalization_scales(hx, hy)
    info = DatasetInfo(
        model=f"synthetic:{generator if isinstance(generator, str) else 'sparse' if generator is None else 'custom'}",
        layers=list(range(n_layers)), n_layers=n_layers, d_model=d_model, dtype=dtype,
        tokens_per_sample=T, n_tokens=n_tokens, hooks={"x": "synthetic", "y": "synthetic"},
        scale_x=sx, scale_y=sy, shards=shards, scale_tokens=hx.shape[0],
        scale_source=f"the first {hx.shape[0]} tokens written", harvest={"seed": seed}, path=str(folder))
    info.save(folder)
    return info

