"""Check and time every encode / decode implementation available here; write benchmarks/kernels.md.

    python benchmarks/kernels.py [--quick] [--out benchmarks/kernels.md]

One run measures everything it reports: the machine's ceilings (matmul TFLOP/s, copy GB/s), then per
shape and implementation the error against the dense reference and the times of encode forward+
backward, decode forward, decode forward+backward and (at the training shapes) a whole training step
(forward, loss terms, backward, grad clipping, fused Adam), with the ratio to the dense reference.

Activity: thresholds are calibrated on the batch so each feature fires on ~1% of tokens (the trained
regime, "L0 in the low hundreds"). What the decode's activation gradient costs depends on the JumpReLU
straight-through window (grad_mask = active | |h - theta| < eps/2), reported for two settings:
  - eps = 2, the default: on normalized activations it covers nearly every position (measured and
    printed), so a decode on its own computes a dense activation gradient. The training step goes
    through CLT.encode_decode (kernels/fused.py), whose window-complement path computes exact
    activation gradients only on P = active | outside the window (~6%) and the window's part as
    per-feature sums; `--steps` times it against the composed encode and decode as well;
  - a trained-like window: eps chosen so grad_mask holds ~2% of positions (active 1% + 1% just below
    threshold), where the sampled product is used.
Times are the best of `reps` runs after a warm-up, on a possibly shared machine (load average shown).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import record_function

from cltrain import kernels
from cltrain.machine import cpu_model
from cltrain.kernels import torch_ops
from cltrain.train.clt import CLT, CLTConfig, LossWeights, loss_terms, reference_decode, reference_encode

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
TARGET_ACTIVE = 0.01
TRAINED_MASK = 0.02


def sync():
    if CUDA:
        torch.cuda.synchronize()


def timed(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def device_name() -> str:
    if CUDA:
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def load_avg() -> str:
    try:
        return " / ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def ceilings(quick: bool) -> dict:
    n = 8192 if CUDA else (1024 if quick else 2048)
    a = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    b = torch.randn(n, n, device=DEVICE, dtype=DTYPE)
    t = timed(lambda: a @ b, 3 if quick else 5)
    tflops = 2 * n ** 3 / t / 1e12
    src = torch.empty(64 * 2 ** 20 if not quick else 16 * 2 ** 20, device=DEVICE)
    dst = torch.empty_like(src)
    t = timed(lambda: dst.copy_(src), 5)
    gbs = 2 * src.numel() * src.element_size() / t / 1e9  # read + write
    return {"tflops": tflops, "gbs": gbs, "matmul_n": n}


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def impls_here() -> list[str]:
    names = ["dense", "torch_sparse"]
    if CUDA and kernels.triton_available():
        # "triton": what training runs (dense cuBLAS products above the GPU density switches);
        # "triton-sparse": the sparse Triton kernels at any density, to measure them against dense
        names += ["triton", "triton-sparse"]
    return names


def impl_fns(name):
    if name == "dense":
        return reference_encode, reference_decode
    if name == "torch_sparse":
        return kernels.torch_encode, kernels.torch_sparse_decode
    if name == "triton":
        return kernels.triton_encode, kernels.triton_decode
    from cltrain.kernels import triton_ops

    def forced_decode(acts, W_dec, grad_mask=None):
        saved = triton_ops.DENSE_ACTS_ABOVE
        triton_ops.DENSE_ACTS_ABOVE = 1.0
        try:
            return triton_ops.triton_decode(acts, W_dec, grad_mask, dense_grad_above=1.0)
        finally:
            triton_ops.DENSE_ACTS_ABOVE = saved
    return kernels.triton_encode, forced_decode


class Shape:
    def __init__(self, name, B, N, D, F, step: bool, reps: int):
        self.name, self.B, self.N, self.D, self.F, self.step, self.reps = name, B, N, D, F, step, reps

    def label(self):
        return f"{self.name}: N={self.N}, D={self.D}, F={self.F}, B={self.B}"


def window_eps(pre, theta, target_mask: float) -> float:
    """Bandwidth eps such that active | |h - theta| < eps/2 covers ~target_mask of positions."""
    diff = (pre - theta).flatten()
    sample = diff[torch.randint(0, diff.numel(), (min(diff.numel(), 2_000_000),), device=diff.device)]
    below = sample[sample <= 0].float()
    active = (sample > 0).float().mean().item()
    extra = max(target_mask - active, 1e-4) / max(1 - active, 1e-9)
    return 2 * float(torch.quantile(-below[: 2 ** 24], extra))


def run_shape(sh: Shape, ceil: dict, lines: list[str], log):
    B, N, D, F = sh.B, sh.N, sh.D, sh.F
    log(f"\n== {sh.label()} ({DEVICE}, {DTYPE})")
    g = torch.Generator(device="cpu").manual_seed(0)
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F), generator=g)
    x = torch.randn(B, N, D, generator=g)
    y = torch.randn(B, N, D, generator=g)
    with torch.no_grad():  # what eps = 2 gives at the default initialization (theta = 0.03)
        pre0 = clt.preactivations(x)
        theta0 = clt.threshold
        init_active = (pre0 > theta0).float().mean().item()
        init_mask = ((pre0 > theta0) | ((pre0 - theta0).abs() < 1.0)).float().mean().item()
        clt.calibrate_thresholds(x, TARGET_ACTIVE)
        theta = clt.threshold
        active = (pre0 > theta).float().mean().item()
        mask_eps2 = ((pre0 > theta) | ((pre0 - theta).abs() < 1.0)).float().mean().item()
        eps_trained = window_eps(pre0, theta, TRAINED_MASK)
        mask_trained = ((pre0 > theta) | ((pre0 - theta).abs() < eps_trained / 2)).float().mean().item()
        del pre0
    clt = clt.to(DEVICE, DTYPE)
    x, y = x.to(DEVICE, DTYPE), y.to(DEVICE, DTYPE)
    regimes = {"eps=2": 2.0, "trained-like": eps_trained}
    lines += [f"### {sh.label()}", "",
              f"Default init (theta = 0.03), eps = 2: {init_active:.1%} active, grad_mask (active | window) "
              f"{init_mask:.1%}. Calibrated to {TARGET_ACTIVE:.0%} firing: {active:.2%} active; grad_mask "
              f"{mask_eps2:.1%} with eps = 2, {mask_trained:.2%} with the trained-like eps = {eps_trained:.3g}.",
              ""]
    log(lines[-2])

    # Leaves shared by every implementation (snapshots: the timed steps update clt in place).
    # As in training: gradients for the encoder's parameters, none for x; the loss reads acts and
    # preact_gap (the pre-activation penalty), not pre.
    enc_leaves = [p.detach().clone().requires_grad_() for p in (clt.W_enc, clt.b_enc, clt.log_threshold)]
    W_leaves = [w.detach().clone().requires_grad_() for w in clt.W_dec]
    slots = sum(w.shape[1] for w in W_leaves)
    dec_bytes = sum(w.numel() * w.element_size() for w in W_leaves)
    enc_flops = 6 * B * N * F * D
    dec_flops = 2 * B * F * D * slots
    gen = torch.Generator(device="cpu").manual_seed(1)
    ga = torch.randn(B, N, F, generator=gen).to(DEVICE, DTYPE)
    gg = torch.randn(N, F, generator=gen).to(DEVICE, DTYPE)
    dY = torch.randn(B, N, D, generator=gen).to(DEVICE, DTYPE)

    def clear(ts):
        for t in ts:
            t.grad = None

    # Reference results, and the activations / masks every implementation decodes.
    acts_by_regime, ref = {}, {}
    for regime, eps in regimes.items():
        clear(enc_leaves)
        e = reference_encode(x, *enc_leaves, eps, False)
        torch.autograd.backward([e.acts, e.preact_gap], [ga, gg])
        acts_leaf = e.acts.detach().clone().requires_grad_()  # clone keeps the [N, B, F] layout
        acts_by_regime[regime] = (acts_leaf, e.grad_mask)
        clear([acts_leaf, *W_leaves])
        out = reference_decode(acts_leaf, W_leaves, e.grad_mask)
        out.backward(dY)
        ref[regime] = (e.pre.detach(), e.acts.detach(), e.preact_gap.detach(), [t.grad for t in enc_leaves],
                       out.detach(), acts_leaf.grad, [w.grad for w in W_leaves])
        del e, out

    configs = [("dense", "any", regimes["trained-like"])]
    configs += [(n, r, eps) for n in impls_here() if n != "dense" for r, eps in regimes.items()]
    checks = {}
    for name, regime, eps in configs:
        if name == "dense":
            checks[(name, regime)] = "reference"
            continue
        encode, decode = impl_fns(name)
        r_pre, r_acts, r_gap, r_enc_grads, r_y, r_gacts, r_gW = ref[regime]
        try:
            clear(enc_leaves)
            e = encode(x, *enc_leaves, eps, False)
            torch.autograd.backward([e.acts, e.preact_gap], [ga, gg])
            errs = [rel_err(e.pre, r_pre), rel_err(e.acts, r_acts), rel_err(e.preact_gap, r_gap)]
            errs += [rel_err(t.grad, r) for t, r in zip(enc_leaves, r_enc_grads)]
            errs.append(float(not torch.equal(e.grad_mask, acts_by_regime[regime][1])))
            acts_leaf, mask = acts_by_regime[regime]
            clear([acts_leaf, *W_leaves])
            out = decode(acts_leaf, W_leaves, mask)
            out.backward(dY)
            errs += [rel_err(out, r_y), rel_err(acts_leaf.grad[mask], r_gacts[mask])]
            errs.append(max(rel_err(w.grad, r) for w, r in zip(W_leaves, r_gW)))
            del e, out
        except Exception as err:  # e.g. a sparse op this device/dtype lacks: report, don't time
            checks[(name, regime)] = f"unsupported here ({type(err).__name__}: {str(err)[:80]})"
            log(f"   check {name} / {regime}: {checks[(name, regime)]}")
            continue
        tol = 2e-2 if DTYPE == torch.bfloat16 else 1e-4
        worst = max(errs)
        checks[(name, regime)] = f"{'ok' if worst <= tol else 'FAIL'} (max rel err {worst:.1e})"
        log(f"   check {name} / {regime}: {checks[(name, regime)]}  {[f'{v:.1e}' for v in errs]}")
    del ref
    configs = [c for c in configs if not checks[c[:2]].startswith("unsupported")]

    opt = torch.optim.Adam(clt.parameters(), lr=1e-6, fused=True) if sh.step else None
    weights = LossWeights(sparsity=1e-3, preact=3e-6)

    def components(name, eps, acts_leaf, mask):
        encode, decode = impl_fns(name)

        def enc_fb():
            clear(enc_leaves)
            e = encode(x, *enc_leaves, eps, False)
            torch.autograd.backward([e.acts, e.preact_gap], [ga, gg])

        def dec_f():
            with torch.no_grad():
                decode(acts_leaf, W_leaves, mask)

        def dec_fb():
            clear([acts_leaf, *W_leaves])
            decode(acts_leaf, W_leaves, mask).backward(dY)

        def step():
            clt.cfg.bandwidth = eps
            kernels.install(clt, name)
            opt.zero_grad(set_to_none=True)
            e, y_hat = clt(x)
            sum(loss_terms(clt, e, y_hat, y, weights).values()).backward()
            torch.nn.utils.clip_grad_norm_(clt.parameters(), 1.0)
            opt.step()

        comps = {"enc_fb": enc_fb, "dec_f": dec_f, "dec_fb": dec_fb}
        if sh.step and name in kernels.IMPLEMENTATIONS:
            comps["step"] = step
        return comps

    # Rounds interleave the implementations, so on a shared machine each sees the same load;
    # every figure is the best of its rounds.
    best = {(n, r): {} for n, r, _ in configs}
    for rnd in range(sh.reps):
        for name, regime, eps in configs:
            acts_leaf, mask = acts_by_regime["trained-like" if regime == "any" else regime]
            for comp, fn in components(name, eps, acts_leaf, mask).items():
                t = timed(fn, 1, warmup=0)
                row = best[(name, regime)]
                row[comp] = min(row.get(comp, math.inf), t)
        log(f"   round {rnd}: " + "; ".join(
            f"{n}/{r}: " + ", ".join(f"{k} {v:.3g}" for k, v in best[(n, r)].items()) for n, r, _ in configs))
    breakdown = step_breakdown(clt, opt, x, y, weights, regimes["trained-like"], sh.reps) if sh.step else None

    dense = best[("dense", "any")]
    for key, note in checks.items():
        if note.startswith("unsupported"):
            lines.append(f"- {key[0]} / {key[1]}: {note}")
    lines += ["| impl | window | check vs dense | encode f+b | decode fwd | decode f+b | "
              + ("step (tokens/s) | " if sh.step else "") + "x dense (enc / dec f+b"
              + (" / step" if sh.step else "") + ") |",
              "|---|---|---|---|---|---|" + ("---|" if sh.step else "") + "---|"]
    for name, regime, _ in configs:
        r = best[(name, regime)]
        enc_tf = enc_flops / r["enc_fb"] / 1e12
        if name == "dense":
            dtf = 3 * dec_flops / r["dec_fb"] / 1e12
            dec_note = f"{r['dec_fb']:.3g} s ({dtf:.3g} TFLOP/s, {dtf / ceil['tflops']:.0%})"
            fwd_note = f"{r['dec_f']:.3g} s ({dec_flops / r['dec_f'] / 1e12:.3g} TFLOP/s)"
        else:
            gb = 3 * dec_bytes / r["dec_fb"] / 1e9
            dec_note = f"{r['dec_fb']:.3g} s ({gb:.3g} GB/s, {gb / ceil['gbs']:.0%})"
            fwd_note = f"{r['dec_f']:.3g} s ({dec_bytes / r['dec_f'] / 1e9:.3g} GB/s)"
        cells = [name, regime, checks[(name, regime)],
                 f"{r['enc_fb']:.3g} s ({enc_tf:.3g} TFLOP/s, {enc_tf / ceil['tflops']:.0%})",
                 fwd_note, dec_note]
        ratios = [dense["enc_fb"] / r["enc_fb"], dense["dec_fb"] / r["dec_fb"]]
        if sh.step and "step" in r:
            cells.append(f"{r['step']:.3g} s ({B / r['step']:.0f})")
            ratios.append(dense["step"] / r["step"])
        elif sh.step:
            cells.append("-")
        cells.append(" / ".join(f"{v:.2f}" for v in ratios))
        lines.append("| " + " | ".join(cells) + " |")
    if sh.step:
        # The floor of a step: the encoder's matmuls, 6BNFD FLOPs, at this run's matmul rate (docs/design.md section 4)
        floor = enc_flops / (ceil["tflops"] * 1e12)
        lines += ["", f"Step floor (encoder 6BNFD = {enc_flops / 1e9:.3g} GFLOP at the measured matmul rate): "
                  f"{floor:.3g} s; step / floor: " + ", ".join(
                      f"{n} / {r} {best[(n, r)]['step'] / floor:.1f}x" for n, r, _ in configs
                      if "step" in best[(n, r)]) + "."]
    if breakdown:
        lines += ["", "Where a torch_sparse step (trained-like window) goes: " + "; ".join(
            f"{k} {v:.3g} s" for k, v in breakdown.items()) + "."]
    lines += ["", f"Best of {sh.reps} interleaved rounds. Decode GB/s counts the memory floor of a sparse "
              "decode: W_dec read in the forward, read again for the activation gradient, its gradient "
              f"written (3 x {dec_bytes / 1e9:.3g} GB at f+b, 1 x at fwd); TFLOP/s counts dense FLOPs, so an "
              "encode whose backward is a sparse product can pass the matmul ceiling "
              f"(encode 6BNFD = {enc_flops / 1e9:.3g} GFLOP, dense decode 2BFD x {slots} slots = "
              f"{dec_flops / 1e9:.3g} GFLOP per product). The step is forward, loss terms (MSE, sparsity, "
              "pre-activation), backward, grad-norm clipping and Adam(fused=True).", ""]


def step_breakdown(clt, opt, x, y, weights, eps, reps) -> dict:
    """Split a torch_sparse training step: encode + decode (+ MSE) forward/backward, the other loss
    terms (sparsity, pre-activation: decoder norms and elementwise passes over [B, N, F]; defined in
    train/clt.py), the decoder-norm computation alone, grad clipping, the fused Adam step."""
    from cltrain.train.clt import mse_loss
    clt.cfg.bandwidth = eps
    kernels.install(clt, "torch_sparse")

    def fb(all_terms):
        opt.zero_grad(set_to_none=True)
        e, y_hat = clt(x)
        loss = sum(loss_terms(clt, e, y_hat, y, weights).values()) if all_terms else mse_loss(y_hat, y)
        loss.backward()

    def norms():
        opt.zero_grad(set_to_none=True)
        clt.decoder_norms().sum().backward()

    t_mse = timed(lambda: fb(False), reps)
    t_all = timed(lambda: fb(True), reps)
    t_norms = timed(norms, reps)
    fb(True)
    t_clip = timed(lambda: torch.nn.utils.clip_grad_norm_(clt.parameters(), 1.0), reps)
    t_adam = timed(opt.step, reps)
    return {"encode + decode + MSE fwd/bwd": t_mse,
            "sparsity + pre-activation terms fwd/bwd": t_all - t_mse,
            "of which decoder_norms() fwd/bwd": t_norms,
            "grad clipping": t_clip, "Adam(fused=True)": t_adam}


CLIP_PHASE = "cltrain.grad_clip"  # the training step's clipping, as phase_split reports it


def training_step(clt, x, y):
    """(step, optimizer): one training step as clt-train takes it (forward, the loss terms, backward, grad-norm
    clipping, Adam(fused=True)) on fixed x and y."""
    opt = torch.optim.Adam(clt.parameters(), lr=1e-6, fused=True)
    weights = LossWeights(sparsity=1e-3, preact=3e-6)

    def step():
        opt.zero_grad(set_to_none=True)
        e, y_hat = clt(x)
        sum(loss_terms(clt, e, y_hat, y, weights).values()).backward()
        with record_function(CLIP_PHASE):
            torch.nn.utils.clip_grad_norm_(clt.parameters(), 1.0)
        opt.step()
    return step, opt


def whole_steps(calibrated: bool, reps: int, eps2: bool = False, variants: dict | None = None,
                every: bool = False, rate: float = TARGET_ACTIVE):
    """Best-of-`reps` training-step times (dense, torch_sparse) at the CPU default shape, interleaved
    after a warm-up round. calibrated: thresholds at `rate` firing (1%) and a trained-like window (eps2:
    the default eps = 2 instead); else the default initialization (theta = 0.03, eps = 2), where nearly
    half the activations fire. variants: {name: set-up callable taking the CLT} to time instead of
    dense and torch_sparse; every: return every time, not the best."""
    B, N, D, F = 1024, 12, 768, 4096
    g = torch.Generator().manual_seed(0)
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F), generator=g)
    x, y = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    if calibrated:
        with torch.no_grad():
            clt.calibrate_thresholds(x, rate)
            if not eps2:
                clt.cfg.bandwidth = window_eps(clt.preactivations(x), clt.threshold, TRAINED_MASK)
    step, opt = training_step(clt, x, y)

    if variants is None:
        variants = {name: lambda clt, name=name: kernels.install(clt, name) for name in ("dense", "torch_sparse")}
    times = {name: [] for name in variants}
    for rnd in range(reps + 1):
        for name, set_up in variants.items():
            set_up(clt)
            t = timed(step, 1, warmup=0)
            if rnd:
                times[name].append(t)
    return times if every else {name: min(ts) for name, ts in times.items()}


def _compiled_kernels(on: bool):
    def set_up(clt):
        kernels.install(clt, "torch_sparse")
        os.environ["CLTRAIN_CPU_KERNELS"] = "1" if on else "0"
    return set_up


def _sparse_products_used() -> str:
    from cltrain.kernels import cpu_native
    if cpu_native.available():
        return "compiled (kernels/cpu_sparse.c)"
    return f"torch's (no compiled kernels: {cpu_native.failure()})"


def _dense_vs_sparse(times) -> str:
    return (f"dense {times['dense']:.3g} s, torch_sparse {times['torch_sparse']:.3g} s "
            f"({times['dense'] / times['torch_sparse']:.2f}x)")


def allocator_effect(lines, log, reps: int = 3):
    """Training steps (trained-like window) with glibc's default allocator settings and then with
    `kernels.retain_freed_cpu_memory()`, which the rest of the run keeps."""
    default = whole_steps(True, reps)
    kernels.retain_freed_cpu_memory()
    retained = whole_steps(True, reps)
    log(f"   allocator: default {default}, retained {retained}")
    lines += ["### CPU allocator: glibc defaults vs `retain_freed_cpu_memory()` (CPU default shape, "
              "trained-like window, whole training step)", "",
              f"glibc defaults: {_dense_vs_sparse(default)}. Freed memory retained (what CPU training "
              f"sets, and the rest of this run): {_dense_vs_sparse(retained)}. Best of {reps} interleaved "
              "steps each, after a warm-up round.", ""]


def early_training(lines, log, reps: int = 2):
    """Training steps between the default initialization (~45% firing) and the trained regime (~1%),
    eps = 2: where the density switches (kernels/torch_ops.py) decide between sparse and dense products,
    with the compiled kernels (and their switch) and with torch's products (and theirs)."""
    rows = ["| firing | dense | torch_sparse, compiled kernels | torch_sparse, torch's products "
            "(`CLTRAIN_CPU_KERNELS=0`) |", "|---|---|---|---|"]
    for rate in (0.03, 0.06, 0.1, 0.2, 0.3):
        try:
            times = whole_steps(True, reps, eps2=True, rate=rate, variants={
                "dense": lambda clt: kernels.install(clt, "dense"),
                "compiled": _compiled_kernels(True), "torch": _compiled_kernels(False)})
        finally:
            os.environ.pop("CLTRAIN_CPU_KERNELS", None)
        rows.append(f"| {rate:.0%} | {times['dense']:.3g} s | {times['compiled']:.3g} s "
                    f"({times['dense'] / times['compiled']:.2f}x) | {times['torch']:.3g} s "
                    f"({times['dense'] / times['torch']:.2f}x) |")
        log("   " + rows[-1])
    lines += ["### Early in training (CPU default shape, eps = 2, thresholds calibrated to each firing rate, "
              "whole training step)", "", *rows, "",
              f"Best of {reps} interleaved steps each, after a warm-up round. The density switches: "
              f"{kernels.torch_ops.COMPILED_DENSE_ABOVE:.0%} with the compiled kernels; with torch's products "
              f"{kernels.torch_ops.DENSE_ACTS_ABOVE:.0%} for the activations' products and "
              f"{kernels.torch_ops.DENSE_GRAD_ABOVE:.0%} for the activation gradient's mask.", ""]


def initial_regime(lines, log, reps: int = 3):
    """Training steps at the default initialization, before any sparsity: the sparse path must not
    lose to the dense reference there (it switches to dense products where activations are dense)."""
    times = whole_steps(False, reps)
    log(f"   default init: {times}")
    lines += ["### At the default initialization (CPU default shape, theta = 0.03, eps = 2, ~45% of "
              "activations non-zero, whole training step)", "",
              f"{_dense_vs_sparse(times)}. Best of {reps} interleaved steps each, after a warm-up round.",
              ""]


def _with_compiled(flag: str, fn):
    """fn() with the compiled CPU kernels on ("1") or off ("0")."""
    os.environ["CLTRAIN_CPU_KERNELS"] = flag
    try:
        return fn()
    finally:
        os.environ.pop("CLTRAIN_CPU_KERNELS")


def sparse_products(lines, log, reps):
    """One source layer (s = 0, 12 slots): the activation gradient's cost vs grad_mask density (dense,
    sampled with the compiled kernel of kernels/cpu_native.py, sampled with torch's sampled_addmm), and
    the CSR x dense products (the decode's forward and weight gradient, the encoder's weight gradient)
    compiled vs torch's (MKL)."""
    from cltrain.kernels import cpu_native
    from cltrain.kernels.torch_ops import SparseLayers, acts_grad, csr_addmm, sampled_pairs
    B, N, D, F = 1024, 12, 768, 4096
    g = torch.Generator().manual_seed(2)
    dY_s = torch.randn(B, N * D, generator=g)
    W2 = torch.randn(F, N * D, generator=g) / 100
    out = torch.empty(B, F)
    t_dense = timed(lambda: acts_grad(out, dY_s, W2, None), reps)
    native = cpu_native.available()
    variants = (("compiled", "1"), ("torch", "0")) if native else (("torch", "0"),)
    cells = []
    for d in (0.01, 0.02, 0.05, 0.1, 0.2):
        m = torch.rand(B, F, generator=g) < d
        pairs = sampled_pairs(m[:, None], 1, 1.0)[0]
        t = {name: _with_compiled(flag, lambda: timed(lambda: acts_grad(out, dY_s, W2, pairs), reps))
             for name, flag in variants}
        cells.append(f"{d:.0%}: " + ", ".join(f"{name} {v:.3g} s ({v / t_dense:.0%})" for name, v in t.items()))
        log(f"   sampled {d:.0%}: {t} (dense {t_dense:.3g} s)")
    why = "" if native else f" The compiled kernels are unavailable here: {cpu_native.failure()}."
    lines += ["### Sparse products (torch_sparse, CPU, one source layer, B=1024, F=4096, 12 slots x D=768)", "",
              f"Activation gradient. Dense product {t_dense:.3g} s; sampled at grad_mask density (time, and "
              "its share of the dense product's): " + "; ".join(cells)
              + f". The switch (`dense_grad_above`) is at {kernels.torch_ops.COMPILED_DENSE_ABOVE:.0%} with the "
              f"compiled kernels, {kernels.torch_ops.DENSE_GRAD_ABOVE:.0%} with torch's.", ""]
    # CSR x dense at activation densities around the trained 1%
    y_s = torch.zeros(B, N * D)
    x = torch.randn(B, D, generator=g)
    dw, gW = torch.empty(F, N * D), torch.zeros(F, D)
    rows = ["| activations | decode forward (a @ W) | decode weight gradient (a^T @ dY) | "
            "encoder weight gradient (S^T @ x) |", "|---|---|---|---|"]
    for d in (0.01, 0.02, 0.05):
        a = (torch.rand(B, F, generator=g) < d) * torch.rand(B, F, generator=g)
        nz = SparseLayers(a[:, None])
        crow, f_idx, vals = nz.token_major()[0]
        ccol, b_idx, vals_fm, _ = nz.feature_major()[0]
        ops = ((lambda: csr_addmm(y_s, crow, f_idx, vals, W2, True), 2 * vals.numel() * N * D),
               (lambda: csr_addmm(dw, ccol, b_idx, vals_fm, dY_s, False), 2 * vals.numel() * N * D),
               (lambda: csr_addmm(gW, ccol, b_idx, vals_fm, x, True), 2 * vals.numel() * D))
        cells = []
        for op, flops in ops:
            t = {name: _with_compiled(flag, lambda: timed(op, reps)) for name, flag in variants}
            cell = ", ".join(f"{name} {v * 1e3:.3g} ms ({flops / v / 1e9:.0f} GFLOP/s)" for name, v in t.items())
            if native:
                cell += f"; {t['torch'] / t['compiled']:.2f}x"
            cells.append(cell)
        rows.append(f"| {d:.0%} | " + " | ".join(cells) + " |")
        log("   " + rows[-1])
    lines += ["CSR x dense products, compiled (kernels/cpu_sparse.c) vs torch's (MKL):", "", *rows, "",
              "`compiled` is kernels/cpu_sparse.c, what training uses for the decode's products where a C "
              "compiler works (the encoder's weight gradient stays with MKL); `torch` is torch's own "
              "(`CLTRAIN_CPU_KERNELS=0`), the fallback." + why, ""]


SMOLLM2_SHAPE = (30, 576, 1024, 1024)  # N, D, F, B: SmolLM2-135M's layers and width, the reference CLT's size


def phase_split(step, reps: int) -> dict:
    """Seconds per phase of one training step, from torch.profiler: the kernels' own phases (kernels/torch_ops.py
    PHASES: encode, decode forward, the decode backward's decoder gradient and activation gradient -- or both in
    one pass, decode_grads --, the window sums, the encode backward, the decoder norms and where their gradient
    is added separately), the optimizer step by its op and grad clipping by its range; the rest of the step
    (the loss terms, index building, autograd glue) is what remains of its wall time."""
    from torch.profiler import ProfilerActivity, profile

    from cltrain.kernels.torch_ops import PHASES

    step()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        step()
        sync()
        wall = time.perf_counter() - t0
    events = {e.key: e for e in prof.key_averages()}

    def seconds(name):  # on a GPU the device time of the range's kernels, on CPU the range's time
        e = events.get(name)
        if e is None:
            return 0.0
        return (getattr(e, "device_time_total", 0.0) if CUDA else e.cpu_time_total) / 1e6

    out = {key: seconds(name) for key, name in PHASES.items()}
    out["adam"] = seconds("aten::_fused_adam_")
    out["grad clipping"] = seconds(CLIP_PHASE)
    out["rest"] = max(wall - sum(out.values()), 0.0)
    out["step (profiled)"] = wall
    return out


def shape_report(N: int, D: int, F: int, B: int, reps: int = 3) -> list[str]:
    """One shape's whole training step (torch_sparse against the dense reference, both windows, ~1% firing), its
    floor (the encoder's forward and backward plus fused Adam over all parameters, timed in the same run) and
    where the step's time goes."""
    if not CUDA:
        kernels.retain_freed_cpu_memory()
    g = torch.Generator().manual_seed(0)
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F), generator=g)
    x, y = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    with torch.no_grad():
        clt.calibrate_thresholds(x, TARGET_ACTIVE)
        pre, theta = clt.preactivations(x), clt.threshold
        eps_trained = window_eps(pre, theta, TRAINED_MASK)
        mask2 = ((pre > theta) | ((pre - theta).abs() < 1.0)).float().mean().item()
        P2 = ((pre > theta) | ((pre - theta) <= -1.0)).float().mean().item()
        del pre
    clt = clt.to(DEVICE, DTYPE)
    x, y = x.to(DEVICE, DTYPE), y.to(DEVICE, DTYPE)
    fast = "triton" if CUDA else "torch_sparse"
    step, opt = training_step(clt, x, y)

    W = clt.W_enc.detach().clone().requires_grad_()

    def encoder():  # the floor's encoder: h = x W^T per layer, forward and the weight gradient
        W.grad = None
        torch.baddbmm(clt.b_enc.detach().unsqueeze(1), x.transpose(0, 1), W.transpose(1, 2)).sum().backward()

    opt.zero_grad(set_to_none=False)
    for p_ in clt.parameters():
        p_.grad = torch.zeros_like(p_)
    t_enc, t_adam = timed(encoder, reps), timed(opt.step, reps)
    floor = t_enc + t_adam
    lines = [f"### Many layers: N={N}, D={D}, F={F}, B={B} (`--shape {N},{D},{F},{B}`)", "",
             f"Measured by `python benchmarks/kernels.py --shape {N},{D},{F},{B}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on {device_name()}, torch {torch.__version__}, "
             f"load average {load_avg()}. Thresholds calibrated to {TARGET_ACTIVE:.0%} firing. With eps = 2 the "
             f"window |h - theta| < 1 holds {mask2:.0%} of positions here and P = active | below the window "
             f"{P2:.0%}; the trained-like eps = {eps_trained:.3g} leaves a grad_mask of ~{TRAINED_MASK:.0%}. "
             f"Floor: the encoder's forward and weight gradient {t_enc:.3g} s + fused Adam over all parameters "
             f"{t_adam:.3g} s = {floor:.3g} s. Best of {reps} steps after a warm-up.", "",
             f"| window | dense reference step | {fast} step | ours / dense | step / floor |", "|---|---|---|---|---|"]
    splits, separate = {}, []
    for regime, eps in (("eps = 2", 2.0), ("trained-like", eps_trained)):
        clt.cfg.bandwidth = eps
        times = {}
        for name in ("dense", fast):
            kernels.install(clt, name)
            times[name] = timed(step, reps)
        splits[regime] = phase_split(step, reps)
        lines.append(f"| {regime} | {times['dense']:.3g} s | {times[fast]:.3g} s | "
                     f"{times['dense'] / times[fast]:.2f}x faster | {times[fast] / floor:.2f}x |")
        if not CUDA:  # the one-pass decode backward against the separate products, in this run
            torch_ops.ONE_PASS_GRADS = False
            try:
                t_sep = timed(step, reps)
            finally:
                torch_ops.ONE_PASS_GRADS = True
            separate.append(f"{regime}: {t_sep:.3g} s with the separate products, {t_sep / times[fast]:.2f}x "
                            "the one-pass step")
    if separate:
        lines += ["", "The decode backward's decoder and activation gradients as separate products "
                  "(`torch_ops.ONE_PASS_GRADS = False`) instead of one compiled pass per source layer: "
                  + "; ".join(separate) + "."]
    lines += ["", f"Where a {fast} step goes (seconds, one profiled step; the profiler adds a little):", "",
              "| phase | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for key in next(iter(splits.values())):
        lines.append(f"| {key} | " + " | ".join(f"{sp[key]:.3g}" for sp in splits.values()) + " |")
    return lines + [""]


def shape_only(out: Path, shape: tuple, reps: int):
    """--shape: one shape's report, put in `out` as its own section (replacing an earlier one of that shape)."""
    section = shape_report(*shape, reps=reps)
    print("\n".join(section))
    text = out.read_text() if out.exists() else "# Kernel benchmark\n"
    heading = section[0]
    if heading in text:
        head, rest = text.split(heading, 1)
        nxt = rest.find("\n### ")
        text = head + "\n".join(section) + (rest[nxt + 1:] if nxt >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(section)
    out.write_text(text)


STEPS_HEADING = "### Whole training steps, both windows (CPU default shape, ~1% firing; --steps)"


def steps_only(out: Path, reps: int):
    """Re-measure only the whole CPU training steps at calibrated thresholds (trained-like window and
    eps = 2) and put them in `out` as their own section, replacing that section of an earlier run:
    for a machine too loaded (or too short of memory) for the whole benchmark."""
    kernels.retain_freed_cpu_memory()
    start_load = load_avg()
    t0 = time.time()
    from cltrain.kernels import fused
    trained = whole_steps(True, reps)
    eps2 = whole_steps(True, reps, eps2=True)
    fused.WINDOW_COMPLEMENT = False
    try:  # encode and decode composed: the decode computes a dense activation gradient
        composed = whole_steps(True, reps, eps2=True)
    finally:
        fused.WINDOW_COMPLEMENT = True
    from cltrain.kernels import cpu_native
    ab_text = "no compiled kernel here, nothing to compare"
    if cpu_native.available():
        # the compiled kernels against torch's products, alternating step by step: paired steps, as
        # this machine's step-to-step noise is of the order of their difference
        try:
            ab = whole_steps(True, 5, eps2=True, every=True, variants={
                "compiled": _compiled_kernels(True), "torch": _compiled_kernels(False)})
        finally:
            os.environ.pop("CLTRAIN_CPU_KERNELS", None)
        ab_text = "; ".join(f"{name}: best {min(ts):.3g} s, median {statistics.median(ts):.3g} s"
                            for name, ts in ab.items())
    section = [STEPS_HEADING, "",
               f"Measured by `python benchmarks/kernels.py --steps` "
               f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}) on {device_name()}, torch "
               f"{torch.__version__}, load average {start_load} at start and {load_avg()} at the end "
               f"({time.time() - t0:.0f} s). Best of {reps} interleaved steps each after a warm-up round; "
               f"freed memory retained; the decode's sparse products: {_sparse_products_used()}. "
               "The step is forward (CLT.encode_decode: with torch_sparse the fused encode+decode of "
               "kernels/fused.py), loss terms, backward, clipping, Adam(fused=True).", "",
               f"- trained-like window (grad_mask ~2%): {_dense_vs_sparse(trained)}",
               f"- default eps = 2 (grad_mask ~95%; the fused window-complement path: exact activation "
               f"gradients on the ~6% of positions outside the window, per-feature sums inside): "
               f"{_dense_vs_sparse(eps2)}",
               f"- default eps = 2, encode and decode composed instead (`fused.WINDOW_COMPLEMENT = False`: "
               f"a dense activation gradient): {_dense_vs_sparse(composed)}",
               f"- eps = 2, torch_sparse only, the decode's sparse products compiled vs torch's "
               f"(`CLTRAIN_CPU_KERNELS=0`), alternating over 5 steps each: {ab_text}",
               "",
               "What eps = 2 adds to the trained-like step: the window's threshold gradient needs, per "
               "feature, the sum of d loss / d a over ~95% of the tokens. The fused path takes it as T_f "
               "(one matrix-vector product per layer) minus the complement, so it needs exact products only "
               "on P, ~6% of positions (1% active, ~5% below the window), against ~2% in the trained-like "
               "mask. Those are sampled dense-dense products: every multiply-add loads a decoder element "
               "and a dY element that no other pair shares, so on a CPU they run at cache bandwidth, not at "
               "the matmul ceiling (\"Sparse products\" below gives their cost against the dense "
               "product).", "", ""]
    text = out.read_text() if out.exists() else "# Kernel benchmark\n"
    if STEPS_HEADING in text:  # replace the earlier section (up to the next heading)
        head, rest = text.split(STEPS_HEADING, 1)
        nxt = rest.find("\n### ")
        text = head + "\n".join(section) + (rest[nxt + 1:] if nxt >= 0 else "")
    else:  # after the header block, before the first section
        at = text.find("\n### ")
        text = text[:at + 1] + "\n".join(section) + "\n" + text[at + 1:] if at >= 0 else text + "\n".join(section)
    out.write_text(text)
    print("\n".join(section))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shape only, fewer repetitions")
    ap.add_argument("--steps", action="store_true",
                    help="only the whole CPU training steps (both windows), as a section of --out")
    ap.add_argument("--shape", help="N,D,F,B: only the whole-step report (both windows, phase split, floor) at "
                                    f"this shape, as a section of --out; e.g. {','.join(map(str, SMOLLM2_SHAPE))}")
    ap.add_argument("--out", default=str(Path(__file__).with_name("kernels.md")))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    if args.steps:
        return steps_only(Path(args.out), 3)
    if args.shape:
        try:
            shape = tuple(int(v) for v in args.shape.split(","))
            assert len(shape) == 4 and min(shape) > 0
        except (ValueError, AssertionError):
            ap.error(f"--shape {args.shape!r}: expected four positive integers N,D,F,B")
        return shape_only(Path(args.out), shape, 3)
    t_start = time.time()

    def log(msg):
        print(msg, flush=True)

    lines = ["# Kernel benchmark", "",
             f"Written by `python benchmarks/kernels.py{' --quick' if args.quick else ''}` "
             f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
             f"- device: {device_name()}; torch {torch.__version__}; dtype {DTYPE}",
             f"- implementations timed: {', '.join(impls_here())}",
             f"- load average at start (1/5/15 min): {load_avg()}"]
    ceil = ceilings(args.quick)
    lines += [f"- ceilings measured in this run: matmul {ceil['tflops']:.3g} TFLOP/s "
              f"({ceil['matmul_n']}^3, {DTYPE}), copy {ceil['gbs']:.3g} GB/s (read + write)", ""]
    log("\n".join(lines))
    if not CUDA:
        if not args.quick:
            allocator_effect(lines, log)
            initial_regime(lines, log)
            early_training(lines, log)
        kernels.retain_freed_cpu_memory()  # as CPU training does (train/trainer.py)
    shapes = [Shape("small", 256, 4, 128, 512, step=True, reps=5)]
    if not args.quick:
        shapes.append(Shape("CPU default", 1024, 12, 768, 4096, step=True, reps=3))
        if CUDA:
            shapes.append(Shape("GPU", 4096, 12, 768, 4096, step=True, reps=5))
    for sh in shapes:
        run_shape(sh, ceil, lines, log)
        if CUDA:
            torch.cuda.empty_cache()
        # written after every shape, so a run cut short still leaves what it measured
        Path(args.out).write_text("\n".join(lines + ["(run in progress or cut short)", ""]))
    if not CUDA and not args.quick:
        sparse_products(lines, log, 2)
    if not args.quick:  # the many-layer shape of the reference CLT
        lines += shape_report(*SMOLLM2_SHAPE)
        log("\n".join(lines[-20:]))
    lines += [f"Load average at the end: {load_avg()}; total run {time.time() - t_start:.0f} s.", ""]
    Path(args.out).write_text("\n".join(lines))
    log(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
