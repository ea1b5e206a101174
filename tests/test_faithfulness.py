"""Perturbation checks of attribution graphs (train/faithfulness.py) on the tiny random Llama with a random CLT
exported by the project: the graph's edges match constrained interventions exactly, the check catches an
export whose decoder was changed after the graph was built, ablations in the unconstrained model give
finite rank correlations that match a direct recomputation, and Spearman handles ties."""
from __future__ import annotations

import math
import shutil
from types import SimpleNamespace

import pytest
import torch

try:
    import circuit_tracer  # noqa: F401
    from circuit_tracer.replacement_model import replacement_model_nnsight  # noqa: F401
except ImportError as e:  # the `graphs` extra (make install installs it)
    pytest.skip(f"circuit-tracer cannot be imported ({e}); pip install 'cltrain[graphs]'", allow_module_level=True)

from circuit_tracer import ReplacementModel, attribute

from cltrain.train import graphs
from cltrain.train.export import export
from cltrain.train.faithfulness import (ablation_faithfulness, average_ranks, check_edges, node_influence,
                                        spearman)
from cltrain.train.lm import hf_folder
from tiny_models import random_clt, save_model

pytestmark = pytest.mark.timeout(300)  # a few seconds in all on a quiet 2-core machine

PROMPT = "ab cd ef"
FAST = dict(max_feature_nodes=48, batch_size=32, max_n_logits=3)


def load_rm(export_dir, folder):
    cfg, shapes = graphs.read_export(export_dir)
    transcoders = graphs.load_transcoders(export_dir, cfg, shapes, "cpu", "test-scan")
    return ReplacementModel.from_pretrained_and_transcoders(folder, transcoders, backend="nnsight",
                                                            device=torch.device("cpu"), dtype=torch.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(model folder, export folder, replacement model, graph of PROMPT); the tiny model goes to a private cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLTRAIN_CACHE", str(tmp_path_factory.mktemp("cache")))
        folder = hf_folder("tiny-llama")
        tmp = tmp_path_factory.mktemp("faithfulness")
        model_dir = save_model(tmp / "clt", random_clt(), "tiny-llama")  # b_enc = 0.2: many features fire
        exp = export(model_dir, tmp / "export")
        rm = load_rm(exp, folder)
        graph = attribute(PROMPT, rm, **FAST)
        yield SimpleNamespace(folder=folder, export=exp, rm=rm, graph=graph, tmp=tmp)


# ----------------------------------------------------------------------------------------------------
# Exactness


def test_edges_of_a_correct_graph_verify(setup):
    assert len(setup.graph.selected_features) == FAST["max_feature_nodes"]  # fewer than the active ones
    assert len(setup.graph.selected_features) < len(setup.graph.active_features)
    res = check_edges(setup.rm, setup.graph, PROMPT, n_nodes=8, seed=0)
    assert res["checked"] == 8
    assert res["verified"] == res["checked"], res["per_node"]
    assert res["max_abs_error"] < 1e-5
    assert res["logits_compared"] == len(setup.graph.logit_targets)
    for row in res["per_node"]:
        assert {"layer", "pos", "feature", "max_abs_error", "ok"} <= set(row)
        assert row["pos"] > 0  # BOS carries no features
        assert row["upstream_max_abs_change"] < 1e-6
        assert row["max_abs_predicted"] > 1e-3  # the comparison is not trivially 0 == 0
    # deterministic in the seed, and the sample changes with it
    again = check_edges(setup.rm, setup.graph, setup.graph.input_tokens, n_nodes=8, seed=0)
    assert [(r["layer"], r["pos"], r["feature"]) for r in again["per_node"]] == \
        [(r["layer"], r["pos"], r["feature"]) for r in res["per_node"]]
    other = check_edges(setup.rm, setup.graph, PROMPT, n_nodes=8, seed=1)
    assert other["verified"] == 8
    assert {(r["layer"], r["pos"], r["feature"]) for r in other["per_node"]} != \
        {(r["layer"], r["pos"], r["feature"]) for r in res["per_node"]}


def test_a_broken_export_fails_the_check(setup):
    """Scale one sampled feature's decoder by 1.5 in a copy of the export: the graph (built from the original)
    no longer describes the model, and exactly that node fails."""
    from safetensors.torch import load_file, save_file

    first = check_edges(setup.rm, setup.graph, PROMPT, n_nodes=4, seed=0)["per_node"]
    victim = max(first, key=lambda r: r["max_abs_predicted"])
    layer, feat = victim["layer"], victim["feature"]
    broken = setup.tmp / "export-broken"
    shutil.copytree(setup.export, broken)
    path = broken / f"W_dec_{layer}.safetensors"
    tensors = load_file(str(path))
    tensors[f"W_dec_{layer}"][feat] *= 1.5
    save_file(tensors, str(path), metadata={"format": "pt"})

    rm_broken = load_rm(broken, setup.folder)
    res = check_edges(rm_broken, setup.graph, PROMPT, n_nodes=4, seed=0)
    assert res["checked"] == 4 and res["verified"] == 3
    bad = [r for r in res["per_node"] if not r["ok"]]
    assert [(r["layer"], r["feature"], r["pos"]) for r in bad] == [(layer, feat, victim["pos"])]
    # the error is half of the node's largest predicted effect (1.5x instead of 1x)
    assert bad[0]["max_abs_error"] == pytest.approx(0.5 * victim["max_abs_predicted"], rel=1e-3)
    assert res["max_abs_error"] > 100 * res["atol"]


def test_inputs_must_be_the_graphs_prompt(setup):
    with pytest.raises(ValueError, match="tokenize to"):
        check_edges(setup.rm, setup.graph, "something else", n_nodes=1)


def test_a_graph_without_features_is_skipped(setup):
    empty = SimpleNamespace(selected_features=torch.zeros(0, dtype=torch.long),
                            active_features=torch.zeros(0, 3, dtype=torch.long),
                            activation_values=torch.zeros(0), input_tokens=setup.graph.input_tokens,
                            logit_targets=setup.graph.logit_targets)
    res = check_edges(setup.rm, empty, PROMPT)
    assert res["checked"] == 0 and res["verified"] == 0 and "no feature nodes" in res["skipped"]
    abl = ablation_faithfulness(setup.rm, empty, PROMPT)
    assert abl["n_features"] == 0 and abl["spearman_output"] is None and "no feature nodes" in abl["skipped"]


# ----------------------------------------------------------------------------------------------------
# Faithfulness


def test_ablation_faithfulness(setup):
    rm, graph = setup.rm, setup.graph
    res = ablation_faithfulness(rm, graph, PROMPT, n_features=6)
    assert res["n_features"] == 6 and len(res["per_feature"]) == 6
    for key in ("spearman_output", "spearman_downstream"):
        assert res[key] is not None and math.isfinite(res[key]) and -1.0 <= res[key] <= 1.0
    assert isinstance(res["measure"], str) and "demeaned logit" in res["measure"]

    # the top features by circuit-tracer's influence, in decreasing order
    influence = node_influence(graph)[: len(graph.selected_features)]
    infl = [r["influence"] for r in res["per_feature"]]
    assert infl == sorted(infl, reverse=True)
    assert infl[0] == pytest.approx(float(influence.max()))

    # one output effect recomputed by hand: ablate the second feature in the unconstrained model
    row = res["per_feature"][1]
    tokens = graph.input_tokens
    target = graph.logit_targets[0].vocab_idx
    base, _ = rm.get_activations(tokens)
    new, _ = rm.feature_intervention(tokens, [(row["layer"], row["pos"], row["feature"], 0.0)],
                                     constrained_layers=None)
    base, new = base[0, -1].double(), new[0, -1].double()
    delta = (new[target] - new.mean()) - (base[target] - base.mean())
    assert row["output_delta"] == pytest.approx(float(delta), abs=1e-6)
    assert row["output_effect"] == pytest.approx(abs(float(delta)), abs=1e-6)
    assert row["output_effect"] > 1e-4  # a real effect, not 0 == 0
    assert row["n_downstream"] > 0 and row["downstream_effect"] > 0


# ----------------------------------------------------------------------------------------------------
# Spearman


def test_spearman_with_ties():
    assert average_ranks([1, 2, 2, 3]).tolist() == [1.0, 2.5, 2.5, 4.0]
    assert average_ranks([3, 1, 3, 3, 0]).tolist() == [4.0, 2.0, 4.0, 4.0, 1.0]
    # ranks [1, 2.5, 2.5, 4] and [1, 3, 2, 4]: centered [-1.5, 0, 0, 1.5] . [-1.5, .5, -.5, 1.5] = 4.5,
    # norms^2 4.5 and 5, so rho = 4.5 / sqrt(22.5) = 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10), abs=1e-12)
    # without ties: 1 - 6 sum d^2 / (n (n^2 - 1)); d = [0, 1, -1, 0, 0] -> 1 - 12 / 120
    assert spearman([1, 2, 3, 4, 5], [1, 3, 2, 4, 5]) == pytest.approx(0.9, abs=1e-12)
    assert spearman([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    assert spearman([1, 2], [1, 2]) is None  # too few
    assert spearman([1, 2, 3], [5, 5, 5]) is None  # constant
    assert spearman([1, 2, float("nan"), 3, 4], [1, 2, 9, 3, 4]) == pytest.approx(1.0)  # NaN pair dropped
