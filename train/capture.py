"""Forward and capture: a language model run over text in fixed-length contexts, with its MLP sites' inputs
and outputs (x_l, y_l) captured as rows of activations. Shared by clt-harvest (train/harvest.py, which
writes them as shards) and the live data source (train/live.py, which trains on them as they come), so both
read the same hook sites, context windows and BOS handling (docs/design.md sections 1 and 2)."""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

import torch

from cltrain.errors import ConfigError

from .data import DTYPES, all_finite
from .lm import hook_mlp_sites, hook_names, load_lm, mlp_sites


@dataclass(frozen=True)
class CaptureSpec:
    """What decides the captured rows: the model (and the seed of a tiny random one), the sites, the
    context length, BOS handling and the storage dtype. Made from clt-harvest's settings or from a live
    run's (config.HarvestSettings, config.LiveSettings), which name these keys alike."""
    base_model: str
    model_dtype: str
    seed: int
    layers: list | None
    x_source: str
    dtype: str
    context: int
    bos: str

    @classmethod
    def of(cls, settings, seed: int | None = None) -> "CaptureSpec":
        values = {f.name: getattr(settings, f.name) for f in fields(cls) if f.name != "seed"}
        return cls(seed=settings.seed if seed is None else seed, **values)


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


class _StopForward(Exception):
    """Raised by the last captured layer's hook: the rest of the model (and the LM head) is not needed."""


@dataclass
class Rows:
    """One forward pass's captured tokens, one row each: data holds x and y [n, layers, D] in the storage
    dtype, ids, doc, ctx, pos [n] (BOS positions already dropped with bos=drop); fed counts the tokens fed
    (BOS included), dropped the BOS positions left out."""
    data: dict[str, torch.Tensor]
    last_context: int
    contexts: int
    fed: int
    dropped: int


def model_width(c) -> int:
    """The residual stream width from a model config."""
    return next(getattr(c, k) for k in ("hidden_size", "n_embd", "d_model") if hasattr(c, k))


def _select_sites(cfg: CaptureSpec, model) -> tuple[int, int, list]:
    """(first, last, sites): the MLP sites of `layers` (every layer with an MLP when null), checked."""
    sites = mlp_sites(model)
    lo, hi = (0, len(sites) - 1) if cfg.layers is None else tuple(cfg.layers)
    if hi >= len(sites):
        raise ConfigError(f"config key 'layers' = {[lo, hi]}: {cfg.base_model} has {len(sites)} MLP layers (0..{len(sites) - 1})")
    sites = sites[lo:hi + 1]
    if cfg.x_source == "normalized" and not all(s.input_is_norm for s in sites):
        raise ConfigError(f"config key 'x_source' = 'normalized': {cfg.base_model}'s MLPs have no norm before them")
    return lo, hi, sites


class Capture:
    """The language model and its captured MLP sites. `meta` describes them (layers, width, hooks,
    tokenizer, separator); inside `hooked()`, calling it on a batch of contexts runs the forward pass up to
    the last captured layer and returns its Rows: x_l (the MLP site's input, or its norm's output with
    x_source=normalized) and y_l (the MLP's output), cast to the storage dtype, BOS positions dropped."""

    def __init__(self, cfg: CaptureSpec, device):
        self.cfg, self.device = cfg, device
        self.model, self.tok = load_lm(cfg.base_model, dtype=torch.float32 if cfg.model_dtype == "fp32" else torch.bfloat16,
                                       seed=cfg.seed, device=device)
        lo, hi, self.sites = _select_sites(cfg, self.model)
        self.sep = self.tok.bos_token_id if self.tok.bos_token_id is not None else self.tok.eos_token_id
        self.meta = {"layers": list(range(lo, hi + 1)), "d_model": model_width(self.model.config),
                     "hooks": hook_names(self.sites, cfg.x_source),
                     "tokenizer": f"{type(self.tok).__name__}, vocabulary {len(self.tok)}", "bos_token_id": self.sep}
        # int8 shards are quantized per row when a shard is written; until then tokens wait in bf16.
        self.store = DTYPES.get(cfg.dtype, torch.bfloat16)
        self.x: list = [None] * len(self.sites)
        self.y: list = [None] * len(self.sites)

    def _on_x(self, i: int, x: torch.Tensor):
        self.x[i] = x.detach()

    def _on_y(self, i: int, y: torch.Tensor):
        self.y[i] = y.detach()
        if i == len(self.sites) - 1:
            raise _StopForward

    @contextmanager
    def hooked(self):
        """The hooks on the captured sites, removed on leaving."""
        hooks = hook_mlp_sites(self.sites, self._on_x, self._on_y, x_from_output=self.cfg.x_source != "resid")
        try:
            yield self
        finally:
            hooks.remove()

    def forward(self, ids: torch.Tensor) -> tuple[list, list]:
        """Run the model on token ids [B, C] up to the last captured layer (inside `hooked()`): x_l and y_l
        per site, [B, C, D] each, as the model computed them."""
        try:
            self.model(input_ids=ids, use_cache=False)
        except _StopForward:
            pass
        return self.x, self.y

    def __call__(self, batch: list[tuple]) -> Rows:
        cfg, C = self.cfg, self.cfg.context
        ids = torch.tensor([b[1] for b in batch], dtype=torch.long, device=self.device)
        self.forward(ids)
        x = torch.stack(self.x, dim=2).to(self.store).flatten(0, 1).cpu()  # [B*C, N, D]
        y = torch.stack(self.y, dim=2).to(self.store).flatten(0, 1).cpu()
        if not (all_finite(x) and all_finite(y)):
            raise FloatingPointError(
                f"{cfg.base_model}: non-finite activations in contexts {batch[0][0]}..{batch[-1][0]} after casting "
                f"to {cfg.dtype}" + (" (overflow: use dtype=bfloat16)" if cfg.dtype == "float16" else ""))
        tok_ids = ids.flatten().cpu()
        doc = torch.tensor([b[2] for b in batch], dtype=torch.long).flatten()
        ctx = torch.tensor([b[0] for b in batch], dtype=torch.long).repeat_interleave(C)
        pos = torch.arange(C).repeat(len(batch))
        keep = tok_ids != self.sep if (cfg.bos == "drop" and self.sep is not None) else torch.ones_like(tok_ids, dtype=torch.bool)
        data = {"x": x[keep], "y": y[keep], "ids": tok_ids[keep], "doc": doc[keep], "ctx": ctx[keep], "pos": pos[keep]}
        return Rows(data, last_context=batch[-1][0], contexts=len(batch), fed=ids.numel(), dropped=int((~keep).sum()))
