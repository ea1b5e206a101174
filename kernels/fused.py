"""Encode and decode as one autograd Function, so the backward can skip per-position activation
gradients that nothing needs.

Why: with straight-through to h off (the default), JumpReLU's backward reads d loss / d a at active
positions (for d loss / d h) and, inside the straight-through window |h - theta| < eps/2, only as
per-feature sums (for d loss / d theta):
    d loss / d theta_f  +=  -(theta_f / eps) * sum_{b in window_f} g[b, f]
with g = d loss / d a. At eps = 2 on normalized activations the window holds ~95% of positions, so a
decode that must return g at every window position computes a dense product dY_s W_s^T. But
    sum_{b in window} g[b, f] = T_f - sum_{b not in window} g[b, f],   T_f = W_s[f] . sum_b dY_s[b]
(the decode's part of g is <dY_s[b], W_s[f]>), and the complement of the window is small (~5%).
So the decode's part of g is computed exactly only on P = active | not in window (a sampled
product), T_f from one matrix-vector product per source layer, and the encode backward receives
the window's missing mass T_f - sum_{b in P} g[b, f] as a per-feature term (`window_extra`). The
sparsity term's part of g (given by autograd as a dense [B, N, F] tensor) is summed directly.
(The positions below the window enter only as sums, so they could also be summed as one CSR x dense
product per layer, but that writes an [F, S*D] sum per layer and measured 1.5x slower than the
sampled product over P on the 2-core CPU, 2026-11-29, with torch's products.)

Elsewhere (straight-through to h on, d loss / d pre or d loss / d x asked for, a narrow window whose
mask is already sparse, or P dense) the backward is exactly the encode's and the decode's composed.

The Function also returns the decoder norms ||W_s[f]|| (Encoded.decoder_norms, which the sparsity and
pre-activation terms read): their gradient is coef[s, f] W_s[f], which the CPU decode adds inside its
one pass over the decoder rows (kernels/torch_ops.py) instead of a decoder-sized temporary and a second
pass over every decoder gradient; where a decode does not, it is added here per source layer.
Results and gradients equal train/clt.py's reference_encode followed by reference_decode.
"""
from __future__ import annotations

import torch

from cltrain.encoding import Encoded, nonzero_positions

from .torch_ops import PHASES, TorchEncode, TorchSparseDecode, default_dense_above, record_function


# The window-complement path runs wherever it applies and P = active | outside the window is sparse
# by the decode's own switch (dense_grad_above); False composes encode and decode as they are (the
# benchmark's comparison, benchmarks/kernels.py --steps).
WINDOW_COMPLEMENT = True


class _SubCtx:
    """Stands in for an autograd ctx so the fused Function can run the encode's and the decode's own
    forward and backward; what they save goes through the real ctx's save_for_backward."""

    def __init__(self):
        self.saved_tensors = ()
        self.needs_input_grad = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def set_materialize_grads(self, value):
        pass

    def mark_non_differentiable(self, *tensors):
        pass


class _Impl:
    """One implementation's encode / decode Functions and their extra (non-tensor) arguments."""

    def __init__(self, encode, decode, enc_args: tuple, dec_args: tuple, pre_theta):
        self.encode, self.decode = encode, decode
        self.enc_args, self.dec_args = enc_args, dec_args
        self.pre_theta = pre_theta  # saved encode tensors -> (pre [N, B, F], theta [N, 1, F])
        self.window_kernel = None  # the window sums in one launch (the Triton path's; see _window_totals)


class _EncodeDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, impl: _Impl, x, W_enc, b_enc, log_threshold, *W_dec):
        ectx, dctx = _SubCtx(), _SubCtx()
        with record_function(PHASES["encode"]):
            pre, acts, mask, gap = impl.encode.forward(ectx, x, W_enc, b_enc, log_threshold, *impl.enc_args)
        with record_function(PHASES["decode"]):
            y = impl.decode.forward(dctx, acts, mask, *impl.dec_args, *W_dec)
        with record_function(PHASES["norms"]):
            norms = torch.stack([torch.linalg.vector_norm(w, dim=(1, 2)) for w in W_dec])
        ctx.save_for_backward(*ectx.saved_tensors, norms, *dctx.saved_tensors)
        ctx.n_enc_saved = len(ectx.saved_tensors)
        ectx.saved_tensors = dctx.saved_tensors = ()
        ctx.ectx, ctx.dctx, ctx.impl = ectx, dctx, impl
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(mask)
        return pre, acts, mask, gap, y, norms

    @staticmethod
    def backward(ctx, grad_pre, grad_acts, _grad_mask, grad_gap, grad_y, grad_norms):
        impl, ectx, dctx = ctx.impl, ctx.ectx, ctx.dctx
        saved = ctx.saved_tensors
        k = ctx.n_enc_saved
        ectx.saved_tensors, norms, dctx.saved_tensors = saved[:k], saved[k], saved[k + 1:]
        need_enc, need_dec = ctx.needs_input_grad[1:5], ctx.needs_input_grad[5:]
        n_dec_args = len(impl.dec_args)
        ectx.needs_input_grad = tuple(need_enc) + (False,) * len(impl.enc_args)
        dctx.needs_input_grad = (any(need_enc), False) + (False,) * n_dec_args + tuple(need_dec)

        complement = (WINDOW_COMPLEMENT and grad_y is not None and grad_pre is None and not need_enc[0]
                      and not ectx.st_to_preact and any(need_enc))
        if complement:
            # The window's mask must be dense (else its own positions are the cheaper listing) and
            # P = active | outside the window sparse.
            dga = dctx.dense_grad_above
            complement = nonzero_positions(ectx.grad_mask, dga) is None
        if complement:
            pre, theta = impl.pre_theta(ectx.saved_tensors)
            # active | below the window, i.e. active | not grad_mask (grad_mask is diff > -eps/2)
            P = torch.logical_not(ectx.grad_mask).logical_or_((pre > theta).transpose(0, 1))
            complement = nonzero_positions(P, dga) is not None
        if complement:
            dctx.grad_mask = P  # exact d loss / d a on P only
        # d ||W_s[f]|| / d W_s[f] = W_s[f] / ||W_s[f]||: the norms' gradient is coef[s, f] W_s[f], which a
        # decode backward may add in its own pass over the decoder rows (then it sets norm_coef_used)
        dctx.norm_coef = None if grad_norms is None else grad_norms / norms.clamp_min(torch.finfo(norms.dtype).tiny)
        dctx.norm_coef_used = False
        g_dec, grad_W_dec = None, (None,) * len(need_dec)
        if grad_y is not None:
            grads_dec = impl.decode.backward(dctx, grad_y)  # (acts, mask, *dec_args, *W_dec)
            g_dec, grad_W_dec = grads_dec[0], grads_dec[2 + n_dec_args:]
        if dctx.norm_coef is not None and not dctx.norm_coef_used:
            with record_function(PHASES["norms"]):
                W_dec = dctx.saved_tensors[-len(need_dec):]
                grad_W_dec = tuple(_add_norm_grad(g, w, c) if need else g for g, w, c, need
                                   in zip(grad_W_dec, W_dec, dctx.norm_coef, need_dec))
        dctx.norm_coef = None
        if complement:
            # the window's part of sum_b g[b, f] that P leaves out: T_f - sum_{b in P} g[b, f]
            with record_function(PHASES["window"]):
                W_dec = dctx.saved_tensors[1:]
                totals = _window_totals(grad_y, W_dec, impl.window_kernel)
                ectx.window_extra = totals - g_dec.sum(0).to(totals.dtype)
        g = g_dec if grad_acts is None else (grad_acts if g_dec is None else g_dec + grad_acts)
        with record_function(PHASES["encode_backward"]):
            grads_enc = impl.encode.backward(ectx, grad_pre, g, None, grad_gap)
        ectx.window_extra = None
        return (None, *grads_enc[:4], *grad_W_dec)


def _add_norm_grad(grad_w, w, coef):
    """grad_w + coef[f] w[f] (grad_w None: just the latter), in grad_w's memory where there is one."""
    term = w * coef.to(w.dtype)[:, None, None]
    return term if grad_w is None else grad_w.add_(term)


def _window_totals(grad_y, W_dec, kernel=None):
    """[N, F]: T[s, f] = sum_b <dY[b, s:s+S_s], W_s[f]>. Memory-bound: the decoder is read once either
    way. `kernel` (the Triton path's triton_ops.window_totals) does all layers in one launch, reading
    W_s in its own dtype; without it, one matrix-vector product per source layer (the twin; on a CPU
    N calls cost microseconds, and torch has no batched product over the ragged W_s short of copying
    them all into one tensor, which would triple the bytes)."""
    if kernel is not None:
        return kernel(grad_y, W_dec)
    col = grad_y.float().sum(0) if grad_y.dtype != torch.float64 else grad_y.sum(0)  # [N, D]
    out = []
    for s, w in enumerate(W_dec):
        F, n_slots, D = w.shape
        out.append(w.reshape(F, n_slots * D).to(col.dtype) @ col[s:s + n_slots].reshape(-1))
    return torch.stack(out)


def _torch_pre_theta(saved):
    _, _, pre, theta = saved
    return pre, theta


def _triton_pre_theta(saved):
    _, _, pre, lt = saved
    return pre, lt.float().exp().unsqueeze(1)


def _apply(impl: _Impl, x, W_enc, b_enc, log_threshold, W_dec):
    pre, acts, mask, gap, y, norms = _EncodeDecode.apply(impl, x, W_enc, b_enc, log_threshold, *W_dec)
    return Encoded(pre, acts, mask, gap, norms), y


def torch_encode_decode(x, W_enc, b_enc, log_threshold, W_dec, bandwidth: float, st_to_preact: bool, *,
                        dense_grad_above: float | None = None):
    """(Encoded, partial y_hat): `torch_encode` then `torch_sparse_decode` in one Function (see the
    module docstring); results and gradients as reference_encode then reference_decode. The density
    switch defaults to torch_ops.default_dense_above(W_dec[0])."""
    if dense_grad_above is None:
        dense_grad_above = default_dense_above(W_dec[0])
    impl = _Impl(TorchEncode, TorchSparseDecode, (bandwidth, st_to_preact, dense_grad_above),
                 (dense_grad_above,), _torch_pre_theta)
    return _apply(impl, x, W_enc, b_enc, log_threshold, W_dec)


def triton_encode_decode(x, W_enc, b_enc, log_threshold, W_dec, bandwidth: float, st_to_preact: bool, *,
                         dense_grad_above: float | None = None, blocks: dict | None = None,
                         block_d: int | None = None):
    """(Encoded, partial y_hat): `triton_encode` then `triton_decode` in one Function (the decode's
    density switch defaults to triton_ops.DENSE_GRAD_ABOVE, a GPU figure)."""
    from . import triton_ops as T

    if dense_grad_above is None:
        dense_grad_above = T.DENSE_GRAD_ABOVE
    if block_d is None:
        block_d = T.decode_block_d(x.shape[1], W_enc.shape[1], x.shape[2], W_dec[0].element_size())
    impl = _Impl(T._TritonEncode, T._TritonDecode, (bandwidth, st_to_preact, {**T.ENCODE_BLOCKS, **(blocks or {})}),
                 (dense_grad_above, block_d), _triton_pre_theta)
    impl.window_kernel = T.window_totals
    return _apply(impl, x, W_enc, b_enc, log_threshold, W_dec)
