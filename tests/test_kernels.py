"""kernels/: every implementation and every gradient against train/clt.py's references.

CPU: torch paths in float64; Triton kernels under TRITON_INTERPRET=1 in float32 (the kernels compute
in fp32 whatever the storage). CUDA (when present): the Triton kernels run natively, in float32 and in
bf16 against their fp32 twins, with tolerances that follow from bf16's 8-bit mantissa.
"""
from __future__ import annotations

import importlib
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.utils.weak import WeakTensorKeyDictionary

CUDA = torch.cuda.is_available()


# The interpreter must be on before triton itself is imported (triton.language's own helpers, e.g.
# tl.sum, are jit functions defined at import). If something in this process imported triton first,
# the Triton tests run in a fresh subprocess instead (test_triton_in_fresh_process).
TRITON_IMPORTABLE = importlib.util.find_spec("triton") is not None
TRITON_IN_PROCESS = TRITON_IMPORTABLE and (
    CUDA or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1")
if TRITON_IN_PROCESS and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"


def _import_triton_ops():
    if not TRITON_IN_PROCESS:
        return None
    name = "cltrain.kernels.triton_ops"
    mod = sys.modules.get(name)
    if mod is None:
        return importlib.import_module(name)
    return mod if mod.INTERPRET == (not CUDA) else importlib.reload(mod)


triton_ops = _import_triton_ops()

from cltrain import kernels  # noqa: E402
from cltrain.kernels import torch_encode, torch_sparse_decode  # noqa: E402
from cltrain.kernels import torch_ops  # noqa: E402
from cltrain import encoding  # noqa: E402
from cltrain.kernels.torch_ops import encode_forward_twin  # noqa: E402
from cltrain.train.clt import (CLT, CLTConfig, LossWeights, loss_terms, reference_decode,  # noqa: E402
                               reference_encode)

needs_triton = pytest.mark.skipif(
    triton_ops is None, reason="triton is not importable" if not TRITON_IMPORTABLE else
    "triton was imported before TRITON_INTERPRET could be set: see test_triton_in_fresh_process")
needs_cuda = pytest.mark.skipif(not CUDA or triton_ops is None, reason="needs CUDA and triton")
DEV = "cuda" if CUDA else "cpu"

# Large blocks: the interpreter's cost is per block operation, not per element.
ENC_BLOCKS = dict(block_b=64, block_f=64, block_d=32)
DEC_BLOCK_D = 32


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _grid(shape, gen, scale=8.0):
    """Random non-zero multiples of 1/scale in [-3/scale, 3/scale]: products and sums of a few dozen
    of them are exact in float32, so a kernel's accumulation order cannot move a pre-activation
    across a JumpReLU threshold or window edge (thresholds are placed off this grid)."""
    mag = torch.randint(1, 4, shape, generator=gen).double()
    sign = torch.randint(0, 2, shape, generator=gen).double() * 2 - 1
    return mag * sign / scale


def _close(actual, expected, rtol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max() / scale
    assert err <= rtol, f"{what}: max error {err:.3g} (relative to max |expected|) > {rtol:g}"


@pytest.mark.skipif(not TRITON_IMPORTABLE or TRITON_IN_PROCESS, reason="Triton tests run in this process")
def test_triton_in_fresh_process():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "-k", "triton and not fresh_process"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]


# ----------------------------------------------------------------------------------------------------
# install()


def test_install_choices():
    clt = CLT(CLTConfig(n_layers=2, d_model=8, n_features=16))
    assert kernels.install(clt, "dense") == "dense"
    assert clt.encode_impl is reference_encode and clt.decode_impl is reference_decode
    assert kernels.install(clt, "torch_sparse") == "torch_sparse"
    assert clt.encode_impl is torch_encode and clt.decode_impl is torch_sparse_decode
    assert kernels.install(clt) == ("triton" if CUDA and kernels.triton_available() else "torch_sparse")
    with pytest.raises(ValueError, match="'bogus'.*dense.*torch_sparse.*triton"):
        kernels.install(clt, "bogus")


@needs_triton
def test_install_triton():
    clt = CLT(CLTConfig(n_layers=2, d_model=8, n_features=16)).to(DEV)
    assert kernels.install(clt, "triton") == "triton"
    assert clt.encode_impl is triton_ops.triton_encode and clt.decode_impl is triton_ops.triton_decode


# ----------------------------------------------------------------------------------------------------
# Decode

# (B, N, D, F, per_layer, act density, extra grad-mask density or None for no mask, case)
DECODE_CASES = [
    (37, 3, 20, 50, False, 0.1, 0.05, "ragged"),
    (37, 3, 20, 50, False, 0.1, None, "no-mask"),
    (23, 1, 20, 50, False, 0.2, 0.1, "N=1"),
    (29, 4, 20, 36, True, 0.1, 0.05, "per-layer"),
    (31, 3, 20, 50, False, 0.1, 0.05, "rows"),
]
SMALL = {  # the interpreter runs a Python loop per program: smaller sizes for Triton on CPU
    "ragged": (13, 3, 20, 24), "no-mask": (13, 3, 20, 24), "N=1": (11, 1, 20, 24),
    "per-layer": (12, 3, 20, 18), "rows": (12, 3, 20, 24)}


def _decode_inputs(B, N, D, F, per_layer, density, mask_density, case, dtype, seed=0):
    g = _gen(seed)
    values = torch.rand(N, B, F, generator=g, dtype=torch.float64) + 0.1
    acts = (values * (torch.rand(N, B, F, generator=g) < density)).transpose(0, 1)  # encode's layout
    if case == "rows":  # all-inactive and all-active tokens, and a source layer with nothing active
        acts[0] = 0
        acts[1] = values[:, 1]
        acts[:, 1] = 0
        acts[2, 1, :3] = values[1, 2, :3]  # ...except one token, so the layer is not trivially empty
        acts[3, 1] = 0
    W = [torch.randn(F, 1 if per_layer else N - s, D, generator=g, dtype=torch.float64) for s in range(N)]
    dY = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    mask = None
    if mask_density is not None:
        mask = (acts != 0) | (torch.rand(B, N, F, generator=g) < mask_density)
    return acts.to(dtype), [w.to(dtype) for w in W], dY.to(dtype), mask


def _check_decode(fn, acts, W, dY, mask, rtol, **kw):
    acts_r = acts.detach().double().requires_grad_()
    W_r = [w.detach().double().requires_grad_() for w in W]
    y_r = reference_decode(acts_r, W_r)
    grads_r = torch.autograd.grad(y_r, [acts_r, *W_r], dY.double())

    acts_k = acts.detach().clone().requires_grad_()
    W_k = [w.detach().clone().requires_grad_() for w in W]
    y_k = fn(acts_k, W_k, mask, **kw)
    grads_k = torch.autograd.grad(y_k, [acts_k, *W_k], dY)

    _close(y_k, y_r, rtol, "y_hat")
    where = torch.ones_like(acts, dtype=torch.bool) if mask is None else mask
    assert torch.isfinite(grads_k[0]).all(), "grad acts: non-finite outside the mask"
    _close(grads_k[0].cpu()[where.cpu()], grads_r[0][where.cpu()], rtol, "grad acts (in mask)")
    for s, (gk, gr) in enumerate(zip(grads_k[1:], grads_r[1:])):
        _close(gk, gr, rtol, f"grad W_dec[{s}]")


@pytest.mark.parametrize("B,N,D,F,per_layer,density,mask_density,case", DECODE_CASES,
                         ids=[c[-1] for c in DECODE_CASES])
@pytest.mark.parametrize("acts_grad", ["sampled", "sampled-in-blocks", "dense"])
@pytest.mark.parametrize("products", ["csr", "dense"])
def test_torch_sparse_decode(B, N, D, F, per_layer, density, mask_density, case, acts_grad, products,
                             monkeypatch):
    acts, W, dY, mask = _decode_inputs(B, N, D, F, per_layer, density, mask_density, case, torch.float64)
    thr = 0.0 if acts_grad == "dense" else 1.0
    # forward and weight-gradient products over the non-zeros (CSR) or dense (dense activations)
    monkeypatch.setattr(torch_ops, "DENSE_ACTS_ABOVE", 1.0 if products == "csr" else -1.0)
    if acts_grad == "sampled-in-blocks":  # column blocks of 16 over up to 3 x 20 columns: a ragged last one
        monkeypatch.setattr(torch_ops, "SAMPLED_BLOCK", 16)
    _check_decode(torch_sparse_decode, acts, W, dY, mask, 1e-12, dense_grad_above=thr)


def test_torch_sparse_decode_all_active_and_float32():
    acts, W, dY, mask = _decode_inputs(9, 2, 12, 10, False, 1.1, 0.0, "all", torch.float32)
    assert bool((acts != 0).all())
    _check_decode(torch_sparse_decode, acts, W, dY, mask, 1e-5, dense_grad_above=1.0)


def test_torch_sparse_decode_bf16_cpu_upcasts():
    acts, W, dY, mask = _decode_inputs(13, 3, 16, 24, False, 0.2, 0.05, "bf16", torch.bfloat16)
    _check_decode(torch_sparse_decode, acts, W, dY, mask, 2e-2)


@needs_triton
@pytest.mark.parametrize("case", ["ragged", "no-mask", "N=1", "per-layer", "rows"])
@pytest.mark.parametrize("acts_grad", ["sampled", "dense"])
@pytest.mark.parametrize("products", ["csr", "dense"])
def test_triton_decode(case, acts_grad, products, monkeypatch):
    _, _, _, _, per_layer, density, mask_density, _ = next(c for c in DECODE_CASES if c[-1] == case)
    if case == "no-mask" and acts_grad == "sampled":
        pytest.skip("without a mask the activation gradient is always dense")
    if products == "dense" and acts_grad == "sampled" and case != "ragged":
        pytest.skip("dense products: one case is enough")
    # forward and weight gradient: the kernels over the non-zeros, or cuBLAS above the density cap
    monkeypatch.setattr(triton_ops, "DENSE_ACTS_ABOVE", 1.0 if products == "csr" else -1.0)
    B, N, D, F = SMALL[case]
    acts, W, dY, mask = _decode_inputs(B, N, D, F, per_layer, density, mask_density, case, torch.float32)
    acts, W, dY = acts.to(DEV), [w.to(DEV) for w in W], dY.to(DEV)
    mask = None if mask is None else mask.to(DEV)
    thr = 1.0 if acts_grad == "sampled" else 0.0
    _check_decode(triton_ops.triton_decode, acts, W, dY, mask, 1e-5, dense_grad_above=thr,
                  block_d=DEC_BLOCK_D)


@pytest.mark.parametrize("impl", ["torch_sparse", "triton"])
def test_decode_mixed_mask_density(impl, monkeypatch):
    """Layers on both sides of dense_grad_above in one call: dense product for some, sampled for others."""
    if impl == "triton" and triton_ops is None:
        pytest.skip("triton is not importable")
    B, N, D, F = (13, 3, 20, 24) if impl == "triton" else (37, 3, 20, 50)
    acts, W, dY, mask = _decode_inputs(B, N, D, F, False, 0.1, 0.05, "mixed", torch.float32)
    mask[:, 1] = True
    if impl == "triton":  # the kernels, not the dense products above the density cap
        monkeypatch.setattr(triton_ops, "DENSE_ACTS_ABOVE", 1.0)
    fn = torch_sparse_decode if impl == "torch_sparse" else triton_ops.triton_decode
    kw = {} if impl == "torch_sparse" else {"block_d": DEC_BLOCK_D}
    dev = DEV if impl == "triton" else "cpu"
    _check_decode(fn, acts.to(dev), [w.to(dev) for w in W], dY.to(dev), mask.to(dev), 1e-5,
                  dense_grad_above=0.5, **kw)


class _CountLaunches:
    """Stands in for a Triton kernel: records each launch's grid, then launches the real kernel."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@needs_triton
@pytest.mark.parametrize("per_layer", [False, True], ids=["cross-layer", "per-layer"])
def test_triton_decode_many_layers_one_launch(per_layer, monkeypatch):
    """N = 7 source layers (28 (source, target) pairs), ragged sizes: each backward product is one
    launch over all source layers, beside the per-source dense fallbacks. Layer 0 has no active
    feature and nothing in the mask (a sampled layer with no pairs), layer 2's activations are dense
    (dense products for all three), layer 4's mask is full (dense activation gradient). Every
    gradient is compared per source layer, so a layer skipped, double-counted or given another
    layer's decoder fails; the launch grids must list exactly the kernel layers' (source, slot) pairs
    and masked positions."""
    B, N, D, F = 19, 7, 45, 21
    acts, W, dY, mask = _decode_inputs(B, N, D, F, per_layer, 0.12, 0.05, "many", torch.float32, seed=7)
    g = _gen(8)
    acts[:, 0] = 0
    acts[:, 2] = (torch.rand(B, F, generator=g) + 0.1) * (torch.rand(B, F, generator=g) < 0.6)
    mask = (acts != 0) | (torch.rand(B, N, F, generator=g) < 0.05)
    mask[:, 0] = False
    mask[:, 4] = True
    density = (acts != 0).double().mean((0, 2))
    assert density[0] == 0 and density[2] > 0.3 and all(0 < density[s] < 0.3 for s in (1, 3, 4, 5, 6))
    monkeypatch.setattr(triton_ops, "DENSE_ACTS_ABOVE", 0.3)  # layer 2 dense, the others listed
    dw_kernel = _CountLaunches(triton_ops._decode_dw_kernel)
    ga_kernel = _CountLaunches(triton_ops._decode_sampled_grad_kernel)
    monkeypatch.setattr(triton_ops, "_decode_dw_kernel", dw_kernel)
    monkeypatch.setattr(triton_ops, "_decode_sampled_grad_kernel", ga_kernel)
    _check_decode(triton_ops.triton_decode, acts.to(DEV), [w.to(DEV) for w in W], dY.to(DEV), mask.to(DEV),
                  1e-5, dense_grad_above=0.5, block_d=16)
    slots = [w.shape[1] for w in W]
    assert dw_kernel.grids == [(F, math.ceil(D / 16), sum(slots) - slots[2])]
    sampled = [s for s in range(N) if mask[:, s].sum() <= 0.5 * B * F]  # layers 2 and 4: dense products
    assert sampled == [0, 1, 3, 5, 6]
    assert ga_kernel.grids == [(int(mask[:, sampled].sum()),)]


@needs_cuda
@pytest.mark.parametrize("acts_grad", ["sampled", "dense"])
def test_triton_decode_bf16(acts_grad, monkeypatch):
    monkeypatch.setattr(triton_ops, "DENSE_ACTS_ABOVE", 1.0)  # the kernels, not the dense products
    acts, W, dY, mask = _decode_inputs(300, 4, 200, 520, False, 0.02, 0.02, "bf16", torch.bfloat16)
    acts, W, dY, mask = acts.cuda(), [w.cuda() for w in W], dY.cuda(), mask.cuda()
    # bf16 output rounding (2^-8 relative) dominates: fp32 accumulation of the products is exact-ish.
    _check_decode(triton_ops.triton_decode, acts, W, dY, mask, 1.5e-2,
                  dense_grad_above=1.0 if acts_grad == "sampled" else 0.0)


# ----------------------------------------------------------------------------------------------------
# Encode

# (B, N, D, F, bandwidth, case)
ENCODE_CASES = [
    (37, 3, 20, 50, 0.5, "ragged"),
    (17, 1, 24, 40, 0.5, "N=1"),
    (21, 3, 20, 36, 2.0, "wide-window"),
    (21, 3, 20, 36, 0.5, "rows"),
]


def _encode_inputs(B, N, D, F, bandwidth, case, dtype, seed=1):
    g = _gen(seed)
    x = _grid((B, N, D), g, 2.0)
    W = _grid((N, F, D), g, 8.0)
    b = _grid((N, F), g, 4.0)
    # thresholds off the 1/16 grid of pre-activations (so are the window edges theta +- eps/2)
    theta = (torch.randint(1, 16, (N, F), generator=g).double() + 0.5) / 16
    if case == "rows":  # a layer active everywhere, one inactive (and outside the window) everywhere
        b[0] = 64.0
        b[1] = -64.0
    return [t.to(dtype) for t in (x, W, b, theta.log())]


def _check_encode(fn, inputs, bandwidth, st, use, rtol, **kw):
    B, N, D = inputs[0].shape
    F = inputs[1].shape[1]
    g = _gen(7)
    ga, gp = torch.randn(B, N, F, generator=g), torch.randn(B, N, F, generator=g)
    gg = torch.randn(N, F, generator=g)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ker_in = [t.detach().clone().requires_grad_() for t in inputs]
    outs = []
    for f, args in ((reference_encode, ref_in), (fn, ker_in)):
        extra = kw if f is fn else {}
        enc = f(*args, bandwidth, st, **extra)
        loss = 0
        if use in ("acts", "both"):
            loss = loss + (enc.acts * ga.to(enc.acts)).sum()
        if use in ("pre", "both"):
            loss = loss + (enc.pre * gp.to(enc.pre)).sum()
        if use in ("gap", "both", "acts+gap"):
            loss = loss + (enc.preact_gap * gg.to(enc.preact_gap)).sum()
        if use == "acts+gap":
            loss = loss + (enc.acts * ga.to(enc.acts)).sum()
        grads = torch.autograd.grad(loss, args, allow_unused=True)  # log_threshold: unused via pre
        outs.append((enc, [torch.zeros_like(a) if g is None else g for a, g in zip(args, grads)]))
    (e_r, g_r), (e_k, g_k) = outs
    _close(e_k.pre, e_r.pre, rtol, "pre")
    _close(e_k.acts, e_r.acts, rtol, "acts")
    _close(e_k.preact_gap, e_r.preact_gap, rtol, "preact_gap")
    assert e_k.grad_mask.dtype == torch.bool and torch.equal(e_k.grad_mask.cpu(), e_r.grad_mask.cpu())
    for name, a, b in zip(("x", "W_enc", "b_enc", "log_threshold"), g_k, g_r):
        _close(a, b, rtol, f"grad {name}")
    return e_r


@pytest.mark.parametrize("B,N,D,F,bandwidth,case", ENCODE_CASES, ids=[c[-1] for c in ENCODE_CASES])
@pytest.mark.parametrize("st", [False, True], ids=["st-off", "st-to-preact"])
def test_torch_encode(B, N, D, F, bandwidth, case, st):
    inputs = _encode_inputs(B, N, D, F, bandwidth, case, torch.float64)
    e = _check_encode(torch_encode, inputs, bandwidth, st, "both", 1e-12)
    if case == "rows":
        assert bool(e.grad_mask[:, 0].all()) and not bool(e.grad_mask[:, 1].any())
    else:  # the inputs exercise all three regions: active, in the window only, outside
        m, a = e.grad_mask, e.acts != 0
        assert bool(a.any()) and bool((m & ~a).any()) and (case == "wide-window" or bool((~m).any()))


@pytest.mark.parametrize("use", ["acts", "pre", "gap"])
def test_torch_encode_one_output_used(use):
    inputs = _encode_inputs(19, 2, 20, 30, 0.5, "ragged", torch.float64)
    _check_encode(torch_encode, inputs, 0.5, False, use, 1e-12)


@pytest.mark.parametrize("B,N,D,F,bandwidth,case", ENCODE_CASES, ids=[c[-1] for c in ENCODE_CASES])
@pytest.mark.parametrize("st", [False, True], ids=["st-off", "st-to-preact"])
@pytest.mark.parametrize("use", ["acts+gap", "acts", "gap"])
@pytest.mark.parametrize("path", ["sparse", "window-sums", "dense"])
def test_torch_encode_weight_grads_sparse_and_dense(B, N, D, F, bandwidth, case, st, use, path):
    # What training asks for (no d loss / d x, no d loss / d pre): the weight gradients come from the
    # grad_mask positions plus a rank-1 term (sparse), from the positions where h >= theta plus
    # per-feature window sums (window-sums: a dense mask, straight-through to h off), or from dense
    # matmuls; all equal the reference.
    x, W, b, lt = _encode_inputs(B, N, D, F, bandwidth, case, torch.float64)
    with torch.no_grad():
        e = reference_encode(x, W, b, lt, bandwidth, st)
        at_or_above = (e.pre >= lt.exp()).double().mean().item()
        in_mask = e.grad_mask.double().mean().item()
    if path == "window-sums" and not at_or_above < in_mask:
        pytest.skip("no density between the active positions' and the mask's")
    threshold = {"sparse": 1.0, "dense": -1.0, "window-sums": (at_or_above + in_mask) / 2}[path]
    grads = []
    for fn, kw in ((reference_encode, {}), (torch_encode, {"dense_grad_above": threshold})):
        params = [t.clone().requires_grad_() for t in (W, b, lt)]
        enc = fn(x, *params, bandwidth, st, **kw)
        g = _gen(5)
        gap_w = torch.randn(N, F, generator=g, dtype=torch.float64)
        acts_w = torch.randn(B, N, F, generator=g, dtype=torch.float64)
        terms = {"acts": (enc.acts * acts_w).sum(), "gap": (enc.preact_gap * gap_w).sum()}
        loss = sum(terms[k] for k in use.split("+"))
        grads.append(torch.autograd.grad(loss, params))
    for name, a, r in zip(("W_enc", "b_enc", "log_threshold"), *grads):
        _close(a, r, 1e-12, f"grad {name} ({path})")


@needs_triton
@pytest.mark.parametrize("B,N,D,F,bandwidth,case", ENCODE_CASES, ids=[c[-1] for c in ENCODE_CASES])
@pytest.mark.parametrize("st", [False, True], ids=["st-off", "st-to-preact"])
def test_triton_encode(B, N, D, F, bandwidth, case, st):
    inputs = [t.to(DEV) for t in _encode_inputs(B, N, D, F, bandwidth, case, torch.float32)]
    _check_encode(triton_ops.triton_encode, inputs, bandwidth, st, "both", 1e-6, blocks=ENC_BLOCKS)


@needs_triton
@pytest.mark.parametrize("use", ["acts", "pre", "gap"])
def test_triton_encode_one_output_used(use):
    inputs = [t.to(DEV) for t in _encode_inputs(19, 2, 20, 30, 0.5, "ragged", torch.float32)]
    _check_encode(triton_ops.triton_encode, inputs, 0.5, False, use, 1e-6, blocks=ENC_BLOCKS)


@needs_cuda
def test_triton_encode_bf16_forward_matches_twin():
    g = _gen(3)
    B, N, D, F = 300, 3, 256, 520
    x = torch.randn(B, N, D, generator=g).bfloat16().cuda()
    W = (torch.randn(N, F, D, generator=g) / math.sqrt(D)).bfloat16().cuda()
    b = (torch.randn(N, F, generator=g) * 0.1).bfloat16().cuda()
    lt = (torch.rand(N, F, generator=g) * 0.5 + 0.1).log().bfloat16().cuda()
    enc = triton_ops.triton_encode(x, W, b, lt, 0.5, False)
    pre, acts, mask, gap = encode_forward_twin(x, W, b, lt, 0.5)
    # bf16 storage of pre: 2^-8 relative; fp32 accumulation order: negligible next to it.
    _close(enc.pre.float(), pre, 1e-2, "pre (bf16)")
    _close(enc.acts.float(), acts, 1e-2, "acts (bf16)")
    _close(enc.preact_gap.float(), gap, 1e-2, "preact_gap (bf16)")
    # the mask may differ only where the fp32 pre-activation is within bf16 rounding of an edge
    flips = (enc.grad_mask != mask).float().mean().item()
    assert flips < 1e-3, f"grad_mask differs at {flips:.2%} of positions"


# ----------------------------------------------------------------------------------------------------
# Whole CLT forward + backward with install(clt, impl) against the dense references


def _clt_grads(impl, cfg, dtype, device, x, y):
    clt = CLT(cfg, generator=_gen(11)).double()
    if cfg.activation == "jumprelu":  # in float64 for every impl, so all see the same thresholds
        clt.calibrate_thresholds(x, 0.1)
    clt.to(device=device, dtype=dtype)
    assert kernels.install(clt, impl) == impl
    enc, y_hat = clt(x.to(device, dtype))
    terms = loss_terms(clt, enc, y_hat, y.to(device, dtype), LossWeights(sparsity=0.1, preact=1e-2))
    sum(terms.values()).backward()
    return y_hat.detach(), {n: p.grad for n, p in clt.named_parameters()}


CLT_CASES = [
    dict(n_layers=3, d_model=16, n_features=40, bandwidth=0.3),  # sparse window: sampled acts grad
    dict(n_layers=3, d_model=16, n_features=40),  # eps = 2: the window is dense
    dict(n_layers=3, d_model=16, n_features=40, per_layer=True, bandwidth=0.3,
         straight_through_to_preact=True),
    dict(n_layers=2, d_model=16, n_features=40, activation="topk", topk=4),
]


@pytest.mark.parametrize("impl", ["torch_sparse", "triton"])
@pytest.mark.parametrize("cfg", CLT_CASES, ids=["clt", "clt-eps2", "plt-st", "topk"])
def test_clt_end_to_end(impl, cfg):
    if impl == "triton" and triton_ops is None:
        pytest.skip("triton is not importable")
    dtype = torch.float64 if impl == "torch_sparse" else torch.float32
    device = DEV if impl == "triton" else "cpu"
    cfg = CLTConfig(**cfg)
    g = _gen(5)
    x = torch.randn(24, cfg.n_layers, cfg.d_model, generator=g, dtype=torch.float64) * 4
    y = torch.randn(24, cfg.n_layers, cfg.d_model, generator=g, dtype=torch.float64)
    y_ref, g_ref = _clt_grads("dense", cfg, torch.float64, "cpu", x, y)
    y_k, g_k = _clt_grads(impl, cfg, dtype, device, x, y)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    _close(y_k, y_ref, rtol, "y_hat")
    for name, gr in g_ref.items():
        _close(g_k[name], gr, rtol, f"grad {name}")


def test_torch_sparse_step_lists_mask_positions_once(monkeypatch):
    # The decode's backward and the encode's backward walk the same grad_mask positions, the decode's
    # forward and the sparsity term the same non-zero activations: each listed once per step.
    g = _gen(11)
    clt = CLT(CLTConfig(n_layers=3, d_model=16, n_features=64, bandwidth=0.05), generator=g)
    x = torch.randn(64, 3, 16, generator=g)
    clt.calibrate_thresholds(x, 0.02)  # below DENSE_ACTS_ABOVE and SPARSE_TERMS_BELOW: listed
    kernels.install(clt, "torch_sparse")
    built = []
    original = torch_ops.SparseLayers.__init__

    def counting_init(self, t, with_values=True, indices=None):
        built.append(("acts" if with_values else "mask", "shared" if indices is not None else "listed"))
        original(self, t, with_values, indices)

    monkeypatch.setattr(torch_ops.SparseLayers, "__init__", counting_init)
    listings = []

    class CountingMemo(WeakTensorKeyDictionary):
        def __setitem__(self, key, value):
            listings.append(str(key.dtype))
            super().__setitem__(key, value)

    monkeypatch.setattr(encoding, "_NONZERO", CountingMemo())
    enc, y_hat = clt(x)
    assert enc.grad_mask.float().mean() < torch_ops.DENSE_GRAD_ABOVE
    terms = loss_terms(clt, enc, y_hat, torch.randn_like(y_hat), LossWeights(sparsity=0.1, preact=0.1))
    sum(terms.values()).backward()
    # one count-and-listing per tensor (the activations, the mask), one layout of the mask's positions
    assert sorted(listings) == ["torch.bool", "torch.float32"], listings
    assert sorted(built) == [("acts", "shared"), ("mask", "shared")], built


RSS_AFTER_FREE = """
import sys, torch
from cltrain.kernels import retain_freed_cpu_memory
if sys.argv[1] == "retain":
    assert retain_freed_cpu_memory()
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
t = torch.ones(64 * 2**20)  # 256 MiB, touched
before = rss_mb()
del t
print(before - rss_mb())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_retain_freed_cpu_memory_keeps_large_blocks_mapped():
    # glibc unmaps a freed 256 MiB block at once by default; once retained, the process keeps it
    # (so the next step's temporaries reuse mapped pages instead of faulting them in again).
    released = {mode: float(subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, mode], check=True,
                                           capture_output=True, text=True).stdout)
                for mode in ("default", "retain")}
    assert released["default"] > 200 and released["retain"] < 50, released
