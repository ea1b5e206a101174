"""Evaluation metrics, defined once: reconstruction (NMSE, explained variance) and sparsity (L0, dead
and dense features), pooled over all evaluated tokens. clt-eval (train/evaluate.py) and the trainer's
periodic evaluation (train/dictionary.py, eval_every) both use `PooledMetrics`, so `eval/nmse` means the
same number in both: per layer, sum over tokens of ||y_hat - y||^2 divided by sum over tokens of
||y - mean(y)||^2 (the mean over the evaluated tokens), then averaged over layers.

Massive activations: a few tokens carry hundreds to thousands of times a typical token's ||y_l||^2 (in
SmolLM2-135M, some first tokens after BOS, the attention sink: 17,000x the median at one token in 16k).
Pooled, one such token can hold half of a layer's variance, and the NMSE then mostly measures it. So the
summary also gives `nmse_without_massive`: the same pooled NMSE over the tokens with ||y_l|| <= MASSIVE_NORM *
sqrt(D) at that layer (normalized activations have E||y_l|| = sqrt(D), so the cut is 100x the mean energy),
with how many tokens and what share of sum ||y_l||^2 were left out."""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .clt import CLT, inference_forward


DENSE_THRESHOLD = 0.1  # a feature firing on more than this fraction of tokens counts as dense
MASSIVE_NORM = 10.0  # a token's ||y_l|| above this many sqrt(D) is massive at layer l (module docstring)


class PooledMetrics:
    """Sums over evaluation tokens, from which every metric is computed at the end (pooled, not a mean of
    per-batch ratios). `acts` may be a slice of the features (feature parallelism): `summary` then sums the
    firing counts over `feature_group`."""

    def __init__(self, n_layers: int, n_features: int, d_model: int, device):
        f64 = dict(dtype=torch.float64, device=device)
        # [2, ...]: index 0 over every token, index 1 over the tokens that are not massive at that layer
        self.sse = torch.zeros(2, n_layers, **f64)
        self.sum_y = torch.zeros(2, n_layers, d_model, **f64)
        self.sum_y2 = torch.zeros(2, n_layers, **f64)
        self.count = torch.zeros(2, n_layers, **f64)
        self.fired = torch.zeros(n_layers, n_features, **f64)
        self.tokens = 0
        self.massive_y2 = MASSIVE_NORM ** 2 * d_model

    def add(self, y_hat: torch.Tensor, y: torch.Tensor, acts: torch.Tensor):
        """One batch: y_hat, y [B, N, D] (normalized), acts [B, N, F]."""
        y = y.double()
        y2, err2 = y.pow(2).sum(-1), (y_hat.double() - y).pow(2).sum(-1)  # [B, N]
        kept = (y2 <= self.massive_y2).double()
        for i, w in enumerate((torch.ones_like(kept), kept)):
            self.sse[i] += (err2 * w).sum(0)
            self.sum_y[i] += torch.einsum("bn,bnd->nd", w, y)  # no [B, N, D] temporary
            self.sum_y2[i] += (y2 * w).sum(0)
            self.count[i] += w.sum(0)
        self.fired += (acts != 0).sum(0).double()
        self.tokens += y.shape[0]

    def summary(self, dense_threshold: float = DENSE_THRESHOLD, feature_group=None) -> dict:
        """The metrics (clt-eval's metrics.json layout) plus "density" [N, F] (this rank's features)."""
        n = self.tokens
        if n == 0:
            raise ValueError("no evaluation tokens: the held-out split is empty")
        m = self.count.clamp_min(1)
        var = (self.sum_y2 / m - (self.sum_y / m.unsqueeze(-1)).pow(2).sum(-1)).clamp_min(1e-12)  # E||y - mean(y)||^2
        nmse, typical = (self.sse / m / var).unbind(0)
        density = self.fired / n
        counts = torch.stack([self.fired.sum(-1) / n, (self.fired == 0).sum(-1).double(),
                              (density > dense_threshold).sum(-1).double()])  # [3, N]: l0, dead, dense
        total = self.fired.numel()
        if feature_group is not None and dist.get_world_size(feature_group) > 1:
            dist.all_reduce(counts, group=feature_group)
            total *= dist.get_world_size(feature_group)
        l0, dead_per_layer, dense_per_layer = counts[0], counts[1].long(), counts[2].long()
        dead, dense = int(dead_per_layer.sum()), int(dense_per_layer.sum())
        return {
            "tokens": n,
            "nmse": {"per_layer": nmse.tolist(), "mean": float(nmse.mean())},
            "explained_variance": {"per_layer": (1 - nmse).tolist(), "mean": float((1 - nmse).mean())},
            "nmse_without_massive": {
                "per_layer": typical.tolist(), "mean": float(typical.mean()), "massive_norm": MASSIVE_NORM,
                "massive_tokens_per_layer": (self.count[0] - self.count[1]).long().tolist(),
                "massive_share_per_layer": (1 - self.sum_y2[1] / self.sum_y2[0].clamp_min(1e-12)).tolist()},
            "l0": {"per_layer": l0.tolist(), "total": float(l0.sum()), "mean": float(l0.mean())},
            "features": {"total": total, "dead_count": dead, "dead_fraction": dead / total,
                         "dense_count": dense, "dense_fraction": dense / total,
                         "dense_threshold": dense_threshold,
                         "dead_per_layer": dead_per_layer.tolist(),
                         "dense_per_layer": dense_per_layer.tolist()},
            "density": density.cpu(),
        }


@torch.no_grad()
def shard_metrics(clt: CLT, batches: Iterable, max_tokens: int | None = None,
                  dense_threshold: float = DENSE_THRESHOLD, progress: bool = True) -> dict:
    """PooledMetrics of a whole CLT over batches with .x, .y [B, N, D] (normalized), at most max_tokens."""
    dev = clt.b_dec.device
    pooled = PooledMetrics(clt.cfg.n_layers, clt.cfg.n_features, clt.cfg.d_model, dev)
    bar = tqdm(total=max_tokens, unit="tok", desc="eval shards", disable=not progress)
    for batch in batches:
        x, y = batch.x.to(dev), batch.y.to(dev)
        if max_tokens is not None:
            x, y = x[: max_tokens - pooled.tokens], y[: max_tokens - pooled.tokens]
        if x.shape[0] == 0:
            break
        acts, y_hat = inference_forward(clt, x)
        pooled.add(y_hat, y, acts)
        bar.update(x.shape[0])
        if max_tokens is not None and pooled.tokens >= max_tokens:
            break
    bar.close()
    return pooled.summary(dense_threshold)


def flat_metrics(metrics: dict, prefix: str = "eval/") -> dict[str, float]:
    """metrics.json flattened to scalar W&B keys, e.g. eval/nmse/layer_3, eval/replacement/mode_b/kl."""
    out = {}

    def walk(d, key):
        for k, v in d.items():
            name = f"{key}{k}"
            if isinstance(v, dict):
                walk(v, name + "/")
            elif isinstance(v, list) and k == "per_layer":
                out.update({f"{key}layer_{i}": float(x) for i, x in enumerate(v)})
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[name] = float(v)

    walk({k: v for k, v in metrics.items() if k not in ("layers",)}, prefix)
    return out
