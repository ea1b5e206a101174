"""Global weights: how features connect across all prompts (the methods paper, "Global Weights").

Virtual weight of a source feature s (layer l_s) onto a target feature t (layer l_t > l_s), through the
residual stream, attention-mediated paths excluded:

    V_st = < sum_{l = l_s .. l_t - 1} W_dec[s -> l],  W_enc[t] >

in the exported (raw) units, where the decoders write and the encoders read: W_dec[s -> l] / s_y[l] and
W_enc[t] * s_x[l_t] (the normalization folded in as clt-export folds it; per-dimension scales
elementwise). This holds when the encoders read the residual stream before the MLP's norm (x_source=resid,
the default), where the decoders' outputs arrive. With x_source=normalized the encoders read the norm's
output: V would need the norm's learned scale folded into W_enc[t] and its per-token 1/rms replaced by a
mean over data (an approximation); virtual weights are not computed for such a CLT.

    ERA_st   = E[1(a_t > 0) a_s] V_st           TWERA_st = (E[a_t a_s] / E[a_t]) V_st

with same-token co-activation statistics over the feature pages' held-out tokens (BOS excluded).

All F x F pairs do not fit (30,720 features: 943M pairs), so `candidates` computes V blockwise (one
[F, F] block per (source layer, target layer) at a time) and keeps, per target feature, its `k` sources of
largest |V| and, per source feature, its `k` targets of largest |V|: memory O(N F k). `Coactivation` then
sums the statistics for the per-target candidate pairs only, from the sparse activations of each batch.
"""
from __future__ import annotations

import torch

NO_SOURCE = -1


class Candidates:
    """Per target feature (CLT layer, feature) its k sources by |V| (global ids l * F + f, NO_SOURCE where a
    layer has fewer earlier features than k) and their V; per source feature its k targets by |V|."""

    def __init__(self, n_layers: int, n_features: int, k: int):
        N, F = n_layers, n_features
        self.n_layers, self.n_features, self.k = N, F, k
        self.src = torch.full((N, F, k), NO_SOURCE, dtype=torch.long)
        self.src_v = torch.zeros(N, F, k)
        self.tgt = torch.full((N, F, k), NO_SOURCE, dtype=torch.long)
        self.tgt_v = torch.zeros(N, F, k)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.src, self.src_v, self.tgt, self.tgt_v))


def _merge_top(ids: torch.Tensor, vals: torch.Tensor, new_ids: torch.Tensor, new_vals: torch.Tensor, k: int):
    """Keep the k entries of largest |value| per row of (ids, vals) [R, k] and (new_ids, new_vals) [R, M]."""
    all_ids, all_vals = torch.cat([ids, new_ids], 1), torch.cat([vals, new_vals], 1)
    key = all_vals.abs().masked_fill(all_ids == NO_SOURCE, -1.0)
    top = key.topk(k, dim=1).indices
    return all_ids.gather(1, top), all_vals.gather(1, top)


@torch.no_grad()
def virtual_weight_block(clt, s_x: torch.Tensor, s_y: torch.Tensor, ls: int, lt: int) -> torch.Tensor:
    """V [F, F] from every feature of source layer ls onto every feature of target layer lt > ls: the definition,
    one block at a time (`candidates` computes the same blocks with a running decoder sum)."""
    dec = clt.W_dec[ls].float()  # [F, S, D], slot j writes layer ls + j (a PLT: S = 1, its own layer only)
    writes = sum(dec[:, l - ls] / s_y[l].float() for l in range(ls, min(lt, ls + dec.shape[1])))
    reads = clt.W_enc[lt].float() * s_x[lt].float()  # [F, D]
    return writes @ reads.T


@torch.no_grad()
def candidates(clt, s_x: torch.Tensor, s_y: torch.Tensor, k: int, progress: bool = True) -> Candidates:
    """The per-target and per-source top-k pairs by |V|, computed one [F, F] block at a time."""
    from tqdm.auto import tqdm

    N, F = clt.cfg.n_layers, clt.cfg.n_features
    c = Candidates(N, F, k)
    dev = clt.W_enc.device  # blocks computed where the model is; the kept pairs on CPU
    s_x, s_y = s_x.float().to(dev), s_y.float().to(dev)
    bar = tqdm(total=N * (N - 1) // 2, desc="virtual weights", unit="block", disable=not progress)
    for ls in range(N - 1):
        dec = clt.W_dec[ls].float()
        writes = torch.zeros(F, clt.cfg.d_model, device=dev)
        for lt in range(ls + 1, N):
            # what source ls has written by the time layer lt reads: its decoders into layers ls..lt-1
            if lt - 1 - ls < dec.shape[1]:
                writes += dec[:, lt - 1 - ls] / s_y[lt - 1]
            v = (writes @ (clt.W_enc[lt].float() * s_x[lt]).T).cpu()  # [F_s, F_t], = virtual_weight_block
            kk = min(k, F)
            # targets of layer lt: their best sources among layer ls's features
            top = v.abs().topk(kk, dim=0).indices  # [kk, F_t]
            c.src[lt], c.src_v[lt] = _merge_top(c.src[lt], c.src_v[lt], (ls * F + top).T,
                                                v.gather(0, top).T, k)
            # sources of layer ls: their best targets among layer lt's features
            top = v.abs().topk(kk, dim=1).indices  # [F_s, kk]
            c.tgt[ls], c.tgt_v[ls] = _merge_top(c.tgt[ls], c.tgt_v[ls], lt * F + top, v.gather(1, top), k)
            bar.update(1)
    bar.close()
    return c


class Coactivation:
    """Same-token sums for each target's candidate sources: S_t = sum a_t, S_on[t, j] = sum 1(a_t > 0) a_s,
    S_both[t, j] = sum a_t a_s over the counted tokens (`add`, one batch of every layer's activations)."""

    def __init__(self, cand: Candidates):
        self.cand = cand
        N, F, k = cand.src.shape
        self.tokens = 0
        self.sum_t = torch.zeros(N, F, dtype=torch.float64)
        self.sum_on = torch.zeros(N, F, k, dtype=torch.float64)
        self.sum_both = torch.zeros(N, F, k, dtype=torch.float64)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sum_t, self.sum_on, self.sum_both))

    def add(self, acts: torch.Tensor, tokens: int):
        """acts [T, N, F] of every layer on the same T tokens (zero at tokens not counted); `tokens` counted."""
        T, N, F = acts.shape
        flat = acts.reshape(T, N * F).float()
        self.tokens += tokens
        for lt in range(N):
            a_t = flat[:, lt * F:(lt + 1) * F]
            self.sum_t[lt] += a_t.sum(0).double()
            b, g = (a_t > 0).nonzero(as_tuple=True)  # the target's firing (token, feature) pairs
            if not len(b):
                continue
            src = self.cand.src[lt, g]  # [nnz, k]
            a_s = flat[b[:, None], src.clamp(min=0)] * (src != NO_SOURCE)  # [nnz, k]
            at = a_t[b, g][:, None]
            self.sum_on[lt].index_add_(0, g, a_s.double())
            self.sum_both[lt].index_add_(0, g, (at * a_s).double())

    def era_twera(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ERA, TWERA) [N, F, k] of the per-target candidates (0 where the target never fired)."""
        n = max(self.tokens, 1)
        v = self.cand.src_v.double()
        era = self.sum_on / n * v
        twera = torch.where(self.sum_t[..., None] > 0, self.sum_both / self.sum_t[..., None].clamp(min=1e-30),
                            torch.zeros_like(self.sum_both)) * v
        return era.float(), twera.float()


def _entry(gid: int, F: int, v: float, era, twera) -> dict:
    layer, feature = divmod(gid, F)
    out = {"layer": layer, "feature": feature, "index": (layer + feature) * (layer + feature + 1) // 2 + feature,
           "virtual_weight": round(v, 6)}
    out["era"] = None if era is None else round(era, 6)
    out["twera"] = None if twera is None else round(twera, 6)
    return out


def layer_connections(cand: Candidates, era: torch.Tensor, twera: torch.Tensor, layer: int, show: int,
                      inverse: dict) -> list[dict]:
    """Per feature of `layer`: its top `show` inputs by TWERA and by |virtual weight|, and outputs likewise
    (`inverse`: per source gid, the (target gid, slot) pairs where it is a candidate input; outputs by TWERA
    come from those, outputs by weight from the per-source top-k, with ERA/TWERA where the pair is a
    candidate)."""
    F = cand.n_features
    src, v = cand.src[layer].tolist(), cand.src_v[layer].tolist()
    e, tw = era[layer].tolist(), twera[layer].tolist()
    tgt, tv = cand.tgt[layer].tolist(), cand.tgt_v[layer].tolist()
    out = []
    for f in range(F):
        ins = [(src[f][j], v[f][j], e[f][j], tw[f][j]) for j in range(cand.k) if src[f][j] != NO_SOURCE]
        by_twera = sorted(ins, key=lambda r: -abs(r[3]))[:show]
        by_weight = sorted(ins, key=lambda r: -abs(r[1]))[:show]
        gid = layer * F + f
        outs = inverse.get(gid, [])
        stats = {t: (vv, ee, ww) for t, vv, ee, ww in outs}
        out_twera = sorted(outs, key=lambda r: -abs(r[3]))[:show]
        out_weight = [(t, vv) for t, vv in zip(tgt[f], tv[f]) if t != NO_SOURCE]
        out_weight = sorted(out_weight, key=lambda r: -abs(r[1]))[:show]
        out.append({
            "inputs_by_twera": [_entry(g, F, vv, ee, ww) for g, vv, ee, ww in by_twera],
            "inputs_by_weight": [_entry(g, F, vv, ee, ww) for g, vv, ee, ww in by_weight],
            "outputs_by_twera": [_entry(t, F, vv, ee, ww) for t, vv, ee, ww in out_twera],
            "outputs_by_weight": [_entry(t, F, vv, *(stats[t][1:] if t in stats else (None, None)))
                                  for t, vv in out_weight],
        })
    return out


def inverse_candidates(cand: Candidates, era: torch.Tensor, twera: torch.Tensor) -> dict:
    """Per source gid: [(target gid, V, ERA, TWERA)] over the pairs where it is a target's candidate input."""
    N, F, k = cand.src.shape
    src = cand.src.reshape(-1, k)
    keep = src != NO_SOURCE
    t_gid = torch.arange(N * F)[:, None].expand(-1, k)[keep].tolist()
    s_gid = src[keep].tolist()
    vals = zip(cand.src_v.reshape(-1, k)[keep].tolist(), era.reshape(-1, k)[keep].tolist(),
               twera.reshape(-1, k)[keep].tolist())
    inv: dict = {}
    for s, t, (v, e, w) in zip(s_gid, t_gid, vals):
        inv.setdefault(s, []).append((t, v, e, w))
    return inv


def table_rows(connections: list[dict], layer: int) -> list[str]:
    """The compact per-layer table (TSV): one row per (feature, direction, rank)."""
    rows = []
    for f, c in enumerate(connections):
        for key in ("inputs_by_twera", "outputs_by_twera"):
            for rank, e in enumerate(c[key], 1):
                rows.append("\t".join(str(x) for x in (layer, f, key.split("_")[0], rank, e["layer"], e["feature"],
                                                       e["virtual_weight"], e["era"], e["twera"])))
    return rows


TABLE_HEADER = "layer\tfeature\tdirection\trank\tother_layer\tother_feature\tvirtual_weight\tera\ttwera"
