"""Tiny models for the graph and feature-page tests: a random CLT saved as clt-train saves one, and a harvest
of the tiny random Llama (train/lm.py's tiny-llama) to evaluate it on."""
from __future__ import annotations

import torch

from cltrain.train.clt import CLT, CLTConfig
from cltrain.train.config import compose
from cltrain.train.model_io import clt_state, save_clt

N, D = 4, 32  # tiny-llama


def save_model(folder, clt, model, x_hook="post_attention_layernorm:input", scales=(1.0, 1.0), **ds):
    n = clt.cfg.n_layers
    meta = {"model": model, "layers": list(range(n)), "n_layers": n, "d_model": clt.cfg.d_model,
            "scale_x": [scales[0]] * n, "scale_y": [scales[1]] * n,
            "hooks": {"x": f"model.layers.{{l}}.{x_hook}", "y": "model.layers.{l}.mlp:output"}, **ds}
    save_clt(folder, clt_state(clt), clt.cfg, {"dataset": meta, "train": {}})
    return folder


def random_clt(n_layers=N, d_model=D, per_layer=False, seed=0, n_features=16):
    clt = CLT(CLTConfig(n_layers=n_layers, d_model=d_model, n_features=n_features, per_layer=per_layer),
              generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        clt.b_enc.fill_(0.2)
    return clt.eval()


def harvest_tiny_llama(out):
    from cltrain.train.harvest import harvest

    return harvest(compose("harvest", [
        "base_model=tiny-llama", "max_tokens=768", "context=64", "tokens_per_sample=64", "shard_tokens=256",
        f"out_dir={out}", "shuffle_buffer=256", "device=cpu", "scale_tokens=256", "threads=1"]))
