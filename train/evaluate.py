"""clt-eval: how well a trained CLT reconstructs, how sparse it is, and how well it replaces the MLPs.

Two parts, both written to <out_dir>/metrics.json, PNG plots, and W&B (DESIGN section 6):

1. On held-out activation shards (normalized, as trained; every metric here is scale-free):
   - NMSE_l = E||y_hat_l - y_l||^2 / E||y_l - mean(y_l)||^2 and explained variance 1 - NMSE_l, per layer;
   - L0 per layer (active features per token);
   - dead features (never fired on the evaluated tokens) and dense ones (fired on more than
     `dense_threshold` of them, 10% by default: such features act like biases, not dictionary entries);
   - the feature-density histogram (log10 of each feature's firing rate).

2. The replacement model, on text run through the base model (CLT layers only: a CLT covering part of
   the model replaces only those MLPs):
   - mode (a) "clean inputs": every covered MLP output is replaced by the CLT's reconstruction computed
     from the *original* model's residual stream (recorded in a clean run), so CLT errors never reach
     the CLT's own inputs;
   - mode (b) "full replacement" (the paper's replacement model and headline number): every covered MLP
     is replaced and the CLT reads the *replacement* model's own residual stream, so errors compound.
   For each mode: top-1 next-token agreement with the original model, KL(original || replaced) per token,
   and the CE loss with CE-loss recovered = (CE_ablate - CE_replaced) / (CE_ablate - CE_original), where
   CE_ablate zero-ablates the same MLPs.
"""
from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as Fn
from tqdm.auto import tqdm

from .clt import CLT
from .config import CONFIG_DIR, ConfigError
from .export import dataset_scales, resolve_model_dir
from .model_io import META, atomic_write_bytes, load_clt

log = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1  # a feature firing on more than this fraction of tokens counts as dense
METRICS_FILE = "metrics.json"
PLOTS = ("nmse_per_layer.png", "l0_per_layer.png", "feature_density.png")


# ----------------------------------------------------------------------------------------------------
# Inputs: the model and a dataset that matches it


def check_dataset_matches_model(info, meta: dict, source: str):
    """Raise ConfigError naming dataset.json and the key where it differs from what the CLT was trained on."""
    ds = meta.get("dataset") or {}
    for key in ("model", "layers", "d_model"):
        want, found = ds.get(key), getattr(info, key)
        if want is not None and want != found:
            raise ConfigError(f"{info.json_path}: key '{key}' = {found!r} but {source} was trained on "
                              f"dataset.{key} = {want!r} (a checkpoint from another dataset?)")
    for key in ("scale_x", "scale_y"):
        want, found = ds.get(key), getattr(info, key)
        if want is not None and (len(want) != len(found) or not all(
                math.isclose(a, b, rel_tol=1e-4) for a, b in zip(want, found))):
            raise ConfigError(f"{info.json_path}: key '{key}' differs from {source}'s dataset.{key} "
                              f"(activations from another harvest?)")


# ----------------------------------------------------------------------------------------------------
# Part 1: reconstruction and sparsity on held-out shards


@torch.no_grad()
def shard_metrics(clt: CLT, batches: Iterable, max_tokens: int | None = None,
                  dense_threshold: float = DENSE_THRESHOLD, progress: bool = True) -> dict:
    """Accumulate NMSE, explained variance, L0 and firing counts over batches with .x, .y [B, N, D]
    (normalized). Returns the metrics plus "density" [N, F] (firing rate per feature, a tensor)."""
    N, F, D = clt.cfg.n_layers, clt.cfg.n_features, clt.cfg.d_model
    dev = clt.b_dec.device
    sse = torch.zeros(N, dtype=torch.float64, device=dev)
    sum_y = torch.zeros(N, D, dtype=torch.float64, device=dev)
    sum_y2 = torch.zeros(N, dtype=torch.float64, device=dev)
    fired = torch.zeros(N, F, dtype=torch.float64, device=dev)
    n = 0
    bar = tqdm(total=max_tokens, unit="tok", desc="eval shards", disable=not progress)
    for batch in batches:
        x, y = batch.x.to(dev), batch.y.to(dev)
        if max_tokens is not None:
            x, y = x[: max_tokens - n], y[: max_tokens - n]
        if x.shape[0] == 0:
            break
        enc, y_hat = clt(x)
        sse += (y_hat - y).double().pow(2).sum(-1).sum(0)
        sum_y += y.double().sum(0)
        sum_y2 += y.double().pow(2).sum(-1).sum(0)
        fired += (enc.acts != 0).sum(0).double()
        n += x.shape[0]
        bar.update(x.shape[0])
        if max_tokens is not None and n >= max_tokens:
            break
    bar.close()
    if n == 0:
        raise ValueError("no evaluation tokens: the held-out split is empty")
    var = (sum_y2 / n - (sum_y / n).pow(2).sum(-1)).clamp_min(1e-12)  # E||y - mean(y)||^2
    nmse = (sse / n) / var
    density = fired / n
    l0 = fired.sum(-1) / n
    dead = int((fired == 0).sum())
    dense = int((density > dense_threshold).sum())
    return {
        "tokens": n,
        "nmse": {"per_layer": nmse.tolist(), "mean": float(nmse.mean())},
        "explained_variance": {"per_layer": (1 - nmse).tolist(), "mean": float((1 - nmse).mean())},
        "l0": {"per_layer": l0.tolist(), "total": float(l0.sum()), "mean": float(l0.mean())},
        "features": {"total": N * F, "dead_count": dead, "dead_fraction": dead / (N * F),
                     "dense_count": dense, "dense_fraction": dense / (N * F),
                     "dense_threshold": dense_threshold,
                     "dead_per_layer": (fired == 0).sum(-1).tolist(),
                     "dense_per_layer": (density > dense_threshold).sum(-1).tolist()},
        "density": density.cpu(),
    }


# ----------------------------------------------------------------------------------------------------
# Part 2: the replacement model


@torch.no_grad()
def encode_layer(clt: CLT, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Activations [B, F] of one source layer from normalized x [B, D]: CLT.encode restricted to one
    layer (every activation rule acts per layer, so layers can be encoded as the forward pass reaches them)."""
    cfg = clt.cfg
    pre = x @ clt.W_enc[layer].T + clt.b_enc[layer]
    if cfg.activation == "jumprelu":
        return pre * (pre > clt.log_threshold[layer].exp())
    if cfg.activation == "topk":
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, pre.topk(cfg.topk, dim=-1).indices, True)
    else:  # batchtopk: the B*k largest pre-activations of the layer over the batch
        flat = pre.reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(min(cfg.topk * pre.shape[0], flat.numel())).indices] = True
        keep = keep.view_as(pre)
    return Fn.relu(pre) * keep


class CLTReplacement:
    """Replacement MLP outputs, layer by layer, in raw space: y_raw_hat_t = CLT(s_x x_raw)_t / s_y[t].

    Called as (t, x_raw_t) for t = 0..N-1 in order within one forward pass: layer t's features are
    encoded when its input arrives, and its output sums the decoders of every source s <= t so far.
    `reset()` before each forward pass."""

    def __init__(self, clt: CLT, s_x: torch.Tensor, s_y: torch.Tensor):
        self.clt = clt
        dev = clt.b_dec.device
        self.s_x, self.s_y = s_x.float().to(dev), s_y.float().to(dev)  # [N, 1] or [N, D]
        self.acts: dict[int, torch.Tensor] = {}

    def reset(self):
        self.acts = {}

    @torch.no_grad()
    def __call__(self, t: int, x_raw: torch.Tensor) -> torch.Tensor:
        clt = self.clt
        shape, D = x_raw.shape, x_raw.shape[-1]
        x = x_raw.reshape(-1, D).float() * self.s_x[t]
        self.acts[t] = encode_layer(clt, x, t)
        y = clt.b_dec[t].expand(x.shape[0], D).clone()
        for s in range(t + 1):
            w = clt.W_dec[s]  # [F, S_s, D]
            if t - s < w.shape[1]:
                y += self.acts[s] @ w[:, t - s]
        return (y / self.s_y[t]).reshape(shape).to(x_raw.dtype)


ReplaceFn = Callable[[int, torch.Tensor], torch.Tensor]  # (CLT layer index, live x) -> MLP output


def _first_tensor(args, kwargs):
    if args:
        return args[0]
    for v in kwargs.values():
        if torch.is_tensor(v):
            return v
    raise ValueError("MLP input module called without a tensor input")


def run_lm(lm, input_ids: torch.Tensor, sites: list, replace: ReplaceFn | None = None,
           capture: bool = False, x_from_output: bool = False, keep: torch.Tensor | None = None):
    """One forward pass of the base model with hooks on the CLT's MLP sites (sites[i] is CLT layer i).

    Each site's x is read at its input module (the residual stream entering the MLP's norm; its output
    when x_from_output, for datasets harvested at the normalized MLP input); with `replace`, the output
    module's result is replaced by replace(i, x), except at positions where `keep` [B, T] is true, which
    keep the model's own MLP output. Returns logits [B, T, V], and with `capture` the clean per-site
    x and y (lists of [B, T, D])."""
    xs: dict[int, torch.Tensor] = {}
    ys: dict[int, torch.Tensor] = {}
    handles = []

    def read_x(i):
        if x_from_output:
            def hook(module, args, output):
                xs[i] = output[0] if isinstance(output, tuple) else output
            return hook

        def pre_hook(module, args, kwargs):
            xs[i] = _first_tensor(args, kwargs)
        return pre_hook

    def write_y(i):
        def hook(module, args, output):
            y = output[0] if isinstance(output, tuple) else output
            if capture:
                ys[i] = y
            if replace is None:
                return None
            new = replace(i, xs[i]).to(y.dtype).view_as(y)
            if keep is not None:
                new = torch.where(keep[..., None], y, new)
            return (new, *output[1:]) if isinstance(output, tuple) else new
        return hook

    try:
        for i, site in enumerate(sites):
            if x_from_output:
                handles.append(site.input_module.register_forward_hook(read_x(i)))
            else:
                handles.append(site.input_module.register_forward_pre_hook(read_x(i), with_kwargs=True))
            handles.append(site.output_module.register_forward_hook(write_y(i)))
        out = lm(input_ids)
    finally:
        for h in handles:
            h.remove()
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if capture:
        return logits, [xs[i] for i in range(len(sites))], [ys[i] for i in range(len(sites))]
    return logits


@dataclass
class _LogitStats:
    """Sums over predicted positions: all but the last of each sequence, less those in `skip`."""
    tokens: int = 0
    agree: float = 0.0
    kl: float = 0.0
    ce: float = 0.0

    def add(self, logits_orig, logits, input_ids, skip=None):
        use = torch.ones_like(input_ids[:, :-1], dtype=torch.bool) if skip is None else ~skip[:, :-1]
        lo = logits_orig[:, :-1][use].float()
        lr = logits[:, :-1][use].float()
        targets = input_ids[:, 1:][use]
        logp_o, logp_r = lo.log_softmax(-1), lr.log_softmax(-1)
        self.tokens += targets.numel()
        self.agree += float((lo.argmax(-1) == lr.argmax(-1)).sum())
        self.kl += float((logp_o.exp() * (logp_o - logp_r)).sum())
        self.ce += float(Fn.nll_loss(logp_r, targets, reduction="sum"))

    def mean(self) -> dict:
        n = max(self.tokens, 1)
        return {"top1_agreement": self.agree / n, "kl": self.kl / n, "ce": self.ce / n}


@torch.no_grad()
def replacement_metrics(lm, sites: list, token_batches: Iterable[torch.Tensor],
                        replacer: CLTReplacement | None, oracle: bool = False,
                        x_from_output: bool = False, keep_token: int | None = None,
                        progress: bool = True) -> dict:
    """Top-1 agreement, KL and CE of modes (a) and (b) against the original model, on batches of token
    ids [B, T]. `oracle=True` replaces each MLP with its own recorded clean output instead of the CLT
    (through the same hooks; a check of this code path: agreement 1, KL 0, CE recovered 1).

    keep_token (the BOS/separator id): its positions keep the model's own MLP outputs (in the zero
    ablation too) and are left out of the metrics -- a harvest with bos=drop never showed them to the CLT
    (their activations are outliers), and circuit-tracer likewise leaves position 0 to the error nodes."""
    orig, ablate, mode_a, mode_b = _LogitStats(), _LogitStats(), _LogitStats(), _LogitStats()
    for ids in tqdm(list(token_batches), desc="replacement model", unit="batch", disable=not progress):
        keep = None if keep_token is None else ids == keep_token
        kw = dict(x_from_output=x_from_output, keep=keep)
        logits_o, clean_x, clean_y = run_lm(lm, ids, sites, capture=True, x_from_output=x_from_output)
        orig.add(logits_o, logits_o, ids, keep)
        ablate.add(logits_o, run_lm(lm, ids, sites, lambda i, x: torch.zeros_like(x), **kw), ids, keep)
        if oracle:
            def mode_a_fn(i, x):
                return clean_y[i]
            mode_b_fn = mode_a_fn
        else:
            def mode_a_fn(i, x):
                return replacer(i, clean_x[i])

            def mode_b_fn(i, x):
                return replacer(i, x)
        for stats, fn in ((mode_a, mode_a_fn), (mode_b, mode_b_fn)):
            if replacer is not None:
                replacer.reset()
            stats.add(logits_o, run_lm(lm, ids, sites, fn, **kw), ids, keep)
    ce_o, ce_z = orig.mean()["ce"], ablate.mean()["ce"]

    def report(stats, what):
        m = stats.mean()
        gap = ce_z - ce_o
        m["ce_recovered"] = (ce_z - m["ce"]) / gap if abs(gap) > 1e-12 else None  # undefined
        m["description"] = what
        return m

    return {
        "tokens": orig.tokens,
        "ce_original": ce_o,
        "ce_zero_ablation": ce_z,
        "zero_ablation": {k: v for k, v in ablate.mean().items() if k != "ce"},
        "mode_a": report(mode_a, "each MLP output replaced by the CLT's reconstruction from the original "
                                 "model's residual stream (no compounding)"),
        "mode_b": report(mode_b, "full replacement model: the CLT reads the replacement model's own "
                                 "residual stream, errors compound (the paper's headline metric)"),
    }


def eval_token_batches(tokenizer, text: str | os.PathLike | None, n_sequences: int, seq_len: int,
                       batch_size: int, device="cpu", skip_documents: int = 0,
                       skip_tokens: int = 0) -> list[torch.Tensor]:
    """Token-id batches [B, seq_len]: documents of a text source (train/text.py: a .txt/.jsonl file or
    folder, 'builtin', 'hf:NAME'; None = 'builtin') joined into one stream, each document preceded by
    BOS (as clt-harvest builds it), less its first `skip_documents` documents and then its first
    `skip_tokens` tokens; every sequence starts with BOS followed by the next seq_len - 1 tokens."""
    from .text import documents

    source = "builtin" if text is None else str(text)
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        bos = getattr(tokenizer, "eos_token_id", None)
    body = seq_len - (bos is not None)
    need = n_sequences * body + skip_tokens
    stream: list[int] = []
    for k, doc in enumerate(documents(source)):
        if k < skip_documents:
            continue
        stream.extend(([bos] if bos is not None else []) + tokenizer.encode(doc, add_special_tokens=False))
        if len(stream) >= need:
            break
    stream = stream[skip_tokens:]
    n = min(len(stream) // body, n_sequences)
    if n == 0:
        raise ValueError(f"text source {source!r} has {len(stream)} tokens after skipping {skip_tokens}, "
                         f"fewer than one sequence of {seq_len} (config keys replacement.text / "
                         f"replacement.seq_len / replacement.skip_harvested)")
    seqs = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos is not None:
        seqs = torch.cat([torch.full((n, 1), bos, dtype=torch.long), seqs], 1)
    return list(seqs.to(device).split(batch_size))


# ----------------------------------------------------------------------------------------------------
# Output: plots, metrics.json, W&B


def _save_figure(fig, path: Path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise OSError(e.errno, f"{path}: write failed ({e.strerror or e})") from e


def write_plots(metrics: dict, density: torch.Tensor, out_dir: Path, title: str = "") -> list[Path]:
    """NMSE per layer, L0 per layer, and the log10 feature-density histogram, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = metrics["layers"]
    paths = []
    for name, key, ylabel in (("nmse_per_layer.png", "nmse", "NMSE (held-out)"),
                              ("l0_per_layer.png", "l0", "L0 (active features / token)")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(layers)), metrics[key]["per_layer"], color="tab:blue")
        ax.set_xticks(range(len(layers)), [str(l) for l in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} {key.upper()} per layer (mean {metrics[key]['mean']:.4g})".strip())
        paths.append(out_dir / name)
        _save_figure(fig, paths[-1])
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rate = density.flatten().double()
    alive = rate[rate > 0]
    n_tok = metrics["tokens"]
    if alive.numel():
        lo = math.floor(math.log10(1 / n_tok))
        ax.hist(alive.log10().numpy(), bins=50, range=(lo, 0), color="tab:blue")
    dead, dense = metrics["features"]["dead_count"], metrics["features"]["dense_count"]
    ax.axvline(math.log10(metrics["features"]["dense_threshold"]), color="tab:red", ls="--",
               label=f"dense > {metrics['features']['dense_threshold']:g} ({dense})")
    ax.set_xlabel("log10 firing rate")
    ax.set_ylabel("features")
    ax.set_title(f"{title} feature density ({dead} dead of {rate.numel()}, {n_tok} tokens)".strip())
    ax.legend()
    paths.append(out_dir / "feature_density.png")
    _save_figure(fig, paths[-1])
    plt.close(fig)
    return paths


def plot_frontier(sources: Iterable[str | os.PathLike], out_path: str | os.PathLike) -> Path:
    """The L0-vs-NMSE frontier of several evaluations (a sweep over dictionary sizes), CLT against PLT:
    one point per metrics.json (a file, or a folder holding one), x = total L0 per token, y = mean NMSE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {False: [], True: []}
    for src in sources:
        path = Path(src)
        path = path / METRICS_FILE if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not found (expected a metrics.json written by clt-eval)")
        try:
            m = json.loads(path.read_text())
            points[bool(m["per_layer"])].append((m["l0"]["total"], m["nmse"]["mean"], m["n_features"]))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a clt-eval metrics.json ({e})") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for per_layer, style in ((False, "o-"), (True, "s--")):
        pts = sorted(points[per_layer])
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label="PLT" if per_layer else "CLT")
        for l0, nmse, n_features in pts:
            ax.annotate(f"F={n_features}", (l0, nmse), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token, all layers)")
    ax.set_ylabel("NMSE (mean over layers, held-out)")
    ax.set_title("L0 vs NMSE frontier")
    ax.legend()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, out_path)
    plt.close(fig)
    return out_path


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


def log_wandb(logger_cfg, metrics: dict, plots: list[Path], out_dir: Path, config: dict | None = None):
    if logger_cfg is None or logger_cfg.get("mode", "disabled") == "disabled":
        return
    import wandb

    run = wandb.init(project=logger_cfg.get("project"), entity=logger_cfg.get("entity"),
                     name=logger_cfg.get("run_name"), group=logger_cfg.get("group"),
                     tags=list(logger_cfg.get("tags") or []), mode=logger_cfg.mode, dir=str(out_dir),
                     job_type="eval", config=config,
                     settings=wandb.Settings(quiet=True, console="off", x_disable_stats=True))
    try:
        values = flat_metrics(metrics)
        run.log({**values, **{f"eval/plots/{p.stem}": wandb.Image(str(p)) for p in plots}})
        run.summary.update(values)
    finally:
        run.finish()


# ----------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(model_dir: str | os.PathLike, *, dataset: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, split: str = "heldout", heldout_shards: int = 1,
             max_tokens: int | None = 65536, batch_tokens: int = 4096,
             dense_threshold: float = DENSE_THRESHOLD, replacement: bool = True, lm: str | None = None,
             text: str | os.PathLike | None = None, skip_documents: int = 0, n_sequences: int = 32,
             seq_len: int = 128, lm_batch: int = 8, skip_bos: bool = True, skip_harvested: bool = True,
             device: str = "auto",
             logger_cfg=None, write: bool = True, progress: bool = True) -> dict:
    """Evaluate the CLT in model_dir; returns the metrics dict (also written to out_dir/metrics.json,
    default <model_dir>/eval, with the PNG plots, unless write=False).

    dataset: the activation dataset (default: dataset.path recorded in model.json); evaluated on its
      last `heldout_shards` shards (split="heldout") or all of them (split="all"), up to max_tokens.
    replacement: also run the replacement model on `lm` (default: the dataset's base model, via
      train/lm.py's load_lm) over n_sequences x seq_len tokens of `text` (default: the harvest's text
      source) after its first `skip_documents` documents and, with skip_harvested and the harvest's text
      source, after the tokens the harvest fed the model (see eval_token_batches); with skip_bos,
      BOS/separator positions keep the original MLP outputs and are not scored (see replacement_metrics).
    """
    from .data import ActivationLoader, DatasetInfo

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = resolve_model_dir(model_dir)
    source = str(model_dir / META)
    clt, meta = load_clt(model_dir, map_location=device)
    cfg = clt.cfg
    s_x, s_y = dataset_scales(meta, cfg.n_layers, cfg.d_model, source)
    ds_meta = meta["dataset"]
    dataset = dataset if dataset is not None else ds_meta.get("path")
    if dataset is None:
        raise ConfigError(f"config key 'dataset' = None and {source} records no dataset.path: expected "
                          f"the activation dataset folder to evaluate on")
    info = DatasetInfo.load(dataset)
    check_dataset_matches_model(info, meta, source)
    if info.n_layers != cfg.n_layers or info.d_model != cfg.d_model:
        raise ConfigError(f"{info.json_path}: n_layers={info.n_layers}, d_model={info.d_model} but {source} "
                          f"has a CLT with n_layers={cfg.n_layers}, d_model={cfg.d_model}")
    out_dir = Path(out_dir) if out_dir is not None else model_dir / "eval"

    loader = ActivationLoader(info, batch_tokens, split=split, heldout_shards=heldout_shards,
                              epochs=1, device=device)
    m = shard_metrics(clt, loader, max_tokens, dense_threshold, progress)
    density = m.pop("density")
    metrics = {"model_dir": str(model_dir), "dataset": str(info.path), "split": split,
               "layers": list(info.layers), "n_features": cfg.n_features,
               "activation": cfg.activation, "per_layer": cfg.per_layer, **m}

    if replacement:
        spec = lm or ds_meta.get("model") or info.model
        if str(spec).startswith("synthetic"):
            log.warning("replacement model skipped: the dataset %s has no base model (%s)", info.path, spec)
            metrics["replacement"] = {"skipped": f"no base model for dataset model {spec!r}"}
        else:
            metrics["replacement"] = _replacement_for(clt, s_x, s_y, info, spec, text, skip_documents,
                                                      skip_harvested, n_sequences, seq_len, lm_batch,
                                                      skip_bos, device, progress)

    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = write_plots(metrics, density, out_dir)
        try:
            atomic_write_bytes(out_dir / METRICS_FILE, json.dumps(metrics, indent=2).encode())
        except OSError as e:
            raise OSError(e.errno, f"{out_dir / METRICS_FILE}: write failed ({e.strerror or e})") from e
        log_wandb(logger_cfg, metrics, plots, out_dir, config={
            k: metrics[k] for k in ("model_dir", "dataset", "split", "layers", "n_features", "activation",
                                    "per_layer", "tokens")})
    _print_summary(metrics)
    return metrics


def _replacement_for(clt, s_x, s_y, info, spec, text, skip_documents, skip_harvested, n_sequences,
                     seq_len, lm_batch, skip_bos, device, progress):
    from .lm import load_lm, mlp_sites

    model, tokenizer = load_lm(spec, dtype=torch.float32, device=device)
    all_sites = {site.layer: site for site in mlp_sites(model)}
    missing = [l for l in info.layers if l not in all_sites]
    if missing:
        raise ConfigError(f"{info.json_path}: key 'layers' = {info.layers} but model {spec!r} has MLP "
                          f"layers {sorted(all_sites)}")
    sites = [all_sites[l] for l in info.layers]
    x_from_output = str((info.hooks or {}).get("x", "")).endswith(":output")
    # Held-out text: the harvest consumed a prefix of its text source's token stream (tokens_fed over
    # all ranks); start after it when reading the same source, unless the harvest exhausted it.
    harvested = info.harvest or {}
    text = text if text is not None else harvested.get("text.source")
    skip_tokens = 0
    if skip_harvested and text is not None and str(text) == harvested.get("text.source") and \
            not harvested.get("text_exhausted"):
        skip_tokens = int(harvested.get("tokens_fed", 0))
    batches = eval_token_batches(tokenizer, text, n_sequences, seq_len, lm_batch, device, skip_documents,
                                 skip_tokens)
    sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    out = replacement_metrics(model, sites, batches, CLTReplacement(clt, s_x, s_y),
                              x_from_output=x_from_output, keep_token=sep if skip_bos else None,
                              progress=progress)
    out["bos_positions"] = "kept original, not scored" if skip_bos and sep is not None else "replaced, scored"
    out["model"] = str(spec)
    out["text"] = {"source": "builtin" if text is None else str(text), "skip_documents": skip_documents,
                   "skip_tokens": skip_tokens}
    out["replaced_layers"] = list(info.layers)
    return out


def _print_summary(metrics: dict):
    lines = [f"clt-eval on {metrics['tokens']} tokens: NMSE mean {metrics['nmse']['mean']:.4f} "
             f"(per layer {' '.join(f'{v:.3f}' for v in metrics['nmse']['per_layer'])}), "
             f"L0 total {metrics['l0']['total']:.1f}, dead {metrics['features']['dead_fraction']:.2%}, "
             f"dense {metrics['features']['dense_fraction']:.2%}"]
    rep = metrics.get("replacement") or {}
    for mode in ("mode_a", "mode_b"):
        if mode in rep:
            r = rep[mode]
            lines.append(f"  replacement {mode}: top-1 agreement {r['top1_agreement']:.3f}, KL {r['kl']:.4f}, "
                         f"CE {r['ce']:.3f} (original {rep['ce_original']:.3f}, zero-ablation "
                         f"{rep['ce_zero_ablation']:.3f}), CE recovered "
                         + ("n/a" if r["ce_recovered"] is None else f"{r['ce_recovered']:.3f}"))
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------------
# Console script


def _validate(cfg):
    from .config import require_choice, require_number, require_positive_int

    if not cfg.get("model_dir"):
        raise ConfigError("config key 'model_dir' = None: expected the folder of a trained CLT "
                          "(model.safetensors + model.json) or a clt-train run folder, e.g. clt-eval model_dir=runs/clt")
    require_choice(cfg, "split", ("heldout", "all"))
    require_positive_int(cfg, "heldout_shards")
    require_positive_int(cfg, "max_tokens", allow_none=True)
    require_positive_int(cfg, "batch_tokens")
    require_number(cfg, "dense_threshold", lo=0, hi=1, lo_open=True)
    require_choice(cfg, "device", ("auto", "cpu", "cuda"))
    for key in ("n_sequences", "seq_len", "batch_size"):
        require_positive_int(cfg, f"replacement.{key}")
    skip = cfg.replacement.get("skip_documents", 0)
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ConfigError(f"config key 'replacement.skip_documents' = {skip!r}: expected an integer >= 0")
    require_choice(cfg, "logger.mode", ("offline", "online", "disabled"))


def run(cfg) -> dict:
    """clt-eval with a composed config (configs/eval.yaml). With `frontier` (a list of metrics.json files
    or eval folders) it also writes frontier.png; with frontier and no model_dir it only plots."""
    frontier = list(cfg.get("frontier") or [])
    if frontier and not cfg.get("model_dir"):
        if not cfg.get("out_dir"):
            raise ConfigError("config key 'out_dir' = None: expected where to write frontier.png")
        return {"frontier": str(plot_frontier(frontier, Path(cfg.out_dir) / "frontier.png"))}
    _validate(cfg)
    metrics = _evaluate_from_config(cfg)
    if frontier:
        out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else resolve_model_dir(cfg.model_dir) / "eval"
        metrics["frontier"] = str(plot_frontier(frontier + [out_dir], out_dir / "frontier.png"))
    return metrics


def _evaluate_from_config(cfg) -> dict:
    r = cfg.replacement
    return evaluate(cfg.model_dir, dataset=cfg.get("dataset"), out_dir=cfg.get("out_dir"), split=cfg.split,
                    heldout_shards=int(cfg.heldout_shards), max_tokens=cfg.get("max_tokens"),
                    batch_tokens=int(cfg.batch_tokens), dense_threshold=float(cfg.dense_threshold),
                    replacement=bool(r.enabled), lm=r.get("model"), text=r.get("text"),
                    skip_documents=int(r.get("skip_documents", 0)),
                    n_sequences=int(r.n_sequences), seq_len=int(r.seq_len), lm_batch=int(r.batch_size),
                    skip_bos=bool(r.get("skip_bos", True)), skip_harvested=bool(r.get("skip_harvested", True)),
                    device=cfg.device, logger_cfg=cfg.logger, progress=bool(cfg.get("progress", True)))


def _main(cfg):
    try:
        run(cfg)
    except (ConfigError, FileNotFoundError, ValueError, OSError) as e:
        raise SystemExit(f"clt-eval: {e}") from None


def main():
    import hydra

    return hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
