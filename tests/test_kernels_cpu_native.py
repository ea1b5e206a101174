"""kernels/cpu_native.py: the compiled CPU sparse products against float64 products, the decode and
encode with them and without them, their input checks, the build cache and the fallback when no
compiler works."""
from __future__ import annotations

import os
import stat

import pytest
import torch

from cltrain.kernels import cpu_native, torch_ops
from cltrain.kernels.torch_ops import torch_sparse_decode
from cltrain.train.clt import reference_decode

NATIVE = cpu_native.available()
needs_native = pytest.mark.skipif(not NATIVE, reason=f"no compiled CPU kernel here: {cpu_native.failure()}")


def _pairs(counts, B, g):
    """Column pointers and token indices (sorted per feature, as the decode lists them) for features
    with the given numbers of tokens."""
    rows = [torch.randperm(B, generator=g)[:c].sort().values for c in counts]
    ccol = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0)
    return ccol, torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)


@needs_native
@pytest.mark.parametrize("K,block", [(1, 1024), (15, 1024), (33, 16), (100, 32), (257, 64)])
@pytest.mark.parametrize("threads", [1, 2, 5])
def test_sampled_product_matches_float64(K, block, threads, monkeypatch):
    g = torch.Generator().manual_seed(K * 10 + threads)
    B = 23
    # features with 0 tokens, fewer than a tile (8), a tile, a tile and a rest, two tiles and more, all B
    counts = [0, 1, 7, 8, 9, 0, 17, 23, 3, 16, 0]
    F = len(counts)
    W = torch.randn(F, K + 3, generator=g)[:, 1:K + 1]  # row stride > K, not 64-byte aligned
    Y = torch.randn(B, 2 * K + 5, generator=g)[:, K:2 * K]  # row stride 2K + 5
    ccol, rows = _pairs(counts, B, g)
    f_idx = torch.repeat_interleave(torch.arange(F), torch.tensor(counts))
    out = torch.full((int(ccol[-1]),), float("nan"))
    monkeypatch.setattr(cpu_native, "BLOCK", block)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert cpu_native.sampled_product(W, Y, ccol, rows, out)
    ref = (W.double()[f_idx] * Y.double()[rows]).sum(1)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * K ** 0.5)


@needs_native
def test_sampled_product_checks_its_inputs():
    W, Y = torch.randn(3, 8), torch.randn(5, 8)
    ccol, rows = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 4, 2])
    out = torch.empty(3)
    with pytest.raises(ValueError, match=r"token index out of range \[0, 5\)"):
        cpu_native.sampled_product(W, Y, ccol, torch.tensor([0, 5, 2]), out)
    with pytest.raises(ValueError, match="non-decreasing"):
        cpu_native.sampled_product(W, Y, torch.tensor([0, 2, 1, 3]), rows, out)
    with pytest.raises(ValueError, match="pointers have 3 entries, expected 4"):
        cpu_native.sampled_product(W, Y, ccol[:3], rows, out)
    with pytest.raises(ValueError, match="W must be a 2-d CPU torch.float32"):
        cpu_native.sampled_product(W.double(), Y, ccol, rows, out)
    with pytest.raises(ValueError, match="W has 8 columns, Y 7"):
        cpu_native.sampled_product(W, Y[:, :7], ccol, rows, out)
    with pytest.raises(ValueError, match="W needs unit column stride"):
        cpu_native.sampled_product(W.t().contiguous().t(), Y, ccol, rows, out)
    with pytest.raises(ValueError, match="out must be contiguous with 3 entries, got 2"):
        cpu_native.sampled_product(W, Y, ccol, rows, out[:2])


@needs_native
@pytest.mark.parametrize("K", [1, 15, 16, 100, 256, 300, 529])  # below, at and past a register block
@pytest.mark.parametrize("accumulate", [False, True])
@pytest.mark.parametrize("threads", [1, 3])
def test_csr_dense_matches_float64(K, accumulate, threads, monkeypatch):
    g = torch.Generator().manual_seed(K + 1000 * accumulate + threads)
    M = 29
    counts = [0, 1, 5, 0, 29, 12, 3, 0]  # empty rows (first, middle, last), a full row
    R = len(counts)
    ptr, idx = _pairs(counts, M, g)
    vals = torch.randn(int(ptr[-1]), generator=g)
    D = torch.randn(M, K + 7, generator=g)[:, 3:K + 3]  # row stride K + 7, unaligned
    base = torch.randn(R, 2 * K + 1, generator=g)
    out = base[:, :K].clone() if accumulate else torch.full((R, K), float("nan"))
    out = torch.cat([out, base[:, K:]], 1)[:, :K]  # row stride 2K + 1
    start = out.clone()
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    assert cpu_native.csr_dense(ptr, idx, vals, D, out, accumulate)
    rows = torch.repeat_interleave(torch.arange(R), torch.tensor(counts))
    ref = torch.zeros(R, K, dtype=torch.float64).index_add_(0, rows, vals.double()[:, None] * D.double()[idx])
    if accumulate:
        ref += start.double()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


@needs_native
def test_csr_dense_checks_its_inputs():
    D, out = torch.randn(4, 8), torch.empty(3, 8)
    ptr, idx, vals = torch.tensor([0, 1, 1, 2]), torch.tensor([3, 0]), torch.randn(2)
    with pytest.raises(ValueError, match=r"column index out of range \[0, 4\)"):
        cpu_native.csr_dense(ptr, torch.tensor([4, 0]), vals, D, out, False)
    with pytest.raises(ValueError, match="D has 7 columns, out 8"):
        cpu_native.csr_dense(ptr, idx, vals, D[:, :7], out, False)
    with pytest.raises(ValueError, match="vals must be contiguous with 2 entries, got 3"):
        cpu_native.csr_dense(ptr, idx, torch.randn(3), D, out, False)
    with pytest.raises(ValueError, match="out needs unit column stride"):
        cpu_native.csr_dense(ptr, idx, vals, D, torch.empty(8, 3).t(), False)
    with pytest.raises(ValueError, match="pointers span 0..2, indices have 1 entries"):
        cpu_native.csr_dense(ptr, idx[:1], vals, D, out, False)


def _decode_float32(seed=0, B=37, N=3, D=20, F=50):
    g = torch.Generator().manual_seed(seed)
    acts = (torch.rand(N, B, F, generator=g) + 0.1) * (torch.rand(N, B, F, generator=g) < 0.06)  # below the switches
    acts = acts.transpose(0, 1)
    W = [torch.randn(F, N - s, D, generator=g) for s in range(N)]
    dY = torch.randn(B, N, D, generator=g)
    mask = (acts != 0) | (torch.rand(B, N, F, generator=g) < 0.05)
    return acts, W, dY, mask


def _decode_grads(acts, W, dY, mask):
    a = acts.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in W]
    y = torch_sparse_decode(a, ws, mask, dense_grad_above=1.0)
    return torch.autograd.grad(y, [a, *ws], dY)


def test_decode_same_with_and_without_compiled_kernel(monkeypatch):
    """The decode's activation gradient on the mask: compiled kernel, torch's sampled_addmm and the
    float64 reference agree (where no compiler works both runs take the fallback, and still agree)."""
    acts, W, dY, mask = _decode_float32()
    calls = []
    real = cpu_native.decode_grads
    monkeypatch.setattr(cpu_native, "decode_grads", lambda *a: calls.append(1) or real(*a))
    native = _decode_grads(acts, W, dY, mask)
    assert calls, "the decode did not ask for the compiled kernel"
    monkeypatch.setenv("CLTRAIN_CPU_KERNELS", "0")
    fallback = _decode_grads(acts, W, dY, mask)
    a_r = acts.double().requires_grad_()
    W_r = [w.double().requires_grad_() for w in W]
    ref = torch.autograd.grad(reference_decode(a_r, W_r), [a_r, *W_r], dY.double())
    for name, got in (("compiled", native), ("fallback", fallback)):
        torch.testing.assert_close(got[0][mask].double(), ref[0][mask], rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
        for s, (g, r) in enumerate(zip(got[1:], ref[1:])):
            torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5,
                                       msg=lambda m, name=name, s=s: f"{name}, W_dec[{s}]: {m}")
    if NATIVE:
        assert not torch.equal(native[0], torch.zeros_like(native[0]))


def test_decode_with_a_mask_missing_active_positions():
    """A mask that leaves out active positions (allowed: the activation gradient is asked for on the
    mask only) still gives the exact decoder gradient: the one-pass kernel reads activations at the
    mask's pairs, so such a layer takes the separate products."""
    acts, W, dY, mask = _decode_float32(seed=1)
    mask = mask & (torch.rand(mask.shape, generator=torch.Generator().manual_seed(2)) < 0.5)
    got = _decode_grads(acts, W, dY, mask)
    W_r = [w.double().requires_grad_() for w in W]
    ref = torch.autograd.grad(reference_decode(acts.double(), W_r), W_r, dY.double())
    for s, (g, r) in enumerate(zip(got[1:], ref)):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5, msg=lambda m, s=s: f"W_dec[{s}]: {m}")


@needs_native
@pytest.mark.parametrize("F,K,B,density", [(37, 100, 29, 0.2), (64, 16 * 9, 100, 0.05), (5, 7, 3, 0.5),
                                           (9, 16 * 9 + 5, 11, 0.3), (50, 576 * 2 + 64, 64, 0.1), (8, 33, 5, 0.0)])
@pytest.mark.parametrize("with_coef", [True, False], ids=["coef", "no-coef"])
def test_decode_grads_one_pass(F, K, B, density, with_coef):
    """cpu_native.decode_grads against its definition on ragged shapes (K not a multiple of the
    vector width or block, features without pairs, inactive pairs, strided Y): the dot products at
    the pairs and dW = coef W + sum act Y, with dW overwritten wherever it was garbage."""
    g = torch.Generator().manual_seed(F * K + B)
    W = torch.randn(F, K + 3, generator=g)[:, :K]
    Y = torch.randn(B, K + 5, generator=g)[:, :K]
    pairs = (torch.rand(F, B, generator=g) < density).nonzero()
    f, b = pairs[:, 0].contiguous(), pairs[:, 1].contiguous()
    ccol = torch.zeros(F + 1, dtype=torch.int64)
    ccol[1:] = torch.bincount(f, minlength=F).cumsum(0)
    act = torch.randn(len(f), generator=g) * (torch.rand(len(f), generator=g) < 0.5)
    coef = torch.randn(F, generator=g) if with_coef else None
    out = torch.full((len(f),), float("nan"))
    dW = torch.full((F, K + 2), float("nan"))[:, :K]
    assert cpu_native.decode_grads(W, Y, ccol, b, act, coef, out, dW)
    ref_dW = (coef[:, None] * W.double()) if with_coef else torch.zeros(F, K, dtype=torch.float64)
    ref_dW.index_add_(0, f, act.double()[:, None] * Y.double()[b])
    torch.testing.assert_close(out.double(), (W.double()[f] * Y.double()[b]).sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(dW.double(), ref_dW, rtol=1e-5, atol=1e-4)


def test_build_is_cached_and_failures_fall_back(tmp_path, monkeypatch):
    monkeypatch.setenv("CLTRAIN_CACHE", str(tmp_path / "cache"))
    if NATIVE:
        first = cpu_native.build()
        mtime = first.stat().st_mtime_ns
        assert cpu_native.build() == first and first.stat().st_mtime_ns == mtime  # reused, not rebuilt
        assert first.parent == tmp_path / "cache" / "kernels"
        assert not [p for p in first.parent.iterdir() if p.name.endswith(".tmp")]
    # a compiler that fails: a clear error naming it, then a warning and the torch fallback
    bad = tmp_path / "bad-cc"
    bad.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo bad-cc 1.0; exit 0; fi\n"
                   "echo 'bad-cc: error: this compiler always fails' >&2\nexit 1\n")
    bad.chmod(bad.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CLTRAIN_CACHE", str(tmp_path / "cache2"))
    monkeypatch.setenv("CC", str(bad))
    with pytest.raises(RuntimeError, match=r"(?s)bad-cc failed to compile .*cpu_sparse\.c.*always fails"):
        cpu_native.build()
    assert not list((tmp_path / "cache2" / "kernels").iterdir())  # nothing half-written left
    monkeypatch.setattr(cpu_native, "_lib", None)
    monkeypatch.setattr(cpu_native, "_failure", None)
    with pytest.warns(RuntimeWarning, match="(?s)sampled_addmm, CSR addmm.*always fails"):
        assert not cpu_native.available()
    assert "always fails" in cpu_native.failure()
    acts, W, dY, mask = _decode_float32(seed=1)
    got = _decode_grads(acts, W, dY, mask)
    a_r = acts.double().requires_grad_()
    W_r = [w.double().requires_grad_() for w in W]
    ref = torch.autograd.grad(reference_decode(a_r, W_r), [a_r, *W_r], dY.double())
    torch.testing.assert_close(got[0][mask].double(), ref[0][mask], rtol=1e-5, atol=1e-5)


def _step_grads(impl, dtype, bandwidth, x, y):
    from cltrain import kernels
    from cltrain.train.clt import CLT, CLTConfig, LossWeights, loss_terms

    clt = CLT(CLTConfig(n_layers=3, d_model=24, n_features=256, bandwidth=bandwidth),
              generator=torch.Generator().manual_seed(3)).double()
    clt.calibrate_thresholds(x, 0.02)  # in float64 for every run, so all see the same thresholds
    clt.to(dtype)
    kernels.install(clt, impl)
    enc, y_hat = clt(x.to(dtype))
    sum(loss_terms(clt, enc, y_hat, y.to(dtype), LossWeights(sparsity=0.1, preact=1e-2)).values()).backward()
    return y_hat.detach(), {n: p.grad for n, p in clt.named_parameters()}


@pytest.mark.parametrize("bandwidth", [0.05, 2.0], ids=["narrow-window", "eps=2"])
def test_training_step_same_with_and_without_compiled_kernels(bandwidth, monkeypatch):
    """A float32 torch_sparse step (fused encode + decode, loss terms, backward) with the compiled
    kernels and with torch's products: both equal the float64 dense reference, and the compiled
    kernels did run (the decode's sparse products go through them)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(160, 3, 24, generator=g, dtype=torch.float64)
    y = torch.randn(160, 3, 24, generator=g, dtype=torch.float64)
    y_ref, g_ref = _step_grads("dense", torch.float64, bandwidth, x, y)
    used = {"sampled_product": 0, "csr_dense": 0, "decode_grads": 0}

    def counting(name, real):
        def call(*args):
            done = real(*args)
            used[name] += done
            return done
        return call

    for name in used:
        monkeypatch.setattr(cpu_native, name, counting(name, getattr(cpu_native, name)))
    runs = {"compiled": _step_grads("torch_sparse", torch.float32, bandwidth, x, y)}
    monkeypatch.setenv("CLTRAIN_CPU_KERNELS", "0")
    compiled_calls = dict(used)
    runs["fallback"] = _step_grads("torch_sparse", torch.float32, bandwidth, x, y)
    assert used == compiled_calls, "compiled kernels ran with CLTRAIN_CPU_KERNELS=0"
    if NATIVE:
        # per source layer: the forward; the weight gradient and the activation gradient on the mask in one pass
        assert compiled_calls == {"csr_dense": 3, "decode_grads": 3, "sampled_product": 0}, compiled_calls
    for run, (y_k, g_k) in runs.items():
        torch.testing.assert_close(y_k.double(), y_ref, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, r=run: f"{r} y_hat: {m}")
        for name, gr in g_ref.items():
            scale = gr.abs().max().item()
            torch.testing.assert_close(g_k[name].double(), gr, rtol=1e-3, atol=1e-4 * scale,
                                       msg=lambda m, r=run, n=name: f"{r} grad {n}: {m}")


def test_density_switch_follows_the_products(monkeypatch):
    """With the compiled kernels the sparse products pay up to COMPILED_DENSE_ABOVE: a float32 decode at
    ~7% activity and a ~9% mask (above torch's products' switches, below the compiled one) takes them (by
    default), and still equals the reference."""
    w32 = torch.zeros(2, 2)
    if NATIVE:
        assert torch_ops.default_dense_above(w32) == torch_ops.COMPILED_DENSE_ABOVE
        assert torch_ops.default_dense_above(w32, torch_ops.DENSE_ACTS_ABOVE) == torch_ops.COMPILED_DENSE_ABOVE
    assert torch_ops.default_dense_above(w32.double()) == torch_ops.DENSE_GRAD_ABOVE
    assert torch_ops.default_dense_above(w32.double(), torch_ops.DENSE_ACTS_ABOVE) == torch_ops.DENSE_ACTS_ABOVE
    g = torch.Generator().manual_seed(5)
    B, N, D, F = 64, 3, 20, 200
    acts = ((torch.rand(N, B, F, generator=g) + 0.1) * (torch.rand(N, B, F, generator=g) < 0.07)).transpose(0, 1)
    W = [torch.randn(F, N - s, D, generator=g) for s in range(N)]
    dY = torch.randn(B, N, D, generator=g)
    mask = (acts != 0) | (torch.rand(B, N, F, generator=g) < 0.02)
    assert torch_ops.DENSE_GRAD_ABOVE < mask.float().mean() < torch_ops.COMPILED_DENSE_ABOVE
    assert torch_ops.DENSE_ACTS_ABOVE < (acts != 0).float().mean() < torch_ops.COMPILED_DENSE_ABOVE
    used = []
    real = cpu_native.decode_grads
    monkeypatch.setattr(cpu_native, "decode_grads", lambda *a: used.append(1) or real(*a))
    a = acts.clone().requires_grad_()
    ws = [w.clone().requires_grad_() for w in W]
    got = torch.autograd.grad(torch_sparse_decode(a, ws, mask), [a, *ws], dY)
    assert bool(used) == NATIVE  # sampled (compiled) with the kernels; dense products without
    a_r = acts.double().requires_grad_()
    W_r = [w.double().requires_grad_() for w in W]
    ref = torch.autograd.grad(reference_decode(a_r, W_r), [a_r, *W_r], dY.double())
    torch.testing.assert_close(got[0][mask].double(), ref[0][mask], rtol=1e-5, atol=1e-5)
    for gk, gr in zip(got[1:], ref[1:]):
        torch.testing.assert_close(gk.double(), gr, rtol=1e-5, atol=1e-5)
    monkeypatch.setenv("CLTRAIN_CPU_KERNELS", "0")
    assert torch_ops.default_dense_above(w32) == torch_ops.DENSE_GRAD_ABOVE


@pytest.mark.skipif(not NATIVE or os.uname().machine != "x86_64", reason="an x86-64 build of the kernels")
def test_kernels_built_for_avx2_match_float64(tmp_path, monkeypatch):
    """The narrower-vector code path (no AVX-512: ACC_VECS 4 and GRAD_VECS 2, as on AVX2 or NEON machines), built here
    for x86-64-v3 and checked against float64 like the native build."""
    monkeypatch.setenv("CLTRAIN_CACHE", str(tmp_path))
    monkeypatch.setattr(cpu_native, "FLAGS", [f if f != "-march=native" else "-march=x86-64-v3"
                                              for f in cpu_native.FLAGS])
    monkeypatch.setattr(cpu_native, "_lib", None)
    assert cpu_native.available(), cpu_native.failure()
    for K in (15, 64, 300):
        test_csr_dense_matches_float64(K, True, 2, monkeypatch)
        test_sampled_product_matches_float64(K, 32, 2, monkeypatch)
    for F, K, B, density in ((37, 100, 29, 0.2), (9, 16 * 9 + 5, 11, 0.3)):  # GRAD_VECS 2 there
        test_decode_grads_one_pass(F, K, B, density, True)
