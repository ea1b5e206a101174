"""clt-eval: held-out metrics against a hand computation, the replacement model's code path (an oracle
that reproduces each MLP exactly, a zero CLT that equals zero-ablation), BatchTopK evaluated at its
running threshold, and bad input."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from cltrain.train import evaluate as ev
from cltrain.train import plots
from cltrain.train import replacement as rp
from cltrain.train.clt import CLT, CLTConfig, inference_encode_layer
from cltrain.train.config import compose
from cltrain.errors import ConfigError
from cltrain.train.data import ActivationLoader, DatasetError
from cltrain.train.model_io import clt_state, save_clt

N, D, F = 3, 8, 16


def make_clt(seed=0, **kw) -> CLT:
    g = torch.Generator().manual_seed(seed)
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F, **kw), generator=g)
    with torch.no_grad():
        clt.b_enc.copy_(torch.randn(N, F, generator=g) * 0.3)
        clt.b_dec.copy_(torch.randn(N, D, generator=g) * 0.1)
        if clt.log_threshold is not None:
            clt.log_threshold.copy_((torch.rand(N, F, generator=g) * 0.5 + 0.01).log())
    return clt.eval()


def save(tmp_path, clt, info, name="model", **override):
    ds = {"model": info.model, "layers": info.layers, "n_layers": info.n_layers, "d_model": info.d_model,
          "scale_x": info.scale_x, "scale_y": info.scale_y, "path": info.path, **override}
    save_clt(tmp_path / name, clt_state(clt), clt.cfg, {"dataset": ds, "train": {}})
    return tmp_path / name


# ----------------------------------------------------------------------------------------------------
# Part 1: held-out shards


def test_shard_metrics_match_hand_computation(tmp_path, make_dataset):
    info = make_dataset(n_layers=N, d_model=D, n_tokens=640, shard_tokens=128)  # 5 shards
    clt = make_clt()
    model_dir = save(tmp_path, clt, info)
    m = ev.evaluate(model_dir, heldout_shards=2, max_tokens=None, batch_tokens=96, replacement=False,
                    out_dir=tmp_path / "eval", device="cpu", progress=False)

    # by hand, on every held-out token at once
    batches = list(ActivationLoader(info, 10_000, split="heldout", heldout_shards=2, epochs=1))
    x, y = torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])
    assert m["tokens"] == x.shape[0] == 256
    with torch.no_grad():
        enc, y_hat = clt(x)
    y64, yh64 = y.double(), y_hat.double()
    nmse = ((yh64 - y64) ** 2).sum(-1).mean(0) / ((y64 - y64.mean(0)) ** 2).sum(-1).mean(0)
    torch.testing.assert_close(torch.tensor(m["nmse"]["per_layer"], dtype=torch.float64), nmse, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.tensor(m["explained_variance"]["per_layer"], dtype=torch.float64), 1 - nmse,
                               rtol=1e-5, atol=1e-7)
    active = enc.acts != 0
    torch.testing.assert_close(torch.tensor(m["l0"]["per_layer"]), active.float().sum(-1).mean(0))
    rate = active.double().mean(0)
    assert m["features"]["dead_count"] == int((rate == 0).sum())
    assert m["features"]["dense_count"] == int((rate > 0.1).sum())
    assert 0 < m["features"]["dense_count"] < N * F, "the test CLT should have some dense features"

    on_disk = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert on_disk["nmse"] == m["nmse"] and on_disk["layers"] == [0, 1, 2]
    for name in plots.PLOTS:
        assert (tmp_path / "eval" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    flat = ev.flat_metrics(m)
    assert flat["eval/nmse/layer_2"] == m["nmse"]["per_layer"][2]
    assert flat["eval/features/dead_fraction"] == m["features"]["dead_fraction"]


def test_nmse_without_massive_tokens_equals_the_pooled_nmse_of_the_rest():
    """A few tokens with hundreds of times the typical energy (an attention sink's MLP output) dominate the
    pooled NMSE; nmse_without_massive is the pooled NMSE over the other tokens, per layer, with their count
    and share of sum ||y||^2; the full NMSE is unchanged by the split."""
    from cltrain.train.eval_metrics import MASSIVE_NORM, PooledMetrics

    g = torch.Generator().manual_seed(3)
    T = 300
    y = torch.randn(T, N, D, generator=g)  # normalized: E||y_l||^2 = D
    massive = {(7, 0), (123, 0), (123, 2), (250, 1)}  # (token, layer)
    for t, layer in massive:
        y[t, layer] *= 40.0  # ||y_l|| ~ 40 sqrt(D), over the cut of MASSIVE_NORM sqrt(D)
    y_hat = y * 0.7 + 0.3 * torch.randn(T, N, D, generator=g)
    acts = (torch.rand(T, N, F, generator=g) < 0.2).float()
    pooled = PooledMetrics(N, F, D, "cpu")
    for lo in range(0, T, 64):  # in batches: the sums pool
        pooled.add(y_hat[lo:lo + 64], y[lo:lo + 64], acts[lo:lo + 64])
    m = pooled.summary()

    def nmse(a, b):
        a, b = a.double(), b.double()
        return float(((a - b) ** 2).sum(-1).mean() / ((b - b.mean(0)) ** 2).sum(-1).mean())

    assert MASSIVE_NORM < 40 * 0.8
    wm = m["nmse_without_massive"]
    for layer in range(N):
        rest = torch.tensor([t for t in range(T) if (t, layer) not in massive])
        assert m["nmse"]["per_layer"][layer] == pytest.approx(nmse(y_hat[:, layer], y[:, layer]), rel=1e-9)
        assert wm["per_layer"][layer] == pytest.approx(nmse(y_hat[rest, layer], y[rest, layer]), rel=1e-9)
        assert wm["massive_tokens_per_layer"][layer] == T - len(rest)
        share = 1 - float(y[rest, layer].double().pow(2).sum() / y[:, layer].double().pow(2).sum())
        assert wm["massive_share_per_layer"][layer] == pytest.approx(share, rel=1e-9)
    assert wm["massive_share_per_layer"][0] > 0.5  # two tokens of 300 hold most of layer 0's energy
    assert wm["mean"] == pytest.approx(sum(wm["per_layer"]) / N)


def test_config_entry_point(tmp_path, make_dataset):
    info = make_dataset(n_layers=N, d_model=D, n_tokens=256, shard_tokens=128)
    model_dir = save(tmp_path, make_clt(), info)
    base = [f"model_dir={model_dir}", "logger=none", "replacement.enabled=false", "progress=false",
            "device=cpu", f"out_dir={tmp_path / 'e'}"]
    m = ev.run(compose("eval", base))
    assert m["tokens"] == 128 and (tmp_path / "e" / "metrics.json").is_file()
    with pytest.raises(ConfigError, match="'split'"):
        ev.run(compose("eval", base + ["split=test"]))
    with pytest.raises(ConfigError, match="'model_dir'"):
        ev.run(compose("eval", ["logger=none"]))


# ----------------------------------------------------------------------------------------------------
# Bad input


def test_bad_input_names_the_file_or_key(tmp_path, make_dataset):
    info = make_dataset(n_layers=N, d_model=D, n_tokens=256, shard_tokens=128)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        ev.evaluate(tmp_path / "missing", replacement=False, write=False, progress=False)

    # a checkpoint trained on other layers of the model
    model_dir = save(tmp_path, make_clt(), info, name="other", layers=[4, 5, 6])
    with pytest.raises(ConfigError, match=r"dataset\.json: key 'layers'"):
        ev.evaluate(model_dir, replacement=False, write=False, progress=False)
    # activations from another harvest (different normalization)
    model_dir = save(tmp_path, make_clt(), info, name="scales", scale_x=[1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="scale_x"):
        ev.evaluate(model_dir, replacement=False, write=False, progress=False)
    # a missing dataset folder
    model_dir = save(tmp_path, make_clt(), info, name="nodata", path=str(tmp_path / "gone"))
    with pytest.raises(DatasetError, match=str(tmp_path / "gone" / "dataset.json")):
        ev.evaluate(model_dir, replacement=False, write=False, progress=False)
    assert not (tmp_path / "other" / "eval").exists() and not (tmp_path / "nodata" / "eval").exists()


# ----------------------------------------------------------------------------------------------------
# Part 2: the replacement model


@pytest.mark.parametrize("kw", [{}, {"per_layer": True}, {"activation": "topk", "topk": 3},
                                {"activation": "batchtopk", "topk": 3}],
                         ids=["jumprelu", "plt", "topk", "batchtopk"])
def test_layerwise_replacement_equals_clt_forward(kw):
    """CLTReplacement, fed layer by layer as a forward pass would, reproduces CLT(s_x x) / s_y."""
    clt = make_clt(**kw)
    s_x, s_y = torch.tensor([[0.5], [2.0], [3.0]]), torch.tensor([[4.0], [0.25], [1.5]])
    x_raw = torch.randn(2, 5, N, D) / s_x.view(1, 1, N, 1)
    rep = rp.CLTReplacement(clt, s_x, s_y)
    got = torch.stack([rep(t, x_raw[:, :, t]) for t in range(N)], 2)
    with torch.no_grad():
        _, y_norm = clt((x_raw * s_x.view(1, 1, N, 1)).reshape(10, N, D))
    torch.testing.assert_close(got.reshape(10, N, D), y_norm / s_y.view(1, N, 1), rtol=1e-5, atol=1e-5)


def test_batchtopk_is_evaluated_at_its_running_threshold(tmp_path, make_dataset):
    """A trained BatchTopK CLT is evaluated as clt-export writes it: JumpReLU at the running threshold
    per layer, so a token's features do not depend on the other tokens of the batch."""
    info = make_dataset(n_layers=N, d_model=D, n_tokens=256, shard_tokens=128)
    clt = make_clt(activation="batchtopk", topk=3)
    cut = torch.tensor([0.2, 0.5, 0.1])
    clt.batchtopk_threshold.copy_(cut)
    x = torch.randn(7, D)
    pre = x @ clt.W_enc[1].T + clt.b_enc[1]
    torch.testing.assert_close(inference_encode_layer(clt, x, 1), pre * (pre > 0.5))
    # one token alone gets the same features as in a batch (the batch's top-k would not)
    torch.testing.assert_close(inference_encode_layer(clt, x[:1], 1), inference_encode_layer(clt, x, 1)[:1])

    m = ev.evaluate(save(tmp_path, clt, info), max_tokens=None, replacement=False, write=False, progress=False)
    x = torch.cat([b.x for b in ActivationLoader(info, 10_000, split="heldout", heldout_shards=1, epochs=1)])
    pre = clt.preactivations(x)
    expected_l0 = (pre > cut[None, :, None]).float().sum(-1).mean(0)
    torch.testing.assert_close(torch.tensor(m["l0"]["per_layer"]), expected_l0)
    assert not torch.allclose(expected_l0, torch.full((N,), 3.0)), "the threshold should not give L0 = k exactly"
    # the replacement model uses the same rule
    rep = rp.CLTReplacement(clt, torch.ones(N, 1), torch.ones(N, 1))
    rep(0, x[:, 0])
    torch.testing.assert_close(rep.acts[0], inference_encode_layer(clt, x[:, 0], 0))


def tiny_lm(n_layer=3):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    # a large init so the MLPs matter to the logits (GPT-2's default 0.02 leaves them negligible)
    cfg = GPT2Config(n_layer=n_layer, n_embd=D, n_head=2, vocab_size=64, n_positions=32,
                     initializer_range=0.5, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(cfg).eval()
    # GPT-2's MLP reads ln_2(resid_mid) and its output is added to the residual stream
    sites = [SimpleNamespace(layer=i, input_module=b.ln_2, output_module=b.mlp)
             for i, b in enumerate(model.transformer.h)]
    return model, sites


def test_replacement_oracle_agrees_and_zero_clt_is_zero_ablation():
    model, sites = tiny_lm()
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 64, (2, 16), generator=g) for _ in range(2)]

    # each MLP replaced by its own recorded output, through the same hooks: a perfect replacement
    oracle = rp.replacement_metrics(model, sites, batches, None, oracle=True, progress=False)
    for mode in ("mode_a", "mode_b"):
        assert oracle[mode]["top1_agreement"] == 1.0
        assert abs(oracle[mode]["kl"]) < 1e-6
        assert oracle[mode]["ce"] == pytest.approx(oracle["ce_original"], abs=1e-5)
        assert oracle[mode]["ce_recovered"] == pytest.approx(1.0, abs=1e-4)
    assert oracle["zero_ablation"]["kl"] > 1e-4  # ablating the MLPs does change the model

    # a zero CLT outputs exactly zero: the zero-ablation CE, nothing recovered
    zero = make_clt()
    with torch.no_grad():
        for p in zero.parameters():
            if p is not zero.log_threshold:
                p.zero_()
    ones = torch.ones(N, 1)
    m = rp.replacement_metrics(model, sites, batches, rp.CLTReplacement(zero, ones, ones), progress=False)
    for mode in ("mode_a", "mode_b"):
        assert m[mode]["ce"] == pytest.approx(m["ce_zero_ablation"], abs=1e-5)
        assert m[mode]["ce_recovered"] == pytest.approx(0.0, abs=1e-4)
    assert m["ce_original"] == pytest.approx(oracle["ce_original"])


def test_modes_a_and_b_differ_only_through_compounding():
    """With a random CLT, mode (a) reads clean inputs and mode (b) its own: for a one-layer replacement
    (the first covered layer sees identical inputs either way) they agree; over several layers they differ."""
    model, sites = tiny_lm()
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 16), generator=g)]
    clt = make_clt()
    ones = torch.ones(N, 1)
    m = rp.replacement_metrics(model, sites, batches, rp.CLTReplacement(clt, ones, ones), progress=False)
    assert m["mode_a"]["kl"] != pytest.approx(m["mode_b"]["kl"], rel=1e-6)

    one = CLT(CLTConfig(n_layers=1, d_model=D, n_features=F)).eval()
    with torch.no_grad():
        one.b_enc.fill_(0.2)
    r = rp.replacement_metrics(model, sites[1:2], batches, rp.CLTReplacement(one, ones[:1], ones[:1]),
                               progress=False)
    assert r["mode_a"]["kl"] == pytest.approx(r["mode_b"]["kl"], rel=1e-5)
    assert r["mode_a"]["kl"] > 0


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-gemma2"])
def test_oracle_through_real_mlp_sites(name):
    """The hooks work on each layout train/lm.py knows (Gemma-2's output module is the post-MLP norm)."""
    from cltrain.train.lm import load_lm, mlp_sites

    model, _ = load_lm(name)
    sites = mlp_sites(model)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 256, (2, 12), generator=g)]
    m = rp.replacement_metrics(model, sites[1:3], batches, None, oracle=True, progress=False)
    for mode in ("mode_a", "mode_b"):
        assert m[mode]["top1_agreement"] == 1.0 and abs(m[mode]["kl"]) < 1e-6


@pytest.fixture(scope="module")
def tiny_gpt2_dataset(tmp_path_factory):
    from cltrain.train.harvest import harvest

    out = tmp_path_factory.mktemp("acts")
    return harvest(compose("harvest", [
        "base_model=tiny-gpt2", "max_tokens=1536", "context=64", "tokens_per_sample=64", "shard_tokens=512",
        f"out_dir={out}", "shuffle_buffer=512", "device=cpu", "scale_tokens=512"]))


def test_end_to_end_on_a_harvested_model(tmp_path, tiny_gpt2_dataset):
    info = tiny_gpt2_dataset
    clt = CLT(CLTConfig(n_layers=info.n_layers, d_model=info.d_model, n_features=32),
              generator=torch.Generator().manual_seed(0)).eval()
    with torch.no_grad():
        clt.b_enc.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    model_dir = save(tmp_path, clt, info, hooks=info.hooks)
    overrides = [f"model_dir={model_dir}", "logger=none", "progress=false", "device=cpu",
                 "replacement.n_sequences=4", "replacement.seq_len=32", "replacement.batch_size=2"]
    m = ev.run(compose("eval", overrides))
    rep = m["replacement"]
    assert rep["model"] == "tiny-gpt2" and rep["replaced_layers"] == info.layers
    # held-out text: the same source as the harvest, after the tokens it used
    assert rep["text"] == {"source": "builtin", "skip_documents": 0, "skip_tokens": info.harvest["tokens_fed"]}
    assert 0 < rep["tokens"] <= 4 * 31  # BOS positions are not scored
    for mode in ("mode_a", "mode_b"):
        assert 0 <= rep[mode]["top1_agreement"] <= 1 and rep[mode]["kl"] >= 0
        assert rep[mode]["ce"] > 0
    on_disk = json.loads((model_dir / "eval" / "metrics.json").read_text())
    assert on_disk["replacement"]["mode_b"] == rep["mode_b"]

    # the same checkpoint against a dataset of another base model
    other = save(tmp_path, clt, info, name="other", model="tiny-llama")
    with pytest.raises(ConfigError, match=r"dataset\.json: key 'model'"):
        ev.run(compose("eval", [f"model_dir={other}"] + overrides[1:]))


def test_frontier_plot(tmp_path):
    for name, per_layer, l0, nmse in (("a", False, 10.0, 0.3), ("b", False, 20.0, 0.2), ("c", True, 12.0, 0.4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps(
            {"per_layer": per_layer, "n_features": 64, "l0": {"total": l0}, "nmse": {"mean": nmse}}))
    m = ev.run(compose("eval", [f"frontier=[{tmp_path / 'a'},{tmp_path / 'b'},{tmp_path / 'c' / 'metrics.json'}]",
                                f"out_dir={tmp_path / 'out'}", "logger=none"]))
    assert (tmp_path / "out" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert m["frontier"] == str(tmp_path / "out" / "frontier.png")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="bad.json"):
        plots.plot_frontier([tmp_path / "bad.json"], tmp_path / "f.png")
    with pytest.raises(FileNotFoundError, match="nothere"):
        plots.plot_frontier([tmp_path / "nothere"], tmp_path / "f.png")
