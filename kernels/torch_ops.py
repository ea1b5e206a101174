"""Plain-PyTorch implementations: the fused JumpReLU encode and the sparse (index-based) decode.

These run anywhere torch runs. On CPU they are what training uses (impl "torch_sparse"); they are
also the twins the Triton kernels (kernels/triton_ops.py) are tested against. Results and gradients
equal train/clt.py's `reference_encode` / `reference_decode`, which define them.

Why the decode is sparse: a dense decode costs B*F*D*N*(N+1)/2 multiply-adds; with ~1% of the
activations non-zero, products over the non-zeros only are ~100x cheaper. Per source layer s the
activations a_s [B, F] become a CSR matrix and
    forward        y[:, s:s+S_s]   = a_s      @ W_s         (CSR x dense)
    weight grad    dW_s            = a_s^T    @ dY_s        (feature-major CSR x dense: one pass
                                                             over the decoder rows)
    acts grad      dA_s = (dY_s @ W_s^T) restricted to grad_mask[:, s]
with W_s = W_dec[s] viewed [F, S_s*D] and dY_s = dY[:, s:s+S_s] viewed [B, S_s*D]. Where a source
layer's activations are dense (above DENSE_ACTS_ABOVE, or COMPILED_DENSE_ABOVE with the compiled
kernels: early in training nearly half can fire) its forward and weight-gradient products are dense
matmuls instead.
The acts gradient is needed wherever JumpReLU's backward reads it (active or inside the
straight-through window, `grad_mask`). When that mask is sparse it is a sampled dense-dense product,
feature-major so each decoder row is read once: in float32 on CPU the compiled kernel of
kernels/cpu_native.py, elsewhere (or where no C compiler works) torch.sparse.sampled_addmm; when it is dense
(early in training with eps = 2 the window holds almost every position) the plain dense product is
cheaper. `dense_grad_above` is the mask density where we switch (measured crossover on 2-core CPUs:
about 8% to 11% with torch's sampled_addmm, 20% to 30% with the compiled kernels; see
benchmarks/kernels.md and `default_dense_above`). In float32 on CPU, where the mask is sparse and holds
every active position (training's masks do), a source layer's weight gradient and activation gradient
are one compiled pass over its decoder rows instead (`_decode_grads`, kernels/cpu_native.py
decode_grads), which also adds the decoder norms' gradient handed over by the fused encode + decode
(kernels/fused.py): each decoder element read once and each gradient element written once.

Why the encode's backward is sparse too: in training nothing needs d loss / d x or d loss / d pre
(the pre-activation penalty reads Encoded.preact_gap), and d loss / d pre is then a part on grad_mask
minus a per-feature constant, so the encoder's weight gradient is a sparse product plus a rank-1
term instead of a dense [F, B] x [B, D] matmul per layer (see TorchEncode).
"""
from __future__ import annotations

import contextlib
import warnings

import torch
from torch.profiler import record_function
from torch.utils.weak import WeakTensorKeyDictionary

from cltrain.encoding import Encoded, jumprelu_grad_mask, nonzero_positions, preact_gap

from . import cpu_native

# Density switches, with torch's own sparse products (sampled_addmm, MKL's CSR x dense):
# mask density above which the acts gradient is computed as a dense product (see module docstring;
# the crossover measured ~11% on 2026-11-24 and ~8% on 2026-11-29, on two 2-core Xeon VMs).
DENSE_GRAD_ABOVE = 0.08
# Activation density (per source layer) above which the decode's forward and weight-gradient products
# are dense: the crossover of CSR and dense products on a 2-core CPU is about 3.5% for the forward
# and 9% for the weight gradient (S = 12 slots, B = 1024, F = 4096). Early in training (theta = 0.03
# at init) nearly half the activations can be non-zero.
DENSE_ACTS_ABOVE = 0.05
# Both switches where the compiled kernels run (kernels/cpu_native.py: float32 on CPU): whole steps
# at 3-30% firing crossed over at ~10% on the 2-core Xeon VM (2026-12-07, benchmarks/kernels.md "Early in
# training": 1.00x at 10%, 0.54x at 20%), between 20% and 30% on an AMD EPYC VM (2026-12-06), whose
# dense matmul reached 0.18 TFLOP/s against the Xeon's 0.33: the machine CI and these runs use decides.
COMPILED_DENSE_ABOVE = 0.1
# Column block of the sampled product (see acts_grad).
SAMPLED_BLOCK = 256
# The decoder gradient and the activation gradient of a source layer in one compiled pass where it applies
# (TorchSparseDecode.backward); False takes the separate products (benchmarks/kernels.py's comparison).
ONE_PASS_GRADS = True


# Names of a step's phases as torch.profiler sees them (benchmarks/kernels.py's phase split reads them; a
# record_function costs microseconds, nothing while no profiler runs).
PHASES = {"encode": "cltrain.encode", "decode": "cltrain.decode", "decoder_grad": "cltrain.decode.backward.weights",
          "acts_grad": "cltrain.decode.backward.acts", "window": "cltrain.window_sums",
          "encode_backward": "cltrain.encode.backward", "norms": "cltrain.decoder_norms",
          "decode_grads": "cltrain.decode.backward.fused"}


@contextlib.contextmanager
def _quiet_sparse():
    # torch warns once that CSR support is "beta" and that invariant checks are off; the CSR tensors
    # here are built from indices we construct ourselves, so both warnings are noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        yield


# ----------------------------------------------------------------------------------------------------
# Fused JumpReLU encode


class TorchEncode(torch.autograd.Function):
    """pre = x W_enc^T + b_enc, acts = JumpReLU(pre), grad_mask and preact_gap in one autograd node
    instead of the reference's several, so the backward makes few passes over [B, N, F].

    d loss / d pre is non-zero on grad_mask (from acts) plus, from preact_gap with upstream gradient
    q [N, F], -q wherever h < theta. Writing 1[h < theta] = 1 - 1[h >= theta], where h >= theta lies
    inside grad_mask, it is a part S supported on grad_mask minus a per-feature constant:
        dW_enc[n] = S_n^T x_n - q_n (sum_b x_n[b])^T      grad_b = sum_b S - B q
    so when grad_mask is sparse the encoder's weight gradient is a sparse product and a rank-1
    update, not a dense [F, B] x [B, D] matmul per layer."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, log_threshold, bandwidth: float, st_to_preact: bool,
                dense_grad_above: float):
        # [N, B, F] in memory (the layout the reference einsum also returns), viewed as [B, N, F]:
        # each layer's slice acts[:, s] is then contiguous for the decode.
        pre = torch.baddbmm(b_enc.unsqueeze(1), x.transpose(0, 1), W_enc.transpose(1, 2))
        theta = log_threshold.exp().unsqueeze(1)
        diff = pre - theta
        acts = torch.where(diff > 0, pre, 0)
        # active | |diff| < eps/2 in one comparison: an active position has diff > 0 > -eps/2
        mask = diff > -bandwidth / 2
        # preact_gap = sum_b relu(-diff) = (sum_b |diff| - sum_b diff) / 2: two reductions and no
        # [N, B, F] temporary (on CPU a fresh one costs page faults as much as the arithmetic)
        gap = diff.sum(1)
        gap = diff.abs_().sum(1).sub_(gap).mul_(0.5)  # diff is dead now
        ctx.save_for_backward(x, W_enc, pre, theta)
        ctx.bandwidth, ctx.st_to_preact, ctx.dense_grad_above = bandwidth, st_to_preact, dense_grad_above
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None: no zeros to scan
        mask = mask.transpose(0, 1)
        ctx.mark_non_differentiable(mask)
        ctx.grad_mask = mask  # the object the decode also gets: it keys mask_positions
        return pre.transpose(0, 1), acts.transpose(0, 1), mask, gap

    @staticmethod
    def backward(ctx, grad_pre, grad_acts, _grad_mask, grad_gap):
        grads = TorchEncode._backward(ctx, grad_pre, grad_acts, grad_gap)
        extra = getattr(ctx, "window_extra", None)  # [N, F], from the fused encode+decode (fused.py)
        if extra is not None and grads[3] is not None:
            # d loss / d theta -= (theta / eps) * extra; times theta for the log parameterization
            theta = ctx.saved_tensors[3].squeeze(1)
            grads = (*grads[:3], grads[3] - (extra * (theta * theta / ctx.bandwidth)).to(grads[3].dtype),
                     *grads[4:])
        return grads

    @staticmethod
    def _backward(ctx, grad_pre, grad_acts, grad_gap):
        x, W_enc, pre, theta = ctx.saved_tensors
        need_x, need_W, need_b, need_lt = ctx.needs_input_grad[:4]
        if grad_pre is None and not need_x:
            positions = mask_positions(ctx.grad_mask, ctx.dense_grad_above)
            window_sums = False
            if positions is None and not ctx.st_to_preact:
                # A wide window (grad_mask dense). Per-token gradients are still needed only where
                # h >= theta; the window reaches only the threshold gradient, as per-feature sums.
                at_or_above = (pre >= theta).transpose(0, 1)
                indices = nonzero_positions(at_or_above, ctx.dense_grad_above)
                if indices is not None:
                    positions = SparseLayers(at_or_above, with_values=False, indices=indices)
                    window_sums = True
            if positions is not None:
                return (None, *_encode_backward_sparse(ctx, x, pre, theta, positions, grad_acts, grad_gap,
                                                       window_sums), None, None, None)
        gh, grad_theta = _encode_dense_grad_pre(ctx, pre, theta, grad_pre, grad_acts, grad_gap)
        grad_x = torch.bmm(gh, W_enc).transpose(0, 1) if need_x else None
        grad_W = torch.bmm(gh.transpose(1, 2), x.transpose(0, 1)) if need_W else None
        grad_b = gh.sum(1) if need_b else None
        grad_lt = grad_theta * theta.squeeze(1) if need_lt else None
        return grad_x, grad_W, grad_b, grad_lt, None, None, None


def _jump(ctx, diff, theta, grad_acts):
    """d loss / d pre from the acts (straight-through term included when configured), and the jump
    term's contribution to d loss / d theta, at the given pre - theta values."""
    eps = ctx.bandwidth
    window_grad = torch.where(diff.abs() < eps / 2, grad_acts, 0)
    gh = grad_acts * (diff > 0)
    if ctx.st_to_preact:
        gh = gh + window_grad * (theta / eps)
    return gh, -window_grad * (theta / eps)


def _encode_dense_grad_pre(ctx, pre, theta, grad_pre, grad_acts, grad_gap):
    """d loss / d pre as a dense [N, B, F] tensor, and d loss / d theta [N, F]."""
    N, B, F = pre.shape
    diff = pre - theta
    grad_theta = pre.new_zeros(N, F)
    if grad_acts is not None:
        gh, jump = _jump(ctx, diff, theta, grad_acts.transpose(0, 1))
        grad_theta += jump.sum(1)
    else:
        gh = pre.new_zeros(N, B, F)
    if grad_pre is not None:
        gh += grad_pre.transpose(0, 1)
    if grad_gap is not None:  # d gap / d h = -1[h < theta], d gap / d theta = #(h < theta)
        below = diff < 0
        gh -= below * grad_gap.unsqueeze(1)
        grad_theta += below.sum(1) * grad_gap
    return gh.contiguous(), grad_theta


def _encode_backward_sparse(ctx, x, pre, theta, positions, grad_acts, grad_gap, window_sums: bool):
    """The encoder's gradients from a rank-1 term and the positions given: grad_mask's, or (with
    window_sums, straight-through to h off) those where h >= theta, the window's threshold
    gradient then taken as per-feature sums over the dense grad_acts (see TorchEncode)."""
    N, B, F = pre.shape
    n, b, f = positions.s, positions.b, positions.f
    th = theta.squeeze(1)[n, f]
    diff = pre[n, b, f] - th
    grad_theta = pre.new_zeros(N, F)
    if grad_acts is not None and window_sums:
        ga = grad_acts.transpose(0, 1)
        s_vals = ga[n, b, f] * (diff > 0)
        # the window |diff| < eps/2 is grad_mask (diff > -eps/2) less the listed positions with
        # diff >= eps/2: one masked reduction over [N, B, F] instead of recomputing |pre - theta|
        window_sum = torch.where(ctx.grad_mask.transpose(0, 1), ga, 0).sum(1)
        high = diff >= ctx.bandwidth / 2
        window_sum.index_put_((n[high], f[high]), -ga[n[high], b[high], f[high]], accumulate=True)
        grad_theta -= window_sum * (theta.squeeze(1) / ctx.bandwidth)
    elif grad_acts is not None:
        s_vals, jump = _jump(ctx, diff, th, grad_acts[b, n, f])
        grad_theta.index_put_((n, f), jump, accumulate=True)
    else:
        s_vals = torch.zeros_like(diff)
    if grad_gap is not None:
        q = grad_gap[n, f]
        at_or_above = diff >= 0
        s_vals = s_vals + q * at_or_above
        n_below = B - torch.zeros_like(grad_theta).index_put_((n, f), at_or_above.to(pre.dtype),
                                                               accumulate=True)
        grad_theta += n_below * grad_gap
    need_W, need_b, need_lt = ctx.needs_input_grad[1:4]
    grad_W = grad_b = None
    if need_b:
        grad_b = torch.zeros_like(grad_theta).index_put_((n, f), s_vals, accumulate=True)
        if grad_gap is not None:
            grad_b -= B * grad_gap
    if need_W:
        x_nbd = _upcast(x.transpose(0, 1).contiguous())
        grad_W = x_nbd.new_zeros(N, F, x.shape[-1])
        if grad_gap is not None:
            torch.mul(grad_gap.unsqueeze(2), x_nbd.sum(1).unsqueeze(1), out=grad_W).neg_()
        with _quiet_sparse():
            for s, (ccol, b_idx, vals, _) in enumerate(positions.feature_major(s_vals.to(x_nbd.dtype))):
                if vals.numel():
                    # MKL's CSR product, not the compiled one: at D columns (not the decode's S*D)
                    # MKL's measured faster (benchmarks/kernels.md, "Sparse products")
                    torch.addmm(grad_W[s], _csr(ccol, b_idx, vals, (F, B)), x_nbd[s], out=grad_W[s])
        grad_W = grad_W.to(x.dtype)
    grad_lt = grad_theta * theta.squeeze(1) if need_lt else None
    return grad_W, grad_b, grad_lt


def torch_encode(x, W_enc, b_enc, log_threshold, bandwidth: float, st_to_preact: bool, *,
                 dense_grad_above: float | None = None) -> Encoded:
    """Fused JumpReLU encode in plain PyTorch; same results and gradients as `reference_encode`.
    The weight gradients are sparse products where grad_mask covers at most `dense_grad_above` of
    the positions (and nothing needs d loss / d x or d loss / d pre), dense matmuls otherwise
    (default: `default_dense_above(W_enc)`)."""
    if dense_grad_above is None:
        dense_grad_above = default_dense_above(W_enc)
    pre, acts, mask, gap = TorchEncode.apply(x, W_enc, b_enc, log_threshold, bandwidth, st_to_preact,
                                              dense_grad_above)
    return Encoded(pre, acts, mask, gap)


def encode_forward_twin(x, W_enc, b_enc, log_threshold, bandwidth: float):
    """Forward of the encode, without autograd: the twin of the Triton forward kernel."""
    pre = torch.einsum("bnd,nfd->bnf", x.float(), W_enc.float()) + b_enc.float()
    theta = log_threshold.float().exp()
    return pre, pre * (pre > theta), jumprelu_grad_mask(pre, theta, bandwidth), preact_gap(pre, theta)


# ----------------------------------------------------------------------------------------------------
# Sparse decode


class SparseLayers:
    """The non-zeros of a [B, N, F] tensor (activations or grad_mask) per source layer, as CSR over
    tokens (token-major, for the forward) and CSR over features (feature-major, for the products that
    walk decoder rows once). Index building is batched over layers -- a handful of ops whatever N --
    because on a busy CPU each small parallel op can stall for a scheduler tick."""

    def __init__(self, t, with_values: bool = True, indices=None):
        nbf = t.transpose(0, 1)  # the encode's memory order: one contiguous scan
        self.N, self.B, self.F = nbf.shape
        # sorted by (layer, token, feature); `indices` if the caller has them already
        self.s, self.b, self.f = nbf.nonzero(as_tuple=True) if indices is None else indices
        self.values = nbf[self.s, self.b, self.f] if with_values else None
        self.counts = torch.bincount(self.s, minlength=self.N).tolist()
        self._by_feature = self._by_layer = None

    def layer(self, s: int):
        """Layer s's entries: (token index, feature index, value), in (token, feature) order."""
        if self._by_layer is None:
            self._by_layer = list(zip(self.b.split(self.counts), self.f.split(self.counts),
                                      self.values.split(self.counts)))
        return self._by_layer[s]

    def _ptr(self, key, n_rows: int):
        ptr = torch.zeros(self.N, n_rows + 1, dtype=torch.int64, device=key.device)
        ptr[:, 1:] = torch.bincount(key, minlength=self.N * n_rows).view(self.N, n_rows).cumsum(1)
        return ptr

    def token_pointers(self):
        """[N, B + 1]: per layer, token b's entries are [ptr[s, b], ptr[s, b + 1]) of that layer's."""
        return self._ptr(self.s * self.B + self.b, self.B)

    def token_major(self):
        """Per layer: (row pointers [B + 1], feature index, value)."""
        crow = self.token_pointers()
        vals = self.values.split(self.counts) if self.values is not None else [None] * self.N
        return list(zip(crow, self.f.split(self.counts), vals))

    def feature_major(self, values=None):
        """Per layer: (column pointers [F + 1], token index, value, feature index), by feature.
        `values` (given in this object's (layer, token, feature) order) replace its own."""
        if self._by_feature is None:  # one sort for all layers, kept for later calls
            key = self.s * self.F + self.f
            order = torch.argsort(key, stable=True)
            self._by_feature = (order, self._ptr(key, self.F), self.b[order].split(self.counts),
                                self.f[order].split(self.counts))
        order, ccol, b_idx, f_idx = self._by_feature
        values = self.values if values is None else values
        vals = values[order].split(self.counts) if values is not None else [None] * self.N
        return list(zip(ccol, b_idx, vals, f_idx))


# A grad_mask's positions, by layer and feature-major, serve the decode's backward and the encode's
# backward alike: build them once per mask (the listing itself is nonzero_positions').
_MASK_LAYERS = WeakTensorKeyDictionary()


def mask_positions(grad_mask, dense_above: float):
    """SparseLayers of grad_mask [B, N, F], or None where it covers more than `dense_above` of its
    positions (listing a nearly full mask costs more than the dense products it would replace)."""
    indices = nonzero_positions(grad_mask, dense_above)
    if indices is None:
        return None
    layers = _MASK_LAYERS.get(grad_mask)
    if layers is None or layers.s is not indices[0]:
        layers = _MASK_LAYERS[grad_mask] = SparseLayers(grad_mask, with_values=False, indices=indices)
    return layers


def default_dense_above(weight, torch_products: float = DENSE_GRAD_ABOVE) -> float:
    """The density switch for products on `weight`'s device and dtype: COMPILED_DENSE_ABOVE where the
    compiled CPU kernels run them (float32 arithmetic on CPU), else `torch_products`."""
    compiled = (weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16, torch.float16)
                and cpu_native.available())
    return COMPILED_DENSE_ABOVE if compiled else torch_products


def _upcast(t):
    # MKL's sparse products have no bf16/fp16 kernels on CPU: compute those in float32.
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) and t.device.type == "cpu" else t


def _csr(ptr, idx, values, shape):
    return torch.sparse_csr_tensor(ptr, idx, values, shape, check_invariants=False)


def csr_addmm(out, ptr, idx, values, dense, accumulate: bool):
    """out [R, K] (+)= CSR(ptr, idx, values) [R, M] @ dense [M, K], in place: in float32 on CPU the
    compiled kernel (kernels/cpu_native.py), else torch's addmm (MKL's on CPU)."""
    if (out.dtype == dense.dtype == values.dtype == torch.float32 and out.device.type == "cpu"
            and cpu_native.csr_dense(ptr, idx, values, dense, out, accumulate)):
        return
    # beta=0 into fresh memory: `csr @ dense` would zero-fill, then copy (3x slower)
    torch.addmm(out, _csr(ptr, idx, values, (out.shape[0], dense.shape[0])), dense, beta=1 if accumulate else 0,
                out=out)


class TorchSparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, grad_mask, dense_grad_above: float, *W_dec):
        B, N, F = acts.shape
        D = W_dec[0].shape[-1]
        out_dtype = torch.promote_types(acts.dtype, W_dec[0].dtype)
        a = _upcast(acts.detach())
        y = torch.zeros(B, N, D, dtype=_upcast(a.new_empty(0, dtype=out_dtype)).dtype, device=a.device)
        acts_above = default_dense_above(W_dec[0], DENSE_ACTS_ABOVE)
        indices = nonzero_positions(acts, acts_above)  # listed once: the sparsity term shares them
        nz = None if indices is None else SparseLayers(a, indices=indices)
        dense = [nz is None or nz.counts[s] > acts_above * B * F for s in range(N)]
        with _quiet_sparse():
            for s, (crow, f_idx, values) in enumerate(nz.token_major() if nz else [(None,) * 3] * N):
                w = W_dec[s]
                n_slots = w.shape[1]
                W2 = _upcast(w.detach()).reshape(F, n_slots * D)
                # addmm into the strided slice of y: `csr @ W2` would zero-fill and copy a temporary
                y_s = y[:, s:s + n_slots].view(B, n_slots * D)
                if dense[s]:
                    torch.addmm(y_s, a[:, s], W2, out=y_s)
                elif values.numel():
                    csr_addmm(y_s, crow, f_idx, values.to(W2.dtype), W2, accumulate=True)
        ctx.nz, ctx.dense = nz, dense
        ctx.dense_grad_above = dense_grad_above
        ctx.grad_mask = grad_mask  # the object itself: it keys mask_positions (a bool tensor, no grad)
        ctx.save_for_backward(acts if any(dense) else None, *W_dec)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        acts, *W_dec = ctx.saved_tensors
        grad_mask = ctx.grad_mask
        B, N, D = grad_y.shape
        F = W_dec[0].shape[0]
        dY = _upcast(grad_y)
        need_acts = ctx.needs_input_grad[0]
        grad_acts = pairs = None
        if need_acts:
            # [N, B, F] in memory like the encode's output; zeros where the gradient is not needed.
            grad_acts = dY.new_empty(N, B, F)  # every layer's slice is written by acts_grad
            pairs = sampled_pairs(grad_mask, N, ctx.dense_grad_above)
        # the decoder norms' gradient coef[s, f] W_s[f], from the fused encode + decode (kernels/fused.py)
        coef = getattr(ctx, "norm_coef", None)
        fused = [need_acts and ctx.needs_input_grad[3 + s] and not ctx.dense[s] and pairs[s] is not None
                 and _fused_grads_apply(dY, W_dec[s]) for s in range(N)]
        acts_fm = None
        grad_W = []
        with _quiet_sparse():
            for s, w in enumerate(W_dec):
                n_slots = w.shape[1]
                dY_s = dY[:, s:s + n_slots].reshape(B, n_slots * D)
                if fused[s]:
                    with record_function(PHASES["decode_grads"]):
                        dw = _decode_grads(grad_acts[s], dY_s, w, ctx.nz.layer(s), pairs[s],
                                           None if coef is None else coef[s])
                    if dw is not None:
                        grad_W.append(dw)
                        continue
                if acts_fm is None and ctx.nz is not None and ctx.needs_input_grad[3 + s]:
                    acts_fm = ctx.nz.feature_major()
                with record_function(PHASES["decoder_grad"]):
                    if ctx.needs_input_grad[3 + s] and ctx.dense[s]:
                        grad_W.append(torch.mm(_upcast(acts[:, s]).t(), dY_s).view(F, n_slots, D).to(w.dtype))
                    elif ctx.needs_input_grad[3 + s]:
                        ccol, b_idx, values, _ = acts_fm[s]
                        if values.numel() == 0:
                            grad_W.append(torch.zeros_like(w))
                        else:  # dW_s = a_s^T dY_s, feature-major: each decoder row written once
                            dw = dY.new_empty(F, n_slots * D)
                            csr_addmm(dw, ccol, b_idx, values.to(dY.dtype), dY_s, accumulate=False)
                            grad_W.append(dw.view(F, n_slots, D).to(w.dtype))
                    else:
                        grad_W.append(None)
                if need_acts:
                    with record_function(PHASES["acts_grad"]):
                        acts_grad(grad_acts[s], dY_s, _upcast(w).reshape(F, n_slots * D), pairs[s])
                if coef is not None and grad_W[s] is not None:
                    with record_function(PHASES["norms"]):
                        grad_W[s] = grad_W[s].add_(w * coef[s].to(w.dtype)[:, None, None])
        if coef is not None:
            ctx.norm_coef_used = True
        if grad_acts is not None:
            grad_acts = grad_acts.to(grad_y.dtype).transpose(0, 1)
        return (grad_acts, None, None, *grad_W)


def _fused_grads_apply(dY, w) -> bool:
    """Whether a source layer's decoder and activation gradients can be one compiled pass (float32 on CPU)."""
    return (ONE_PASS_GRADS and dY.dtype == w.dtype == torch.float32 and w.device.type == "cpu"
            and cpu_native.available())


def _decode_grads(out, dY_s, w, active, pairs, coef):
    """One source layer's decode backward in one pass over its decoder rows (kernels/cpu_native.py,
    decode_grads): out [B, F] <- dY_s W_s^T at the mask's pairs (0 elsewhere); returns dW_s = a_s^T dY_s
    (+ coef[f] W_s[f], the decoder norms' gradient). `active`: the layer's non-zero activations (token,
    feature, value), read at the mask's pairs through `out` as scratch: exact when the pairs include all
    of them, as training's masks do (grad_mask is active | window, or active | below it); None (out
    zeroed, nothing else written) otherwise."""
    ccol, b_idx, _, f_idx = pairs
    a_b, a_f, a_v = active
    F, n_slots, D = w.shape
    W2 = w.detach().reshape(F, n_slots * D)
    dw = torch.empty_like(W2)  # first: the step's large blocks then sit together in the heap
    out.zero_()
    out[a_b, a_f] = a_v.to(out.dtype)
    act = out[b_idx, f_idx]
    if int(torch.count_nonzero(act)) != a_v.numel():
        out.zero_()
        return None
    vals = dY_s.new_empty(b_idx.numel())
    cpu_native.decode_grads(W2, dY_s, ccol, b_idx, act, None if coef is None else coef.float().contiguous(),
                            vals, dw)
    out.zero_()
    out[b_idx, f_idx] = vals
    return dw.view(F, n_slots, D)


def sampled_pairs(grad_mask, n_layers: int, dense_grad_above: float):
    """Per source layer: the masked (token, feature) pairs, feature-major (column pointers [F + 1],
    token index, -, feature index), where they are few enough for a sampled product; None where a
    dense product is cheaper (or there is no mask). Densities are counted first: listing the indices
    of a nearly full mask would cost more than the dense product saves."""
    if grad_mask is None:
        return [None] * n_layers
    B, _, F = grad_mask.shape
    layers = mask_positions(grad_mask, dense_grad_above)
    if layers is None:
        return [None] * n_layers
    return [pairs if c <= dense_grad_above * B * F else None
            for c, pairs in zip(layers.counts, layers.feature_major())]


def acts_grad(out, dY_s, W2, pairs):
    """out [B, F] <- dY_s @ W2^T, exactly at the masked pairs (feature-major layout; all when None)."""
    B, F = out.shape
    if pairs is None:
        torch.mm(dY_s, W2.t(), out=out) if out.is_contiguous() else out.copy_(dY_s @ W2.t())
        return
    ccol, b_idx, _, f_idx = pairs
    out.zero_()
    if not b_idx.numel():
        return
    vals = None
    if dY_s.dtype == W2.dtype == torch.float32 and dY_s.device.type == "cpu":
        # the compiled kernel (faster than sampled_addmm, benchmarks/kernels.md); False where it
        # cannot be built
        vals = dY_s.new_empty(b_idx.numel())
        if not cpu_native.sampled_product(W2, dY_s, ccol, b_idx, vals):
            vals = None
    if vals is None:
        ones = torch.ones(b_idx.numel(), dtype=dY_s.dtype, device=dY_s.device)
        pattern = _csr(ccol, b_idx, ones, (F, B))
        # Feature-major: each decoder row is read once and dotted with its tokens' dY rows. Over
        # column blocks, so a block of dY stays in cache while every feature's tokens re-read it
        # (~25% faster than one product over all S*D columns on a 2-core CPU).
        for j in range(0, W2.shape[1], SAMPLED_BLOCK):
            part = torch.sparse.sampled_addmm(pattern, W2[:, j:j + SAMPLED_BLOCK],
                                              dY_s[:, j:j + SAMPLED_BLOCK].t(), beta=0.0).values()
            vals = part if vals is None else vals.add_(part)
    out[b_idx, f_idx] = vals


def torch_sparse_decode(acts, W_dec, grad_mask=None, *, dense_grad_above: float | None = None):
    """Sparse decode in plain PyTorch (CSR products, no dense B x (N*F) times decoder product).

    Same result as `reference_decode`; the gradient w.r.t. acts is exact where grad_mask is True (or
    everywhere when grad_mask is None) and 0 elsewhere; gradients w.r.t. every W_dec[s] are exact.
    dense_grad_above: the mask density above which the acts gradient is a dense product (default:
    `default_dense_above(W_dec[0])`).
    """
    if dense_grad_above is None:
        dense_grad_above = default_dense_above(W_dec[0])
    return TorchSparseDecode.apply(acts, grad_mask, dense_grad_above, *W_dec)
