"""Feature pages on SmolLM2-135M, CPU, in one run per size (writes benchmarks/features.md):

1. the plain forward: the base model up to the last layer and the CLT's encode and decode on held-out contexts;
2. the feature-page pass on the same contexts (train/features.collect: the base model, the encode, and the
   statistics: histograms, top and sampled contexts with their windows);
3. the records (top/bottom logits through the unembedding included) written in circuit-tracer's binary layout,
   expanded to per-feature JSON, and our browser: time and size on disk of each.

at F = 128 and F = 1,024 features per layer (30 layers). The CLTs are random with each feature's threshold set
so that it fires on 10 / F of the calibration tokens (about 10 active features per layer and token, as a
trained CLT); the pass's cost does not depend on what the features mean. Each size runs in a fresh process, so
its peak RSS (VmHWM) is its own.

    .venv/bin/python benchmarks/features.py [--features 128 1024] [--contexts 128] [--out benchmarks/features.md]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cltrain.machine import cpu_model
from cltrain.train import features as fp
from cltrain.train.capture import Capture, CaptureSpec
from cltrain.train.clt import CLT, CLTConfig, inference_encode_layer
from cltrain.train.feature_browser import write_browser
from cltrain.train.lm import unembedding
from cltrain.train.memory import peak_rss
from cltrain.train.replacement import eval_token_batches

CONTEXT, BATCH, L0 = 64, 8, 10
NOTE = ("The pass costs less than the plain forward: it encodes but does not decode (the 30-layer decode is most of "
        "the CLT's forward at F = 1,024), and its statistics touch only the active (token, feature) pairs and one "
        "[contexts, F] maximum per layer. Its memory is the base model plus the pass state, which grows with the "
        "features and the examples kept (16 + 20 windows of 25 tokens per feature), not with the tokens read. After "
        "the pass, writing the records (logits included) costs about as much again at F = 1,024; the per-feature "
        "JSON and the browser's data each hold the records uncompressed (~10 KB a feature), the binary layout "
        "compressed (~2 KB). With more held-out contexts more features fill their 36 examples: clt-eval's default "
        "of 512 contexts on the demo's trained CLT (F = 128) wrote 13.0 MB binary and 54.7 MB of JSON for 3,840 "
        "features (3.4 KB and 14 KB a feature; so ~100 MB and ~430 MB at F = 1,024).")


def _dir_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@torch.no_grad()
def setup(F: int, n_contexts: int):
    """(capture, CLT, s_x, s_y, batches): SmolLM2 with its 30 sites, a random CLT of F features per layer whose
    thresholds fire each feature on L0 / F of a calibration batch, and n_contexts held-out-like contexts (the
    builtin text after the demo's harvest, 24,576 tokens)."""
    torch.manual_seed(0)
    cap = Capture(CaptureSpec(base_model="smollm2", model_dtype="fp32", seed=0, layers=None, x_source="resid",
                              dtype="bfloat16", context=CONTEXT, bos="keep"), "cpu")
    N, D = len(cap.sites), cap.meta["d_model"]
    batches = eval_token_batches(cap.tok, None, n_contexts + BATCH, CONTEXT, BATCH, "cpu", 0, 24576)
    calib, batches = batches[0], batches[1:]
    clt = CLT(CLTConfig(n_layers=N, d_model=D, n_features=F)).eval()
    with cap.hooked():
        xs, _ = cap.forward(calib)
        s_x = torch.stack([(D / x.float().pow(2).sum(-1).mean()).sqrt() for x in xs])[:, None]
        for layer, x in enumerate(xs):  # each feature fires on L0 / F of the calibration tokens
            pre = x.reshape(-1, D).float() * s_x[layer] @ clt.W_enc[layer].T + clt.b_enc[layer]
            clt.log_threshold[layer] = pre.quantile(1 - L0 / F, dim=0).clamp_min(1e-3).log()
    return cap, clt, s_x, torch.ones(N, 1), batches


@torch.no_grad()
def measure(F: int, n_contexts: int, tmp: Path) -> dict:
    cap, clt, s_x, s_y, batches = setup(F, n_contexts)
    N, D = clt.cfg.n_layers, clt.cfg.d_model
    tokens = sum(int((b != cap.sep).sum()) for b in batches)

    t = time.perf_counter()
    with cap.hooked():
        l0 = 0.0
        for ids in batches:
            xs, _ = cap.forward(ids)
            acts = torch.stack([inference_encode_layer(clt, x.reshape(-1, D).float() * s_x[layer], layer)
                                for layer, x in enumerate(xs)], 1)
            clt.decode(acts)
            l0 += float((acts > 0).sum()) / N
    forward_s = time.perf_counter() - t

    stats = fp.FeatureStats(N, F, 16, 20, 16, 8)
    run = fp.collect(clt, s_x, cap, batches, stats, cap.sep, progress=False)
    W_U, scale, _ = unembedding(cap.model)

    t = time.perf_counter()
    top, bottom = fp.direct_logits(clt, s_y, W_U, scale, 10)
    logits_s = time.perf_counter() - t
    pages = fp.PageSettings(quantiles=5, histogram_bins=50, dense_threshold=0.1, transcoder_id="bench")
    text = fp.TokenText(cap.tok)
    folder = tmp / "features"
    folder.mkdir()
    t = time.perf_counter()
    binary = fp.write_binary(folder, ((layer, fp.layer_records(stats, layer, top, bottom, text, pages))
                                      for layer in range(N)))
    records_s = time.perf_counter() - t
    t = time.perf_counter()
    json_bytes = fp.expand_json(folder, tmp / "json")
    json_s = time.perf_counter() - t
    t = time.perf_counter()
    index = fp.read_index(folder)
    meta = {"title": "bench", "model": "smollm2", "kind": "CLT", "n_layers": N, "n_features": F,
            "layers": list(range(N)), "tokens": run["tokens"], "contexts": run["contexts"], "dense_threshold": 0.1,
            "per_layer": [{"layer": i, "dead": 0, "dense": 0, "mean_frequency": 0, "median_frequency": 0}
                          for i in range(N)], "logits_note": "", "graphs": []}
    write_browser(folder, meta, ((layer, fp.read_layer(folder, layer, index)) for layer in range(N)))
    browser_s = time.perf_counter() - t
    browser_bytes = _dir_bytes(folder) - binary["bytes"]
    return {"F": F, "tokens": tokens, "l0_per_layer": l0 / tokens, "forward_tok_s": tokens / forward_s,
            "pass_tok_s": run["tokens"] / run["seconds"], "pass_s": run["seconds"], "forward_s": forward_s,
            "logits_s": logits_s, "records_s": records_s, "json_s": json_s, "browser_s": browser_s,
            "binary_bytes": binary["bytes"], "json_bytes": json_bytes, "browser_bytes": browser_bytes,
            "state_bytes": stats.state_bytes(), "peak_rss": peak_rss()}


def run_sizes(script: str, sizes: list[int], args: list[str]) -> list[dict]:
    """`script --one F *args` for each size F in a fresh process (its memory peak its own): the RESULT each prints."""
    rows = []
    for f in sizes:
        out = subprocess.run([sys.executable, script, "--one", str(f), *args], capture_output=True, text=True)
        line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
        if out.returncode or not line:
            raise SystemExit(f"F={f} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
        rows.append(json.loads(line[0][7:]))
        print(rows[-1], flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, nargs="+", default=[128, 1024])
    ap.add_argument("--contexts", type=int, default=128)
    ap.add_argument("--out", default=str(Path(__file__).with_name("features.md")))
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # one size in a fresh process (its memory peak is its own)
        with tempfile.TemporaryDirectory(prefix="cltrain-features-") as tmp:
            print("RESULT " + json.dumps(measure(a.one, a.contexts, Path(tmp))), flush=True)
        return 0
    rows = run_sizes(__file__, a.features, ["--contexts", str(a.contexts)])
    cpu = cpu_model()
    mb, gib = 1e6, 2 ** 30
    lines = ["# Feature pages: SmolLM2-135M (30 layers, D=576), CPU", "",
             f"Machine: {cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}. "
             f"`python benchmarks/features.py` ({a.contexts} held-out contexts of {CONTEXT} tokens, BOS not counted; "
             f"16 top and 20 sampled examples per feature, windows of 25 tokens; random CLTs with thresholds set for "
             f"~{L0} active features per layer and token; each size in a fresh process).", "",
             "| F per layer | features | plain forward (LM + CLT encode + decode) | feature-page pass | pass / forward "
             "| peak RSS (pass state) | top/bottom logits | records + binary layout | per-feature JSON | browser |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['F']} | {30 * r['F']:,} | {r['forward_tok_s']:.0f} tok/s | {r['pass_tok_s']:.0f} tok/s | "
            f"{r['forward_tok_s'] / r['pass_tok_s']:.2f}x the time | {r['peak_rss'] / gib:.2f} GiB "
            f"({r['state_bytes'] / mb:.0f} MB) | {r['logits_s']:.1f} s | {r['records_s']:.0f} s, "
            f"{r['binary_bytes'] / mb:.1f} MB | {r['json_s']:.0f} s, {r['json_bytes'] / mb:.0f} MB | "
            f"{r['browser_s']:.0f} s, {r['browser_bytes'] / mb:.0f} MB |")
    lines += ["", NOTE, "", "Raw figures: `" + json.dumps(rows) + "`", ""]
    Path(a.out).write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
