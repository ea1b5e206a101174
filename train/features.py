"""Feature pages: what each feature of a trained CLT means, in circuit-tracer's formats and our own browser.

One streaming pass over held-out text (the base model up to the last CLT layer, then the CLT's encoders under
its inference rule, clt.inference_encode_layer) keeps, for every feature of every layer, in memory bounded by
the number of features (not by the tokens read; `state_bytes` says how much):
  - how often it fires (activation_frequency: the fraction of non-BOS tokens with a > 0), its smallest and
    largest nonzero activation;
  - the histogram of its nonzero activations, in 256 bins of a power-of-two width that doubles (merging bin
    pairs) whenever a larger activation arrives: exact, the same counts as binning every value at the final
    width (floor(floor(a / w) / 2) = floor(a / 2w)); the page's histogram and its 100 percentiles
    (quantile_values) are read from it, so they resolve act_max / 128 at worst;
  - its top contexts: the `top_examples` contexts (of `context` tokens) with the highest maximum activation,
    ties to the earlier context, one example per context;
  - a uniform sample of the contexts where it fires: the `sampled_examples` whose key sample_key(context,
    feature) is smallest (a bottom-k sketch: the same as drawing them after the pass, for any data order).
    Sorted by their maximum activation and cut into `quantiles` bands of equal size, they are the examples at
    several activation quantiles ("Quantile q of Q": the q-th band of the contexts where it fires);
  - for each kept context, the feature's activation on `before` tokens before its maximum and `after` after,
    and those tokens.
Its top and bottom logits are its direct effect: for a feature of source layer s, the sum of its decoder
vectors over every target layer s..N-1 (a PLT: its one decoder), in the base model's units (the export's:
each target's 1/s_y folded in), times the final norm's scale (lm.unembedding), through the unembedding.

Written by `write_pages` in three forms, every feature (dead ones too: `dead: true`, no examples) included:
  - circuit-tracer's binary layout (the one its frontend reads from a Hugging Face repository):
    index.json.gz, a gzipped JSON list with per layer {"filename": "layer_<L>.bin", "offsets": [F + 1 byte
    offsets]}, and layer_<L>.bin, per feature a 4-byte little-endian length then its zlib-compressed JSON;
  - per-feature JSON <index>.json (Cantor index of (layer, feature)) where clt-eval's graphs point
    (`expand_json`; train/graphs.py writes the graphs' scan as ./data/features/<name>);
  - our browser (train/feature_browser.py), self-contained, from the same records.
Each record is circuit-tracer's frontend model (frontend/feature_models.py) plus our keys layer, feature,
dead and dense, which its frontend ignores.
"""
from __future__ import annotations

import gzip
import shutil
import hashlib
import json
import math
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from cltrain.files import atomic_write_bytes

from . import circuits
from .clt import CLT, inference_encode_layer

HIST_BINS = 256  # fine histogram bins per feature (power-of-two width)
INDEX_FILE = "index.json.gz"
SUMMARY_FILE = "summary.json"
CIRCUITS_DIR = "circuits"  # per-layer tables of each feature's top connections (train/circuits.py)
_EMPTY_EXP = -1 << 30  # a feature that never fired has no bin width yet
_P = 2_147_483_647  # 2^31 - 1: sample_key's modulus (products stay below 2^62 in int64)


def cantor_index(layer: int, feature: int) -> int:
    """circuit-tracer's node index of (layer, feature) (frontend/graph_models.py; the JS util.cantorUnpair)."""
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def sample_key(context: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """A pseudo-random key in [0, 2^31 - 1) for each (global context id, global feature id), broadcast;
    the sampled examples of a feature are its firing contexts with the smallest keys."""
    x = (context * 1_103_515_245 + feature * 48_271 + 12_345) % _P
    x = (x * x) % _P
    return (x * 69_621 + feature) % _P


def layer_file(layer: int) -> str:
    return f"layer_{layer}.bin"


# ----------------------------------------------------------------------------------------------------
# The streaming statistics


class ContextKeeper:
    """Per feature (a [N, F] grid), the `k` contexts with the highest score seen so far (ties: the earlier
    context, as contexts arrive in order), each with its maximum activation, the position of it, and the
    feature's activations and token ids on the window [pos - before, pos + after] (-1 ids off the context)."""

    def __init__(self, n_layers: int, n_features: int, k: int, before: int, after: int):
        self.k, self.before, self.after = k, before, after
        W = before + 1 + after
        shape = (n_layers, n_features, k)
        self.score = torch.full(shape, -math.inf, dtype=torch.float64)
        self.ctx = torch.full(shape, -1, dtype=torch.long)
        self.value = torch.zeros(shape)
        self.pos = torch.zeros(shape, dtype=torch.long)
        self.acts = torch.zeros(*shape, W)
        self.ids = torch.full((*shape, W), -1, dtype=torch.int32)

    def add(self, layer: int, score: torch.Tensor, ctx: torch.Tensor, value: torch.Tensor, pos: torch.Tensor,
            acts: torch.Tensor, ids: torch.Tensor):
        """score, value, pos [B, F] (score -inf: not a candidate), ctx [B] global context ids, acts [B, C, F],
        ids [B, C]."""
        k = self.k
        B, C, F = acts.shape
        both = torch.cat([self.score[layer], score.T.double()], 1)  # [F, k + B]: kept first (earlier contexts)
        order = both.sort(dim=1, descending=True, stable=True).indices[:, :k]
        new_score = both.gather(1, order)
        fresh = order >= k
        old = order.clamp(max=k - 1)
        for name in ("ctx", "value", "pos"):
            getattr(self, name)[layer] = getattr(self, name)[layer].gather(1, old)
        W = self.acts.shape[-1]
        self.acts[layer] = self.acts[layer].gather(1, old[..., None].expand(F, k, W))
        self.ids[layer] = self.ids[layer].gather(1, old[..., None].expand(F, k, W))
        self.score[layer] = new_score
        f, slot = fresh.nonzero(as_tuple=True)
        if len(f):
            b = order[f, slot] - k
            p = pos[b, f]
            window = p[:, None] + torch.arange(-self.before, self.after + 1)
            inside = (window >= 0) & (window < C)
            w = window.clamp(0, C - 1)
            self.ctx[layer, f, slot] = ctx[b]
            self.value[layer, f, slot] = value[b, f].float()
            self.pos[layer, f, slot] = p
            self.acts[layer, f, slot] = acts[b[:, None], w, f[:, None]].float() * inside
            self.ids[layer, f, slot] = torch.where(inside, ids[b[:, None], w], -1).int()
        self.ctx[layer][new_score == -math.inf] = -1  # an empty slot stays empty

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.score, self.ctx, self.value, self.pos, self.acts,
                                                        self.ids))


class FeatureStats:
    """Everything the pages need, accumulated one batch of contexts at a time (`add`), per CLT layer."""

    def __init__(self, n_layers: int, n_features: int, top_examples: int, sampled_examples: int, before: int,
                 after: int):
        N, F = n_layers, n_features
        self.n_layers, self.n_features = N, F
        self.tokens = 0
        self.contexts = 0
        self.count = torch.zeros(N, F, dtype=torch.long)
        self.act_max = torch.zeros(N, F)
        self.act_min = torch.full((N, F), math.inf)
        self.hist = torch.zeros(N, F, HIST_BINS, dtype=torch.int32)
        self.hist_exp = torch.full((N, F), _EMPTY_EXP, dtype=torch.long)  # bin width 2^exp
        self.top = ContextKeeper(N, F, top_examples, before, after)
        self.sampled = ContextKeeper(N, F, sampled_examples, before, after)

    def state_bytes(self) -> int:
        plain = sum(t.numel() * t.element_size() for t in (self.count, self.act_max, self.act_min, self.hist,
                                                           self.hist_exp))
        return plain + self.top.nbytes() + self.sampled.nbytes()

    def add(self, layer: int, acts: torch.Tensor, ids: torch.Tensor, first_context: int):
        """acts [B, C, F] of CLT layer `layer` (zero where not counted, e.g. BOS), ids [B, C]; the contexts are
        numbered first_context.. in the order of the pass."""
        acts = acts.float()
        B, C, F = acts.shape
        fired = acts > 0
        self.count[layer] += fired.sum((0, 1))
        self.act_max[layer] = torch.maximum(self.act_max[layer], acts.amax((0, 1)))
        self.act_min[layer] = torch.minimum(self.act_min[layer], acts.masked_fill(~fired, math.inf).amin((0, 1)))
        self._histogram(layer, acts[fired], fired.nonzero()[:, 2])
        value, pos = acts.max(1)  # [B, F]: max over positions, first position on ties
        ctx = torch.arange(first_context, first_context + B)
        lit = value > 0
        self.top.add(layer, value.double().masked_fill(~lit, -math.inf), ctx, value, pos, acts, ids)
        gid = layer * F + torch.arange(F)
        key = sample_key(ctx[:, None], gid[None, :]).double()
        self.sampled.add(layer, (-key).masked_fill(~lit, -math.inf), ctx, value, pos, acts, ids)

    def _histogram(self, layer: int, values: torch.Tensor, feature: torch.Tensor):
        if not len(values):
            return
        F = self.n_features
        top = torch.zeros(F).scatter_reduce_(0, feature, values, "amax")
        # the smallest exponent e with top < HIST_BINS * 2^e (frexp: top = m * 2^x, 0.5 <= m < 1)
        need = torch.frexp(top)[1].long() - int(math.log2(HIST_BINS))
        exp = self.hist_exp[layer]
        had = exp > _EMPTY_EXP
        while True:
            grow = had & (need > exp) & (top > 0)
            if not bool(grow.any()):
                break
            h = self.hist[layer, grow]
            self.hist[layer, grow] = torch.cat([h.view(-1, HIST_BINS // 2, 2).sum(-1, dtype=torch.int32),
                                                torch.zeros_like(h[:, : HIST_BINS // 2])], 1)
            exp[grow] += 1
        first = ~had & (top > 0)
        exp[first] = need[first]
        bins = torch.ldexp(values, -exp[feature].float()).floor().long().clamp_(0, HIST_BINS - 1)
        self.hist[layer].view(-1).index_add_(0, feature * HIST_BINS + bins,
                                             torch.ones_like(bins, dtype=torch.int32))


@torch.no_grad()
def collect(clt: CLT, s_x: torch.Tensor, capture, batches: list[torch.Tensor], stats: FeatureStats,
            sep: int | None, progress: bool = True, coactivation=None) -> dict:
    """Run the pass over token-id batches [B, C] (each context starting with the separator): the base model
    through `capture` (train/capture.Capture, hooked), each layer's x normalized by s_x and encoded, separator
    positions left out; with `coactivation` (circuits.Coactivation) its same-token sums too. Returns
    {"tokens", "contexts", "seconds"}."""
    t0 = time.monotonic()
    dev = clt.b_dec.device
    s_x = s_x.float().to(dev)
    first = 0
    bar = tqdm(total=sum(b.numel() for b in batches), desc="feature pages", unit="tok", unit_scale=True,
               disable=not progress)
    with capture.hooked():
        for ids in batches:
            ids = ids.to(capture.device)
            xs, _ = capture.forward(ids)
            B, C = ids.shape
            counted = ids != sep if sep is not None else torch.ones_like(ids, dtype=torch.bool)
            cpu_ids = ids.cpu()
            every = []
            for layer, x in enumerate(xs):
                x = x.reshape(B * C, -1).float().to(dev) * s_x[layer]
                acts = inference_encode_layer(clt, x, layer).view(B, C, -1)
                acts = (acts * counted.to(dev)[..., None]).cpu()
                stats.add(layer, acts, cpu_ids, first)
                if coactivation is not None:
                    every.append(acts.reshape(B * C, -1))
            if coactivation is not None:
                coactivation.add(torch.stack(every, 1), int(counted.sum()))
            stats.tokens += int(counted.sum())
            stats.contexts += B
            first += B
            bar.update(ids.numel())
    bar.close()
    return {"tokens": stats.tokens, "contexts": stats.contexts, "seconds": round(time.monotonic() - t0, 2)}


@torch.no_grad()
def direct_logits(clt: CLT, s_y: torch.Tensor, W_U: torch.Tensor, norm_scale: torch.Tensor | None, n: int,
                  chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, bottom) token ids [N, F, n]: per feature, the n tokens its direct effect raises most and lowers
    most: W_U (norm_scale * sum_t W_dec[s][f, t - s] / s_y[t]) (module docstring)."""
    cfg = clt.cfg
    N, F = cfg.n_layers, cfg.n_features
    W_U = W_U.float()
    s_y = s_y.float().to(W_U.device)
    n = min(n, W_U.shape[0])
    top = torch.empty(N, F, n, dtype=torch.long)
    bottom = torch.empty(N, F, n, dtype=torch.long)
    for s in range(N):
        dec = clt.W_dec[s].float().to(W_U.device)  # [F, S, D]: slot j writes layer s + j
        v = sum(dec[:, j] / s_y[s + j] for j in range(dec.shape[1]))
        if norm_scale is not None:
            v = v * norm_scale.float().to(W_U.device)
        for lo in range(0, F, chunk):
            logits = v[lo:lo + chunk] @ W_U.T
            top[s, lo:lo + chunk] = logits.topk(n, dim=1).indices.cpu()
            bottom[s, lo:lo + chunk] = logits.topk(n, dim=1, largest=False).indices.cpu()
    return top, bottom


# ----------------------------------------------------------------------------------------------------
# Records


@dataclass
class PageSettings:
    """What shapes the records (config.FeatureSettings names these keys alike)."""
    quantiles: int
    histogram_bins: int
    dense_threshold: float
    transcoder_id: str


def _percentiles(hist: torch.Tensor, width: float, lo: float, hi: float) -> list[float]:
    """Percentiles 1..100 of the values binned in `hist` (bins of `width` from 0), linear within a bin,
    clamped to the exact [lo, hi]."""
    cdf = hist.double().cumsum(0)
    total = float(cdf[-1])
    q = torch.arange(1, 101, dtype=torch.float64) / 100 * total
    i = torch.searchsorted(cdf, q).clamp(max=len(hist) - 1)
    before = torch.where(i > 0, cdf[(i - 1).clamp(min=0)], torch.zeros_like(q))
    inside = hist.double()[i].clamp(min=1)
    x = (i.double() + (q - before) / inside) * width
    out = x.clamp(lo, hi)
    out[-1] = hi
    return [round(v, 4) for v in out.tolist()]


def _rebin(hist: torch.Tensor, width: float, lo: float, hi: float, bins: int) -> list[float]:
    """`bins` equal bins from lo to hi, each fine bin's count spread evenly over its width."""
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), hist.double().cumsum(0)])
    fine_edges = torch.arange(len(hist) + 1, dtype=torch.float64) * width
    edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
    at = torch.from_numpy(np.interp(edges.numpy(), fine_edges.numpy(), cdf.numpy()))
    at[-1] = cdf[-1]
    at[0] = 0.0
    return [round(v, 2) for v in (at[1:] - at[:-1]).clamp(min=0).tolist()]


class TokenText:
    """Token ids to the strings the frontend shows (each token decoded alone, as circuit-tracer decodes a
    prompt's tokens), cached."""

    def __init__(self, tokenizer):
        self.tok, self.cache = tokenizer, {}

    def __call__(self, i: int) -> str:
        s = self.cache.get(i)
        if s is None:
            s = self.cache[i] = self.tok.decode([i])
        return s


def layer_records(stats: FeatureStats, layer: int, top_ids: torch.Tensor, bottom_ids: torch.Tensor,
                  text: TokenText, s: PageSettings, connections: list[dict] | None = None) -> list[dict]:
    """The records of one layer's features, in feature order; with `connections` (circuits.layer_connections)
    each record's `circuits` (an extra key circuit-tracer's frontend ignores)."""
    F = stats.n_features
    count = stats.count[layer].tolist()
    amax, amin = stats.act_max[layer].tolist(), stats.act_min[layer].tolist()
    exps = stats.hist_exp[layer].tolist()
    tokens = max(stats.tokens, 1)
    top_l, bottom_l = top_ids[layer].tolist(), bottom_ids[layer].tolist()
    keep = {name: {k: getattr(kp, k)[layer].tolist() for k in ("ctx", "value", "pos", "acts", "ids")}
            for name, kp in (("top", stats.top), ("sampled", stats.sampled))}
    out = []
    for f in range(F):
        freq = count[f] / tokens
        dead = count[f] == 0
        rec = {"transcoder_id": s.transcoder_id, "index": cantor_index(layer, f), "layer": layer, "feature": f,
               "dead": dead, "dense": freq > s.dense_threshold, "activation_frequency": freq,
               "top_logits": [text(i) for i in top_l[f]], "bottom_logits": [text(i) for i in bottom_l[f]]}
        if connections is not None:
            rec["circuits"] = connections[f]
        if dead:
            rec.update(act_min=0.0, act_max=0.0, quantile_values=[0.0] * 100, histogram=[0.0] * s.histogram_bins,
                       examples_quantiles=[])
            out.append(rec)
            continue
        lo, hi = amin[f], amax[f]
        width = math.ldexp(1.0, exps[f])
        hist = stats.hist[layer, f]
        rec.update(act_min=round(lo, 4), act_max=round(hi, 4),
                   quantile_values=_percentiles(hist, width, lo, hi),
                   histogram=_rebin(hist, width, lo, hi, s.histogram_bins))
        top = _examples(keep["top"], f, text, stats.top.before, set())
        top_ctx = {c for c in keep["top"]["ctx"][f] if c >= 0}
        sampled = _examples(keep["sampled"], f, text, stats.top.before, top_ctx)
        groups = [{"quantile_name": "Top activations", "examples": [e for _, e in top]}]
        sampled.sort(key=lambda ve: ve[0])
        Q = s.quantiles
        for q in range(Q, 0, -1):  # highest band first
            band = sampled[len(sampled) * (q - 1) // Q: len(sampled) * q // Q]
            if band:
                groups.append({"quantile_name": f"Quantile {q} of {Q}", "examples": [e for _, e in reversed(band)]})
        rec["examples_quantiles"] = groups
        out.append(rec)
    return out


def _examples(kept: dict, f: int, text: TokenText, before: int, repeated: set) -> list[tuple[float, dict]]:
    """(max activation, example) of feature f's kept contexts, in kept order; the window's slot `before` is
    the maximum's token, and slots off the context (ids -1) are dropped."""
    out = []
    for ctx, value, acts, ids in zip(*(kept[k][f] for k in ("ctx", "value", "acts", "ids"))):
        if ctx < 0:
            continue
        valid = [j for j, i in enumerate(ids) if i >= 0]
        out.append((value, {"tokens": [text(ids[j]) for j in valid],
                            "tokens_acts_list": [round(acts[j], 4) for j in valid],
                            "train_token_ind": before - valid[0], "is_repeated_datapoint": ctx in repeated}))
    return out


# ----------------------------------------------------------------------------------------------------
# Layouts


def write_binary(folder: Path, layers: Iterator[tuple[int, list[dict]]]) -> dict:
    """circuit-tracer's binary layout in `folder`: layer_<L>.bin per layer and index.json.gz (module
    docstring). Returns {"bytes": total size}."""
    index, total = [], 0
    for layer, records in layers:
        offsets, chunks, at = [0], [], 0
        for rec in records:
            blob = zlib.compress(json.dumps(rec, separators=(",", ":")).encode(), 6)
            chunks.append(struct.pack("<I", len(blob)) + blob)
            at += 4 + len(blob)
            offsets.append(at)
        data = b"".join(chunks)
        atomic_write_bytes(folder / layer_file(layer), data)
        index.append({"filename": layer_file(layer), "offsets": offsets})
        total += len(data)
    blob = gzip.compress(json.dumps(index, separators=(",", ":")).encode(), mtime=0)
    atomic_write_bytes(folder / INDEX_FILE, blob)
    return {"bytes": total + len(blob)}


def read_index(folder: Path) -> list[dict]:
    path = Path(folder) / INDEX_FILE
    try:
        index = json.loads(gzip.decompress(path.read_bytes()))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (expected feature pages written by clt-eval "
                                f"features.enabled=true)") from None
    except (OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: not a gzipped JSON feature index ({e})") from None
    if not isinstance(index, list) or not all(isinstance(e, dict) and "filename" in e and "offsets" in e
                                              for e in index):
        raise ValueError(f"{path}: expected a list of {{'filename', 'offsets'}} per layer")
    return index


def read_layer(folder: Path, layer: int, index: list[dict] | None = None) -> list[dict]:
    """Every record of one layer, read back by its offsets the way the frontend reads one (a length, then
    the compressed JSON)."""
    folder = Path(folder)
    entry = (index or read_index(folder))[layer]
    path = folder / entry["filename"]
    data = path.read_bytes()
    offsets = entry["offsets"]
    if offsets[-1] != len(data):
        raise ValueError(f"{path}: {len(data)} bytes but {INDEX_FILE} says {offsets[-1]} (a partial file?)")
    out = []
    for f, (a, b) in enumerate(zip(offsets, offsets[1:])):
        (n,) = struct.unpack("<I", data[a:a + 4])
        if a + 4 + n != b:
            raise ValueError(f"{path}: record {f} at byte {a} says {n} bytes, the index {b - a - 4}")
        out.append(json.loads(zlib.decompress(data[a + 4:b])))
    return out


def expand_json(folder: Path, dest: Path) -> int:
    """Per-feature <index>.json files in `dest` from the binary layout in `folder` (what circuit-tracer's
    local server serves for a graph whose scan is ./data/features/<name>). Returns the bytes written."""
    dest.mkdir(parents=True, exist_ok=True)
    index = read_index(folder)
    total = 0
    for layer in range(len(index)):
        for rec in read_layer(folder, layer, index):
            blob = json.dumps(rec, separators=(",", ":")).encode()
            (dest / f"{rec['index']}.json").write_bytes(blob)  # inside a staging folder, renamed whole
            total += len(blob)
    return total


def weights_fingerprint(meta: dict) -> str:
    """A short id of the weights a model.json describes (its shard hashes), recorded with the pages."""
    shards = (meta.get("weights") or {}).get("shards") or []
    return hashlib.sha256("".join(s.get("sha256", "") for s in shards).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------
# The whole pass, as clt-eval runs it


def _frequency_table(stats: FeatureStats, dense_threshold: float) -> tuple[list[dict], dict]:
    """Per layer: dead, dense, mean and median firing frequency; and the histogram of log10 frequency per
    layer (dead features counted apart) that metrics.json and the PNG show."""
    freq = stats.count.double() / max(stats.tokens, 1)
    edges = [round(-6 + 0.5 * i, 1) for i in range(13)]  # log10 frequency from 1e-6 to 1
    rows, counts = [], []
    for layer in range(stats.n_layers):
        f = freq[layer]
        live = f[f > 0]
        rows.append({"layer": layer, "dead": int((f == 0).sum()), "dense": int((f > dense_threshold).sum()),
                     "mean_frequency": float(f.mean()), "median_frequency": float(f.median())})
        h = torch.histogram(live.log10().clamp(edges[0], edges[-1]).float(),
                            torch.tensor(edges, dtype=torch.float32))[0] if len(live) else torch.zeros(12)
        counts.append([int(c) for c in h.tolist()])
    return rows, {"log10_edges": edges, "counts_per_layer": counts}


def build(clt: CLT, s_x: torch.Tensor, s_y: torch.Tensor, info, spec: str, settings, dense_threshold: float,
          folder: Path, transcoder_id: str, weights: str, device: str = "cpu", progress: bool = True,
          circuit_settings=None) -> dict:
    """The pass and the binary layout + summary.json in `folder`, for a CLT trained on dataset `info` (its
    layers, hooks and harvest text), base model `spec` (a load_lm spec); settings: config.FeatureSettings;
    weights: weights_fingerprint of its model.json. Returns the summary (also the block clt-eval records in
    metrics.json)."""
    from .capture import Capture, CaptureSpec
    from .lm import unembedding
    from .replacement import eval_token_batches, heldout_text

    t0 = time.monotonic()
    fs = settings
    cfg = clt.cfg
    x_source = "normalized" if str((info.hooks or {}).get("x", "")).endswith(":output") else "resid"
    cap = Capture(CaptureSpec(base_model=str(spec), model_dtype="fp32", seed=0,
                              layers=[info.layers[0], info.layers[-1]], x_source=x_source, dtype="bfloat16",
                              context=fs.context, bos="keep"), device)
    text, skip = heldout_text(info, fs.text, True)
    batches = eval_token_batches(cap.tok, text, fs.n_contexts, fs.context, fs.batch_size, "cpu",
                                 fs.skip_documents, skip)
    stats = FeatureStats(cfg.n_layers, cfg.n_features, fs.top_examples, fs.sampled_examples, fs.before, fs.after)
    cand = coact = None
    circuit_block: dict = {}
    if circuit_settings is not None and circuit_settings.enabled:
        if x_source != "resid":
            circuit_block = {"skipped": "virtual weights are defined here for encoders reading the residual stream "
                                        "(x_source=resid); this CLT reads the normalized MLP input"}
        else:
            t = time.monotonic()
            cand = circuits.candidates(clt, s_x, s_y, circuit_settings.candidates, progress)
            coact = circuits.Coactivation(cand)
            circuit_block = {"virtual_weight_seconds": round(time.monotonic() - t, 2),
                             "candidates": circuit_settings.candidates, "state_bytes": cand.nbytes() + coact.nbytes()}
    run = collect(clt, s_x, cap, batches, stats, cap.sep, progress, coact)
    W_U, norm_scale, norm_name = unembedding(cap.model)
    top, bottom = direct_logits(clt, s_y, W_U.to(clt.b_dec.device), norm_scale, fs.n_logits)
    tok = cap.tok
    del cap, W_U
    page = PageSettings(quantiles=fs.quantiles, histogram_bins=fs.histogram_bins, dense_threshold=dense_threshold,
                        transcoder_id=transcoder_id)
    text_of = TokenText(tok)
    folder.mkdir(parents=True, exist_ok=True)
    if coact is not None:
        era, twera = coact.era_twera()
        inverse = circuits.inverse_candidates(cand, era, twera)
        (folder / CIRCUITS_DIR).mkdir()
        circuit_block["table_dir"] = CIRCUITS_DIR

    def connections(layer: int) -> list[dict] | None:
        """The layer's connections for its records, its table written beside them (None without circuits)."""
        if coact is None:
            return None
        rows = circuits.layer_connections(cand, era, twera, layer, circuit_settings.show, inverse)
        table = [circuits.TABLE_HEADER] + circuits.table_rows(rows, layer)
        atomic_write_bytes(folder / CIRCUITS_DIR / f"layer_{layer}.tsv", ("\n".join(table) + "\n").encode())
        return rows
    layers = ((layer, layer_records(stats, layer, top, bottom, text_of, page, connections(layer)))
              for layer in range(cfg.n_layers))
    layers = tqdm(layers, total=cfg.n_layers, desc="feature records", unit="layer", disable=not progress)
    binary = write_binary(folder, layers)
    per_layer, freq_hist = _frequency_table(stats, dense_threshold)
    decoders = ("its one decoder (a per-layer transcoder)" if cfg.per_layer else
                "the sum of its decoder vectors over target layers l..N-1")
    summary = {
        "transcoder_id": transcoder_id, "kind": "PLT" if cfg.per_layer else "CLT", "weights": weights,
        "n_layers": cfg.n_layers, "n_features": cfg.n_features, "layers": list(info.layers),
        "model": str(spec), "tokens": run["tokens"], "contexts": run["contexts"],
        "pass_seconds": run["seconds"], "tokens_per_second": round(run["tokens"] / max(run["seconds"], 1e-9), 1),
        "seconds": round(time.monotonic() - t0, 2), "state_bytes": stats.state_bytes(),
        "binary_bytes": binary["bytes"], "dense_threshold": dense_threshold,
        "dead": int(sum(r["dead"] for r in per_layer)), "dense": int(sum(r["dense"] for r in per_layer)),
        "layer_table": per_layer, "frequency_histogram": freq_hist,
        "text": {"source": "builtin" if text is None else str(text), "skip_tokens": skip,
                 "skip_documents": fs.skip_documents,
                 "overlaps_training": bool((info.harvest or {}).get("text_exhausted")) and fs.text is None},
        "logits_note": f"direct effect: {decoders}, each target's output in the base model's units, through "
                       f"the final norm's scale ({norm_name or 'none found'}) and the unembedding",
        "settings": {k: getattr(fs, k) for k in ("n_contexts", "context", "top_examples", "sampled_examples",
                                                 "quantiles", "before", "after", "n_logits", "histogram_bins")},
    }
    if circuit_block:
        summary["circuits"] = circuit_block
    atomic_write_bytes(folder / SUMMARY_FILE, json.dumps(summary, indent=1).encode())
    return summary


def graph_top_features(graph_dir: Path, slugs: list[str], n: int = 25) -> list[dict]:
    """Per graph (circuit-tracer's pruned <slug>.json), its prompt, tokens and the n feature nodes with the
    most influence (the smallest cumulative influence share: circuit-tracer's `influence` of a node is the
    share of total influence held by it and every node more influential than it)."""
    out = []
    for slug in slugs:
        path = Path(graph_dir) / f"{slug}.json"
        g = json.loads(path.read_text())
        nodes = [nd for nd in g["nodes"] if nd.get("feature_type") == "cross layer transcoder"]
        nodes.sort(key=lambda nd: nd.get("influence") if nd.get("influence") is not None else math.inf)
        top = []
        for nd in nodes[:n]:
            layer, feature, _ = nd["node_id"].split("_")
            top.append({"layer": int(layer), "feature": int(feature), "ctx_idx": nd["ctx_idx"],
                        "influence": nd.get("influence"), "activation": nd.get("activation")})
        meta = g["metadata"]
        out.append({"slug": slug, "prompt": meta.get("prompt"), "prompt_tokens": meta.get("prompt_tokens"),
                    "top_features": top})
    return out


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def finish(stage: Path, summary: dict, graphs: dict | None, out_dir: Path, title: str, export_dir: Path | None,
           write_json: bool = True) -> dict:
    """Complete the pages `build` left in `stage` and put everything in place, each folder whole or not at all:
    the per-feature JSON beside the graphs (graphs: clt-eval's graphs block, when it wrote graphs), our browser,
    <out_dir>/features, and the binary layout in `export_dir`/features (the model's own export) so that an
    uploaded export serves its pages the way circuit-tracer's released transcoders do. Returns the block
    clt-eval records."""
    from cltrain.files import replace_dir

    from .feature_browser import write_browser

    block = dict(summary)
    index = read_index(stage)
    graph_pages = []
    g = graphs or {}
    if "graph_dir" in g and g.get("feature_scan"):
        graph_dir = Path(g["graph_dir"])
        rows = {r["slug"]: r for r in g.get("per_prompt", [])}
        graph_pages = graph_top_features(graph_dir, list(rows))
        for page in graph_pages:
            r = rows[page["slug"]]
            page.update(replacement_score=r["replacement_score"], completeness_score=r["completeness_score"])
        if write_json:  # where the graphs' scan points: ./data/features/<name> under --graph_file_dir
            dest = graph_dir / g["feature_scan"].removeprefix("./data/")
            tmp = dest.with_name(f".{dest.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            block["json_bytes"] = expand_json(stage, tmp)
            replace_dir(tmp, dest)
            block["json_dir"] = str(dest)
    meta = {"title": title, **{k: summary[k] for k in ("model", "kind", "n_layers", "n_features", "layers",
                                                        "tokens", "contexts", "dense_threshold", "logits_note")},
            "per_layer": summary["layer_table"], "graphs": graph_pages}
    write_browser(stage, meta, ((layer, read_layer(stage, layer, index)) for layer in range(len(index))))
    block["browser_bytes"] = _dir_bytes(stage) - summary["binary_bytes"] - (stage / SUMMARY_FILE).stat().st_size
    folder = Path(out_dir) / "features"
    replace_dir(stage, folder)
    block["dir"] = str(folder)
    block["browser"] = str(folder / "index.html")
    if export_dir is not None and Path(export_dir).is_dir():
        block["export_features"] = str(copy_binary(folder, Path(export_dir) / "features"))
    return block


def check_pages(folder: Path, meta: dict, source: str) -> dict:
    """The summary of the pages in `folder` after checking they were made from the weights model.json `meta`
    describes (source names it); ValueError naming the file and key where not."""
    path = Path(folder) / SUMMARY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected the features folder clt-eval writes with "
                                f"features.enabled=true, e.g. <model>/eval/features)")
    try:
        summary = json.loads(path.read_text())
        made_from = summary["weights"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a feature-pages summary ({e})") from None
    if made_from != weights_fingerprint(meta):
        raise ValueError(f"{path}: key 'weights' = {made_from!r} but {source} has weights "
                         f"{weights_fingerprint(meta)!r}: these pages describe another model's features")
    read_index(folder)
    return summary


def copy_binary(folder: Path, dest: Path) -> Path:
    """The binary layout (index, layer files, summary) of `folder` copied to `dest`, which appears whole."""
    from cltrain.files import replace_dir

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        for name in [INDEX_FILE, SUMMARY_FILE] + [e["filename"] for e in read_index(folder)]:
            shutil.copyfile(Path(folder) / name, tmp / name)
        replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
