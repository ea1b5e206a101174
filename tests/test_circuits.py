"""Global weights (train/circuits.py): virtual weights against a brute-force computation, the blockwise top-k
candidates against a full ranking, and ERA / TWERA against dense co-activation statistics."""
import pytest
import torch

from cltrain.train import circuits as cw
from cltrain.train.clt import CLT, CLTConfig


def _clt(per_layer=False, N=4, D=6, F=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F, per_layer=per_layer), generator=g)
    with torch.no_grad():
        for w in clt.W_dec:
            w.normal_(generator=g)
        clt.W_enc.normal_(generator=g)
    return clt


@torch.no_grad()
def _brute_v(clt, s_x, s_y):
    """V[(ls, f), (lt, g)] from the definition, pair by pair."""
    N, F = clt.cfg.n_layers, clt.cfg.n_features
    V = torch.zeros(N * F, N * F)
    for ls in range(N):
        for lt in range(ls + 1, N):
            for f in range(F):
                for g in range(F):
                    w = torch.zeros(clt.cfg.d_model)
                    for l in range(ls, lt):
                        if l - ls < clt.W_dec[ls].shape[1]:
                            w += clt.W_dec[ls][f, l - ls] / s_y[l]
                    V[ls * F + f, lt * F + g] = w @ (clt.W_enc[lt][g] * s_x[lt])
    return V


@pytest.mark.parametrize("per_layer,per_dim", [(False, False), (False, True), (True, False)])
def test_virtual_weights_and_candidates_equal_brute_force(per_layer, per_dim):
    N, D, F, k = 4, 6, 5, 3
    clt = _clt(per_layer, N, D, F)
    g = torch.Generator().manual_seed(1)
    s_x = torch.rand(N, D if per_dim else 1, generator=g) + 0.5
    s_y = torch.rand(N, D if per_dim else 1, generator=g) + 0.5
    V = _brute_v(clt, s_x, s_y)
    for ls in range(N):
        for lt in range(ls + 1, N):
            block = cw.virtual_weight_block(clt, s_x, s_y, ls, lt)
            torch.testing.assert_close(block, V[ls * F:(ls + 1) * F, lt * F:(lt + 1) * F], rtol=1e-5, atol=1e-5)
    c = cw.candidates(clt, s_x, s_y, k, progress=False)
    for lt in range(N):
        for f in range(F):
            col = V[: lt * F, lt * F + f]  # every earlier feature
            want = col.abs().topk(min(k, len(col))).indices.tolist() if len(col) else []
            got = [s for s in c.src[lt, f].tolist() if s != cw.NO_SOURCE]
            assert sorted(got) == sorted(want), (lt, f)
            for s, v in zip(c.src[lt, f].tolist(), c.src_v[lt, f].tolist()):
                if s != cw.NO_SOURCE:
                    assert v == pytest.approx(float(V[s, lt * F + f]), rel=1e-5, abs=1e-6)
    for ls in range(N):
        for f in range(F):
            row = V[ls * F + f, (ls + 1) * F:]
            want = ((ls + 1) * F + row.abs().topk(min(k, len(row))).indices).tolist() if len(row) else []
            assert sorted(s for s in c.tgt[ls, f].tolist() if s != cw.NO_SOURCE) == sorted(want)


def test_era_and_twera_equal_dense_statistics():
    """The sums over each target's candidates, from sparse activations in batches, equal the dense
    E[1(a_t>0) a_s], E[a_t a_s] / E[a_t] times V."""
    N, D, F, k, T = 3, 6, 5, 4, 50
    clt = _clt(False, N, D, F)
    s = torch.ones(N, 1)
    c = cw.candidates(clt, s, s, k, progress=False)
    g = torch.Generator().manual_seed(2)
    acts = torch.rand(T, N, F, generator=g) * (torch.rand(T, N, F, generator=g) < 0.4)
    acts[:, 0, 1] = 0  # a source that never fires; a target that never fires
    acts[:, 2, 3] = 0
    co = cw.Coactivation(c)
    for lo in range(0, T, 7):
        co.add(acts[lo:lo + 7], len(acts[lo:lo + 7]))
    era, twera = co.era_twera()
    flat = acts.reshape(T, N * F)
    for lt in range(N):
        for f in range(F):
            a_t = flat[:, lt * F + f]
            for j, src in enumerate(c.src[lt, f].tolist()):
                if src == cw.NO_SOURCE:
                    assert era[lt, f, j] == 0 and twera[lt, f, j] == 0
                    continue
                v = float(c.src_v[lt, f, j])
                a_s = flat[:, src]
                assert float(era[lt, f, j]) == pytest.approx(float(((a_t > 0) * a_s).mean()) * v, rel=1e-5, abs=1e-7)
                want = float((a_t * a_s).mean() / a_t.mean()) * v if a_t.sum() > 0 else 0.0
                assert float(twera[lt, f, j]) == pytest.approx(want, rel=1e-5, abs=1e-7)
    inv = cw.inverse_candidates(c, era, twera)
    conn = cw.layer_connections(c, era, twera, 1, 3, inv)
    assert len(conn) == F and all(len(x["inputs_by_twera"]) <= 3 for x in conn)
    first = conn[0]["inputs_by_weight"]
    assert [abs(e["virtual_weight"]) for e in first] == sorted((abs(e["virtual_weight"]) for e in first), reverse=True)


def test_circuits_need_the_feature_pages_pass():
    from cltrain.errors import ConfigError
    from cltrain.train.config import EvalSettings, compose

    with pytest.raises(ConfigError, match="circuits.enabled' = true needs features.enabled=true"):
        EvalSettings.from_config(compose("eval", ["model_dir=x", "circuits.enabled=true"]))
    assert EvalSettings.from_config(compose("eval", ["model_dir=x", "circuits.enabled=true",
                                                     "features.enabled=true"])).circuits.candidates == 32
