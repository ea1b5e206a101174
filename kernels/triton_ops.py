"""Triton kernels, each beside its autograd wrapper: the fused JumpReLU encode and the sparse decode.

Twins (the plain-PyTorch definitions the tests compare against): `encode_forward_twin` and
`torch_encode` (kernels/torch_ops.py) for the encode, `torch_sparse_decode` / `reference_decode` for
the decode.

Numerics: bf16 (or fp32) in memory, fp32 in registers. Every load is converted to float32 before
arithmetic, which is also what TRITON_INTERPRET=1 needs (the interpreter's bf16 arithmetic is wrong);
the encode's matmul feeds tl.dot bf16 tiles on a GPU (tensor cores, fp32 accumulation) and fp32 tiles
in fp32 / under the interpreter. TRITON_INTERPRET must be set before this module is imported.

Layouts: pre-activations, activations and masks live in [N, B, F] memory (viewed as [B, N, F], the
same layout the reference einsum returns), so one layer's [B, F] slice is contiguous.

Decode access pattern (DESIGN section 4): at realistic batch sizes almost every feature fires somewhere
in the batch, so the decoder-weight gradient writes nearly every row of W_dec and the decode is bound
by reading W_dec and writing its gradient, not by FLOPs. The weight-gradient kernel is therefore
feature-major: one program per (feature, D-block) walks that feature's active tokens and writes its
decoder row exactly once (no atomics, no zero-fill pass). The forward is token-major (one program per
(token, D-block) walks the token's active features and reads their rows, all target slots at once).
The activation gradient is exact wherever grad_mask says JumpReLU reads it: a sampled dense-dense
kernel (one program per masked (token, feature) pair) when the mask is sparse, a dense cuBLAS product
when it is dense (the straight-through window, eps = 2, is wide early in training).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cltrain.train.clt import Encoded, nonzero_positions

from .torch_ops import DENSE_GRAD_ABOVE, SparseLayers, _sampled_pairs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Default block sizes for a GPU; every wrapper takes them as arguments (tests under the interpreter
# pass large ones: its cost is per block operation, not per element).
ENCODE_BLOCKS = dict(block_b=128, block_f=128, block_d=64)
# Launch options for the encode matmul on a GPU (bf16 128x64 + 64x128 tiles, 3 stages: ~96 KB of
# shared memory); the interpreter takes none.
ENCODE_LAUNCH = {} if INTERPRET else dict(num_warps=8, num_stages=3)
DECODE_BLOCK_D = 256


def _dot_f32(dtype) -> bool:
    return INTERPRET or dtype == torch.float32 or dtype == torch.float64


# ----------------------------------------------------------------------------------------------------
# Encode: pre = x W_enc^T + b_enc, acts = JumpReLU(pre), grad_mask; all layers in one launch


@triton.jit
def _encode_fwd_kernel(x_ptr, w_ptr, b_ptr, lt_ptr, pre_ptr, acts_ptr, mask_ptr, gap_ptr,
                       B, F, D, half_eps,
                       sxb, sxn, sxd, swn, swf, swd,
                       BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_f = tl.program_id(1)
    n = tl.program_id(2)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    rd = tl.arange(0, BLOCK_D)
    b_ok = rb < B
    f_ok = rf < F
    acc = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + rd
        d_ok = dd < D
        xt = tl.load(x_ptr + rb[:, None] * sxb + n * sxn + dd[None, :] * sxd,
                     mask=b_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + n * swn + rf[None, :] * swf + dd[:, None] * swd,
                     mask=f_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_F]
        if DOT_F32:
            if IEEE:
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc)
        else:
            acc = tl.dot(xt, wt, acc)
    bias = tl.load(b_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32)
    theta = tl.exp(tl.load(lt_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32))
    pre = acc + bias[None, :]
    diff = pre - theta[None, :]
    active = diff > 0
    acts = tl.where(active, pre, 0.0)
    in_mask = active | (tl.abs(diff) < half_eps)
    out = n * B * F + rb[:, None] * F + rf[None, :]
    ok = b_ok[:, None] & f_ok[None, :]
    tl.store(pre_ptr + out, pre.to(pre_ptr.dtype.element_ty), mask=ok)
    tl.store(acts_ptr + out, acts.to(acts_ptr.dtype.element_ty), mask=ok)
    tl.store(mask_ptr + out, in_mask.to(tl.int8), mask=ok)
    # this token block's part of preact_gap = sum_b relu(theta - h): [N, cdiv(B, BLOCK_B), F]
    gap = tl.sum(tl.where(ok & (diff < 0), -diff, 0.0), axis=0)
    tl.store(gap_ptr + (n * tl.num_programs(0) + pid_b) * F + rf, gap, mask=f_ok)


@triton.jit
def _encode_bwd_kernel(pre_ptr, lt_ptr, gpre_ptr, gacts_ptr, ggap_ptr, gh_ptr, glt_ptr,
                       B, F, inv_eps, half_eps,
                       HAS_GPRE: tl.constexpr, HAS_GACTS: tl.constexpr, HAS_GGAP: tl.constexpr,
                       ST_TO_PREACT: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr):
    # d loss / d pre (straight-through, plus -q where h < theta from preact_gap's gradient q) for a
    # [all B, BLOCK_F] column of one layer, and the column sums for d loss / d log_theta: a loop
    # over B instead of atomics, so the threshold gradient is deterministic.
    pid_f = tl.program_id(0)
    n = tl.program_id(1)
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = rf < F
    theta = tl.exp(tl.load(lt_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32))
    jump_scale = theta * inv_eps
    jump_sum = tl.zeros((BLOCK_F,), dtype=tl.float32)
    n_below = tl.zeros((BLOCK_F,), dtype=tl.float32)
    q = tl.zeros((BLOCK_F,), dtype=tl.float32)
    if HAS_GGAP:
        q = tl.load(ggap_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        ok = (rb < B)[:, None] & f_ok[None, :]
        offs = n * B * F + rb[:, None] * F + rf[None, :]
        gh = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
        if HAS_GPRE:
            gh += tl.load(gpre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        pre = tl.load(pre_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        diff = pre - theta[None, :]
        if HAS_GGAP:
            below = ok & (diff < 0)
            gh -= tl.where(below, q[None, :], 0.0)
            n_below += tl.sum(below.to(tl.float32), axis=0)
        if HAS_GACTS:
            ga = tl.load(gacts_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            gh += tl.where(diff > 0, ga, 0.0)
            jump = tl.where((tl.abs(diff) < half_eps) & ok, ga, 0.0) * jump_scale[None, :]
            if ST_TO_PREACT:
                gh += jump
            jump_sum += tl.sum(jump, axis=0)
        tl.store(gh_ptr + offs, gh.to(gh_ptr.dtype.element_ty), mask=ok)
    tl.store(glt_ptr + n * F + rf, (q * n_below - jump_sum) * theta, mask=f_ok)


def _nbf(t):
    """[B, N, F] -> contiguous [N, B, F] (a no-op for the encode's own outputs)."""
    return t.transpose(0, 1).contiguous()


class _TritonEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, log_threshold, bandwidth, st_to_preact, blocks):
        B, N, D = x.shape
        F = W_enc.shape[1]
        bb, bf, bd = blocks["block_b"], blocks["block_f"], blocks["block_d"]
        pre = x.new_empty(N, B, F)
        acts = x.new_empty(N, B, F)
        mask = torch.empty(N, B, F, dtype=torch.int8, device=x.device)
        gap_parts = torch.empty(N, triton.cdiv(B, bb), F, dtype=torch.float32, device=x.device)
        b_c, lt_c = b_enc.contiguous(), log_threshold.contiguous()
        grid = (triton.cdiv(B, bb), triton.cdiv(F, bf), N)
        _encode_fwd_kernel[grid](x, W_enc, b_c, lt_c, pre, acts, mask, gap_parts, B, F, D, bandwidth / 2,
                                 *x.stride(), *W_enc.stride(),
                                 BLOCK_B=bb, BLOCK_F=bf, BLOCK_D=bd, **ENCODE_LAUNCH,
                                 DOT_F32=_dot_f32(x.dtype) or x.dtype != W_enc.dtype,
                                 IEEE=x.dtype != torch.bfloat16)
        ctx.save_for_backward(x, W_enc, pre, lt_c)
        ctx.bandwidth, ctx.st_to_preact, ctx.blocks = bandwidth, st_to_preact, blocks
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        mask = mask.view(torch.bool).transpose(0, 1)
        ctx.mark_non_differentiable(mask)
        return pre.transpose(0, 1), acts.transpose(0, 1), mask, gap_parts.sum(1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_pre, grad_acts, _grad_mask, grad_gap):
        x, W_enc, pre, lt = ctx.saved_tensors
        N, B, F = pre.shape
        gh = torch.empty_like(pre)
        glt = torch.empty(N, F, dtype=torch.float32, device=pre.device)
        bb, bf = ctx.blocks["block_b"], ctx.blocks["block_f"]
        has_gpre, has_gacts, has_ggap = (g is not None for g in (grad_pre, grad_acts, grad_gap))
        gpre = _nbf(grad_pre) if has_gpre else pre  # placeholder pointer when absent
        gacts = _nbf(grad_acts) if has_gacts else pre
        ggap = grad_gap.contiguous() if has_ggap else lt
        _encode_bwd_kernel[(triton.cdiv(F, bf), N)](
            pre, lt, gpre, gacts, ggap, gh, glt, B, F, 1.0 / ctx.bandwidth, ctx.bandwidth / 2,
            HAS_GPRE=has_gpre, HAS_GACTS=has_gacts, HAS_GGAP=has_ggap, ST_TO_PREACT=ctx.st_to_preact,
            BLOCK_B=bb, BLOCK_F=bf)
        # The two remaining products are plain batched matmuls: cuBLAS is as good as it gets there.
        grad_x = torch.bmm(gh, W_enc).transpose(0, 1) if ctx.needs_input_grad[0] else None
        grad_W = torch.bmm(gh.transpose(1, 2), x.transpose(0, 1)) if ctx.needs_input_grad[1] else None
        grad_b = gh.sum(1) if ctx.needs_input_grad[2] else None
        grad_lt = glt.to(lt.dtype) if ctx.needs_input_grad[3] else None
        return grad_x, grad_W, grad_b, grad_lt, None, None, None


def triton_encode(x, W_enc, b_enc, log_threshold, bandwidth: float, st_to_preact: bool,
                  *, blocks: dict | None = None) -> Encoded:
    """Fused JumpReLU encode (Triton); results and gradients as `reference_encode`."""
    pre, acts, mask, gap = _TritonEncode.apply(x, W_enc, b_enc, log_threshold, bandwidth, st_to_preact,
                                               {**ENCODE_BLOCKS, **(blocks or {})})
    return Encoded(pre, acts, mask, gap)


# ----------------------------------------------------------------------------------------------------
# Sparse decode, one launch per source layer (sequential launches accumulate into y without atomics)


@triton.jit
def _decode_fwd_kernel(y_ptr, w_ptr, rowptr_ptr, col_ptr, val_ptr,
                       s, N, D, S, swf, sws,
                       BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # y[b, s + j, d-block] += sum over token b's active features f of a[b, s, f] * W_s[f, j, d-block]
    b = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rj = tl.arange(0, BLOCK_S)
    ok = (rj < S)[:, None] & (rd < D)[None, :]
    start = tl.load(rowptr_ptr + b)
    end = tl.load(rowptr_ptr + b + 1)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for k in range(start, end):
        f = tl.load(col_ptr + k).to(tl.int64)
        a = tl.load(val_ptr + k).to(tl.float32)
        w = tl.load(w_ptr + f * swf + rj[:, None] * sws + rd[None, :], mask=ok, other=0.0)
        acc += a * w.to(tl.float32)
    y_at = y_ptr + b.to(tl.int64) * N * D + (s + rj[:, None]) * D + rd[None, :]
    tl.store(y_at, tl.load(y_at, mask=ok, other=0.0) + acc, mask=ok)


@triton.jit
def _decode_dw_kernel(dw_ptr, dy_ptr, colptr_ptr, row_ptr, val_ptr,
                      s, N, D, S,
                      BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # dW_s[f, :, d-block] = sum over feature f's active tokens b of a[b, s, f] * dY[b, s:s+S, d-block];
    # written once per row (zeros for features that did not fire).
    f = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    rj = tl.arange(0, BLOCK_S)
    ok = (rj < S)[:, None] & (rd < D)[None, :]
    start = tl.load(colptr_ptr + f)
    end = tl.load(colptr_ptr + f + 1)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for k in range(start, end):
        b = tl.load(row_ptr + k).to(tl.int64)
        a = tl.load(val_ptr + k).to(tl.float32)
        g = tl.load(dy_ptr + b * N * D + (s + rj[:, None]) * D + rd[None, :], mask=ok, other=0.0)
        acc += a * g.to(tl.float32)
    out = dw_ptr + f.to(tl.int64) * S * D + rj[:, None] * D + rd[None, :]
    tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _decode_sampled_grad_kernel(ga_ptr, dy_ptr, w_ptr, pb_ptr, pf_ptr,
                                s, N, B, F, D, S, swf, sws,
                                BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # d loss / d a[b, s, f] = <dY[b, s:s+S, :], W_s[f, :, :]> for one masked (token, feature) pair.
    p = tl.program_id(0)
    b = tl.load(pb_ptr + p).to(tl.int64)
    f = tl.load(pf_ptr + p).to(tl.int64)
    rj = tl.arange(0, BLOCK_S)
    acc = tl.zeros((BLOCK_S, BLOCK_D), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        rd = d0 + tl.arange(0, BLOCK_D)
        ok = (rj < S)[:, None] & (rd < D)[None, :]
        g = tl.load(dy_ptr + b * N * D + (s + rj[:, None]) * D + rd[None, :], mask=ok, other=0.0)
        w = tl.load(w_ptr + f * swf + rj[:, None] * sws + rd[None, :], mask=ok, other=0.0)
        acc += g.to(tl.float32) * w.to(tl.float32)
    total = tl.sum(tl.sum(acc, axis=1), axis=0)
    tl.store(ga_ptr + s * B * F + b * F + f, total)


def _block_s(n_slots: int) -> int:
    return triton.next_power_of_2(n_slots)


class _TritonDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, grad_mask, dense_grad_above, block_d, *W_dec):
        B, N, F = acts.shape
        D = W_dec[0].shape[-1]
        y = torch.zeros(B, N, D, dtype=torch.float32, device=acts.device)
        nz = SparseLayers(acts.detach(), indices=nonzero_positions(acts))  # shared with the sparsity term
        for s, (crow, f_idx, values) in enumerate(nz.token_major()):
            w = W_dec[s]
            if values.numel() == 0:
                continue
            assert w.stride(-1) == 1, "W_dec rows must be contiguous in D"
            n_slots = w.shape[1]
            _decode_fwd_kernel[(B, triton.cdiv(D, block_d))](
                y, w, crow, f_idx, values, s, N, D, n_slots, w.stride(0), w.stride(1),
                BLOCK_S=_block_s(n_slots), BLOCK_D=block_d)
        ctx.nz = nz
        ctx.dense_grad_above, ctx.block_d = dense_grad_above, block_d
        ctx.save_for_backward(grad_mask, *W_dec)
        return y.to(torch.promote_types(acts.dtype, W_dec[0].dtype))

    @staticmethod
    def backward(ctx, grad_y):
        grad_mask, *W_dec = ctx.saved_tensors
        B, N, D = grad_y.shape
        F, block_d = W_dec[0].shape[0], ctx.block_d
        dY = grad_y.contiguous()
        need_acts = ctx.needs_input_grad[0]
        acts_fm = ctx.nz.feature_major() if any(ctx.needs_input_grad[4:]) else None
        grad_acts = pairs = None
        if need_acts:
            grad_acts = torch.zeros(N, B, F, dtype=torch.float32, device=dY.device)
            pairs = _sampled_pairs(grad_mask, N, ctx.dense_grad_above)
        grad_W = []
        for s, w in enumerate(W_dec):
            n_slots = w.shape[1]
            bs = _block_s(n_slots)
            if ctx.needs_input_grad[4 + s]:
                ccol, b_idx, values, _ = acts_fm[s]
                dw = torch.empty(F, n_slots, D, dtype=w.dtype, device=w.device)
                if values.numel() == 0:
                    dw.zero_()
                else:
                    _decode_dw_kernel[(F, triton.cdiv(D, block_d))](
                        dw, dY, ccol, b_idx, values, s, N, D, n_slots, BLOCK_S=bs, BLOCK_D=block_d)
                grad_W.append(dw)
            else:
                grad_W.append(None)
            if need_acts:
                if pairs[s] is not None:
                    _, pb, _, pf = pairs[s]  # feature-major: neighbouring programs share a decoder row
                    if pb.numel():
                        _decode_sampled_grad_kernel[(pb.numel(),)](
                            grad_acts, dY, w, pb, pf, s, N, B, F, D, n_slots, w.stride(0), w.stride(1),
                            BLOCK_S=bs, BLOCK_D=block_d)
                else:
                    dY_s = dY[:, s:s + n_slots].reshape(B, n_slots * D)
                    grad_acts[s] = (dY_s @ w.reshape(F, n_slots * D).t()).float()
        if grad_acts is not None:
            grad_acts = grad_acts.to(grad_y.dtype).transpose(0, 1)
        return (grad_acts, None, None, None, *grad_W)


def triton_decode(acts, W_dec, grad_mask=None, *, dense_grad_above: float = DENSE_GRAD_ABOVE,
                  block_d: int = DECODE_BLOCK_D):
    """Sparse decode (Triton); same result as `reference_decode`, exact gradients for every W_dec[s]
    and for acts where grad_mask is True (everywhere when None; 0 elsewhere)."""
    return _TritonDecode.apply(acts, grad_mask, dense_grad_above, block_d, *W_dec)
