"""Global weights on SmolLM2-135M, CPU, one run per size (writes benchmarks/circuits.md):

1. the virtual weights: every (source layer, target layer) block of V computed once, per target its top-k
   sources and per source its top-k targets by |V| kept (train/circuits.candidates): time, state, peak RSS;
2. the feature-page pass on the same held-out contexts with and without the co-activation statistics of
   those candidate pairs (train/circuits.Coactivation): the statistics' extra cost.

at F = 128 and F = 1,024 features per layer (30 layers), random CLTs set up as benchmarks/features.py sets
them up (~10 active features per layer and token). The perturbation checks' time per graph and the demo
models' faithfulness come from clt-eval on the demo (metrics.json) and are added by hand to the page.

    .venv/bin/python benchmarks/circuits.py [--features 128 1024] [--contexts 64] [--k 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from features import run_sizes, setup  # noqa: E402  (the same CLTs, contexts and runner)

from cltrain.machine import cpu_model  # noqa: E402
from cltrain.train import circuits, features as fp  # noqa: E402
from cltrain.train.memory import peak_rss  # noqa: E402

HAND = "## From clt-eval on the demo"


@torch.no_grad()
def measure(F: int, n_contexts: int, k: int) -> dict:
    cap, clt, s_x, s_y, batches = setup(F, n_contexts)
    N = clt.cfg.n_layers
    t = time.perf_counter()
    cand = circuits.candidates(clt, s_x, s_y, k, progress=False)
    vw_s = time.perf_counter() - t
    rss_vw = peak_rss()
    fp.collect(clt, s_x, cap, batches[:2], fp.FeatureStats(N, F, 16, 20, 16, 8), cap.sep, progress=False)  # warm-up
    plain, withc = [], []
    for _ in range(2):  # interleaved, best of two: the machine may be shared
        plain.append(fp.collect(clt, s_x, cap, batches, fp.FeatureStats(N, F, 16, 20, 16, 8), cap.sep,
                                progress=False)["seconds"])
        coact = circuits.Coactivation(cand)
        withc.append(fp.collect(clt, s_x, cap, batches, fp.FeatureStats(N, F, 16, 20, 16, 8), cap.sep,
                                progress=False, coactivation=coact)["seconds"])
    plain, withc = {"tokens": coact.tokens, "seconds": min(plain)}, {"seconds": min(withc)}
    t = time.perf_counter()
    era, twera = coact.era_twera()
    inv = circuits.inverse_candidates(cand, era, twera)
    conns = [circuits.layer_connections(cand, era, twera, layer, 10, inv) for layer in range(N)]
    lists_s = time.perf_counter() - t
    return {"F": F, "k": k, "tokens": plain["tokens"], "virtual_weights_s": vw_s, "blocks": N * (N - 1) // 2,
            "candidates_bytes": cand.nbytes(), "coactivation_bytes": coact.nbytes(),
            "pass_s": plain["seconds"], "pass_with_stats_s": withc["seconds"], "lists_s": lists_s,
            "peak_rss_after_vw": rss_vw, "peak_rss": peak_rss(), "n_lists": sum(len(c) for c in conns)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--out", default=str(Path(__file__).with_name("circuits.md")))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print("RESULT " + json.dumps(measure(a.one, a.contexts, a.k)), flush=True)
        return 0
    rows = run_sizes(__file__, a.features, ["--contexts", str(a.contexts), "--k", str(a.k)])
    cpu = cpu_model()
    mb, gib = 1e6, 2 ** 30
    lines = ["# Global weights: SmolLM2-135M (30 layers, D=576), CPU", "",
             f"Machine: {cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}. "
             f"`python benchmarks/circuits.py` ({a.contexts} held-out contexts of 64 tokens; k = {a.k} candidate "
             f"sources per target; random CLTs with ~10 active features per layer and token, as in "
             f"benchmarks/features.md; each size in a fresh process).", "",
             "| F per layer | features | virtual weights (435 blocks of F x F) | candidates + statistics state | "
             "feature-page pass | with co-activation statistics | extra | lists per feature | peak RSS |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['F']} | {30 * r['F']:,} | {r['virtual_weights_s']:.1f} s | "
            f"{(r['candidates_bytes'] + r['coactivation_bytes']) / mb:.0f} MB | {r['pass_s']:.1f} s | "
            f"{r['pass_with_stats_s']:.1f} s | {r['pass_with_stats_s'] / r['pass_s'] - 1:+.0%} | {r['lists_s']:.1f} s | "
            f"{r['peak_rss'] / gib:.2f} GiB |")
    lines += ["", "Raw figures: `" + json.dumps(rows) + "`", ""]
    old = Path(a.out).read_text() if Path(a.out).exists() else ""
    if HAND in old:  # the section written from clt-eval's metrics is kept
        lines.append(old[old.index(HAND):])
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
