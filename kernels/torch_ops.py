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
with W_s = W_dec[s] viewed [F, S_s*D] and dY_s = dY[:, s:s+S_s] viewed [B, S_s*D].
The acts gradient is needed wherever JumpReLU's backward reads it (active or inside the
straight-through window, `grad_mask`). When that mask is sparse it is a sampled dense-dense product
(torch.sparse.sampled_addmm, feature-major so each decoder row is read once); when it is dense
(early in training with eps = 2 the window holds almost every position) the plain dense product is
cheaper. `dense_grad_above` is the mask density where we switch (measured crossover on a 2-core CPU:
about 10-15%, see benchmarks/kernels.md).
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from cltrain.train.clt import Encoded, jumprelu_grad_mask

# Mask density above which the acts gradient is computed as a dense product (see module docstring).
DENSE_GRAD_ABOVE = 0.1


@contextlib.contextmanager
def _quiet_sparse():
    # torch warns once that CSR support is "beta" and that invariant checks are off; the CSR tensors
    # here are built from indices we construct ourselves, so both warnings are noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse.*")
        yield


# ----------------------------------------------------------------------------------------------------
# Fused JumpReLU encode


class _TorchEncode(torch.autograd.Function):
    """pre = x W_enc^T + b_enc, acts = JumpReLU(pre), grad_mask: one autograd node instead of the
    reference's three (einsum, add, JumpReLU), so the backward makes fewer passes over [B, N, F]."""

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, log_threshold, bandwidth: float, st_to_preact: bool):
        # [N, B, F] in memory (the layout the reference einsum also returns), viewed as [B, N, F]:
        # each layer's slice acts[:, s] is then contiguous for the decode.
        pre = torch.baddbmm(b_enc.unsqueeze(1), x.transpose(0, 1), W_enc.transpose(1, 2)).transpose(0, 1)
        theta = log_threshold.exp()
        active = pre > theta
        acts = pre * active
        mask = active | ((pre - theta).abs() < bandwidth / 2)
        ctx.save_for_backward(x, W_enc, pre, theta)
        ctx.bandwidth, ctx.st_to_preact = bandwidth, st_to_preact
        ctx.mark_non_differentiable(mask)
        return pre, acts, mask

    @staticmethod
    def backward(ctx, grad_pre, grad_acts, _grad_mask):
        x, W_enc, pre, theta = ctx.saved_tensors
        eps = ctx.bandwidth
        N, F = theta.shape
        B = pre.shape[0]
        # d loss / d pre, written straight into [N, B, F] memory so the two matmuls below read it
        # contiguously (a [B, N, F]-contiguous upstream gradient would otherwise be copied twice).
        gh = pre.new_empty(N, B, F)
        gh_bnf = gh.transpose(0, 1)
        grad_log_theta = None
        if grad_acts is not None:
            diff = pre - theta
            torch.mul(grad_acts, diff > 0, out=gh_bnf)
            if grad_pre is not None:
                gh_bnf.add_(grad_pre)
            if ctx.st_to_preact or ctx.needs_input_grad[3]:
                window_grad = torch.where(diff.abs_() < eps / 2, grad_acts, 0)  # diff is dead now
                if ctx.st_to_preact:
                    gh_bnf.add_(window_grad * (theta / eps))
                if ctx.needs_input_grad[3]:
                    grad_log_theta = -window_grad.sum(0) * (theta * theta / eps)
        else:
            if grad_pre is None:
                gh.zero_()
            else:
                gh_bnf.copy_(grad_pre)
            if ctx.needs_input_grad[3]:
                grad_log_theta = torch.zeros_like(theta)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.bmm(gh, W_enc).transpose(0, 1)
        if ctx.needs_input_grad[1]:
            grad_W = torch.bmm(gh.transpose(1, 2), x.transpose(0, 1))
        if ctx.needs_input_grad[2]:
            grad_b = gh.sum(1)
        return grad_x, grad_W, grad_b, grad_log_theta, None, None


def torch_encode(x, W_enc, b_enc, log_threshold, bandwidth: float, st_to_preact: bool) -> Encoded:
    """Fused JumpReLU encode in plain PyTorch; same results and gradients as `reference_encode`."""
    pre, acts, mask = _TorchEncode.apply(x, W_enc, b_enc, log_threshold, bandwidth, st_to_preact)
    return Encoded(pre, acts, mask)


def encode_forward_twin(x, W_enc, b_enc, log_threshold, bandwidth: float):
    """Forward of the encode, without autograd: the twin of the Triton forward kernel."""
    pre = torch.einsum("bnd,nfd->bnf", x.float(), W_enc.float()) + b_enc.float()
    theta = log_threshold.float().exp()
    return pre, pre * (pre > theta), jumprelu_grad_mask(pre, theta, bandwidth)


# ----------------------------------------------------------------------------------------------------
# Sparse decode


class SparseLayers:
    """The non-zeros of a [B, N, F] tensor (activations or grad_mask) per source layer, as CSR over
    tokens (token-major, for the forward) and CSR over features (feature-major, for the products that
    walk decoder rows once). Index building is batched over layers -- a handful of ops whatever N --
    because on a busy CPU each small parallel op can stall for a scheduler tick."""

    def __init__(self, t, with_values: bool = True):
        nbf = t.transpose(0, 1)  # the encode's memory order: one contiguous scan
        self.N, self.B, self.F = nbf.shape
        self.s, self.b, self.f = nbf.nonzero(as_tuple=True)  # sorted by (layer, token, feature)
        self.values = nbf[self.s, self.b, self.f] if with_values else None
        self.counts = torch.bincount(self.s, minlength=self.N).tolist()

    def _ptr(self, key, n_rows: int):
        ptr = torch.zeros(self.N, n_rows + 1, dtype=torch.int64, device=key.device)
        ptr[:, 1:] = torch.bincount(key, minlength=self.N * n_rows).view(self.N, n_rows).cumsum(1)
        return ptr

    def token_major(self):
        """Per layer: (row pointers [B + 1], feature index, value)."""
        crow = self._ptr(self.s * self.B + self.b, self.B)
        vals = self.values.split(self.counts) if self.values is not None else [None] * self.N
        return list(zip(crow, self.f.split(self.counts), vals))

    def feature_major(self):
        """Per layer: (column pointers [F + 1], token index, value, feature index), by feature."""
        key = self.s * self.F + self.f
        order = torch.argsort(key, stable=True)  # one sort for all layers
        ccol = self._ptr(key, self.F)
        vals = (self.values[order].split(self.counts) if self.values is not None
                else [None] * self.N)
        return list(zip(ccol, self.b[order].split(self.counts), vals, self.f[order].split(self.counts)))


def _upcast(t):
    # MKL's sparse products have no bf16/fp16 kernels on CPU: compute those in float32.
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) and t.device.type == "cpu" else t


def _csr(ptr, idx, values, shape):
    return torch.sparse_csr_tensor(ptr, idx, values, shape, check_invariants=False)


class _TorchSparseDecode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, acts, grad_mask, dense_grad_above: float, *W_dec):
        B, N, F = acts.shape
        D = W_dec[0].shape[-1]
        out_dtype = torch.promote_types(acts.dtype, W_dec[0].dtype)
        a = _upcast(acts.detach())
        y = torch.zeros(B, N, D, dtype=_upcast(a.new_empty(0, dtype=out_dtype)).dtype, device=a.device)
        nz = SparseLayers(a)
        with _quiet_sparse():
            for s, (crow, f_idx, values) in enumerate(nz.token_major()):
                if values.numel() == 0:
                    continue
                w = W_dec[s]
                n_slots = w.shape[1]
                W2 = _upcast(w.detach()).reshape(F, n_slots * D)
                # addmm into the strided slice of y: `csr @ W2` would zero-fill and copy a temporary
                y_s = y[:, s:s + n_slots].view(B, n_slots * D)
                torch.addmm(y_s, _csr(crow, f_idx, values.to(W2.dtype), (B, F)), W2, out=y_s)
        ctx.nz = nz
        ctx.dense_grad_above = dense_grad_above
        ctx.save_for_backward(grad_mask, *W_dec)
        return y.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        grad_mask, *W_dec = ctx.saved_tensors
        B, N, D = grad_y.shape
        F = W_dec[0].shape[0]
        dY = _upcast(grad_y)
        need_acts = ctx.needs_input_grad[0]
        need_W = any(ctx.needs_input_grad[3:])
        acts_fm = ctx.nz.feature_major() if need_W else None
        grad_acts = pairs = None
        if need_acts:
            # [N, B, F] in memory like the encode's output; zeros where the gradient is not needed.
            grad_acts = dY.new_empty(N, B, F)  # every layer's slice is written by _acts_grad
            pairs = _sampled_pairs(grad_mask, N, ctx.dense_grad_above)
        grad_W = []
        with _quiet_sparse():
            for s, w in enumerate(W_dec):
                n_slots = w.shape[1]
                dY_s = dY[:, s:s + n_slots].reshape(B, n_slots * D)
                if ctx.needs_input_grad[3 + s]:
                    ccol, b_idx, values, _ = acts_fm[s]
                    if values.numel() == 0:
                        grad_W.append(torch.zeros_like(w))
                    else:  # dW_s = a_s^T dY_s, feature-major: each decoder row written once
                        a_t = _csr(ccol, b_idx, values.to(dY.dtype), (F, B))
                        # beta=0 into fresh memory: `a_t @ dY_s` zero-fills, then copies (3x slower)
                        dw = dY.new_empty(F, n_slots * D)
                        torch.addmm(dw, a_t, dY_s, beta=0, out=dw)
                        grad_W.append(dw.view(F, n_slots, D).to(w.dtype))
                else:
                    grad_W.append(None)
                if need_acts:
                    _acts_grad(grad_acts[s], dY_s, _upcast(w).reshape(F, n_slots * D), pairs[s])
        if grad_acts is not None:
            grad_acts = grad_acts.to(grad_y.dtype).transpose(0, 1)
        return (grad_acts, None, None, *grad_W)


def _sampled_pairs(grad_mask, n_layers: int, dense_grad_above: float):
    """Per source layer: the masked (token, feature) pairs, feature-major (column pointers [F + 1],
    token index, -, feature index), where they are few enough for a sampled product; None where a
    dense product is cheaper (or there is no mask). Densities are counted first: listing the indices
    of a nearly full mask would cost more than the dense product saves."""
    if grad_mask is None:
        return [None] * n_layers
    nbf = grad_mask.transpose(0, 1)
    _, B, F = nbf.shape
    counts = nbf.sum(dim=(1, 2)).tolist()
    sparse = [s for s, c in enumerate(counts) if c <= dense_grad_above * B * F]
    out = [None] * n_layers
    if sparse:
        sub = nbf if len(sparse) == n_layers else nbf[sparse]
        for s, layout in zip(sparse, SparseLayers(sub.transpose(0, 1), with_values=False).feature_major()):
            out[s] = layout
    return out


def _acts_grad(out, dY_s, W2, pairs):
    """out [B, F] <- dY_s @ W2^T, exactly at the masked pairs (feature-major layout; all when None)."""
    B, F = out.shape
    if pairs is not None:
        ccol, b_idx, _, f_idx = pairs
        out.zero_()
        if b_idx.numel():
            ones = torch.ones(b_idx.numel(), dtype=dY_s.dtype, device=dY_s.device)
            # feature-major: each decoder row is read once and dotted with its tokens' dY rows
            sampled = torch.sparse.sampled_addmm(_csr(ccol, b_idx, ones, (F, B)), W2, dY_s.t(), beta=0.0)
            out[b_idx, f_idx] = sampled.values()
        return
    torch.mm(dY_s, W2.t(), out=out) if out.is_contiguous() else out.copy_(dY_s @ W2.t())


def torch_sparse_decode(acts, W_dec, grad_mask=None, *, dense_grad_above: float = DENSE_GRAD_ABOVE):
    """Sparse decode in plain PyTorch (CSR products, no dense B x (N*F) times decoder product).

    Same result as `reference_decode`; the gradient w.r.t. acts is exact where grad_mask is True (or
    everywhere when grad_mask is None) and 0 elsewhere; gradients w.r.t. every W_dec[s] are exact.
    """
    return _TorchSparseDecode.apply(acts, grad_mask, dense_grad_above, *W_dec)
