"""The replacement model: a base language model whose MLPs are replaced by a trained CLT's reconstruction.

Measured on text run through the base model (CLT layers only: a CLT covering part of the model
replaces only those MLPs):
- mode (a) "clean inputs": every covered MLP output is replaced by the CLT's reconstruction computed
  from the *original* model's residual stream (recorded in a clean run), so CLT errors never reach
  the CLT's own inputs;
- mode (b) "full replacement" (the paper's replacement model and headline number): every covered MLP
  is replaced and the CLT reads the *replacement* model's own residual stream, so errors compound.
For each mode: top-1 next-token agreement with the original model, KL(original || replaced) per token,
and the CE loss with CE-loss recovered = (CE_ablate - CE_replaced) / (CE_ablate - CE_original), where
CE_ablate zero-ablates the same MLPs.

The CLT's activation rules are the CLT module's own inference rules (clt.inference_encode_layer: a
BatchTopK CLT runs with its running threshold, as exported); the MLP hooks are train/lm.py's.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from tqdm.auto import tqdm

from .clt import CLT, inference_encode_layer
from cltrain.errors import ConfigError
from .lm import hook_mlp_sites, load_lm, mlp_sites


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
        self.acts[t] = inference_encode_layer(clt, x, t)
        y = clt.b_dec[t].expand(x.shape[0], D).clone()
        for s in range(t + 1):
            w = clt.W_dec[s]  # [F, S_s, D]
            if t - s < w.shape[1]:
                y += self.acts[s] @ w[:, t - s]
        return (y / self.s_y[t]).reshape(shape).to(x_raw.dtype)


ReplaceFn = Callable[[int, torch.Tensor], torch.Tensor]  # (CLT layer index, live x) -> MLP output


def run_lm(lm, input_ids: torch.Tensor, sites: list, replace: ReplaceFn | None = None,
           capture: bool = False, x_from_output: bool = False, keep: torch.Tensor | None = None):
    """One forward pass of the base model with hooks on the CLT's MLP sites (sites[i] is CLT layer i).

    Each site's x is read as train/lm.py's hook_mlp_sites reads it (the residual stream entering the
    MLP's norm; the norm's output when x_from_output, for datasets harvested at the normalized MLP
    input); with `replace`, the MLP output is replaced by replace(i, x), except at positions where
    `keep` [B, T] is true, which keep the model's own MLP output. Returns logits [B, T, V], and with
    `capture` the clean per-site x and y (lists of [B, T, D])."""
    xs: dict[int, torch.Tensor] = {}
    ys: dict[int, torch.Tensor] = {}

    def on_y(i, y):
        if capture:
            ys[i] = y
        if replace is None:
            return None
        new = replace(i, xs[i]).to(y.dtype).view_as(y)
        return torch.where(keep[..., None], y, new) if keep is not None else new

    with hook_mlp_sites(sites, xs.__setitem__, on_y, x_from_output=x_from_output):
        out = lm(input_ids)
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


def heldout_text(info, text: str | os.PathLike | None, skip_harvested: bool) -> tuple[str | None, int]:
    """(text source, tokens to skip) for held-out text: the harvest consumed a prefix of its text
    source's token stream (tokens_fed over all ranks); start after it when reading the same source,
    unless the harvest exhausted it. text=None means the harvest's own source."""
    harvested = info.harvest or {}
    text = text if text is not None else harvested.get("text.source")
    skip_tokens = 0
    if skip_harvested and text is not None and str(text) == harvested.get("text.source") and \
            not harvested.get("text_exhausted"):
        skip_tokens = int(harvested.get("tokens_fed", 0))
    return text, skip_tokens


def replacement_for(clt: CLT, s_x, s_y, info, spec, text, skip_documents, skip_harvested, n_sequences,
                    seq_len, lm_batch, skip_bos, device, progress) -> dict:
    """replacement_metrics for a CLT trained on dataset `info`, on base model `spec` (a load_lm spec)
    over held-out text (see heldout_text and eval_token_batches); the dict clt-eval records."""
    model, tokenizer = load_lm(spec, dtype=torch.float32, device=device)
    all_sites = {site.layer: site for site in mlp_sites(model)}
    missing = [l for l in info.layers if l not in all_sites]
    if missing:
        raise ConfigError(f"{info.json_path}: key 'layers' = {info.layers} but model {spec!r} has MLP "
                          f"layers {sorted(all_sites)}")
    sites = [all_sites[l] for l in info.layers]
    x_from_output = str((info.hooks or {}).get("x", "")).endswith(":output")
    text, skip_tokens = heldout_text(info, text, skip_harvested)
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
