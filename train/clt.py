"""The cross-layer transcoder: parameters, activations, encode, decode and loss terms (docs/design.md section 1).

This module is the single definition of the CLT math. It knows nothing of ranks or kernels:
- the feature-parallel layout (train/parallel.py) builds each rank's CLT as a slice of features of the
  whole dictionary (`feature_range`), and sets `CLT.reduce_partial` (sum of partial reconstructions)
  and `CLT.gather_features` (concatenation along the feature dim, for top-k cuts) to collectives over
  its group;
- kernels (kernels/) replace `CLT.encode_impl` / `CLT.decode_impl`, functions with the signatures of
  `reference_encode` / `reference_decode` below, which define their results.

Shapes: B tokens, N layers, D model width, F features per layer.
  W_enc [N, F, D], b_enc [N, F], log_threshold [N, F], b_dec [N, D]
  W_dec[s] [F, N - s, D]  (slot j of source layer s writes target layer s + j; a per-layer
  transcoder keeps only slot 0: [F, 1, D]) -- the circuit-tracer orientation.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as Fn
from cltrain.encoding import Encoded, jumprelu_grad_mask, nonzero_positions, preact_gap

ACTIVATIONS = ("jumprelu", "topk", "batchtopk")


@dataclass
class CLTConfig:
    n_layers: int
    d_model: int
    n_features: int  # per layer; after feature sharding, the local count
    per_layer: bool = False  # True: a per-layer transcoder (each source writes only its own layer)
    activation: str = "jumprelu"
    bandwidth: float = 2.0  # JumpReLU straight-through bandwidth eps, on normalized activations
    threshold_init: float = 0.03
    straight_through_to_preact: bool = False  # the January-2025 variant (see JumpReLU)
    topk: int = 0  # k per token per layer for topk / batchtopk
    batchtopk_threshold_momentum: float = 0.99  # EMA of BatchTopK's effective threshold, for export

    def __post_init__(self):
        for key in ("n_layers", "d_model", "n_features"):
            if int(getattr(self, key)) <= 0:
                raise ValueError(f"CLTConfig.{key} must be positive, got {getattr(self, key)!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"CLTConfig.activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if not self.bandwidth > 0:
            raise ValueError(f"CLTConfig.bandwidth must be > 0, got {self.bandwidth!r}")
        if not self.threshold_init > 0:
            raise ValueError(f"CLTConfig.threshold_init must be > 0, got {self.threshold_init!r}")
        if self.activation != "jumprelu" and not 0 < self.topk <= self.n_features:
            raise ValueError(
                f"CLTConfig.topk must be in 1..n_features={self.n_features} for activation "
                f"{self.activation!r}, got {self.topk!r}")


# ----------------------------------------------------------------------------------------------------
# JumpReLU with straight-through gradients


class JumpReLU(torch.autograd.Function):
    """a = h * 1[h > theta], theta = exp(log_theta).

    Gradients (rectangle kernel K(u) = 1[|u| < 1/2], bandwidth eps):
      d a / d h         = 1[h > theta]                       (+ (theta/eps) K((h-theta)/eps) with
                                                                straight_through_to_preact, the
                                                                January-2025 variant: the jump's
                                                                pseudo-derivative also reaches h)
      d a / d theta     = -(theta/eps) K((h - theta)/eps)
      d a / d log_theta = theta * d a / d theta
    """

    @staticmethod
    def forward(ctx, h, log_theta, bandwidth: float, st_to_preact: bool):
        theta = log_theta.exp()
        ctx.save_for_backward(h, theta)
        ctx.bandwidth, ctx.st_to_preact = bandwidth, st_to_preact
        return h * (h > theta)

    @staticmethod
    def backward(ctx, grad_a):
        h, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        in_window = ((h - theta).abs() < eps / 2).to(grad_a.dtype)
        jump = grad_a * in_window * (theta / eps)  # the straight-through term, per token
        grad_h = grad_log_theta = None
        if ctx.needs_input_grad[0]:
            grad_h = grad_a * (h > theta)
            if ctx.st_to_preact:
                grad_h = grad_h + jump
        if ctx.needs_input_grad[1]:
            grad_theta = -jump.reshape(-1, *theta.shape).sum(0)
            grad_log_theta = grad_theta * theta
        return grad_h, grad_log_theta, None, None


def jumprelu(h, log_theta, bandwidth: float, st_to_preact: bool = False):
    return JumpReLU.apply(h, log_theta, bandwidth, st_to_preact)


# ----------------------------------------------------------------------------------------------------
# Reference encode / decode: the definitions kernels are tested against

EncodeFn = Callable[..., "Encoded"]
DecodeFn = Callable[..., torch.Tensor]


def preactivations(x, W_enc, b_enc):
    """h = W_enc x + b_enc per layer: x [B, N, D] -> [B, N, F]."""
    return torch.einsum("bnd,nfd->bnf", x, W_enc) + b_enc


def reference_encode(x, W_enc, b_enc, log_threshold, bandwidth: float, st_to_preact: bool) -> Encoded:
    """JumpReLU encode: h = W_enc x + b_enc per layer, a = JumpReLU(h). x [B, N, D] -> [B, N, F]."""
    pre = preactivations(x, W_enc, b_enc)
    acts = jumprelu(pre, log_threshold, bandwidth, st_to_preact)
    mask = jumprelu_grad_mask(pre.detach(), log_threshold.detach().exp(), bandwidth)
    return Encoded(pre, acts, mask, preact_gap(pre, log_threshold.exp()))


def reference_decode(acts, W_dec: list[torch.Tensor], grad_mask=None) -> torch.Tensor:
    """Dense decode without bias: y[:, s + j] += acts[:, s] @ W_dec[s][:, j, :].

    acts [B, N, F], W_dec[s] [F, S_s, D] with S_s = N - s (CLT) or 1 (PLT) -> partial y_hat [B, N, D].
    grad_mask is a hint for sparse implementations (see Encoded); the dense reference ignores it.
    """
    B, N, _ = acts.shape
    D = W_dec[0].shape[-1]
    y = acts.new_zeros(B, N, D)
    for s, w in enumerate(W_dec):
        n_slots = w.shape[1]
        out = acts[:, s] @ w.reshape(w.shape[0], n_slots * D)  # [B, S*D]
        y[:, s:s + n_slots] += out.view(B, n_slots, D)  # a slice add: index_add along dim 1 is ~100x slower on CPU
    return y


def _identity(t):
    return t


def global_topk_cut(values, k: int, gather=_identity):
    """The k-th largest of values [..., F] along the last dim, [..., 1], where `gather` concatenates
    the last dim over the ranks that each hold a slice of it (identity for a whole dictionary): each
    slice offers its own k largest, and the k-th largest of those candidates is the global cut (the
    global top k are among them). Keeping values >= cut is the top-k, up to ties at the cut."""
    k_local = min(k, values.shape[-1])
    candidates = gather(values.topk(k_local, dim=-1).values)
    return candidates.topk(min(k, candidates.shape[-1]), dim=-1).values[..., -1:]


# ----------------------------------------------------------------------------------------------------
# The model


# Initialization is keyed per block of INIT_BLOCK features: block b of tensor t on layer l is drawn from
# its own generator seeded by (seed, t, l, b). A rank holding features [start, stop) draws only the
# blocks that overlap its slice, so every feature-parallel size starts from bit-identical weights and
# no rank ever draws the whole dictionary.
INIT_BLOCK = 256


def init_seed(*keys: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions, unlike hash())."""
    digest = hashlib.sha256(",".join(str(int(k)) for k in keys).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def keyed_uniform_rows(out: torch.Tensor, bound: float, seed: int, tensor_key: int, layer: int,
                       start: int):
    """Fill out [rows, ...] with U(-bound, bound): row r is global feature start + r of the dictionary,
    drawn block by block from generators keyed by (seed, tensor_key, layer, block). Generated on
    out's device (the same device type gives the same bits for any slicing)."""
    rows, stop = out.shape[0], start + out.shape[0]
    gen = torch.Generator(device=out.device)
    for block in range(start // INIT_BLOCK, (stop - 1) // INIT_BLOCK + 1 if rows else 0):
        b0 = block * INIT_BLOCK
        gen.manual_seed(init_seed(seed, tensor_key, layer, block))
        values = torch.rand((INIT_BLOCK,) + tuple(out.shape[1:]), generator=gen, device=out.device,
                            dtype=torch.float32)
        lo, hi = max(start, b0), min(stop, b0 + INIT_BLOCK)
        out[lo - start:hi - start].copy_(values[lo - b0:hi - b0].mul_(2 * bound).sub_(bound))


def _identity_gather(t):
    return t


class CLT(nn.Module):
    """A CLT, or the slice of one holding features [start, start + cfg.n_features) of every layer of a
    dictionary of `total` features per layer (feature_range=(start, total); the feature-parallel
    layout builds one per rank). Initialized from `seed` (or generator.initial_seed()) so that a slice
    holds exactly those rows of the whole dictionary's initialization. device="meta" builds the
    structure without memory: `to_empty(device=...)` then `reset_parameters()` initialize it."""

    # The definitions every kernel is compared with; kernels.install(clt, "dense") restores them.
    reference_encode = staticmethod(reference_encode)
    reference_decode = staticmethod(reference_decode)

    def __init__(self, cfg: CLTConfig, generator: torch.Generator | None = None, *, seed: int | None = None,
                 feature_range: tuple[int, int] | None = None, device=None):
        super().__init__()
        self.cfg = cfg
        N, D, F = cfg.n_layers, cfg.d_model, cfg.n_features
        start, total = feature_range if feature_range is not None else (0, F)
        if not (0 <= start and start + F <= total):
            raise ValueError(f"CLT: feature_range {(start, total)} does not hold {F} features")
        self.feature_start, self.total_features = int(start), int(total)
        self.seed = int(seed if seed is not None else generator.initial_seed() if generator is not None else 0)
        factory = {"device": device}
        self.W_enc = nn.Parameter(torch.empty(N, F, D, **factory))
        self.b_enc = nn.Parameter(torch.empty(N, F, **factory))
        self.W_dec = nn.ParameterList(
            [nn.Parameter(torch.empty(F, 1 if cfg.per_layer else N - s, D, **factory)) for s in range(N)])
        self.b_dec = nn.Parameter(torch.empty(N, D, **factory))
        self.log_threshold = nn.Parameter(torch.empty(N, F, **factory)) if cfg.activation == "jumprelu" else None
        # BatchTopK keeps a running estimate of the activation value where it cuts, per layer, so a
        # trained BatchTopK CLT can be exported with JumpReLU thresholds.
        self.register_buffer("batchtopk_threshold", torch.empty(N, **factory))
        if self.W_enc.device.type != "meta":
            self.reset_parameters()
        # Swappable from outside: kernels replace encode_impl / decode_impl; the feature-parallel layout
        # sets reduce_partial (sum over ranks) and gather_features (concatenate along the last dim).
        self.encode_impl: EncodeFn = reference_encode
        self.decode_impl: DecodeFn = reference_decode
        self.reduce_partial: Callable[[torch.Tensor], torch.Tensor] = _identity
        self.gather_features: Callable[[torch.Tensor], torch.Tensor] = _identity_gather

    @torch.no_grad()
    def reset_parameters(self):
        """Encoder U(-1/sqrt(F), 1/sqrt(F)); decoder U(-1/sqrt(N*D), 1/sqrt(N*D)) with F the whole
        dictionary's features per layer; biases 0; thresholds threshold_init (docs/design.md section 1). Keyed per
        feature block (keyed_uniform_rows): a slice gets its rows of the whole dictionary's init."""
        N, D, F = self.cfg.n_layers, self.cfg.d_model, self.total_features
        enc_bound, dec_bound = 1 / math.sqrt(F), 1 / math.sqrt(N * D)
        for layer in range(N):
            keyed_uniform_rows(self.W_enc.data[layer], enc_bound, self.seed, 0, layer, self.feature_start)
            keyed_uniform_rows(self.W_dec[layer].data, dec_bound, self.seed, 1, layer, self.feature_start)
        self.b_enc.zero_()
        self.b_dec.zero_()
        if self.log_threshold is not None:
            self.log_threshold.fill_(math.log(self.cfg.threshold_init))
        self.batchtopk_threshold.zero_()

    @property
    def threshold(self) -> torch.Tensor | None:
        return None if self.log_threshold is None else self.log_threshold.exp()

    def decoder_norms(self) -> torch.Tensor:
        """[N, F]: norm of each feature's concatenated decoder vectors (all of its target slots)."""
        return torch.stack([RowNorm.apply(w) for w in self.W_dec])

    # -- forward pieces -------------------------------------------------------------------------------

    def preactivations(self, x):
        return preactivations(x, self.W_enc, self.b_enc)

    def encode(self, x) -> Encoded:
        cfg = self.cfg
        if cfg.activation == "jumprelu":
            return self.encode_impl(x, self.W_enc, self.b_enc, self.log_threshold, cfg.bandwidth,
                                    cfg.straight_through_to_preact)
        pre = self.preactivations(x)
        k = cfg.topk
        if cfg.activation == "topk":  # per token and layer, the k largest over the whole dictionary
            cut = global_topk_cut(pre.detach(), k, self.gather_features)  # [B, N, 1]
        else:  # batchtopk: per layer, the batch's B*k largest
            B, N, F = pre.shape
            flat = pre.detach().transpose(0, 1).reshape(N, 1, B * F)
            cut = global_topk_cut(flat, k * B, self.gather_features).view(1, N, 1)
        keep = pre.detach() >= cut
        acts = Fn.relu(pre) * keep
        if cfg.activation == "batchtopk" and self.training:
            self._update_batchtopk_threshold(pre.detach(), keep)
        return Encoded(pre, acts, keep & (pre > 0))

    @torch.no_grad()
    def _update_batchtopk_threshold(self, pre, keep):
        # The smallest kept positive activation per layer (over the whole dictionary), averaged over
        # training batches.
        kept = torch.where(keep & (pre > 0), pre, torch.full_like(pre, float("inf")))
        cut = self.gather_features(kept.amin(dim=(0, 2))[:, None]).amin(-1)
        cut = torch.where(torch.isfinite(cut), cut, self.batchtopk_threshold)
        m = self.cfg.batchtopk_threshold_momentum
        if bool((self.batchtopk_threshold == 0).all()):
            self.batchtopk_threshold.copy_(cut)
        else:
            self.batchtopk_threshold.mul_(m).add_(cut, alpha=1 - m)

    def decode(self, acts, grad_mask=None):
        """acts [B, N, F] -> y_hat [B, N, D] (with b_dec). Under feature parallelism each rank decodes
        its own features and reduce_partial sums the partial reconstructions over the group."""
        partial = self.decode_impl(acts, list(self.W_dec), grad_mask)
        return self.reduce_partial(partial) + self.b_dec

    def encode_decode(self, x) -> tuple[Encoded, torch.Tensor]:
        """(Encoded, y_hat) for x: encode then decode. The same values and gradients as
        `enc = self.encode(x); self.decode(enc.acts, enc.grad_mask)`; with `encode_decode_impl` set
        (a fused Function), the backward can skip per-position activation gradients that only feed
        per-feature threshold-gradient sums (the straight-through window, kernels/fused.py)."""
        cfg = self.cfg
        # `encode_decode_impl`, set by kernels.install (absent or None: compose encode and decode),
        # has the signature of kernels.fused.torch_encode_decode
        fused = getattr(self, "encode_decode_impl", None)
        if cfg.activation == "jumprelu" and fused is not None:
            enc, partial = fused(x, self.W_enc, self.b_enc, self.log_threshold, list(self.W_dec),
                                 cfg.bandwidth, cfg.straight_through_to_preact)
            return enc, self.reduce_partial(partial) + self.b_dec
        enc = self.encode(x)
        return enc, self.decode(enc.acts, enc.grad_mask)

    def forward(self, x):
        return self.encode_decode(x)

    # -- initialization from data ---------------------------------------------------------------------

    @torch.no_grad()
    def calibrate_thresholds(self, x, target_rate: float):
        """Set each JumpReLU threshold so the feature fires on `target_rate` of the tokens in x [B, N, D]
        (the pre-activation quantile, kept positive)."""
        if self.log_threshold is None:
            raise ValueError("calibrate_thresholds needs activation='jumprelu'")
        if not 0 < target_rate < 1:
            raise ValueError(f"target_rate must be in (0, 1), got {target_rate!r}")
        q = torch.quantile(self.preactivations(x).float(), 1 - target_rate, dim=0)  # [N, F]
        self.log_threshold.copy_(q.clamp_min(1e-4).log())


# ----------------------------------------------------------------------------------------------------
# Loss terms (averaged over the tokens of a batch)
#
# Written as plain autograd, the sparsity term and the decoder norms make many passes over [B, N, F]
# and over every decoder weight, as costly as the sparse decode on CPU. These Functions compute the
# same values and gradients in fewer passes (tests compare them with the plain formulas in float64).
# The pre-activation term is a function of Encoded.preact_gap, which the encode provides.


class RowNorm(torch.autograd.Function):
    """||w_i|| over all but the first dim of w [F, S, D]; backward w * g / n in one pass."""

    @staticmethod
    def forward(ctx, w):
        n = torch.linalg.vector_norm(w, dim=(1, 2))
        ctx.save_for_backward(w, n)
        return n

    @staticmethod
    def backward(ctx, g):
        w, n = ctx.saved_tensors
        return w * (g / n.clamp_min(torch.finfo(n.dtype).tiny))[:, None, None]


# Above this fraction of non-zero activations the sparsity term is computed densely: early in
# training (theta = 0.03 at init) nearly half the activations can be non-zero.
SPARSE_TERMS_BELOW = 0.1


class TanhSparsity(torch.autograd.Function):
    """sum_{b,l,i} tanh(c * n_{l,i} * a_{b,l,i}) for acts [B, N, F] and norms [N, F].

    tanh(0) = 0, so when few activations are non-zero the value and the norms' gradient come from
    those alone; the activations' gradient c n (1 - tanh^2) is the per-feature constant c n wherever
    a = 0. Dense arithmetic when more than SPARSE_TERMS_BELOW of them are non-zero."""

    @staticmethod
    def forward(ctx, acts, norms, c: float):
        ctx.c, ctx.acts_shape, ctx.acts_dtype = c, acts.shape, acts.dtype
        indices = nonzero_positions(acts, SPARSE_TERMS_BELOW)
        if indices is None:
            t = torch.tanh_(acts * (c * norms))
            ctx.save_for_backward(acts, norms, t)
            ctx.sparse = False
            return t.sum()
        n, b, f = indices
        a = acts[b, n, f]
        cn = norms[n, f] * c
        t = torch.tanh(cn * a)
        ctx.save_for_backward(n, b, f, a, cn, t, norms)
        ctx.sparse = True
        return t.sum()

    @staticmethod
    def backward(ctx, g):
        if not ctx.sparse:
            acts, norms, t = ctx.saved_tensors
            d = (1 - t * t).mul_(g * ctx.c)  # d loss / d (c n a), over c
            grad_norms = (d * acts).sum(0) if ctx.needs_input_grad[1] else None
            return d.mul_(norms), grad_norms, None
        n, b, f, a, cn, t, norms = ctx.saved_tensors
        d = (1 - t * t) * g  # d loss / d (c n a) at the non-zeros
        grad_acts = grad_norms = None
        if ctx.needs_input_grad[0]:
            B, N, F = ctx.acts_shape
            grad = norms.new_empty(N, B, F, dtype=ctx.acts_dtype)  # [N, B, F], like the acts
            grad.copy_((norms * (ctx.c * g)).unsqueeze(1).expand(N, B, F))
            grad[n, b, f] = (d * cn).to(grad.dtype)
            grad_acts = grad.transpose(0, 1)
        if ctx.needs_input_grad[1]:
            grad_norms = torch.zeros_like(norms).index_put_((n, f), d * a * ctx.c, accumulate=True)
        return grad_acts, grad_norms, None


@dataclass
class LossWeights:
    sparsity: float = 0.0  # lambda_s (the trainer ramps it)
    preact: float = 3e-6  # lambda_p
    sparsity_c: float = 4.0  # c
    auxk: float = 0.0  # weight of the AuxK dead-feature loss (off by default)
    auxk_k: int = 512


def mse_loss(y_hat, y):
    """sum_l ||y_hat_l - y_l||^2, averaged over tokens."""
    return (y_hat - y).pow(2).sum(dim=(1, 2)).mean()


def sparsity_loss(acts, dec_norms, lam: float, c: float):
    """lambda_s * sum_{l,i} tanh(c * ||W_dec_{l,i}|| * a_{l,i}), averaged over tokens."""
    if lam == 0:
        return acts.new_zeros(())
    return lam * TanhSparsity.apply(acts, dec_norms, c) / acts.shape[0]


def preact_loss(gap, dec_norms, lam: float, n_tokens: int):
    """lambda_p * sum_{l,i} relu(theta_{l,i} - h_{l,i}) * ||W_dec_{l,i}||, averaged over tokens;
    gap = Encoded.preact_gap holds the token sums of relu(theta - h)."""
    if lam == 0 or gap is None:
        return dec_norms.new_zeros(())
    return lam * (gap * dec_norms).sum() / n_tokens


def auxk_loss(model: CLT, enc: Encoded, y_hat, y, dead: torch.Tensor | None, weight: float, k: int):
    """AuxK (Gao et al. 2024): the k largest pre-activations among dead features [N, F] reconstruct the
    residual error y - y_hat; normalized by the error's variance. Zero when off or nothing is dead."""
    if weight == 0 or dead is None or not bool(dead.any()):
        return y.new_zeros(())
    pre = enc.pre.masked_fill(~dead, float("-inf"))
    # the k largest over the whole dictionary's dead features (each rank holds a slice of them)
    cut = global_topk_cut(pre.detach(), k, model.gather_features)
    keep = (pre.detach() >= cut) & dead & (pre.detach() > 0)
    aux_acts = Fn.relu(pre.masked_fill(~keep, 0))
    err = (y - y_hat).detach()
    # The model's own (sparse) decode: aux_acts hold at most k entries per token and layer, and their
    # gradient is only read where they are positive (scatter of relu'd values).
    err_hat = model.reduce_partial(model.decode_impl(aux_acts, list(model.W_dec), aux_acts > 0))
    denom = (err - err.mean(0)).pow(2).sum(dim=(1, 2)).mean().clamp_min(1e-12)
    return weight * (err_hat - err).pow(2).sum(dim=(1, 2)).mean() / denom


def loss_terms(model: CLT, enc: Encoded, y_hat, y, w: LossWeights, dead=None) -> dict[str, torch.Tensor]:
    """The separate loss terms; the training loss is their sum. Under feature parallelism the
    sparsity/pre-activation terms cover the local features only (their gradients are local)."""
    norms = enc.decoder_norms if enc.decoder_norms is not None else model.decoder_norms()
    return {
        "mse": mse_loss(y_hat, y),
        "sparsity": sparsity_loss(enc.acts, norms, w.sparsity, w.sparsity_c),
        "preact": preact_loss(enc.preact_gap, norms, w.preact, y.shape[0]),
        "auxk": auxk_loss(model, enc, y_hat, y, dead, w.auxk, w.auxk_k),
    }


# ----------------------------------------------------------------------------------------------------
# Metrics


@torch.no_grad()
def batch_metrics(enc: Encoded, y_hat, y) -> dict[str, torch.Tensor]:
    """Per-layer NMSE = E||y_hat - y||^2 / E||y - mean(y)||^2 and L0 (active features per token)."""
    err = (y_hat - y).float().pow(2).sum(-1).mean(0)  # [N]
    var = (y - y.mean(0)).float().pow(2).sum(-1).mean(0).clamp_min(1e-12)
    return {"nmse": err / var, "l0": (enc.acts != 0).float().sum(-1).mean(0)}


# ----------------------------------------------------------------------------------------------------
# Inference: the activation rules of a trained CLT, layer by layer


@torch.no_grad()
def inference_encode_layer(clt: CLT, x: torch.Tensor, layer: int) -> torch.Tensor:
    """Activations [B, F] of source layer `layer` from normalized x [B, D], as the trained CLT is used
    after training (clt-eval, and what clt-export writes):
      - JumpReLU: h * 1[h > theta];
      - TopK: each token's k largest pre-activations, kept where positive;
      - BatchTopK: the running threshold kept during training (CLT.batchtopk_threshold), i.e.
        h * 1[h > max(cut, 0)], the JumpReLU rule clt-export writes -- never the batch's own top-k,
        which would make a token's features depend on the other tokens evaluated with it. A BatchTopK
        CLT that recorded no threshold (never trained) falls back to the batch's top-k.
    Every rule acts per layer, so layers can be encoded as a forward pass reaches them."""
    cfg = clt.cfg
    pre = x @ clt.W_enc[layer].T + clt.b_enc[layer]
    if cfg.activation == "jumprelu":
        return pre * (pre > clt.log_threshold[layer].exp())
    if cfg.activation == "batchtopk" and bool((clt.batchtopk_threshold > 0).any()):
        return pre * (pre > clt.batchtopk_threshold[layer].clamp_min(0))
    if cfg.activation == "topk":
        keep = torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, pre.topk(cfg.topk, dim=-1).indices, True)
    else:  # batchtopk without a recorded threshold: the B*k largest pre-activations of the layer
        flat = pre.reshape(-1)
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(min(cfg.topk * pre.shape[0], flat.numel())).indices] = True
        keep = keep.view_as(pre)
    return Fn.relu(pre) * keep


@torch.no_grad()
def inference_forward(clt: CLT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations [B, N, F], y_hat [B, N, D]) of normalized x [B, N, D] under the inference rules of
    `inference_encode_layer`, decoded by the CLT's own decode."""
    acts = torch.stack([inference_encode_layer(clt, x[:, l], l) for l in range(clt.cfg.n_layers)], 1)
    return acts, clt.decode(acts)
