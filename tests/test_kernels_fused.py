"""kernels/fused.py: encode + decode as one Function, against reference_encode then reference_decode.

The window-complement backward (straight-through to h off, a dense window, P = active | outside the
window sparse) must give every gradient of the composition exactly: weights, biases, thresholds and
decoder, with and without the sparsity term's activation gradient and the pre-activation term.
Triton runs under TRITON_INTERPRET=1 on CPU (float32), the torch path in float64.
"""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest
import torch

CUDA = torch.cuda.is_available()
TRITON_IN_PROCESS = importlib.util.find_spec("triton") is not None and (
    CUDA or "triton" not in sys.modules or os.environ.get("TRITON_INTERPRET") == "1")
if TRITON_IN_PROCESS and not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from cltrain import kernels  # noqa: E402
from cltrain.kernels import fused  # noqa: E402
from cltrain.kernels import cpu_native, torch_ops  # noqa: E402
from cltrain.train.clt import (CLT, CLTConfig, LossWeights, loss_terms, reference_decode,  # noqa: E402
                               reference_encode)

DEV = "cuda" if CUDA else "cpu"


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _steps(shape, gen, step):
    """Non-zero multiples of `step` in {+-1, +-2, +-3} * step: sums of products stay exact."""
    mag = torch.randint(1, 4, shape, generator=gen).double()
    return mag * (torch.randint(0, 2, shape, generator=gen).double() * 2 - 1) * step


def _inputs(B, N, D, F, per_layer, seed=0):
    g = _gen(seed)
    x = _steps((B, N, D), g, 0.5)
    W = _steps((N, F, D), g, 1 / 64)
    b = _steps((N, F), g, 1 / 32)
    # thresholds half-way between multiples of 1/128, the pre-activations' grid; so are the window
    # edges theta +- eps/2 for the eps used here (a multiple of 1/64 plus 1/128 off the grid)
    theta = (torch.randint(8, 40, (N, F), generator=g).double() + 0.5) / 128
    W_dec = [torch.randn(F, 1 if per_layer else N - s, D, generator=g, dtype=torch.float64)
             for s in range(N)]
    return x, W, b, theta.log(), W_dec


def _loss(enc, y, gy, ga, gg, use, norms=None, gn=None):
    loss = (y * gy).sum()
    if "acts" in use:
        loss = loss + (enc.acts * ga).sum()
    if "gap" in use:
        loss = loss + (enc.preact_gap * gg).sum()
    if "norms" in use:  # the decoder norms: the fused Function's output, the reference's from W_dec
        loss = loss + ((enc.decoder_norms if norms is None else norms) * gn).sum()
    return loss


def _close(actual, expected, rtol, what):
    actual, expected = actual.double().cpu(), expected.double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()
    assert err <= rtol, f"{what}: max error {err:.3g} (relative to max |expected|) > {rtol:g}"


CASES = [  # B, N, D, F, per_layer
    (37, 3, 20, 50, False),
    (23, 1, 12, 30, False),
    (29, 4, 16, 36, True),
]
SMALL = {37: (13, 3, 12, 24), 23: (11, 1, 12, 20), 29: (12, 3, 12, 18)}


def _run(impl, B, N, D, F, per_layer, eps, st, use, dtype, rtol, monkeypatch, dga=None):
    x, W, b, lt, W_dec = _inputs(B, N, D, F, per_layer)
    with torch.no_grad():
        e = reference_encode(x, W, b, lt, eps, st)
        diff = e.pre - lt.exp()
        p_density = ((diff > 0) | (diff <= -eps / 2)).double().mean().item()
        mask_density = e.grad_mask.double().mean().item()
    # between the two densities: the fused backward takes the window-complement path when it may
    dga = (p_density + mask_density) / 2 if dga is None else dga
    g = _gen(3)
    gy = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    ga = torch.randn(B, N, F, generator=g, dtype=torch.float64)
    gg = torch.randn(N, F, generator=g, dtype=torch.float64)
    gn = torch.randn(N, F, generator=g, dtype=torch.float64)

    params = [t.clone().requires_grad_() for t in (W, b, lt, *W_dec)]
    enc = reference_encode(x, *params[:3], eps, st)
    y = reference_decode(enc.acts, params[3:])
    norms = torch.stack([w.pow(2).sum(dim=(1, 2)).sqrt() for w in params[3:]])
    ref = torch.autograd.grad(_loss(enc, y, gy, ga, gg, use, norms, gn), params)

    calls = []
    original = fused._window_totals
    monkeypatch.setattr(fused, "_window_totals", lambda *a: calls.append(1) or original(*a))
    params_k = [t.detach().to(DEV, dtype).requires_grad_() for t in (W, b, lt, *W_dec)]
    fn = fused.torch_encode_decode if impl == "torch" else fused.triton_encode_decode
    kw = {} if impl == "torch" else dict(blocks=dict(block_b=32, block_f=32, block_d=32, block_b_bwd=32),
                                         block_d=32)
    enc_k, y_k = fn(x.to(DEV, dtype), *params_k[:3], params_k[3:], eps, st, dense_grad_above=dga, **kw)
    loss_k = _loss(enc_k, y_k, gy.to(DEV, dtype), ga.to(DEV, dtype), gg.to(DEV, dtype), use, gn=gn.to(DEV, dtype))
    got = torch.autograd.grad(loss_k, params_k)
    _close(y_k.detach(), y.detach(), rtol, "y_hat")
    _close(enc_k.acts.detach(), enc.acts.detach(), rtol, "acts")
    _close(enc_k.decoder_norms.detach(), norms.detach(), rtol, "decoder norms")
    names = ["W_enc", "b_enc", "log_threshold"] + [f"W_dec[{s}]" for s in range(N)]
    for name, a, r in zip(names, got, ref):
        _close(a, r, rtol, f"grad {name}")
    return calls, p_density, mask_density


@pytest.mark.parametrize("B,N,D,F,per_layer", CASES, ids=["ragged", "N=1", "per-layer"])
@pytest.mark.parametrize("use", ["mse", "mse+acts", "mse+acts+gap", "mse+acts+gap+norms"])
@pytest.mark.parametrize("st", [False, True], ids=["st-off", "st-to-preact"])
def test_torch_encode_decode(B, N, D, F, per_layer, use, st, monkeypatch):
    calls, p, m = _run("torch", B, N, D, F, per_layer, 0.9, st, use, torch.float64, 1e-10, monkeypatch)
    # the window-complement path ran exactly where it applies (and only there)
    assert p < m, f"inputs do not exercise the window-complement path: P {p:.2f} >= mask {m:.2f}"
    assert len(calls) == (0 if st else 1)


@pytest.mark.skipif(not cpu_native.available(), reason=f"no compiled CPU kernels: {cpu_native.failure()}")
@pytest.mark.parametrize("B,N,D,F,per_layer", CASES + [(41, 5, 37, 45, False)],
                         ids=["ragged", "N=1", "per-layer", "N=5,D=37"])
@pytest.mark.parametrize("st", [False, True], ids=["st-off", "st-to-preact"])
def test_torch_encode_decode_float32_one_pass(B, N, D, F, per_layer, st, monkeypatch):
    # float32 on CPU: each source layer's decoder gradient (with the norms' term folded in) and
    # activation gradient come from the compiled one-pass kernel (cpu_native.decode_grads), on the
    # window-complement's P or on grad_mask; equal to the float64 reference to float32 rounding
    used = []
    original = cpu_native.decode_grads
    monkeypatch.setattr(cpu_native, "decode_grads", lambda *a: used.append(a[0].shape) or original(*a))
    # these small inputs fire on more than the compiled products' density switch: take them anyway
    monkeypatch.setattr(torch_ops, "COMPILED_DENSE_ABOVE", 1.0)
    # straight-through to h on: no window complement, so list grad_mask itself (dense_grad_above 1)
    _run("torch", B, N, D, F, per_layer, 0.9, st, "mse+acts+gap+norms", torch.float32, 2e-5, monkeypatch,
         dga=1.0 if st else None)
    # (a layer whose own mask or activations are dense takes the dense products instead)
    assert used, f"the one-pass kernel ran for none of the {N} source layers"


@pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton not importable, or imported before "
                                                  "TRITON_INTERPRET could be set (see test_kernels.py)")
@pytest.mark.parametrize("case", [0, 1, 2], ids=["ragged", "N=1", "per-layer"])
@pytest.mark.parametrize("st", [False, True], ids=["st-off", "st-to-preact"])
def test_triton_encode_decode(case, st, monkeypatch):
    B, N, D, F, per_layer = CASES[case]
    B, N, D, F = SMALL[B]
    calls, p, m = _run("triton", B, N, D, F, per_layer, 0.9, st, "mse+acts+gap", torch.float32, 1e-5,
                       monkeypatch)
    assert p < m and len(calls) == (0 if st else 1)


NEEDS_TRITON = pytest.mark.skipif(not TRITON_IN_PROCESS, reason="triton not importable, or imported before "
                                  "TRITON_INTERPRET could be set (see test_kernels.py)")


@NEEDS_TRITON
@pytest.mark.parametrize("per_layer", [False, True], ids=["cross-layer", "per-layer"])
def test_triton_window_totals_matches_twin(per_layer):
    # The one-launch window sums against _window_totals' per-layer matrix-vector products, on ragged
    # sizes (N = 7, F = 37 over 16-feature blocks, S_s * D over 32-value chunks, B odd) with one
    # source layer's decoder zero; every layer's row is compared, so a layer skipped, read with
    # another layer's decoder or slots, or summed twice fails.
    from cltrain.kernels import triton_ops

    B, N, D, F = 19, 7, 13, 37
    g = _gen(9)
    W_dec = [torch.randn(F, 1 if per_layer else N - s, D, generator=g) for s in range(N)]
    W_dec[3].zero_()
    grad_y = torch.randn(B, N, D, generator=g)
    got = triton_ops.window_totals(grad_y.to(DEV), [w.to(DEV) for w in W_dec], block_f=16, block_k=32)
    want = fused._window_totals(grad_y.double(), [w.double() for w in W_dec])
    assert got.dtype == torch.float32 and got.shape == (N, F)
    for s in range(N):
        _close(got[s], want[s], 1e-5, f"window totals of source layer {s}")
    _close(got, want, 1e-5, "window totals")


@NEEDS_TRITON
def test_triton_encode_decode_many_layers(monkeypatch):
    # N = 6 through the fused Function's window-complement path with the Triton window kernel (one
    # launch, counted) and the one-launch decode backward: every gradient against the composition.
    from cltrain.kernels import triton_ops

    launches = []
    original = triton_ops.window_totals
    monkeypatch.setattr(triton_ops, "window_totals", lambda *a, **k: launches.append(1) or original(*a, **k))
    calls, p, m = _run("triton", 15, 6, 12, 20, False, 0.9, False, "mse+acts+gap", torch.float32, 1e-5,
                       monkeypatch)
    assert p < m and len(calls) == 1 and len(launches) == 1


def test_clt_encode_decode_matches_composition():
    # CLT.encode_decode with install()'s fused impl equals encode then decode with the references,
    # through the whole loss (sparsity and pre-activation terms included), eps = 2.
    g = _gen(5)
    cfg = CLTConfig(n_layers=3, d_model=16, n_features=64)
    x = torch.randn(96, 3, 16, generator=g, dtype=torch.float64) * 4
    y = torch.randn(96, 3, 16, generator=g, dtype=torch.float64)
    grads = {}
    for impl in ("dense", "torch_sparse"):
        clt = CLT(cfg, generator=_gen(11)).double()
        clt.calibrate_thresholds(x, 0.02)
        kernels.install(clt, impl)
        assert (getattr(clt, "encode_decode_impl", None) is None) == (impl == "dense")
        enc, y_hat = clt.encode_decode(x)
        terms = loss_terms(clt, enc, y_hat, y, LossWeights(sparsity=0.1, preact=1e-2))
        sum(terms.values()).backward()
        grads[impl] = {n: p.grad for n, p in clt.named_parameters()}
    for name, r in grads["dense"].items():
        _close(grads["torch_sparse"][name], r, 1e-10, f"grad {name}")


@pytest.mark.skipif(not CUDA or not TRITON_IN_PROCESS, reason="needs CUDA and triton")
@pytest.mark.parametrize("complement", [True, False], ids=["window-complement", "composed"])
def test_triton_encode_decode_bf16(complement, monkeypatch):
    # bf16 on the GPU against the float64 reference on the same (bf16-rounded) inputs. Each stored
    # bf16 tensor (pre, acts, y, the gradients) carries a relative rounding of 2^-8 ~ 3.9e-3, and the
    # gradients are a few such roundings deep (acts -> y -> dY W^T -> gh -> gh^T x): 2e-2 of the
    # largest magnitude. Thresholds sit on a grid that bf16 pre-activations cannot cross by rounding.
    B, N, D, F = 512, 4, 64, 256
    x, W, b, lt, W_dec = _inputs(B, N, D, F, False, seed=4)
    bf = [t.to(torch.bfloat16).double() for t in (x, W, b, lt, *W_dec)]
    x, W, b, lt, W_dec = bf[0], bf[1], bf[2], bf[3], bf[4:]
    eps = 0.9
    g = _gen(3)
    gy = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    gg = torch.randn(N, F, generator=g, dtype=torch.float64)
    params = [t.clone().requires_grad_() for t in (W, b, lt, *W_dec)]
    enc = reference_encode(x, *params[:3], eps, False)
    y = reference_decode(enc.acts, params[3:])
    ref = torch.autograd.grad(_loss(enc, y, gy, None, gg, "mse+gap"), params)
    calls = []
    original = fused._window_totals
    monkeypatch.setattr(fused, "_window_totals", lambda *a: calls.append(1) or original(*a))
    params_k = [t.detach().cuda().to(torch.bfloat16).requires_grad_() for t in (W, b, lt, *W_dec)]
    enc_k, y_k = fused.triton_encode_decode(x.cuda().to(torch.bfloat16), *params_k[:3], params_k[3:], eps,
                                            False, dense_grad_above=0.5 if complement else 0.0)
    got = torch.autograd.grad(_loss(enc_k, y_k, gy.cuda().bfloat16(), None, gg.cuda().bfloat16(), "mse+gap"),
                              params_k)
    assert len(calls) == int(complement)
    _close(y_k.detach().float(), y.detach(), 2e-2, "y_hat (bf16)")
    for name, a, r in zip(["W_enc", "b_enc", "log_threshold"] + [f"W_dec[{s}]" for s in range(N)], got, ref):
        _close(a.float(), r, 2e-2, f"grad {name} (bf16)")
