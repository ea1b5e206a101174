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

Decode access pattern (docs/design.md section 4): at realistic batch sizes almost every feature fires somewhere
in the batch, so the decoder-weight gradient writes nearly every row of W_dec and the decode is bound
by reading W_dec and writing its gradient, not by FLOPs. The weight-gradient kernel is therefore
feature-major: one program per (feature, D-block, (source, slot) pair) walks that feature's active
tokens and writes its decoder row exactly once (no atomics, no zero-fill pass). Each of the decode's
products is one launch over all source layers (pointer tables to the per-layer W_dec[s] and dW[s]).
The forward is token-major with the token as the fastest grid axis: programs in flight share one
(slot, D-block), whose F x BLOCK_D decoder slice stays in L2, so each decoder row is fetched from
memory about once per step while its ~B*density logical re-reads hit L2 (a feature-major forward
would read rows once but scatter into y with atomics: as many fp32 read-modify-writes as the
token-major's bf16 reads; benchmarks/kernels_compile.md counts both). Above DENSE_ACTS_ABOVE
non-zero activations in a source layer, its forward and weight gradient are dense cuBLAS products,
as on the torch path (the GPU switches below are far lower than the CPU's: see their comment).
The activation gradient is exact wherever grad_mask says JumpReLU reads it: a sampled dense-dense
kernel (one program per masked (token, feature) pair) when the mask is sparse, a dense cuBLAS product
when it is dense (the straight-through window, eps = 2, is wide early in training; the fused
encode+decode of kernels/fused.py avoids that product when straight-through to h is off).
Offsets: every product of sizes that can pass 2^31 is formed in int64 (tests/test_kernels_large.py).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from cltrain.encoding import Encoded, nonzero_positions

from .torch_ops import SparseLayers, sampled_pairs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# Density switches on a GPU, from the cost model in benchmarks/kernels_compile.md (projections, to be
# replaced by `make bench-gpu` measurements): each FMA of the sparse kernels loads an operand from L2
# (2-6 bytes), so against bf16 tensor-core matmuls they pay off only below ~0.7% non-zero activations
# (forward, weight gradient) and ~0.2% masked positions (the sampled activation gradient). Above
# these, the products are dense cuBLAS matmuls. (The torch path's switches are CPU measurements.)
DENSE_ACTS_ABOVE = 0.005
DENSE_GRAD_ABOVE = 0.003

# Default block sizes for a GPU; every wrapper takes them as arguments (tests under the interpreter
# pass large ones: its cost is per block operation, not per element). Chosen with the compile report
# (benchmarks/kernels_compile.md): no spills on sm_80 / sm_90.
ENCODE_BLOCKS = dict(block_b=128, block_f=128, block_d=64)
# Launch options for the encode matmul on a GPU (bf16 128x64 + 64x128 tiles, 3 stages: ~96 KB of
# shared memory); the interpreter takes none.
ENCODE_LAUNCH = {} if INTERPRET else dict(num_warps=8, num_stages=3)
# The encode backward walks [BLOCK_B, BLOCK_F] tiles of up to five [N, B, F] tensors: 128-row tiles
# need more than 255 registers per thread at 4 warps (spills); 16 rows do not (128-134).
ENCODE_BWD_BLOCK_B = 16
ENCODE_BWD_LAUNCH = {} if INTERPRET else dict(num_warps=4)
# Decode D-block: the forward walks all tokens for one (slot, D-block) before the next (token is the
# fastest grid axis), so the decoder slice in use, F x DECODE_BLOCK_D values, stays in L2 (2 MB at
# F = 4096, 16 MB at F = 65536 in bf16) and each decoder row is fetched from memory about once.
DECODE_BLOCK_D = 128
# The forward reads, for one target layer, the slices of every source layer before it: keep that
# working set, (N) x F x BLOCK_D decoder values, within this many bytes (H100 L2: 50 MB, A100: 40 MB).
DECODE_L2_BUDGET = 24 * 2 ** 20


def decode_block_d(N: int, F: int, D: int, itemsize: int) -> int:
    """The forward's D-block: DECODE_BLOCK_D, halved (down to 32) until the slices in use fit L2."""
    bd = DECODE_BLOCK_D
    while bd > 32 and N * F * bd * itemsize > DECODE_L2_BUDGET:
        bd //= 2
    return min(bd, max(32, triton.next_power_of_2(D)))


# The window sums (window_totals): [BLOCK_F, BLOCK_K] tiles of decoder rows, 16 fp32 accumulators a
# thread at 4 warps; each row chunk is 128 contiguous values (256 B in bf16), so loads coalesce.
WINDOW_BLOCKS = dict(block_f=16, block_k=128)
WINDOW_LAUNCH = {} if INTERPRET else dict(num_warps=4)


def _decode_launch(block_d: int) -> dict:
    # one element of the D-block per thread: 1 to 4 warps
    return {} if INTERPRET else dict(num_warps=max(1, min(4, block_d // 32)))
# Grid limits (CUDA): axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65535.
_GRID0_MAX, _GRID12_MAX = 2 ** 31 - 1, 65535


def _dot_f32(dtype) -> bool:
    return INTERPRET or dtype == torch.float32 or dtype == torch.float64


def _require(ok: bool, what: str):
    if not ok:
        raise ValueError(what)


def _check_grid(grid, what: str):
    _require(grid[0] <= _GRID0_MAX and all(g <= _GRID12_MAX for g in grid[1:]),
             f"{what}: launch grid {tuple(grid)} exceeds CUDA's limits (2^31-1, 65535, 65535)")


# ----------------------------------------------------------------------------------------------------
# Encode: pre = x W_enc^T + b_enc, acts = JumpReLU(pre), grad_mask; all layers in one launch
#
# 64-bit offsets: every product of sizes that can pass 2^31 (layer * B * F, layer * F * D, token *
# N * D) is formed from int64 scalars; per-tile offsets within one row stay int32 (bounded by F or D).


@triton.jit
def _encode_fwd_kernel(x_ptr, w_ptr, b_ptr, lt_ptr, pre_ptr, acts_ptr, mask_ptr, gap_ptr,
                       B, F, D, half_eps,
                       sxb, sxn, sxd, swn, swf, swd, son,
                       BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_F32: tl.constexpr, IEEE: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_f = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    rb = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    rd = tl.arange(0, BLOCK_D)
    b_ok = rb < B
    f_ok = rf < F
    x_rows = x_ptr + n * sxn + rb.to(tl.int64)[:, None] * sxb  # [BLOCK_B, 1]
    w_cols = w_ptr + n * swn + rf.to(tl.int64)[None, :] * swf  # [1, BLOCK_F]
    acc = tl.zeros((BLOCK_B, BLOCK_F), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + rd
        d_ok = dd < D
        xt = tl.load(x_rows + dd[None, :] * sxd, mask=b_ok[:, None] & d_ok[None, :], other=0.0)
        wt = tl.load(w_cols + dd[:, None] * swd, mask=f_ok[None, :] & d_ok[:, None], other=0.0)
        if DOT_F32:
            if IEEE:  # the interpreter (exact fp32, as the twin)
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
            else:  # fp32 on a GPU: TF32 tensor cores
                acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="tf32")
        else:
            acc = tl.dot(xt, wt, acc)
    bias = tl.load(b_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32)
    theta = tl.exp(tl.load(lt_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32))
    pre = acc + bias[None, :]
    diff = pre - theta[None, :]
    active = diff > 0
    acts = tl.where(active, pre, 0.0)
    in_mask = active | (tl.abs(diff) < half_eps)
    out = n * son + rb.to(tl.int64)[:, None] * F + rf[None, :]
    ok = b_ok[:, None] & f_ok[None, :]
    tl.store(pre_ptr + out, pre.to(pre_ptr.dtype.element_ty), mask=ok)
    tl.store(acts_ptr + out, acts.to(acts_ptr.dtype.element_ty), mask=ok)
    tl.store(mask_ptr + out, in_mask.to(tl.int8), mask=ok)
    # this token block's part of preact_gap = sum_b relu(theta - h): [N, cdiv(B, BLOCK_B), F]
    gap = tl.sum(tl.where(ok & (diff < 0), -diff, 0.0), axis=0)
    tl.store(gap_ptr + (n * tl.num_programs(0) + pid_b) * F + rf, gap, mask=f_ok)


@triton.jit
def _encode_bwd_kernel(pre_ptr, lt_ptr, gpre_ptr, gacts_ptr, ggap_ptr, wext_ptr, gh_ptr, glt_ptr,
                       B, F, inv_eps, half_eps, son,
                       HAS_GPRE: tl.constexpr, HAS_GACTS: tl.constexpr, HAS_GGAP: tl.constexpr,
                       HAS_WEXT: tl.constexpr, ST_TO_PREACT: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr):
    # d loss / d pre (straight-through, plus -q where h < theta from preact_gap's gradient q) for a
    # [all B, BLOCK_F] column of one layer, and the column sums for d loss / d log_theta: a loop
    # over B instead of atomics, so the threshold gradient is deterministic. wext [N, F] (HAS_WEXT):
    # the part of the window's sum of d loss / d a that the caller has as per-feature sums already
    # (the fused encode+decode, kernels/fused.py).
    pid_f = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    rf = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    f_ok = rf < F
    theta = tl.exp(tl.load(lt_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32))
    jump_scale = theta * inv_eps
    jump_sum = tl.zeros((BLOCK_F,), dtype=tl.float32)
    n_below = tl.zeros((BLOCK_F,), dtype=tl.float32)
    q = tl.zeros((BLOCK_F,), dtype=tl.float32)
    if HAS_GGAP:
        q = tl.load(ggap_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32)
    if HAS_WEXT:
        jump_sum += tl.load(wext_ptr + n * F + rf, mask=f_ok, other=0.0).to(tl.float32) * jump_scale
    layer = n * son
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B)
        ok = (rb < B)[:, None] & f_ok[None, :]
        offs = layer + rb.to(tl.int64)[:, None] * F + rf[None, :]
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


def check_encode_inputs(x, W_enc, b_enc, log_threshold, bandwidth: float, where: str = "triton_encode"):
    """Shapes, dtypes and devices of the encode's inputs, with errors that name the argument."""
    _require(x.dim() == 3, f"{where}: x must be [B, N, D], got shape {tuple(x.shape)}")
    B, N, D = x.shape
    _require(W_enc.dim() == 3 and W_enc.shape[0] == N and W_enc.shape[2] == D,
             f"{where}: W_enc must be [N={N}, F, D={D}], got {tuple(W_enc.shape)}")
    F = W_enc.shape[1]
    for name, t in (("b_enc", b_enc), ("log_threshold", log_threshold)):
        _require(tuple(t.shape) == (N, F), f"{where}: {name} must be [N={N}, F={F}], got {tuple(t.shape)}")
    for name, t in (("x", x), ("W_enc", W_enc), ("b_enc", b_enc), ("log_threshold", log_threshold)):
        _require(t.dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64),
                 f"{where}: {name} must be a floating tensor, got {t.dtype}")
        _require(t.device == x.device, f"{where}: {name} is on {t.device}, x on {x.device}")
    _require(bandwidth > 0, f"{where}: bandwidth must be > 0, got {bandwidth!r}")
    _require(min(B, F, D) > 0, f"{where}: empty input (B={B}, F={F}, D={D})")


class _TritonEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W_enc, b_enc, log_threshold, bandwidth, st_to_preact, blocks):
        check_encode_inputs(x, W_enc, b_enc, log_threshold, bandwidth)
        B, N, D = x.shape
        F = W_enc.shape[1]
        bb, bf, bd = blocks["block_b"], blocks["block_f"], blocks["block_d"]
        pre = x.new_empty(N, B, F)
        acts = x.new_empty(N, B, F)
        mask = torch.empty(N, B, F, dtype=torch.int8, device=x.device)
        gap_parts = torch.empty(N, triton.cdiv(B, bb), F, dtype=torch.float32, device=x.device)
        b_c, lt_c = b_enc.contiguous(), log_threshold.contiguous()
        grid = (triton.cdiv(B, bb), triton.cdiv(F, bf), N)
        _check_grid(grid, "triton_encode")
        _encode_fwd_kernel[grid](x, W_enc, b_c, lt_c, pre, acts, mask, gap_parts, B, F, D, bandwidth / 2,
                                 *x.stride(), *W_enc.stride(), B * F,
                                 BLOCK_B=bb, BLOCK_F=bf, BLOCK_D=bd, **ENCODE_LAUNCH,
                                 DOT_F32=_dot_f32(x.dtype) or x.dtype != W_enc.dtype,
                                 IEEE=INTERPRET)
        ctx.save_for_backward(x, W_enc, pre, lt_c)
        ctx.bandwidth, ctx.st_to_preact, ctx.blocks = bandwidth, st_to_preact, blocks
        ctx.window_extra = None  # set by the fused encode+decode (kernels/fused.py)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        mask = mask.view(torch.bool).transpose(0, 1)
        ctx.mark_non_differentiable(mask)
        ctx.grad_mask = mask
        return pre.transpose(0, 1), acts.transpose(0, 1), mask, gap_parts.sum(1).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_pre, grad_acts, _grad_mask, grad_gap):
        x, W_enc, pre, lt = ctx.saved_tensors
        N, B, F = pre.shape
        gh = torch.empty_like(pre)
        glt = torch.empty(N, F, dtype=torch.float32, device=pre.device)
        bf = ctx.blocks["block_f"]
        bb = ctx.blocks.get("block_b_bwd", ENCODE_BWD_BLOCK_B)
        has_gpre, has_gacts, has_ggap = (g is not None for g in (grad_pre, grad_acts, grad_gap))
        wext = ctx.window_extra
        gpre = _nbf(grad_pre) if has_gpre else pre  # placeholder pointer when absent
        gacts = _nbf(grad_acts) if has_gacts else pre
        ggap = grad_gap.contiguous() if has_ggap else lt
        _encode_bwd_kernel[(triton.cdiv(F, bf), N)](
            pre, lt, gpre, gacts, ggap, lt if wext is None else wext.float().contiguous(), gh, glt,
            B, F, 1.0 / ctx.bandwidth, ctx.bandwidth / 2, B * F,
            HAS_GPRE=has_gpre, HAS_GACTS=has_gacts, HAS_GGAP=has_ggap, HAS_WEXT=wext is not None,
            ST_TO_PREACT=ctx.st_to_preact, BLOCK_B=bb, BLOCK_F=bf, **ENCODE_BWD_LAUNCH)
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
# Sparse decode: each product is one launch over all source layers, which the kernels reach through
# tables of W_dec[s] / dW[s] addresses and row strides (each is its own tensor of [F, N - s or 1, D]).
# At N = 30 that is 465 (source, target) pairs: per-layer launches (and per-layer index preparation)
# would cost more host time than the GPU spends on a layer. No slot padding to a power of two.


@triton.jit
def _decode_fwd_kernel(y_ptr, w0_ptr, wptrs_ptr, wrows_ptr, rowptr_ptr, col_ptr, val_ptr,
                       B, D, syb, syn,
                       PER_LAYER: tl.constexpr, BLOCK_D: tl.constexpr):
    # y[b, t, d-block] = sum over source layers s <= t, over token b's active features f in layer s,
    # of a[b, s, f] * W_s[f, t - s, d-block]: all source layers in one launch, so y is written once
    # (no zero-fill, no read-modify-write per source layer). Token is the fastest grid axis: the
    # programs in flight share (t, d-block), so the decoder slices they read, (t + 1) x F x BLOCK_D
    # values, stay in L2 while every token passes over them.
    b = tl.program_id(0)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    t = tl.program_id(2)
    ok = rd < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if PER_LAYER:
        s_lo = t
    else:
        s_lo = 0
    for s in range(s_lo, t + 1):
        # W_dec[s] is its own tensor: its address and row stride come from tables ([F, S_s, D],
        # slots contiguous in D)
        w = tl.load(wptrs_ptr + s).to(tl.pointer_type(w0_ptr.dtype.element_ty))
        row_stride = tl.load(wrows_ptr + s)  # int64
        w_slot = w + (t - s).to(tl.int64) * D + rd
        start = tl.load(rowptr_ptr + s * (B + 1) + b)
        end = tl.load(rowptr_ptr + s * (B + 1) + b + 1)
        for k in range(start, end):
            f = tl.load(col_ptr + k).to(tl.int64)
            a = tl.load(val_ptr + k).to(tl.float32)
            acc += a * tl.load(w_slot + f * row_stride, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + b.to(tl.int64) * syb + t.to(tl.int64) * syn + rd, acc, mask=ok)


@triton.jit
def _decode_dw_kernel(dw0_ptr, dwptrs_ptr, dwrows_ptr, pairs_ptr, dy_ptr, colptr_ptr, row_ptr, val_ptr,
                      F, D, sdb, sdn,
                      BLOCK_D: tl.constexpr):
    # dW_s[f, j, d-block] = sum over feature f's active tokens b in source layer s of
    # a[b, s, f] * dY[b, s + j, d-block], for every listed (s, j) pair (grid axis 2; a table of int32
    # [2, P]: sources whose product is dense are not listed) in one launch. Written once per row
    # (zeros for features that did not fire): no atomics, no zero-fill pass. Feature is the fastest
    # grid axis: the programs in flight share (s, j, d-block) and so one [B, BLOCK_D] slice of dY.
    f = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    p = tl.program_id(2)
    s = tl.load(pairs_ptr + p).to(tl.int64)
    j = tl.load(pairs_ptr + tl.num_programs(2) + p).to(tl.int64)
    ok = rd < D
    # the all-layer feature-major CSR: layer s's feature f is column s * F + f
    start = tl.load(colptr_ptr + s * F + f)
    end = tl.load(colptr_ptr + s * F + f + 1)
    g_slot = dy_ptr + (s + j) * sdn + rd
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in range(start, end):
        b = tl.load(row_ptr + k).to(tl.int64)
        a = tl.load(val_ptr + k).to(tl.float32)
        acc += a * tl.load(g_slot + b * sdb, mask=ok, other=0.0).to(tl.float32)
    dw = tl.load(dwptrs_ptr + s).to(tl.pointer_type(dw0_ptr.dtype.element_ty))
    out = dw + f * tl.load(dwrows_ptr + s) + j * D + rd
    tl.store(out, acc.to(dw0_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _decode_sampled_grad_kernel(ga_ptr, dy_ptr, w0_ptr, wptrs_ptr, wrows_ptr, wlen_ptr, ps_ptr, pb_ptr, pf_ptr,
                                B, F, sdb, sdn,
                                BLOCK_D: tl.constexpr):
    # d loss / d a[b, s, f] = <dY[b, s:s+S_s, :], W_s[f, :, :]> for one masked (layer, token, feature)
    # triple, all layers in one launch (ga [N, B, F], contiguous). Both operands are contiguous runs of
    # S_s * D values (W_s's row f; dY's row b from slot s on, slots contiguous in dY), so the dot is
    # one flat loop with no ragged D-block per slot. Pairs are feature-major within a layer:
    # neighbouring programs share a decoder row, which is read from memory about once.
    p = tl.program_id(0)
    s = tl.load(ps_ptr + p).to(tl.int64)
    b = tl.load(pb_ptr + p).to(tl.int64)
    f = tl.load(pf_ptr + p).to(tl.int64)
    row_len = tl.load(wlen_ptr + s)  # S_s * D
    w_row = tl.load(wptrs_ptr + s).to(tl.pointer_type(w0_ptr.dtype.element_ty)) + f * tl.load(wrows_ptr + s)
    g_row = dy_ptr + b * sdb + s * sdn
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k0 in range(0, row_len, BLOCK_D):
        rk = k0 + tl.arange(0, BLOCK_D)
        ok = rk < row_len
        g = tl.load(g_row + rk, mask=ok, other=0.0)
        w = tl.load(w_row + rk, mask=ok, other=0.0)
        acc += g.to(tl.float32) * w.to(tl.float32)
    tl.store(ga_ptr + (s * B + b) * F + f, tl.sum(acc, axis=0))


@triton.jit
def _window_totals_kernel(t_ptr, col_ptr, w0_ptr, wptrs_ptr, wrows_ptr, wlen_ptr, F, D,
                          BLOCK_F: tl.constexpr, BLOCK_K: tl.constexpr):
    # T[s, f] = <W_s[f, :, :], colsum(dY)[s:s+S_s, :]> (kernels/fused.py's window sums) for a block of
    # features of one source layer s (grid axis 1): all layers in one launch, reading each decoder
    # element once in its own dtype (no fp32 copy of W_s), fp32 accumulation. col [N, D] is
    # contiguous, so slots s.. of it are one run of S_s * D values, as W_s's row is.
    rf = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    s = tl.program_id(1).to(tl.int64)
    f_ok = rf < F
    row_len = tl.load(wlen_ptr + s)  # S_s * D
    w_rows = tl.load(wptrs_ptr + s).to(tl.pointer_type(w0_ptr.dtype.element_ty)) + \
        rf.to(tl.int64)[:, None] * tl.load(wrows_ptr + s)
    c_run = col_ptr + s * D
    acc = tl.zeros((BLOCK_F, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, row_len, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < row_len
        c = tl.load(c_run + rk, mask=k_ok, other=0.0).to(tl.float32)
        w = tl.load(w_rows + rk[None, :], mask=f_ok[:, None] & k_ok[None, :], other=0.0)
        acc += w.to(tl.float32) * c[None, :]
    tl.store(t_ptr + s * F + rf, tl.sum(acc, axis=1), mask=f_ok)


def check_decode_inputs(acts, W_dec, grad_mask, where: str = "triton_decode"):
    """Shapes, dtypes, layouts and devices of the decode's inputs, with errors that name the argument."""
    _require(acts.dim() == 3, f"{where}: acts must be [B, N, F], got shape {tuple(acts.shape)}")
    B, N, F = acts.shape
    _require(len(W_dec) == N, f"{where}: {len(W_dec)} decoder tensors for N={N} source layers")
    D = W_dec[0].shape[-1] if W_dec else 0
    for s, w in enumerate(W_dec):
        _require(w.dim() == 3 and w.shape[0] == F and w.shape[2] == D and w.shape[1] in (N - s, 1),
                 f"{where}: W_dec[{s}] must be [F={F}, {N - s} or 1, D={D}], got {tuple(w.shape)}")
        _require(w.is_contiguous(), f"{where}: W_dec[{s}] must be contiguous (strides {tuple(w.stride())})")
        _require(w.dtype == W_dec[0].dtype, f"{where}: W_dec[{s}] is {w.dtype}, W_dec[0] {W_dec[0].dtype}")
        _require(w.device == acts.device, f"{where}: W_dec[{s}] is on {w.device}, acts on {acts.device}")
        _require(w.dtype.is_floating_point, f"{where}: W_dec[{s}] must be floating, got {w.dtype}")
    _require(acts.dtype.is_floating_point, f"{where}: acts must be floating, got {acts.dtype}")
    if grad_mask is not None:
        _require(tuple(grad_mask.shape) == (B, N, F) and grad_mask.dtype == torch.bool,
                 f"{where}: grad_mask must be a bool [B, N, F] = {(B, N, F)}, got "
                 f"{grad_mask.dtype} {tuple(grad_mask.shape)}")
        _require(grad_mask.device == acts.device, f"{where}: grad_mask is on {grad_mask.device}")


def _check_index(idx, n: int, what: str):
    # The listings are built here from nonzero(), so this is cheap insurance against a caller's
    # tensors (or a future listing) pointing outside the tensors the kernels index.
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        _require(0 <= lo and hi < n, f"{what}: index range [{lo}, {hi}] outside [0, {n})")


def _check_csr(ptr, idx, n_rows: int, n_cols: int, what: str):
    _require(ptr.numel() == n_rows + 1, f"{what}: {ptr.numel()} row pointers for {n_rows} rows")
    _check_index(idx, n_cols, what)


class _TritonDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, grad_mask, dense_grad_above, block_d, *W_dec):
        check_decode_inputs(acts, W_dec, grad_mask)
        B, N, F = acts.shape
        D = W_dec[0].shape[-1]
        # Listed once, shared with the sparsity term; none above DENSE_ACTS_ABOVE (early in training
        # nearly half the activations fire: dense cuBLAS products are then cheaper than any listing).
        indices = nonzero_positions(acts, DENSE_ACTS_ABOVE)
        nz = None if indices is None else SparseLayers(acts.detach(), indices=indices)
        dense = [nz is None or nz.counts[s] > DENSE_ACTS_ABOVE * B * F for s in range(N)]
        if all(dense):
            y = torch.zeros(B, N, D, dtype=torch.float32, device=acts.device)
        else:
            y = torch.empty(B, N, D, dtype=torch.float32, device=acts.device)  # every element written
            # row pointers of all layers into the one (layer, token, feature)-sorted listing; a dense
            # layer gets empty rows (its product is added below)
            rowptr = nz.token_pointers()
            offsets = torch.tensor([0] + nz.counts[:-1], device=acts.device).cumsum(0)
            rowptr = rowptr + offsets[:, None]
            for s in range(N):
                if dense[s]:
                    rowptr[s] = rowptr[s, :1]
            _check_index(nz.f, F, "triton_decode: feature index")
            tables = _weight_table(W_dec, acts.device)
            grid = (B, triton.cdiv(D, block_d), N)
            _check_grid(grid, "triton_decode forward")
            _decode_fwd_kernel[grid](y, W_dec[0], tables[0], tables[1], rowptr, nz.f, nz.values, B, D,
                                     *y.stride()[:2], PER_LAYER=N > 1 and all(w.shape[1] == 1 for w in W_dec),
                                     BLOCK_D=block_d, **_decode_launch(block_d))
        for s in range(N):
            if dense[s]:
                w = W_dec[s]
                n_slots = w.shape[1]
                y_s = y[:, s:s + n_slots].view(B, n_slots * D)
                y_s += acts[:, s].detach().to(w.dtype).mm(w.detach().reshape(F, n_slots * D)).float()
        ctx.nz, ctx.dense = nz, dense
        ctx.dense_grad_above, ctx.block_d = dense_grad_above, block_d
        ctx.grad_mask = grad_mask  # the object itself: it keys mask_positions (a bool tensor, no grad)
        ctx.save_for_backward(acts if any(dense) else None, *W_dec)
        return y.to(torch.promote_types(acts.dtype, W_dec[0].dtype))

    @staticmethod
    def backward(ctx, grad_y):
        acts, *W_dec = ctx.saved_tensors
        B, N, D = grad_y.shape
        F, block_d = W_dec[0].shape[0], ctx.block_d
        dY = grad_y.contiguous()  # the sampled kernel reads dY[b, s:] as one run of values
        dev = dY.device
        need_Ws = ctx.needs_input_grad[4:]
        launch = _decode_launch(block_d)
        grad_W = [None] * N
        # Weight gradients: dense sources as matmuls, all the others in one launch.
        kernel_sources = [s for s in range(N) if need_Ws[s] and not ctx.dense[s]]
        for s in range(N):
            if need_Ws[s] and ctx.dense[s]:
                n_slots = W_dec[s].shape[1]
                dY_s = dY[:, s:s + n_slots].reshape(B, n_slots * D)
                grad_W[s] = acts[:, s].to(dY.dtype).t().mm(dY_s).view(F, n_slots, D).to(W_dec[s].dtype)
        if kernel_sources:
            for s in kernel_sources:  # every element is written by the kernel (zeros where none fired)
                grad_W[s] = torch.empty_like(W_dec[s])
            colptr, b_idx, values = _feature_major_all(ctx.nz, F)
            _check_csr(colptr, b_idx, N * F, B, "triton_decode weight gradient")
            pairs = _slot_pairs(tuple((s, W_dec[s].shape[1]) for s in kernel_sources), dev)
            dw_table = _weight_table([grad_W[s] if s in kernel_sources else None for s in range(N)], dev)
            grid = (F, triton.cdiv(D, block_d), pairs.shape[1])
            _check_grid(grid, "triton_decode weight gradient")
            _decode_dw_kernel[grid](grad_W[kernel_sources[0]], dw_table[0], dw_table[1], pairs, dY, colptr, b_idx,
                                    values, F, D, *dY.stride()[:2], BLOCK_D=block_d, **launch)
        grad_acts = None
        if ctx.needs_input_grad[0]:
            layer_pairs = sampled_pairs(ctx.grad_mask, N, ctx.dense_grad_above)
            sampled = [s for s in range(N) if layer_pairs[s] is not None]
            # [N, B, F] like the encode's output; zeros off the mask of the sampled layers
            grad_acts = (torch.zeros if sampled else torch.empty)(N, B, F, dtype=torch.float32, device=dev)
            for s in range(N):
                if layer_pairs[s] is None:
                    w = W_dec[s]
                    n_slots = w.shape[1]
                    dY_s = dY[:, s:s + n_slots].reshape(B, n_slots * D)
                    grad_acts[s] = (dY_s.to(w.dtype) @ w.reshape(F, n_slots * D).t()).float()
            counts = [layer_pairs[s][1].numel() for s in sampled]
            total = sum(counts)
            if total:
                # one (layer, token, feature) listing of every sampled layer, feature-major within each
                pb = torch.cat([layer_pairs[s][1] for s in sampled])
                pf = torch.cat([layer_pairs[s][3] for s in sampled])
                ps = torch.repeat_interleave(torch.tensor(sampled, device=dev), torch.tensor(counts, device=dev),
                                             output_size=total)
                _check_index(pb, B, "triton_decode activation gradient: token index")
                _check_index(pf, F, "triton_decode activation gradient: feature index")
                w_table = _weight_table(W_dec, dev)
                _check_grid((total,), "triton_decode activation gradient")
                _decode_sampled_grad_kernel[(total,)](grad_acts, dY, W_dec[0], *w_table, ps, pb, pf,
                                                      B, F, *dY.stride()[:2], BLOCK_D=block_d, **launch)
            grad_acts = grad_acts.to(grad_y.dtype).transpose(0, 1)
        return (grad_acts, None, None, None, *grad_W)


def _weight_table(tensors, device):
    """int64 [3, N]: each [F, S_s, D] tensor's address, row stride and row length S_s * D (equal for
    a contiguous one), for the kernels' pointer tables; zeros for a None (a layer no kernel reads)."""
    rows = [(t.data_ptr(), t.stride(0), t.shape[1] * t.shape[2]) if t is not None else (0, 0, 0)
            for t in tensors]
    return torch.tensor(list(zip(*rows)), dtype=torch.int64, device=device)


_SLOT_PAIRS: dict = {}


def _slot_pairs(sources: tuple, device) -> torch.Tensor:
    """int32 [2, P]: (source s, slot j) for every slot of the given (s, S_s) sources (the weight
    gradient's grid axis 2); kept per layout and device, so a step copies no table to the GPU."""
    key = (sources, str(device))
    table = _SLOT_PAIRS.get(key)
    if table is None:
        if len(_SLOT_PAIRS) >= 64:  # which layers are dense changes over training: keep the cache small
            _SLOT_PAIRS.clear()
        pairs = [(s, j) for s, n_slots in sources for j in range(n_slots)]
        table = _SLOT_PAIRS[key] = torch.tensor(pairs, dtype=torch.int32).t().contiguous().to(device)
    return table


def _feature_major_all(nz, F: int):
    """The activations' non-zeros of all layers as one feature-major CSR: (column pointers [N * F + 1]
    into the concatenated listing, where layer s's feature f is column s * F + f; token index;
    value). One stable sort for all layers (tokens stay ascending within a column)."""
    key = nz.s * F + nz.f
    order = torch.argsort(key, stable=True)
    colptr = torch.zeros(nz.N * F + 1, dtype=torch.int64, device=key.device)
    colptr[1:] = torch.bincount(key, minlength=nz.N * F).cumsum(0)
    return colptr, nz.b[order], nz.values[order]


def window_totals(grad_y, W_dec, *, block_f: int = WINDOW_BLOCKS["block_f"],
                  block_k: int = WINDOW_BLOCKS["block_k"]):
    """[N, F] float32: T[s, f] = sum_b <dY[b, s:s+S_s], W_s[f]> (kernels/fused.py's window sums; its
    `_window_totals` is the twin) in one launch over all source layers."""
    B, N, D = grad_y.shape
    F = W_dec[0].shape[0]
    _require(len(W_dec) == N and all(w.is_contiguous() and w.shape[0] == F and w.shape[2] == D for w in W_dec),
             f"window_totals: W_dec must be {N} contiguous [F={F}, S, D={D}] tensors")
    col = grad_y.float().sum(0)  # [N, D], contiguous
    out = torch.empty(N, F, dtype=torch.float32, device=grad_y.device)
    table = _weight_table(W_dec, grad_y.device)
    grid = (triton.cdiv(F, block_f), N)
    _check_grid(grid, "window_totals")
    _window_totals_kernel[grid](out, col, W_dec[0], *table, F, D, BLOCK_F=block_f, BLOCK_K=block_k,
                                **WINDOW_LAUNCH)
    return out


def triton_decode(acts, W_dec, grad_mask=None, *, dense_grad_above: float = DENSE_GRAD_ABOVE,
                  block_d: int | None = None):
    """Sparse decode (Triton); same result as `reference_decode`, exact gradients for every W_dec[s]
    and for acts where grad_mask is True (everywhere when None; 0 elsewhere)."""
    if block_d is None:
        block_d = decode_block_d(acts.shape[1], acts.shape[2], W_dec[0].shape[-1], W_dec[0].element_size())
    return _TritonDecode.apply(acts, grad_mask, dense_grad_above, block_d, *W_dec)
