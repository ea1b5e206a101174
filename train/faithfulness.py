"""Perturbation checks of attribution graphs (the "Circuit Tracing" methods paper, section "Evaluating
Mechanistic Faithfulness"), run on circuit-tracer's own ReplacementModel (nnsight backend) and a Graph that
`circuit_tracer.attribute` built for the same prompt.

Conventions of circuit-tracer 0.5 that both checks rely on (read from its graph.py, attribute.py,
replacement_model_nnsight.py and its tests/test_attributions_*_nnsight.py):
  - graph.adjacency_matrix is [target, source] over the nodes: selected feature nodes (node i is
    active_features[selected_features[i]], activation activation_values[selected_features[i]]), then
    n_layers * n_pos error nodes, n_pos token nodes, and the logit targets;
  - an edge from a feature is already weighted by that feature's activation a: adjacency[t, s] is the
    change of target t per unit activation of s, times a_s;
  - a feature target is the feature's pre-activation (encoder . input + bias, before JumpReLU/ReLU);
  - a logit target is the *demeaned* logit of its token at the last position: logit[tok] - mean over the
    vocabulary of the logits (the unembedding columns are demeaned), with the final norm's denominator
    frozen; custom (virtual) targets have no vocabulary column and are not compared here;
  - position 0 (BOS) carries no active features.

check_edges: exactness ("edges verified k of n").
  For a seeded sample of the graph's feature nodes s = (layer l, position p, feature f, activation a), the
  feature is set to 2a with rm.feature_intervention(..., constrained_layers=range(n_layers),
  apply_activation_function=False). With every layer constrained, circuit-tracer freezes attention patterns,
  norm denominators and every MLP/transcoder output, and adds (2a - a) * W_dec[s] to the outputs the feature
  writes to: the local replacement model becomes linear, and only direct effects propagate. So the change
  of every selected feature's pre-activation must equal adjacency[:n_features, s] and the change of every
  logit target's demeaned logit must equal adjacency[-n_logits:, s] (no extra factor: the intervention adds
  a, and edges are per unit activation times a). Causality is checked too: every feature's pre-activation
  (all F features, not only the active ones) at positions < p, and at position p in layers <= l, must not
  move. The model's own activation of s must equal the graph's. A node is ok when every compared value is
  within atol + rtol * |predicted| (atol alone for the causality and activation checks). How to read it:
  verified == checked on a graph built from this model and export; a node that fails means the graph does
  not describe the model it claims to (a broken export, a graph from another transcoder, wrong folding of
  scales). max_abs_error is float32 rounding (~1e-6) when things agree.

ablation_faithfulness: does the graph's influence predict what an ablation does?
  The graph's node influence on the output (circuit-tracer's compute_node_influence over the adjacency,
  logit nodes weighted by their probabilities: the score prune_graph ranks nodes by) picks the top
  n_features feature nodes. Each is ablated alone (set to 0 at its layer, position and feature) in the
  replacement model *without* constraints (iterative patching, constrained_layers=None; attention patterns
  frozen as circuit-tracer does by default, norms and MLPs live), so its effect propagates through the
  real MLPs and every later layer, non-linearly. Measured:
    output_effect: |change of the top logit target's demeaned logit| at the last position (the same
      quantity as the graph's logit node); output_delta keeps the sign;
    downstream: the change of the pre-activation of every other selected feature downstream of it (a later
      position, or the same position and a later layer), against the graph's direct prediction for removing
      the source, -adjacency[t, s] (signed);
  and reported as Spearman rank correlations: spearman_output between influence and output_effect across
  the ablated features (the paper reports 0.72 on its 18-layer model), spearman_downstream between the
  predicted and measured downstream changes pooled over ablated features and targets. How to read them:
  near 1, the graph ranks what matters the way the model does; near 0, influence is not predictive (the
  replacement model's features are not the mechanism the output follows, or error nodes carry the effect);
  spearman_downstream is lower than a linear check would give because the measured change also holds
  indirect (multi-hop) effects and nonlinearity. None where fewer than 3 values or one side is constant.

Ranks: Spearman is Pearson correlation of average ranks (ties share the mean of their positions), done here
in torch (scipy is not a dependency).
"""
from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["check_edges", "ablation_faithfulness", "spearman", "average_ranks"]


# ----------------------------------------------------------------------------------------------------
# Spearman rank correlation


def average_ranks(x) -> torch.Tensor:
    """1-based ranks of a 1-D sequence, ties given the average of the positions they span (float64)."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    n = x.numel()
    if n == 0:
        return x.clone()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    _, inverse, counts = torch.unique_consecutive(sorted_x, return_inverse=True, return_counts=True)
    first = torch.cumsum(counts, 0) - counts  # 0-based position of each group's first element
    group_rank = first.to(torch.float64) + (counts.to(torch.float64) + 1) / 2
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = group_rank[inverse]
    return ranks


def spearman(x, y) -> float | None:
    """Spearman's rho of paired values (pairs with a non-finite member dropped); None when fewer than 3
    pairs remain or either side is constant."""
    x = torch.as_tensor(x, dtype=torch.float64).flatten()
    y = torch.as_tensor(y, dtype=torch.float64).flatten()
    if x.numel() != y.numel():
        raise ValueError(f"spearman: {x.numel()} values against {y.numel()}")
    keep = torch.isfinite(x) & torch.isfinite(y)
    x, y = x[keep], y[keep]
    if x.numel() < 3:
        return None
    rx, ry = average_ranks(x), average_ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float((rx * rx).sum()) * float((ry * ry).sum()))
    if den == 0.0:
        return None
    return max(-1.0, min(1.0, float((rx * ry).sum()) / den))


# ----------------------------------------------------------------------------------------------------
# Shared pieces


def _tokens(rm, graph, inputs) -> torch.Tensor:
    """The prompt's tokens as circuit-tracer tokenizes them (BOS prepended), checked against the graph's."""
    expected = graph.input_tokens.detach().cpu().long().flatten()
    if inputs is None:
        tokens = expected
    else:
        tokens = rm.ensure_tokenized(inputs).detach().cpu().long().flatten()
        if not torch.equal(tokens, expected):
            raise ValueError(f"inputs tokenize to {tokens.tolist()}, but the graph was built on "
                             f"{expected.tolist()}: pass the prompt the graph was attributed on")
    return tokens.to(rm.device)


def _feature_nodes(graph):
    """(indices [n, 3] (layer, pos, feature), activations [n]) of the graph's feature nodes, in node order."""
    sel = graph.selected_features.detach().cpu().long()
    feats = graph.active_features.detach().cpu().long()[sel]
    acts = graph.activation_values.detach().cpu().float()[sel]
    return feats, acts


def _logit_targets(graph, vocab: int):
    """(row offsets among the logit nodes, vocabulary ids) of the graph's targets that are real tokens."""
    rows, ids = [], []
    for k, target in enumerate(graph.logit_targets):
        if 0 <= int(target.vocab_idx) < vocab:
            rows.append(k)
            ids.append(int(target.vocab_idx))
    return rows, ids


def _demeaned(logits: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """Demeaned last-position logits of `ids` (circuit-tracer's logit nodes), float64 on CPU."""
    last = logits.reshape(-1, logits.shape[-1])[-1].detach().double().cpu()
    return last[ids] - last.mean()


def _dense(acts) -> torch.Tensor:
    acts = acts.to_dense() if acts.is_sparse else acts
    return acts.detach().double().cpu()


# ----------------------------------------------------------------------------------------------------
# Exactness: edges against constrained interventions


def check_edges(rm, graph, inputs, n_nodes: int = 8, seed: int = 0, atol: float = 5e-4,
                rtol: float = 1e-3) -> dict:
    """Verify the graph's edges out of a seeded sample of n_nodes feature nodes against interventions that
    double each feature in the fully constrained replacement model (module docstring).

    Returns {"checked", "verified", "max_abs_error", "per_node": [{"layer", "pos", "feature",
    "max_abs_error", "ok", ...}], "atol", "rtol"}; a graph without feature nodes gives checked 0 and a
    "skipped" reason."""
    out = {"checked": 0, "verified": 0, "max_abs_error": 0.0, "per_node": [], "atol": atol, "rtol": rtol}
    feats, acts = _feature_nodes(graph)
    n_feat = feats.shape[0]
    if n_feat == 0:
        out["skipped"] = "the graph has no feature nodes"
        return out
    tokens = _tokens(rm, graph, inputs)
    n_layers = int(rm.cfg.n_layers)
    adj = graph.adjacency_matrix.detach().double().cpu()
    n_logits = len(graph.logit_targets)

    gen = torch.Generator().manual_seed(seed)
    nodes = torch.randperm(n_feat, generator=gen)[:max(0, int(n_nodes))].sort().values.tolist()

    softcap = getattr(rm, "zero_softcap", None)  # logit nodes are attributed without the final softcap
    with softcap() if softcap is not None else contextlib.nullcontext():
        base_logits, base_pre = rm.get_activations(tokens, apply_activation_function=False)
        base_pre = _dense(base_pre)
        vocab = base_logits.shape[-1]
        rows, ids = _logit_targets(graph, vocab)
        base_logit = _demeaned(base_logits, ids)
        L, P, F = feats[:, 0], feats[:, 1], feats[:, 2]
        base_feat = base_pre[L, P, F]
        pred_logit_rows = [adj.shape[0] - n_logits + r for r in rows]

        per_node = []
        for i in nodes:
            layer, pos, feat = (int(v) for v in feats[i])
            value = float(acts[i])
            new_logits, new_pre = rm.feature_intervention(
                tokens, [(layer, pos, feat, 2 * value)], constrained_layers=range(n_layers),
                apply_activation_function=False)
            new_pre = _dense(new_pre)
            d_feat = new_pre[L, P, F] - base_feat
            d_logit = _demeaned(new_logits, ids) - base_logit
            pred_feat = adj[:n_feat, i]
            pred_logit = adj[pred_logit_rows, i]

            err_feat = (d_feat - pred_feat).abs()
            err_logit = (d_logit - pred_logit).abs()
            ok_feat = bool((err_feat <= atol + rtol * pred_feat.abs()).all())
            ok_logit = bool((err_logit <= atol + rtol * pred_logit.abs()).all())
            # causality: nothing upstream of the intervened feature moves (all features, active or not)
            delta = new_pre - base_pre
            upstream = torch.cat([delta[:, :pos].flatten(), delta[: layer + 1, pos].flatten()])
            causal = float(upstream.abs().max()) if upstream.numel() else 0.0
            act_err = abs(float(base_pre[layer, pos, feat]) - value)
            worst = max(float(err_feat.max()) if err_feat.numel() else 0.0,
                        float(err_logit.max()) if err_logit.numel() else 0.0, causal, act_err)
            ok = ok_feat and ok_logit and causal <= atol and act_err <= atol + rtol * abs(value)
            per_node.append({"layer": layer, "pos": pos, "feature": feat, "max_abs_error": worst, "ok": ok,
                             "activation": value, "activation_error": act_err,
                             "feature_max_abs_error": float(err_feat.max()) if err_feat.numel() else 0.0,
                             "logit_max_abs_error": float(err_logit.max()) if err_logit.numel() else 0.0,
                             "upstream_max_abs_change": causal,
                             "max_abs_predicted": float(torch.cat([pred_feat, pred_logit]).abs().max())})

    out.update(checked=len(per_node), verified=sum(r["ok"] for r in per_node),
               max_abs_error=max((r["max_abs_error"] for r in per_node), default=0.0), per_node=per_node,
               n_feature_nodes=n_feat, logits_compared=len(ids))
    return out


# ----------------------------------------------------------------------------------------------------
# Faithfulness: influence against ablations in the unconstrained replacement model


def node_influence(graph) -> torch.Tensor:
    """circuit-tracer's influence of every node on the logit nodes (weighted by their probabilities), the
    score prune_graph ranks nodes by; float, on CPU."""
    from circuit_tracer.graph import compute_node_influence

    adj = graph.adjacency_matrix.detach().float().cpu()
    n_logits = len(graph.logit_targets)
    weights = torch.zeros(adj.shape[0])
    if n_logits:
        weights[-n_logits:] = graph.logit_probabilities.detach().float().cpu()
    return compute_node_influence(adj, weights)


MEASURE = ("|change of the top logit target's demeaned logit (logit minus the vocabulary mean, as "
           "circuit-tracer's logit nodes) at the last position| when the feature alone is set to 0 in the "
           "replacement model with iterative patching (constrained_layers=None, attention patterns frozen)")


def ablation_faithfulness(rm, graph, inputs, n_features: int = 10, *, freeze_attention: bool = True) -> dict:
    """Ablate each of the graph's top n_features feature nodes by influence, alone, in the unconstrained
    replacement model, and rank-correlate the graph's predictions with the measured effects (module
    docstring).

    Returns {"n_features", "spearman_output", "spearman_downstream", "per_feature": [{"layer", "pos",
    "feature", "influence", "output_effect", ...}], "measure"}; a graph without feature nodes (or without a
    vocabulary logit target) gives n_features 0 and a "skipped" reason."""
    out = {"n_features": 0, "spearman_output": None, "spearman_downstream": None, "per_feature": [],
           "measure": MEASURE}
    feats, acts = _feature_nodes(graph)
    n_feat = feats.shape[0]
    if n_feat == 0:
        out["skipped"] = "the graph has no feature nodes"
        return out
    tokens = _tokens(rm, graph, inputs)
    base_logits, base_pre = rm.get_activations(tokens, apply_activation_function=False)
    base_pre = _dense(base_pre)
    rows, ids = _logit_targets(graph, base_logits.shape[-1])
    if not ids:
        out["skipped"] = "the graph has no logit target in the vocabulary (custom targets only)"
        return out
    top = ids[:1]
    out["target"] = {"token": str(graph.logit_targets[rows[0]].token_str), "vocab_idx": top[0]}
    base_top = float(_demeaned(base_logits, top)[0])

    influence = node_influence(graph)[:n_feat]
    k = min(max(0, int(n_features)), n_feat)
    order = torch.argsort(-influence.double(), stable=True)[:k].tolist()
    adj = graph.adjacency_matrix.detach().double().cpu()
    L, P, F = feats[:, 0], feats[:, 1], feats[:, 2]
    base_feat = base_pre[L, P, F]

    per_feature, pred_pool, meas_pool = [], [], []
    for i in order:
        layer, pos, feat = (int(v) for v in feats[i])
        new_logits, new_pre = rm.feature_intervention(tokens, [(layer, pos, feat, 0.0)], constrained_layers=None,
                                                      freeze_attention=freeze_attention,
                                                      apply_activation_function=False)
        delta_top = float(_demeaned(new_logits, top)[0]) - base_top
        down = (P > pos) | ((P == pos) & (L > layer))
        down[i] = False
        measured = _dense(new_pre)[L[down], P[down], F[down]] - base_feat[down]
        predicted = -adj[:n_feat][down, i]  # removing a_s takes its (activation-weighted) edge away
        pred_pool.append(predicted)
        meas_pool.append(measured)
        per_feature.append({"layer": layer, "pos": pos, "feature": feat, "influence": float(influence[i]),
                            "output_effect": abs(delta_top), "output_delta": delta_top,
                            "activation": float(acts[i]), "n_downstream": int(down.sum()),
                            "downstream_effect": float(measured.abs().sum()),
                            "downstream_predicted": float(predicted.abs().sum())})

    out.update(
        n_features=len(per_feature),
        spearman_output=spearman([r["influence"] for r in per_feature], [r["output_effect"] for r in per_feature]),
        spearman_downstream=spearman(torch.cat(pred_pool), torch.cat(meas_pool)) if pred_pool else None,
        per_feature=per_feature, n_downstream_pairs=int(sum(p.numel() for p in pred_pool)),
        freeze_attention=freeze_attention)
    return out
