"""Every Triton kernel at offsets past 2^31 elements, under TRITON_INTERPRET=1 (CPU), cheaply.

The products of sizes that pass 2^31 at real shapes (layer * B * F, layer * F * D, token * N * D,
feature * S * D) reach a kernel as (index) x (stride). Here the strides are made ~2^30 elements with
small index ranges, over one buffer of ~4.3 GB of address space of which only a few pages are ever
touched (Linux maps untouched pages lazily), so index 2 or 3 lands past 2^31 elements. With 32-bit
offset arithmetic the address wraps negative: the results come out wrong or the process crashes,
which is why the kernels run in a subprocess and the test compares its output with the twins'.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest

TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None

SCRIPT = textwrap.dedent(r'''
    import os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    import threading, time
    import torch
    import triton.runtime.interpreter as interp
    from cltrain.kernels import triton_ops as T

    # A guard for the machine: stop at once should anything touch the buffer's pages wholesale.
    def watchdog(limit_mb=1500):
        while True:
            with open("/proc/self/statm") as fh:
                if int(fh.read().split()[1]) * 4096 >> 20 > limit_mb:
                    print("RSS above the guard: something touched the whole buffer", flush=True)
                    os._exit(3)
            time.sleep(0.005)
    threading.Thread(target=watchdog, daemon=True).start()

    # The interpreter copies every argument's whole storage back after a launch (GPU -> host
    # emulation); on CPU the "copy" is from a storage onto itself, and it would touch all of buf.
    # Skip exactly that self-copy (private API of triton.runtime.interpreter, checked in Triton
    # 3.6-3.9: GridExecutor._restore_args_dev).
    _restore = interp.GridExecutor._restore_args_dev
    def restore_unless_same(self, args_dev, args_hst, kwargs, kwargs_hst):
        same = all(getattr(d, "data_ptr", None) is None or d.untyped_storage().data_ptr() ==
                   h.untyped_storage().data_ptr() for d, h in zip(args_dev, args_hst))
        if not same:
            _restore(self, args_dev, args_hst, kwargs, kwargs_hst)
    interp.GridExecutor._restore_args_dev = restore_unless_same
    from cltrain.kernels.torch_ops import encode_forward_twin

    L = int(os.environ.get("LARGE_STRIDE", 2 ** 30 + 2 ** 20))  # index 2 is past 2^31 elements
    MB = 2 ** 20
    # address space only (indices up to 2, 4-byte elements): pages stay untouched until written
    buf = torch.empty(8 * L + 64 * MB, dtype=torch.uint8)
    bases = iter(range(0, 64 * MB, MB))  # each tensor's index-0 slab: 1 MB apart

    def view(dtype, shape, stride):
        """A tensor over buf at a fresh 1 MB slab, with the given (large) strides."""
        typed = buf.view(dtype)
        t = torch.as_strided(typed, shape, stride, next(bases) // typed.element_size())
        assert t.untyped_storage().data_ptr() == buf.untyped_storage().data_ptr()
        return t

    def put(dst, src):  # write only the addressed elements (a copy_ of a strided view)
        dst.copy_(src.to(dst.dtype))
        return dst

    g = torch.Generator().manual_seed(0)
    def grid_vals(*shape):  # multiples of 1/8: every sum below is exact in float32
        return (torch.randint(-3, 4, shape, generator=g).float() / 8).masked_fill_(
            torch.rand(shape, generator=g) < 0.0, 0)

    errors = []
    def check(what, got, want):
        if not torch.equal(got.float(), want.float()):
            errors.append(f"{what}: max |diff| {(got.float() - want.float()).abs().max().item():.3g}")

    # ---- encode forward: x[b, n] at n * L, W_enc[n] at n * L, outputs at n * son = n * L
    N, B, F, D = 3, 5, 6, 8
    x = put(view(torch.float32, (B, N, D), (D, L, 1)), grid_vals(B, N, D) * 4)
    W = put(view(torch.float32, (N, F, D), (L, D, 1)), grid_vals(N, F, D))
    b = grid_vals(N, F)
    lt = ((torch.randint(1, 16, (N, F), generator=g).float() + 0.5) / 16).log()
    pre = view(torch.float32, (N, B, F), (L, F, 1))
    acts = view(torch.float32, (N, B, F), (L, F, 1))
    mask = view(torch.int8, (N, B, F), (L, F, 1))
    gap = torch.empty(N, 1, F)
    T._encode_fwd_kernel[(1, 1, N)](x, W, b, lt, pre, acts, mask, gap, B, F, D, 0.5,
                                    *x.stride(), *W.stride(), L,
                                    BLOCK_B=8, BLOCK_F=8, BLOCK_D=8, DOT_F32=True, IEEE=True)
    p_r, a_r, m_r, g_r = encode_forward_twin(x.clone(), W.clone(), b, lt, 1.0)
    check("encode forward: pre", pre.transpose(0, 1), p_r)
    check("encode forward: acts", acts.transpose(0, 1), a_r)
    check("encode forward: grad_mask", mask.transpose(0, 1).bool(), m_r)
    if not torch.allclose(gap.sum(1), g_r, rtol=1e-6, atol=1e-6):  # theta is off the grid: rounding
        errors.append("encode forward: preact_gap")

    # ---- encode backward: every [N, B, F] tensor at n * son = n * L
    gacts = put(view(torch.float32, (N, B, F), (L, F, 1)), grid_vals(N, B, F))
    gh = view(torch.float32, (N, B, F), (L, F, 1))
    glt = torch.empty(N, F)
    ggap = grid_vals(N, F)
    T._encode_bwd_kernel[(1, N)](pre, lt, pre, gacts, ggap, lt, gh, glt, B, F, 1.0, 0.5, L,
                                 HAS_GPRE=False, HAS_GACTS=True, HAS_GGAP=True, HAS_WEXT=False,
                                 ST_TO_PREACT=False, BLOCK_B=8, BLOCK_F=8)
    pre_c, ga_c, th = pre.clone(), gacts.clone(), lt.exp().unsqueeze(1)
    diff = pre_c - th
    gh_r = torch.where(diff > 0, ga_c, 0) - (diff < 0) * ggap.unsqueeze(1)
    glt_r = ((diff < 0).sum(1) * ggap - (torch.where(diff.abs() < 0.5, ga_c, 0) * th).sum(1)) * th.squeeze(1)
    check("encode backward: grad pre", gh, gh_r)
    if not torch.allclose(glt, glt_r, rtol=1e-6, atol=1e-6):
        errors.append("encode backward: grad log_threshold")

    # ---- decode: y[b] at b * L, W_s[f] at f * L, dY[b] at b * L, dW[f] at f * L
    B, N, F, D, s = 3, 2, 3, 8, 0
    S = N - s
    Wd = put(view(torch.float32, (F, S, D), (L, D, 1)), grid_vals(F, S, D))
    W1 = grid_vals(F, 1, D)  # source layer 1 (target 1 only), small
    y = view(torch.float32, (B, N, D), (L, D, 1))
    a = grid_vals(B, N, F).abs() + 0.125
    a[0, 0, 1] = 0
    lay, tok, feat = a.transpose(0, 1).nonzero(as_tuple=True)
    vals = a[tok, lay, feat]
    counts = torch.bincount(lay * B + tok, minlength=N * B).view(N, B)
    rowptr = torch.cat([torch.zeros(1, dtype=torch.int64), counts.view(-1).cumsum(0)])
    rowptr = torch.stack([rowptr[:B + 1], rowptr[B:]])  # [N, B + 1], global offsets
    tables = torch.tensor([[Wd.data_ptr(), W1.data_ptr()], [Wd.stride(0), W1.stride(0)]])
    T._decode_fwd_kernel[(B, 1, N)](y, Wd, tables[0], tables[1], rowptr, feat, vals, B, D,
                                    *y.stride()[:2], PER_LAYER=False, BLOCK_D=8)
    y_r = torch.zeros(B, N, D)
    y_r += (a[:, 0] @ Wd.clone().reshape(F, S * D)).view(B, S, D)
    y_r[:, 1] += a[:, 1] @ W1[:, 0]
    check("decode forward", y, y_r)
    a = a[:, 0]
    tok, feat = a.nonzero(as_tuple=True)

    dY = put(view(torch.float32, (B, N, D), (L, D, 1)), grid_vals(B, N, D))
    dw = view(torch.float32, (F, S, D), (L, D, 1))
    order = torch.argsort(feat * B + tok, stable=True)
    ccol = torch.tensor([0] + torch.cumsum((a != 0).sum(0), 0).tolist())
    pairs = torch.tensor([[s] * S, list(range(S))], dtype=torch.int32)  # (source, slot) pairs
    dw_table = torch.tensor([[dw.data_ptr()], [dw.stride(0)]])
    T._decode_dw_kernel[(F, 1, S)](dw, dw_table[0], dw_table[1], pairs, dY, ccol, tok[order],
                                   a[tok, feat][order], F, D, *dY.stride()[:2], BLOCK_D=8)
    dY_s = dY.clone()[:, s:s + S].reshape(B, S * D)
    check("decode weight gradient", dw, (a.t() @ dY_s).view(F, S, D))

    # the kernel addresses ga [N, B, F] as (s * B + b) * F + f: with s = 0 and F passed as ga's row
    # stride L, that is ga[b, f] of this (B, F) view
    ga = view(torch.float32, (B, F), (L, 1))
    put(ga, torch.zeros(B, F))
    pb, pf = tok[order], feat[order]
    w_table = torch.tensor([[Wd.data_ptr()], [Wd.stride(0)], [S * D]])
    T._decode_sampled_grad_kernel[(pb.numel(),)](ga, dY, Wd, *w_table, torch.zeros_like(pb), pb, pf, B,
                                                 ga.stride(0), *dY.stride()[:2], BLOCK_D=8)
    full = dY_s @ Wd.clone().reshape(F, S * D).t()
    check("decode activation gradient", ga[pb, pf], full[pb, pf])

    col = grid_vals(N, D)
    totals = torch.empty(1, F)
    T._window_totals_kernel[(1, 1)](totals, col, Wd, *w_table, F, D, BLOCK_F=4, BLOCK_K=8)
    check("window sums", totals[0], Wd.clone().reshape(F, S * D) @ col[s:s + S].reshape(-1))

    print("\n".join(errors) if errors else "OK")
    sys.exit(1 if errors else 0)
''')


@pytest.mark.skipif(not TRITON_IMPORTABLE, reason="triton is not importable")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="relies on Linux's lazy page mapping")
def test_kernels_with_offsets_past_2_31():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), (
        f"exit {run.returncode}\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
