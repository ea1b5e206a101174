"""Feature pages (train/features.py): the streaming statistics against a brute-force recomputation, the records
against circuit-tracer's own models, the binary layout round trip, and clt-eval's pages end to end on a tiny
model (every feature node of every graph resolves to its record as the frontend resolves it)."""
import gzip
import json
import math
import shutil
import struct
import zlib
from pathlib import Path

import pytest
import torch

from cltrain.train import features as fp


def _random_acts(n_ctx, C, F, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n_ctx, C, F, generator=g) * torch.rand(1, 1, F, generator=g) * 8
    a = a * (torch.rand(n_ctx, C, F, generator=g) < 0.15)  # sparse
    a[:, :, 0] = 0  # a dead feature
    a[:, :, 1] = (torch.rand(n_ctx, C, generator=g) < 0.9) * 0.5  # a dense one with repeated values (ties)
    a[:, 0] = 0  # position 0 (BOS) never counts
    ids = torch.randint(0, 50, (n_ctx, C), generator=g)
    return a, ids


def _brute(a, ids, layer, F, k, s, before, after):
    """Per feature: the kept contexts (top by (value desc, context asc); sampled by key) with windows."""
    n_ctx, C, _ = a.shape
    value, pos = a.max(1)
    out = {}
    for f in range(F):
        cands = [c for c in range(n_ctx) if value[c, f] > 0]
        top = sorted(cands, key=lambda c: (-float(value[c, f]), c))[:k]
        keys = fp.sample_key(torch.tensor(cands, dtype=torch.long), torch.tensor(layer * F + f)).tolist()
        sampled = [c for _, c in sorted(zip(keys, cands))][:s]

        def window(c):
            p = int(pos[c, f])
            acts, tok = [], []
            for q in range(p - before, p + after + 1):
                acts.append(float(a[c, q, f]) if 0 <= q < C else 0.0)
                tok.append(int(ids[c, q]) if 0 <= q < C else -1)
            return acts, tok
        out[f] = {"top": [(c, *window(c)) for c in top], "sampled": [(c, *window(c)) for c in sampled]}
    return out


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_streaming_statistics_equal_brute_force(batch):
    """Counts, extremes, the power-of-two histogram, top contexts and the sampled contexts (with their
    activation windows) equal a recomputation over all the data at once, whatever the batch size."""
    N, F, n_ctx, C, k, s, before, after = 2, 7, 19, 11, 4, 5, 3, 2
    data = [_random_acts(n_ctx, C, F, seed) for seed in (0, 1)]
    stats = fp.FeatureStats(N, F, k, s, before, after)
    for lo in range(0, n_ctx, batch):
        for layer, (a, ids) in enumerate(data):
            stats.add(layer, a[lo:lo + batch], ids[lo:lo + batch], lo)
    for layer, (a, ids) in enumerate(data):
        fired = a > 0
        assert torch.equal(stats.count[layer], fired.sum((0, 1)))
        assert torch.equal(stats.act_max[layer], a.amax((0, 1)))
        for f in range(F):
            v = a[..., f][fired[..., f]]
            if not len(v):
                assert stats.hist[layer, f].sum() == 0 and stats.act_min[layer, f] == math.inf
                continue
            assert stats.act_min[layer, f] == v.min()
            e = int(stats.hist_exp[layer, f])
            assert 2.0 ** e * fp.HIST_BINS / 2 <= v.max() < 2.0 ** e * fp.HIST_BINS  # the narrowest that holds it
            want = torch.bincount((v / 2.0 ** e).floor().long(), minlength=fp.HIST_BINS)
            assert torch.equal(stats.hist[layer, f].long(), want), (layer, f)
        brute = _brute(a, ids, layer, F, k, s, before, after)
        for name, keeper in (("top", stats.top), ("sampled", stats.sampled)):
            for f in range(F):
                got = [(int(c), keeper.acts[layer, f, j].tolist(), keeper.ids[layer, f, j].tolist())
                       for j, c in enumerate(keeper.ctx[layer, f]) if c >= 0]
                want = brute[f][name]
                assert [g[0] for g in got] == [w[0] for w in want], (name, layer, f)
                for g, w in zip(got, want):
                    assert g[2] == w[2] and torch.allclose(torch.tensor(g[1]), torch.tensor(w[1]))


def test_records_validate_and_binary_round_trips(tmp_path):
    """Records built from the statistics validate against circuit-tracer's frontend model; the binary
    layout reads back (index, offsets, 4-byte length, inflate) to the same records, dead ones included."""
    feature_models = pytest.importorskip("circuit_tracer.frontend.feature_models")
    N, F = 2, 6
    stats = fp.FeatureStats(N, F, 3, 10, 2, 1)
    for layer in range(N):
        a, ids = _random_acts(12, 9, F, layer)
        stats.add(layer, a, ids, 0)
        stats.tokens = 12 * 8
    top = torch.randint(0, 50, (N, F, 4))
    text = fp.TokenText(type("Tok", (), {"decode": staticmethod(lambda i: f"<{i[0]}>")})())
    s = fp.PageSettings(quantiles=3, histogram_bins=20, dense_threshold=0.5, transcoder_id="t")
    layers = [(layer, fp.layer_records(stats, layer, top, top, text, s)) for layer in range(N)]
    for layer, recs in layers:
        assert [r["feature"] for r in recs] == list(range(F))
        for r in recs:
            feature_models.Model(**r)
            assert r["index"] == fp.cantor_index(layer, r["feature"])
            assert len(r["quantile_values"]) == 100 and r["quantile_values"] == sorted(r["quantile_values"])
            if r["dead"]:
                assert r["examples_quantiles"] == [] and r["activation_frequency"] == 0
                continue
            assert abs(sum(r["histogram"]) - int(stats.count[layer, r["feature"]])) < 0.05
            assert r["quantile_values"][-1] == r["act_max"]
            top_ex = r["examples_quantiles"][0]["examples"]
            for ex in top_ex:  # the marked token holds the example's maximum
                assert ex["tokens_acts_list"][ex["train_token_ind"]] == max(ex["tokens_acts_list"])
            assert top_ex[0]["tokens_acts_list"][top_ex[0]["train_token_ind"]] == pytest.approx(r["act_max"])
        assert recs[0]["dead"] and recs[1]["dense"]
    fp.write_binary(tmp_path, iter(layers))
    index = json.loads(gzip.decompress((tmp_path / fp.INDEX_FILE).read_bytes()))
    assert [e["filename"] for e in index] == ["layer_0.bin", "layer_1.bin"]
    for layer, recs in layers:
        data = (tmp_path / index[layer]["filename"]).read_bytes()
        offsets = index[layer]["offsets"]
        for f in range(F):  # as the frontend reads one feature: a range request, a length, inflate
            chunk = data[offsets[f]:offsets[f + 1] + 1]
            (n,) = struct.unpack("<I", chunk[:4])
            assert json.loads(zlib.decompress(chunk[4:4 + n])) == json.loads(json.dumps(recs[f]))
        assert fp.read_layer(tmp_path, layer) == json.loads(json.dumps(recs))
    (tmp_path / "layer_1.bin").write_bytes((tmp_path / "layer_1.bin").read_bytes()[:-3])
    with pytest.raises(ValueError, match="layer_1.bin.*partial"):
        fp.read_layer(tmp_path, 1)


def test_direct_logits_equal_dense_computation():
    """Top and bottom logits: the sum of a feature's decoders over its target layers, each divided by its
    target's s_y, scaled by the final norm, through the unembedding."""
    from cltrain.train.clt import CLT, CLTConfig

    torch.manual_seed(0)
    N, D, F, V = 3, 8, 5, 40
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F))
    with torch.no_grad():
        for w in clt.W_dec:
            w.normal_()
    s_y = torch.rand(N, 1) + 0.5
    W_U, scale = torch.randn(V, D), torch.rand(D) + 0.5
    top, bottom = fp.direct_logits(clt, s_y, W_U, scale, 3, chunk=2)
    for s in range(N):
        for f in range(F):
            v = sum(clt.W_dec[s][f, t - s] / s_y[t] for t in range(s, N))
            logits = W_U @ (scale * v)
            assert top[s, f].tolist() == logits.topk(3).indices.tolist()
            assert bottom[s, f].tolist() == logits.topk(3, largest=False).indices.tolist()


# ----------------------------------------------------------------------------------------------------
# clt-eval features.enabled=true on a harvested tiny Llama, with graphs


@pytest.fixture(scope="module")
def tiny_eval(tmp_path_factory):
    """clt-eval with graphs and feature pages of a random tiny CLT on the tiny Llama: (metrics, out_dir,
    model_dir, dataset info)."""
    pytest.importorskip("circuit_tracer")
    from tiny_models import harvest_tiny_llama, random_clt, save_model

    from cltrain.train import evaluate as ev
    from cltrain.train.config import compose

    root = tmp_path_factory.mktemp("pages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLTRAIN_CACHE", str(root / "cache"))
        info = harvest_tiny_llama(root / "acts")
        clt = random_clt(n_features=24)
        with torch.no_grad():  # a spread of thresholds: some features rare, some dead, some dense
            clt.log_threshold.copy_(torch.linspace(-5, 1.5, 24).expand(4, 24))
        model_dir = save_model(root / "model", clt, "tiny-llama", path=str(info.path), scale_x=info.scale_x,
                               scale_y=info.scale_y)
        out = root / "eval"
        m = ev.run(compose("eval", [
            f"model_dir={model_dir}", f"out_dir={out}", "logger=none", "progress=false", "device=cpu",
            "replacement.enabled=false", "graphs.enabled=true", "graphs.n_prompts=2", "graphs.max_feature_nodes=48",
            "graphs.batch_size=32", "graphs.max_n_logits=3", "graphs.node_threshold=1.0", "graphs.edge_threshold=1.0",
            "features.enabled=true", "features.n_contexts=12",
            "features.context=32", "features.batch_size=5", "features.top_examples=4",
            "features.sampled_examples=6", "features.quantiles=3", "features.before=5", "features.after=3",
            "circuits.enabled=true", "circuits.candidates=6", "circuits.show=4", "circuits.check_nodes=3",
            "circuits.ablate=4"]))
        yield m, out, model_dir, info


def test_eval_pages_match_brute_force(tiny_eval):
    """The records clt-eval writes hold, per feature, the frequency and top contexts that a dense
    recomputation over the same held-out contexts gives."""
    from cltrain.train.clt import inference_encode_layer
    from cltrain.train.lm import load_lm
    from cltrain.train.model_io import load_clt
    from cltrain.train.replacement import eval_token_batches, heldout_text, run_lm
    from cltrain.train.lm import mlp_sites

    m, out, model_dir, info = tiny_eval
    pages = m["feature_pages"]
    clt, _ = load_clt(model_dir)
    lm, tok = load_lm("tiny-llama")
    text, skip = heldout_text(info, None, True)
    ids = torch.cat(eval_token_batches(tok, text, 12, 32, 12, "cpu", 0, skip))
    _, xs, _ = run_lm(lm, ids, mlp_sites(lm), capture=True)
    counted = ids != tok.bos_token_id
    assert pages["tokens"] == int(counted.sum()) and pages["contexts"] == 12
    every = []
    for layer in range(4):
        x = xs[layer].reshape(-1, 32).float() * info.scale_x[layer]
        with torch.no_grad():
            acts = inference_encode_layer(clt, x, layer).view(12, 32, -1) * counted[..., None]
        recs = fp.read_layer(out / "features", layer)
        for f, rec in enumerate(recs):
            fired = int((acts[..., f] > 0).sum())
            assert rec["activation_frequency"] == pytest.approx(fired / pages["tokens"])
            assert rec["dead"] == (fired == 0)
            per_ctx = acts[..., f].amax(1)
            want = per_ctx[per_ctx > 0].sort(descending=True).values[:4].tolist()
            got = [max(e["tokens_acts_list"]) for e in (rec["examples_quantiles"] or [{"examples": []}])[0]["examples"]]
            assert got == pytest.approx(want, abs=1e-3), (layer, f)
        every.append(acts.reshape(12 * 32, -1))
    # global weights: each listed input's ERA / TWERA from dense same-token statistics and the virtual weight
    from cltrain.train.circuits import virtual_weight_block

    flat = torch.stack(every, 1)  # [T, N, F]
    s_x, s_y = torch.tensor(info.scale_x)[:, None], torch.tensor(info.scale_y)[:, None]
    n_checked = 0
    for layer in range(1, 4):
        for rec in fp.read_layer(out / "features", layer):
            a_t = flat[:, layer, rec["feature"]]
            for e in rec["circuits"]["inputs_by_twera"]:
                v = float(virtual_weight_block(clt, s_x, s_y, e["layer"], layer)[e["feature"], rec["feature"]])
                a_s = flat[:, e["layer"], e["feature"]]
                assert e["virtual_weight"] == pytest.approx(v, rel=1e-4, abs=1e-6)
                assert e["era"] == pytest.approx(float(((a_t > 0) * a_s).sum()) / pages["tokens"] * v, rel=1e-3, abs=1e-6)
                want = float((a_t * a_s).sum() / a_t.sum()) * v if a_t.sum() > 0 else 0.0
                assert e["twera"] == pytest.approx(want, rel=1e-3, abs=1e-6)
                n_checked += 1
    assert n_checked > 0
    table = (out / "features" / "circuits" / "layer_2.tsv").read_text().splitlines()
    assert table[0].startswith("layer\tfeature\tdirection") and len(table) > 1
    dead = sum(r["dead"] for r in pages["layer_table"])
    assert 0 < dead < 4 * 24 and pages["dense"] > 0  # the thresholds spread them


def test_every_graph_node_resolves_through_circuit_tracers_server(tiny_eval):
    """Each feature node of each graph clt-eval wrote resolves, the way circuit-tracer's frontend resolves it
    (a scan starting with ./ loads <scan>/<node.feature>.json; its local server serves /data/ from the
    graph folder), to the record of that node's (layer, feature), valid for circuit-tracer's model."""
    import urllib.request

    from circuit_tracer.frontend import local_server
    from circuit_tracer.frontend.feature_models import Model
    from ranks import free_port

    m, out, _, _ = tiny_eval
    graph_dir = out / "graphs"
    port = free_port()
    server = local_server.serve(data_dir=str(graph_dir), port=port)
    try:
        n = 0
        for path in graph_dir.glob("prompt-*.json"):
            g = json.loads(path.read_text())
            scan = g["metadata"]["scan"]
            assert scan == m["graphs"]["feature_scan"] and scan.startswith("./data/")
            for node in g["nodes"]:
                if node["feature_type"] != "cross layer transcoder":
                    continue
                url = f"http://127.0.0.1:{port}/{scan.removeprefix('./')}/{node['feature']}.json"
                with urllib.request.urlopen(url, timeout=10) as r:
                    raw = json.loads(r.read())
                rec = Model(**raw)
                layer, feature, _ = node["node_id"].split("_")
                assert rec.index == node["feature"] == fp.cantor_index(int(layer), int(feature))
                assert (raw["layer"], raw["feature"]) == (int(layer), int(feature))
                n += 1
        assert n > 0
    finally:
        server.stop()
    # every feature has a JSON record, dead ones too, equal to the binary layout's
    json_dir = Path(m["feature_pages"]["json_dir"])
    assert len(list(json_dir.glob("*.json"))) == 4 * 24
    for layer in range(4):
        for rec in fp.read_layer(out / "features", layer):
            assert json.loads((json_dir / f"{rec['index']}.json").read_text()) == rec


def test_eval_checks_every_graph_by_perturbation(tiny_eval):
    """With circuits.enabled and graphs, each graph's sampled edges are verified by constrained interventions
    (all of them, for the export clt-eval made itself), and its influence is compared with ablation effects."""
    m, _, _, _ = tiny_eval
    g = m["graphs"]
    for row in g["per_prompt"]:
        assert row["edges"]["checked"] == 3 and row["edges"]["verified"] == 3, row["edges"]
        f = row["faithfulness"]
        assert f["n_features"] == 4 and (f["spearman_output"] is None or -1 <= f["spearman_output"] <= 1)
    assert g["edges_checked"] == g["edges_verified"] == 3 * len(g["per_prompt"])
    from cltrain.train.eval_metrics import flat_metrics

    flat = flat_metrics(m)
    assert flat["eval/graphs/edges_verified"] == g["edges_verified"]


def test_pages_land_in_the_export_metrics_and_browser(tiny_eval):
    """The binary layout is copied into the model's own export (features/index.json.gz + layer_<L>.bin, as
    a Hugging Face repository of circuit-tracer serves them); metrics.json, the PNG and the browser exist."""
    m, out, _, _ = tiny_eval
    export_features = out / "circuit_tracer" / "features"
    assert m["feature_pages"]["export_features"] == str(export_features)
    for layer in range(4):
        assert fp.read_layer(export_features, layer) == fp.read_layer(out / "features", layer)
    saved = json.loads((out / "metrics.json").read_text())["feature_pages"]
    assert [r["layer"] for r in saved["layer_table"]] == [0, 1, 2, 3]
    assert (out / "feature_frequency.png").stat().st_size > 1000
    assert (out / "features" / "index.html").is_file() and (out / "features" / "data" / "layer_3.js").is_file()
    assert not list(out.glob(".features.tmp*")) and not list((out / "graphs" / "features").glob(".*"))


def test_browser_draws_a_real_models_feature(tiny_eval, tmp_path):
    """Our browser, opened from file:// in headless Chromium on the tiny model's eval, draws a live feature's
    top logits and examples as its record holds them, and each graph's page links its top features."""
    from test_feature_browser import _render, _shown, _texts, chromium  # noqa: F401  (chromium: the fixture)

    m, out, _, _ = tiny_eval
    browser = out / "features" / "index.html"
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.skip("no chromium on PATH: `apt-get install chromium` (tests/install_browser.sh, run by make test)")
    recs = fp.read_layer(out / "features", 2)
    rec = max(recs, key=lambda r: len(r["examples_quantiles"]) and r["activation_frequency"] < 0.5)
    shot = tmp_path / "feature.png"
    dom = _render(path, browser, f"feature=2/{rec['feature']}", tmp_path, screenshot=shot)
    assert _texts(dom.id("top-logits").all("span", "chip")) == rec["top_logits"]
    shown = dom.id("examples").all("div", "example")
    want = [ex for g in rec["examples_quantiles"] for ex in g["examples"]]
    assert len(shown) == len(want) > 0
    assert _texts(shown[0].all("span", "tok")) == [_shown(t) for t in want[0]["tokens"]]
    assert shot.stat().st_size > 5000
    listed = rec["circuits"]["inputs_by_twera"]
    shown_links = [a.attrs["href"] for a in dom.id("inputs-by-twera").all("a")] if listed else []
    assert shown_links == [f"#feature={e['layer']}/{e['feature']}" for e in listed]
    slug = m["graphs"]["per_prompt"][0]["slug"]
    dom = _render(path, browser, f"graph={slug}", tmp_path)
    links = [a.attrs["href"] for a in dom.id("graph-table").all("a") if a.attrs["href"].startswith("#feature=")]
    [page] = fp.graph_top_features(out / "graphs", [slug])
    assert links == [f"#feature={t['layer']}/{t['feature']}" for t in page["top_features"]] and links


def test_circuit_tracers_own_page_shows_a_feature(tiny_eval, tmp_path):
    """circuit-tracer's own frontend, served on a loopback port by its server, shows a feature node's examples
    from our pages. Its page loads d3, d3-jetpack, dagre and pako from transformer-circuits.pub and unpkg.com,
    so this runs only where those hosts answer."""
    import urllib.request

    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if path is None:
        pytest.skip("no chromium on PATH: `apt-get install chromium` (tests/install_browser.sh, run by make test)")
    for host in ("https://transformer-circuits.pub", "https://unpkg.com"):
        try:
            urllib.request.urlopen(urllib.request.Request(host, method="HEAD"), timeout=5).close()
        except OSError as e:
            pytest.skip(f"circuit-tracer's page loads its scripts from {host}, unreachable here ({e})")
    from circuit_tracer.frontend import local_server
    from ranks import free_port
    from test_feature_browser import headless

    m, out, _, _ = tiny_eval
    graph_dir = out / "graphs"
    slug = m["graphs"]["per_prompt"][0]["slug"]
    g = json.loads((graph_dir / f"{slug}.json").read_text())
    node = next(nd for nd in g["nodes"] if nd["feature_type"] == "cross layer transcoder")
    raw = json.loads((Path(m["feature_pages"]["json_dir"]) / f"{node['feature']}.json").read_text())
    port = free_port()
    server = local_server.serve(data_dir=str(graph_dir), port=port)
    try:
        url = f"http://localhost:{port}/index.html?slug={slug}&clickedId={node['node_id']}"
        run = headless(path, tmp_path, url, budget_ms=15000, timeout=120)
    finally:
        server.stop()
    assert run.returncode == 0
    assert all(t in run.stdout for t in raw["top_logits"][:3] if t.strip() and t.isascii() and "<" not in t)


def test_clt_export_takes_the_pages_of_its_own_model_only(tiny_eval, tmp_path):
    """clt-export features=<eval>/features puts the binary layout in the export; pages of another model's
    weights are refused, naming the file and key."""
    from tiny_models import random_clt, save_model

    from cltrain.train.export import export

    m, out, model_dir, info = tiny_eval
    exp = export(model_dir, tmp_path / "export", features=out / "features")
    assert fp.read_layer(exp / "features", 1) == fp.read_layer(out / "features", 1)
    other = save_model(tmp_path / "other", random_clt(n_features=24, seed=1), "tiny-llama", path=str(info.path),
                       scale_x=info.scale_x, scale_y=info.scale_y)
    with pytest.raises(ValueError, match=r"summary.json: key 'weights' = .* another model's features"):
        export(other, tmp_path / "export2", features=out / "features")
    assert not (tmp_path / "export2").exists()


def test_eval_runs_again_over_its_own_pages(tiny_eval, tmp_path):
    """A second clt-eval into the same folder replaces the export it made (features/ inside it included) and
    the pages, rather than refusing the folder as foreign."""
    from cltrain.train.export import export, not_an_export

    m, out, model_dir, _ = tiny_eval
    assert not_an_export(out / "circuit_tracer") is None
    again = export(model_dir, out / "circuit_tracer", overwrite=True, features=out / "features")
    assert (again / "features" / fp.INDEX_FILE).is_file()
    with pytest.raises(FileExistsError, match="also holds stray"):
        (again / "stray").mkdir()
        export(model_dir, again, overwrite=True)
    (again / "stray").rmdir()
