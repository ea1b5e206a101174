"""Attribution graphs through circuit-tracer (train/graphs.py): a tiny random Llama-style model with a tiny
CLT and PLT exported by the project, the known scores of an exact transcoder, and bad input caught
before any graph is built."""
from __future__ import annotations

import json
import os

import pytest
import torch

try:
    import circuit_tracer  # noqa: F401
    from circuit_tracer.replacement_model import replacement_model_nnsight  # noqa: F401
except ImportError as e:  # the `graphs` extra (make install installs it)
    pytest.skip(f"circuit-tracer cannot be imported ({e}); pip install 'cltrain[graphs]'", allow_module_level=True)

from circuit_tracer.graph import Graph, compute_graph_scores

from cltrain.train import evaluate as ev
from cltrain.train import graphs
from cltrain.train.clt import CLT, CLTConfig
from cltrain.train.config import compose
from cltrain.errors import ConfigError
from cltrain.train.export import export
from cltrain.train.lm import byte_tokenizer, tiny_config
from tiny_models import harvest_tiny_llama, random_clt, save_model

pytestmark = pytest.mark.timeout(600)  # ~15 s each on a quiet 2-core machine; generous under load

N, D = 4, 32  # tiny-llama
FAST = dict(max_feature_nodes=48, batch_size=32, max_n_logits=3)


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Tiny model folders go to a private cache, not the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLTRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield




# ----------------------------------------------------------------------------------------------------
# Known values: a transcoder that reproduces every MLP exactly has no error nodes' influence


@pytest.fixture(scope="module")
def affine_llama(tmp_path_factory):
    """A tiny Llama whose MLPs are affine in their (normalized) input: identity activation and an
    up-projection fixed at 1, so MLP_l(x) = W_down (W_gate x + b_gate) + b_down = A_l x + c_l."""
    from transformers import AutoModelForCausalLM

    cfg = tiny_config("tiny-llama")
    cfg.hidden_act, cfg.mlp_bias = "linear", True
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    affine = []
    with torch.no_grad():
        for layer in model.model.layers:
            mlp = layer.mlp
            mlp.up_proj.weight.zero_()
            mlp.up_proj.bias.fill_(1.0)
            mlp.gate_proj.bias.normal_(0, 0.1)
            mlp.down_proj.bias.normal_(0, 0.1)
            affine.append((mlp.down_proj.weight @ mlp.gate_proj.weight,
                           mlp.down_proj.weight @ mlp.gate_proj.bias + mlp.down_proj.bias))
        x = torch.randn(5, D)
        A, c = affine[2]
        torch.testing.assert_close(model.model.layers[2].mlp(x), x @ A.T + c)  # really affine
    folder = tmp_path_factory.mktemp("affine-llama")
    model.save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    return str(folder), affine


def exact_clt(affine, per_layer: bool, s_x: float, s_y: float) -> CLT:
    """Features +x_i and -x_i (JumpReLU at a negligible threshold: a+ - a- = x), decoding A_l x + c_l,
    written in normalized space (x_norm = s_x x, y_norm = s_y y) so that export's folding is exercised."""
    F = 2 * D
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F, per_layer=per_layer))
    eye = torch.eye(D)
    with torch.no_grad():
        clt.W_enc.copy_(torch.cat([eye, -eye])[None].expand(N, F, D))
        clt.b_enc.zero_()
        clt.log_threshold.fill_(-30.0)  # theta = 1e-13
        for l, (A, c) in enumerate(affine):
            w = clt.W_dec[l]
            w.zero_()
            w[:, 0] = torch.cat([A.T, -A.T]) * (s_y / s_x)
            clt.b_dec[l] = c * s_y
    return clt.eval()


@pytest.mark.parametrize("per_layer", [False, True], ids=["clt", "plt"])
def test_exact_transcoder_scores_one(tmp_path, affine_llama, per_layer):
    folder, affine = affine_llama
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("3 + 4 =\nab cd\n")
    settings = graphs.GraphSettings(enabled=True, prompts=str(prompts), n_prompts=2, **FAST)

    model_dir = save_model(tmp_path / "exact", exact_clt(affine, per_layer, 2.0, 0.5), folder,
                           x_hook="post_attention_layernorm:output", scales=(2.0, 0.5))
    exp = export(model_dir, tmp_path / "exact-export")
    job = graphs.prepare(exp, folder, settings)
    assert job.export_cfg["feature_input_hook"] == "mlp.hook_in"
    assert job.shapes["kind"] == ("transcoder_set" if per_layer else "cross_layer_transcoder")
    exact = graphs.run(job, tmp_path / "out", progress=False)
    assert exact["n_prompts"] == 2 and exact["model_kind"] == job.shapes["kind"]
    for row in exact["per_prompt"]:
        assert row["active_features"] > 0
        assert row["replacement_score"] == pytest.approx(1.0, abs=1e-4)
        assert row["completeness_score"] == pytest.approx(1.0, abs=1e-4)

    # Drop layer 1's decoder: its MLP output becomes error, and both scores fall below 1.
    broken = exact_clt(affine, per_layer, 2.0, 0.5)
    with torch.no_grad():
        broken.W_dec[1].zero_()
    exp = export(save_model(tmp_path / "broken", broken, folder, x_hook="post_attention_layernorm:output",
                            scales=(2.0, 0.5)), tmp_path / "broken-export")
    worse = graphs.run(graphs.prepare(exp, folder, settings), None, progress=False)
    assert worse["replacement_score"]["max"] < 0.99 and worse["completeness_score"]["max"] < 0.999


# ----------------------------------------------------------------------------------------------------
# The same path as a user's: clt-eval graphs.enabled=true on a harvested tiny Llama


@pytest.fixture(scope="module")
def llama_dataset(tmp_path_factory):
    return harvest_tiny_llama(tmp_path_factory.mktemp("acts"))


@pytest.mark.parametrize("per_layer", [False, True], ids=["clt", "plt"])
def test_clt_eval_builds_and_scores_graphs(tmp_path, llama_dataset, per_layer, capsys):
    info = llama_dataset
    model_dir = save_model(tmp_path / "model", random_clt(per_layer=per_layer), "tiny-llama", path=str(info.path),
                           scale_x=info.scale_x, scale_y=info.scale_y)
    out = tmp_path / "eval"
    m = ev.run(compose("eval", [
        f"model_dir={model_dir}", f"out_dir={out}", "logger=none", "progress=false", "device=cpu",
        "replacement.enabled=false", "graphs.enabled=true", "graphs.n_prompts=2",
        *(f"graphs.{k}={v}" for k, v in FAST.items())]))
    g = m["graphs"]
    assert g["n_prompts"] == 2 and g["model"] == "tiny-llama"
    assert g["model_kind"] == ("transcoder_set" if per_layer else "cross_layer_transcoder")
    scores = [r["replacement_score"] for r in g["per_prompt"]]
    assert all(0 < s <= 1 for s in scores) and g["replacement_score"]["mean"] == pytest.approx(sum(scores) / 2)
    assert g["replacement_score"]["std"] == pytest.approx(abs(scores[0] - scores[1]) / 2 ** 0.5)
    assert all(0 < r["completeness_score"] <= 1 for r in g["per_prompt"])
    # a random CLT is far from exact: error nodes carry much of the influence
    assert g["replacement_score"]["max"] < 0.99

    # saved in circuit-tracer's formats: the .pt graph reloads to the same scores; the frontend's files
    assert (out / "circuit_tracer" / "config.yaml").is_file()
    meta = json.loads((out / "graphs" / "graph-metadata.json").read_text())
    assert sorted(x["slug"] for x in meta["graphs"]) == [r["slug"] for r in g["per_prompt"]]
    row = g["per_prompt"][1]
    assert json.loads((out / "graphs" / f"{row['slug']}.json").read_text())["nodes"]
    graph = Graph.from_pt(str(out / "graphs" / f"{row['slug']}.pt"))
    assert compute_graph_scores(graph) == pytest.approx((row["replacement_score"], row["completeness_score"]))
    assert g["open_with"] == f"circuit-tracer start-server --graph_file_dir {out / 'graphs'}"

    # metrics.json, W&B keys, the console, and the rows a sweep table reads
    assert json.loads((out / "metrics.json").read_text())["graphs"]["replacement_score"] == g["replacement_score"]
    flat = ev.flat_metrics(m)
    assert flat["eval/graphs/completeness_score/mean"] == g["completeness_score"]["mean"]
    assert "attribution graphs (2 prompts" in capsys.readouterr().out
    [r] = graphs.graph_score_rows([out])
    assert r["arch"] == ("PLT" if per_layer else "CLT") and r["graph_replacement_mean"] == g["replacement_score"]["mean"]
    assert r["graph_completeness_std"] == g["completeness_score"]["std"] and r["l0_total"] == m["l0"]["total"]


def test_heldout_prompts(llama_dataset):
    from cltrain.train.lm import load_lm

    _, tok = load_lm("tiny-llama")
    ps = graphs.load_prompts("heldout", 3, tokenizer=tok, info=llama_dataset, heldout_tokens=12)
    assert len(ps) == 3 and all(len(p.ids) == 12 and p.ids[0] == tok.bos_token_id for p in ps)
    # after the harvested text: not the first tokens of the source
    assert ps[0].ids != graphs.load_prompts("heldout", 1, tokenizer=tok, info=llama_dataset.__class__(
        **{**llama_dataset.__dict__, "harvest": {}}), heldout_tokens=12)[0].ids


# ----------------------------------------------------------------------------------------------------
# Bad input: named, before any graph is built


def test_bad_input_is_named_before_any_graph(tmp_path, llama_dataset, monkeypatch):
    settings = graphs.GraphSettings(enabled=True, n_prompts=1, **FAST)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope" / "config.yaml")):
        graphs.prepare(tmp_path / "nope", "tiny-llama", settings)

    def exported(name, clt, **kw):
        return export(save_model(tmp_path / name, clt, "tiny-llama"), tmp_path / f"{name}-ct", **kw)

    with pytest.raises(ConfigError, match=r"3 layers \(W_enc_\*.safetensors\) but model 'tiny-llama' has "
                                          r"num_hidden_layers = 4"):
        graphs.prepare(exported("layers", random_clt(n_layers=3)), "tiny-llama", settings)
    with pytest.raises(ConfigError, match="encoder width D = 16 but model 'tiny-llama' has hidden_size = 32"):
        graphs.prepare(exported("width", random_clt(d_model=16, per_layer=True)), "tiny-llama", settings)
    good = exported("good", random_clt())
    with pytest.raises(ConfigError, match="'feature_input_hook' = 'hook_resid_pre'.*LlamaForCausalLM"):
        graphs.prepare(exported("hook", random_clt(), feature_input_hook="hook_resid_pre"), "tiny-llama", settings)
    with pytest.raises(ConfigError, match="GPT2LMHeadModel; circuit-tracer's nnsight backend supports"):
        graphs.prepare(good, "tiny-gpt2", settings)
    long = tmp_path / "long.txt"
    long.write_text("short\n" + "x" * 300 + "\n")
    with pytest.raises(ConfigError, match=r"prompt 1 \('xxx.*301 tokens with BOS; model 'tiny-llama' has a "
                                          r"context of 256"):
        graphs.prepare(good, "tiny-llama", graphs.GraphSettings(enabled=True, prompts=str(long), n_prompts=5))
    with pytest.raises(ConfigError, match="'graphs.n_prompts' = 0"):
        graphs.prepare(good, "tiny-llama", graphs.GraphSettings(enabled=True, n_prompts=0))

    # Through clt-eval: the check comes before the held-out metrics (and so before any graph).
    def must_not_run(*a, **k):
        raise AssertionError("held-out metrics ran before the graph inputs were checked")
    monkeypatch.setattr(ev, "shard_metrics", must_not_run)
    model_dir = save_model(tmp_path / "m", random_clt(), "tiny-llama", path=str(llama_dataset.path),
                           scale_x=llama_dataset.scale_x, scale_y=llama_dataset.scale_y)
    base = [f"model_dir={model_dir}", "logger=none", "progress=false", "device=cpu", "graphs.enabled=true"]
    with pytest.raises(FileNotFoundError, match="missing-export"):
        ev.run(compose("eval", base + [f"graphs.export={tmp_path / 'missing-export'}"]))
    with pytest.raises(ConfigError, match="3 layers"):
        ev.run(compose("eval", base + [f"graphs.export={tmp_path / 'layers-ct'}"]))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        ev.run(compose("eval", base + [f"graphs.prompts={tmp_path / 'nope.txt'}"]))
    assert not os.path.exists(model_dir / "eval" / "graphs")
