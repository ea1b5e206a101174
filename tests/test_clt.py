"""The CLT math of docs/design.md section 1: JumpReLU and its straight-through gradients, the decode's layer
structure, the loss terms, and a first sign that it trains."""
import math

import pytest
import torch

from cltrain.train import clt as clt_module
from cltrain.train.clt import CLT, CLTConfig, LossWeights, RowNorm, batch_metrics, jumprelu, loss_terms, mse_loss, preact_loss, reference_decode, sparsity_loss
from cltrain.encoding import jumprelu_grad_mask, nonzero_positions, preact_gap


def make_clt(N=3, D=8, F=16, seed=0, **kw):
    return CLT(CLTConfig(N, D, F, **kw), generator=torch.Generator().manual_seed(seed))


def randomize(clt, seed=1):
    """Nonzero biases and varied thresholds, so no term hides behind a zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clt.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        if clt.log_threshold is not None:
            clt.log_threshold.copy_(torch.rand(clt.log_threshold.shape, generator=g).mul(0.5).add(0.05).log())
    return clt


# -- JumpReLU -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("st_to_preact", [False, True])
def test_jumprelu_forward_and_straight_through_gradients(st_to_preact):
    g = torch.Generator().manual_seed(0)
    B, N, F, eps = 64, 3, 20, 0.5
    theta = torch.rand(N, F, generator=g) * 0.5 + 0.1
    # Half of the values sit within eps/2 of their threshold, on both sides.
    h = torch.where(torch.rand(B, N, F, generator=g) < 0.5,
                    theta + (torch.rand(B, N, F, generator=g) - 0.5) * eps * 0.98,
                    torch.randn(B, N, F, generator=g))
    h.requires_grad_(True)
    log_theta = theta.log().requires_grad_(True)
    a = jumprelu(h, log_theta, eps, st_to_preact)
    assert torch.equal(a, torch.where(h > theta, h, torch.zeros_like(h)))

    upstream = torch.randn(B, N, F, generator=g)
    a.backward(upstream)
    active = (h > theta).float()
    window = ((h - theta).abs() < eps / 2).float()
    assert window.mean() > 0.3 and (1 - window).mean() > 0.2  # both regimes exercised
    expect_h = upstream * active + (upstream * theta / eps * window if st_to_preact else 0)
    expect_theta = (upstream * -(theta / eps) * window).sum(0)
    torch.testing.assert_close(h.grad, expect_h)
    torch.testing.assert_close(log_theta.grad, expect_theta * theta)


def test_jumprelu_gradcheck_away_from_threshold():
    """Away from the jump and outside the window, the straight-through gradient w.r.t. h is the true one."""
    g = torch.Generator().manual_seed(0)
    theta = torch.full((2, 5), 0.2, dtype=torch.float64)
    sign = torch.randint(0, 2, (4, 2, 5), generator=g).double() * 2 - 1
    h = (theta + sign * (0.5 + torch.rand(4, 2, 5, generator=g, dtype=torch.float64))).requires_grad_(True)
    torch.autograd.gradcheck(lambda h: jumprelu(h, theta.log(), 0.1, False), (h,))


def test_grad_mask_is_active_or_window():
    h = torch.tensor([[-1.0, 0.05, 0.3, 2.0]])
    theta = torch.tensor([0.1, 0.1, 0.1, 0.1])
    assert jumprelu_grad_mask(h, theta, 0.2).tolist() == [[False, True, True, True]]


# -- Decode structure -----------------------------------------------------------------------------------


def loop_decode(clt, acts):
    """An independent loop over (source, target) pairs, straight from docs/design.md section 1."""
    B, N, _ = acts.shape
    y = torch.zeros(B, N, clt.cfg.d_model, dtype=acts.dtype)
    for t in range(N):
        y[:, t] = clt.b_dec[t]
        for s in range(t + 1):
            if clt.cfg.per_layer and s != t:
                continue
            for b in range(B):
                y[b, t] += clt.W_dec[s][:, t - s, :].T @ acts[b, s]
    return y


@pytest.mark.parametrize("per_layer", [False, True])
def test_decode_matches_loop_over_layers(per_layer):
    clt = randomize(make_clt(N=4, D=6, F=10, per_layer=per_layer)).double()
    x = torch.randn(5, 4, 6, dtype=torch.float64)
    enc, y_hat = clt(x)
    assert (enc.acts != 0).any() and (enc.acts == 0).any()
    torch.testing.assert_close(y_hat, loop_decode(clt, enc.acts))
    expected_enc = torch.einsum("bnd,nfd->bnf", x, clt.W_enc) + clt.b_enc
    torch.testing.assert_close(enc.pre, expected_enc)


@pytest.mark.parametrize("per_layer", [False, True])
def test_sources_write_only_allowed_targets(per_layer):
    clt = randomize(make_clt(N=4, D=6, F=10, per_layer=per_layer))
    acts = torch.zeros(3, 4, 10)
    for s in range(4):
        a = acts.clone()
        a[:, s] = torch.rand(3, 10) + 0.1
        y = reference_decode(a, list(clt.W_dec))
        written = (y.abs().sum(dim=(0, 2)) > 0).tolist()
        expected = [t == s for t in range(4)] if per_layer else [t >= s for t in range(4)]
        assert written == expected, f"source {s} wrote targets {written}"


def test_plt_parameter_shapes():
    clt = make_clt(N=3, D=8, F=16, per_layer=True)
    assert [tuple(w.shape) for w in clt.W_dec] == [(16, 1, 8)] * 3
    clt = make_clt(N=3, D=8, F=16)
    assert [tuple(w.shape) for w in clt.W_dec] == [(16, 3, 8), (16, 2, 8), (16, 1, 8)]


def test_decode_gradcheck():
    clt = randomize(make_clt(N=3, D=4, F=5)).double()
    acts = torch.rand(2, 3, 5, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda a, *w: reference_decode(a, list(w)), (acts, *clt.W_dec))


def test_initialization_bounds():
    N, D, F = 3, 64, 128
    clt = make_clt(N=N, D=D, F=F)
    enc_bound, dec_bound = 1 / math.sqrt(F), 1 / math.sqrt(N * D)
    assert clt.W_enc.abs().max() <= enc_bound and clt.W_enc.abs().max() > 0.95 * enc_bound
    for w in clt.W_dec:
        assert w.abs().max() <= dec_bound and w.abs().max() > 0.95 * dec_bound
    assert torch.allclose(clt.threshold, torch.full((N, F), 0.03))
    assert not clt.b_enc.any() and not clt.b_dec.any()
    # Same seed, same weights (what lets every layout start from the same model).
    assert torch.equal(make_clt(N=N, D=D, F=F).W_enc, clt.W_enc)


def test_calibrated_thresholds_hit_target_rate():
    clt = make_clt(N=2, D=16, F=32)
    x = torch.randn(4000, 2, 16)
    clt.calibrate_thresholds(x, 0.05)
    enc, _ = clt(x)
    rate = (enc.acts != 0).float().mean()
    assert abs(rate.item() - 0.05) < 0.01


# -- Loss terms -----------------------------------------------------------------------------------------


def test_loss_terms_equal_formulas_on_hand_built_case():
    # N=2 layers, D=2, F=1: decoder norms are hand-computable.
    clt = make_clt(N=2, D=2, F=1)
    with torch.no_grad():
        clt.W_dec[0].copy_(torch.tensor([[[3.0, 0.0], [0.0, 4.0]]]))  # norm 5 over both slots
        clt.W_dec[1].copy_(torch.tensor([[[0.0, 2.0]]]))  # norm 2
        clt.log_threshold.copy_(torch.tensor([[0.5], [1.0]]).log())
    assert torch.allclose(clt.decoder_norms(), torch.tensor([[5.0], [2.0]]))
    acts = torch.tensor([[[0.1], [0.0]], [[0.0], [2.0]]])  # 2 tokens
    pre = torch.tensor([[[0.1], [0.2]], [[-1.0], [2.0]]])
    lam_s, c, lam_p = 0.7, 4.0, 0.3
    expect_s = lam_s * (math.tanh(c * 5 * 0.1) + math.tanh(c * 2 * 2.0)) / 2
    expect_p = lam_p * ((0.5 - 0.1) * 5 + (1.0 - 0.2) * 2 + (0.5 + 1.0) * 5 + 0) / 2
    norms = clt.decoder_norms()
    assert sparsity_loss(acts, norms, lam_s, c).item() == pytest.approx(expect_s, rel=1e-6)
    gap = preact_gap(pre, clt.threshold)
    assert preact_loss(gap, norms, lam_p, 2).item() == pytest.approx(expect_p, rel=1e-6)
    y_hat = torch.tensor([[[1.0, 2.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]])
    y = torch.tensor([[[0.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]])
    assert mse_loss(y_hat, y).item() == pytest.approx((1 + 4 + 1 + 1) / 2)


def test_lambda_zero_turns_terms_off_exactly():
    clt = randomize(make_clt())
    x, y = torch.randn(8, 3, 8), torch.randn(8, 3, 8)
    enc, y_hat = clt(x)
    on = loss_terms(clt, enc, y_hat, y, LossWeights(sparsity=0.5, preact=0.5))
    assert on["sparsity"] > 0 and on["preact"] > 0
    off = loss_terms(clt, enc, y_hat, y, LossWeights(sparsity=0.0, preact=0.0))
    assert off["sparsity"].item() == 0.0 and off["preact"].item() == 0.0 and off["auxk"].item() == 0.0
    assert off["mse"].item() == on["mse"].item()


def test_auxk_loss_only_reads_dead_features():
    clt = randomize(make_clt())
    x, y = torch.randn(8, 3, 8), torch.randn(8, 3, 8)
    enc, y_hat = clt(x)
    dead = torch.zeros(3, 16, dtype=torch.bool)
    w = LossWeights(auxk=1.0, auxk_k=4)
    assert loss_terms(clt, enc, y_hat, y, w, dead)["auxk"].item() == 0.0
    dead[:, :5] = True
    aux = loss_terms(clt, enc, y_hat, y, w, dead)["auxk"]
    assert aux > 0
    aux.backward()
    assert clt.W_dec[0].grad[5:].abs().sum() == 0 and clt.W_dec[0].grad[:5].abs().sum() > 0


def test_topk_and_batchtopk_sparsity():
    x = torch.randn(16, 3, 8)
    topk = make_clt(activation="topk", topk=3)
    enc, _ = topk(x)
    assert ((enc.acts != 0).sum(-1) <= 3).all() and (enc.acts >= 0).all()
    btk = make_clt(activation="batchtopk", topk=3).train()
    enc, _ = btk(x)
    assert ((enc.acts != 0).sum(dim=(0, 2)) <= 3 * 16).all()
    assert (btk.batchtopk_threshold > 0).all()  # running estimate for export as JumpReLU


def test_bad_model_config_is_named():
    with pytest.raises(ValueError, match="n_features"):
        CLTConfig(2, 4, -1)
    with pytest.raises(ValueError, match="activation"):
        CLTConfig(2, 4, 8, activation="relu")
    with pytest.raises(ValueError, match="bandwidth"):
        CLTConfig(2, 4, 8, bandwidth=0.0)


# -- It trains --------------------------------------------------------------------------------------------


def test_adam_recovers_a_known_sparse_dictionary():
    """Activations generated by a known sparse dictionary: k=3 of 24 features fire per layer and token;
    x_l reads them through an encoder map, y_t sums what every source s <= t writes. A few hundred Adam
    steps must reach NMSE < 0.1 at an L0 near the generator's."""
    N, D, M, k, F, steps = 3, 32, 24, 3, 48, 1000
    g = torch.Generator().manual_seed(1)
    E = torch.nn.functional.normalize(torch.randn(N, M, D, generator=g), dim=-1)
    G = [torch.nn.functional.normalize(torch.randn(M, N - s, D, generator=g), dim=-1) for s in range(N)]

    def sample(B):
        z = torch.zeros(B, N, M).scatter_(-1, torch.rand(B, N, M, generator=g).argsort(-1)[..., :k],
                                          torch.rand(B, N, k, generator=g) + 0.5)
        y = torch.zeros(B, N, D)
        for s in range(N):
            y[:, s:] += torch.einsum("bm,mjd->bjd", z[:, s], G[s])
        return torch.einsum("bnm,nmd->bnd", z, E), y

    x0, y0 = sample(4096)  # per-layer normalization as harvest computes it: E||s x|| = sqrt(D)
    sx, sy = math.sqrt(D) / x0.norm(dim=-1).mean(0), math.sqrt(D) / y0.norm(dim=-1).mean(0)
    torch.manual_seed(0)
    clt = make_clt(N=N, D=D, F=F)
    lr = 3e-3
    opt = torch.optim.Adam(clt.parameters(), lr=lr, betas=(0.9, 0.999))
    for step in range(steps):
        x, y = sample(256)
        x, y = x * sx[:, None], y * sy[:, None]
        enc, y_hat = clt(x)
        terms = loss_terms(clt, enc, y_hat, y, LossWeights(sparsity=1.0 * step / steps))  # lambda_s ramp
        for group in opt.param_groups:  # LR decays to 0 over the last 20% of steps
            group["lr"] = lr * min(1.0, (steps - step) / (0.2 * steps))
        opt.zero_grad()
        sum(terms.values()).backward()
        opt.step()
        if step == 0:
            first_nmse = batch_metrics(enc, y_hat, y)["nmse"].mean().item()
    x, y = sample(2048)
    with torch.no_grad():
        enc, y_hat = clt(x * sx[:, None])
        m = batch_metrics(enc, y_hat, y * sy[:, None])
    assert first_nmse > 0.9
    assert m["nmse"].mean() < 0.1, m["nmse"]
    assert 1.5 <= m["l0"].mean() <= 2 * k, m["l0"]


@pytest.mark.parametrize("sparsity_path", ["over-non-zeros", "dense"])
def test_fused_loss_terms_match_plain_autograd(sparsity_path, monkeypatch):
    """The hand-written backward of the norm, sparsity and pre-activation terms equals autograd of the
    plain formulas (float64, random inputs with both signs of theta - h)."""
    monkeypatch.setattr(clt_module, "SPARSE_TERMS_BELOW", 1.0 if sparsity_path == "over-non-zeros" else -1.0)
    g = torch.Generator().manual_seed(3)
    B, N, F, S, D = 7, 3, 11, 4, 5
    W = torch.randn(F, S, D, generator=g, dtype=torch.float64, requires_grad=True)
    acts = torch.rand(B, N, F, generator=g, dtype=torch.float64).mul(torch.rand(B, N, F, generator=g) < 0.5)
    acts.requires_grad_(True)
    pre = torch.randn(B, N, F, generator=g, dtype=torch.float64, requires_grad=True)
    theta = torch.rand(N, F, generator=g, dtype=torch.float64).requires_grad_(True)
    norms_in = torch.rand(N, F, generator=g, dtype=torch.float64).add(0.1).requires_grad_(True)

    def both(fused, plain, inputs):
        out_f, out_p = fused(*inputs), plain(*inputs)
        torch.testing.assert_close(out_f, out_p)
        gf = torch.autograd.grad(out_f, inputs)
        gp = torch.autograd.grad(out_p, inputs)
        for a, b in zip(gf, gp):
            torch.testing.assert_close(a, b)

    both(lambda w: RowNorm.apply(w).pow(3).sum(), lambda w: w.pow(2).sum(dim=(1, 2)).sqrt().pow(3).sum(), (W,))
    both(lambda a, n: sparsity_loss(a, n, 0.7, 4.0),
         lambda a, n: 0.7 * torch.tanh(4.0 * n * a).sum(dim=(1, 2)).mean(), (acts, norms_in))
    both(lambda h, t, n: preact_loss(preact_gap(h, t), n, 0.3, B),
         lambda h, t, n: 0.3 * (torch.relu(t - h) * n).sum(dim=(1, 2)).mean(), (pre, theta, norms_in))


def test_nonzero_positions_lists_layer_token_feature_and_follows_in_place_changes():
    acts = torch.zeros(2, 3, 4)  # [B, N, F]
    acts[1, 2, 3] = 1.0
    assert [t.tolist() for t in nonzero_positions(acts)] == [[2], [1], [3]]
    acts[0, 0, 1] = 5.0  # an in-place change: the memo must not answer with the old listing
    assert [t.tolist() for t in nonzero_positions(acts)] == [[0, 2], [0, 1], [1, 3]]
