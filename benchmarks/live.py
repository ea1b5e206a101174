"""Live activations on SmolLM2-135M, CPU, in one run (writes benchmarks/live.md):

1. generation alone: the base model over text, windows shuffled and served (train/live.py, in-process);
2. training alone on in-memory batches: the same batches, already generated, through Trainer.train_step;
3. training on live data, generation in the training process (data.num_workers=0) and in one generation
   process (data.num_workers=1, with the cores split between the two);

at F = 256 and F = 1024 features per layer. Generation and training share the same cores, so the best a
live run can do is 1 / (1/generation + 1/training) tokens/s; the ratio to that bound is the figure of merit.
Memory: the training process's peak RSS (VmHWM) after the live steps, and the generation processes' own
(private) memory; each configuration runs in a fresh process.

    .venv/bin/python benchmarks/live.py [--features 256 1024] [--steps 6] [--out benchmarks/live.md]
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
from cltrain.train.config import compose
from cltrain.train.memory import peak_rss
from cltrain.train.trainer import Trainer

BATCH = 1024
WINDOW = 4096
NOTE = 'Each figure is one run of 8 steps, so they carry about ±10% noise (a live/bound above 1 is that noise). Generation in the training process reaches the bound: generation and training each use both cores in turn. One generation process beside training does no better on 2 cores (they contend for them), which is why `data.num_workers=0` is the default for `data=live`. Memory: the peak RSS is above the per-rank estimate the run prints (4.1 GiB at F=256, 10.2 GiB at F=1024, the base model and windows included); glibc keeps freed memory for reuse on CPU (kernels.retain_freed_cpu_memory), so the peak is what the process holds from then on.'


def _settings(features: int, workers: int, out: Path, steps: int) -> list[str]:
    return ["data=live", "data.live.base_model=smollm2", f"data.num_workers={workers}", f"data.shuffle_buffer={WINDOW}",
            f"model.n_features={features}", f"batch_tokens={BATCH}", f"steps={steps + 1}", "logger.mode=disabled",
            "progress=false", "log_every=1000", "checkpoint_every=100000", f"out_dir={out}", "kernels=auto"]


def _private_bytes(pid: int) -> int:
    """A process's own memory (private pages; a forked worker's pages shared with its parent not counted)."""
    try:
        lines = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    return sum(int(x.split()[1]) * 1024 for x in lines if x.startswith(("Private_Clean:", "Private_Dirty:")))


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(x) for x in out]


def measure(features: int, workers: int, steps: int, tmp: Path) -> dict:
    """One Trainer on live data (in this process): live steps after a warm-up step (tokens/s, then the
    process's peak RSS and its generation processes' private memory), then, in-process only, generation
    alone and training alone on the batches it made."""
    t = Trainer.build(compose("train", _settings(features, workers, tmp / f"f{features}-w{workers}", steps)))
    try:
        t.train_step([t.next_batch()])  # warm-up: first window, kernels, allocator
        res = {"threads": torch.get_num_threads()}
        t0 = time.perf_counter()
        for _ in range(steps):
            t.train_step([t.next_batch()])
        res["live"] = steps * BATCH / (time.perf_counter() - t0)
        res["rss_gib"] = (peak_rss() or 0) / 2**30
        res["workers_private_gib"] = sum(_private_bytes(c) for c in _children(os.getpid())) / 2**30
        if workers == 0:
            t0 = time.perf_counter()
            batches = [t.next_batch() for _ in range(steps)]
            res["generation"] = steps * BATCH / (time.perf_counter() - t0)
            pairs = [t.loader.to_training(b) for b in batches]
            t0 = time.perf_counter()
            for p in pairs:
                t.train_step([p])
            res["training"] = steps * BATCH / (time.perf_counter() - t0)
        return res
    finally:
        t.close()


def projection(rows) -> list[str]:
    """A GPU projection for Gemma-2-2B from FLOP and byte counts of the shapes (not measured on a GPU)."""
    # Gemma-2-2B: 26 layers, D = 2304, 2.61e9 parameters of which 0.59e9 the (tied) embedding, which the
    # forward only looks up; the capture stops after the last MLP, so the LM head is not run.
    n_layers, d_model, body_params = 26, 2304, 2.61e9 - 0.59e9
    gen_flops = 2 * body_params  # per token, attention over 128-token contexts adds < 2%
    peak = 989e12 * 0.5  # H100 SXM dense bf16, at 50% utilization for both models
    act_bytes = n_layers * d_model * 2 * 2  # x and y, bf16
    out = ["## A GPU projection: Gemma-2-2B on one H100 (from FLOP and byte counts, not measured)", "",
           f"Generation: the forward up to the last MLP, 2 x {body_params / 1e9:.2f}e9 = {gen_flops / 1e9:.1f} GFLOP "
           f"per token. A training step of a CLT with F features per layer: the encoder's 6 N D F FLOPs per token "
           f"(forward and both backward products; the sparse decode adds a share proportional to L0, small at "
           f"the paper's sparsity). Both at 50% of the H100's 989 TFLOP/s dense bf16; on one device the two "
           f"take turns (data.num_workers=0), so the live rate is the bound 1 / (1/g + 1/t).", "",
           "| F per layer | features | generation g | training t | live bound | shards instead: bytes per token, for 1e9 tokens | read rate the live bound would need from disk |",
           "|---|---|---|---|---|---|---|"]
    for f in (4096, 16384, 65536):
        train_flops = 6 * n_layers * d_model * f
        g, t = peak / gen_flops, peak / train_flops
        bound = 1 / (1 / g + 1 / t)
        out.append(f"| {f} | {f * n_layers / 1e6:.2f}M | {g / 1e3:.0f}k tok/s | {t / 1e3:.0f}k tok/s | "
                   f"{bound / 1e3:.0f}k tok/s | {act_bytes / 1e3:.0f} KB, {act_bytes * 1e9 / 1e12:.0f} TB | "
                   f"{bound * act_bytes / 1e9:.1f} GB/s |")
    g_cpu = {f: r["generation"] for f, w, r in rows if w == 0}
    t_cpu = {f: r["training"] for f, w, r in rows if w == 0}
    ratio = ", ".join(f"F={f}: training takes {g_cpu[f] / t_cpu[f]:.1f}x generation's time per token" for f in g_cpu)
    out += ["", f"On this CPU ({ratio}) the measured ratio is what the FLOP counts predict only roughly: SmolLM2's "
                f"forward is ~0.2 GFLOP per token, a step at F=1024 ~0.1 GFLOP in the encoder, but the CPU step runs "
                f"far from its FLOP rate (sparse products, optimizer, normalization). On a GPU both are matmul-bound, "
                f"which is what the projection assumes. Live generation keeps the activations on the device: "
                f"the shard alternative needs the disk and read rate in the last two columns."]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--features", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--out", default=str(Path(__file__).with_name("live.md")))
    ap.add_argument("--one", type=int, nargs=2, metavar=("F", "WORKERS"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:  # one configuration in a fresh process (its memory peak is its own)
        with tempfile.TemporaryDirectory(prefix="cltrain-live-") as tmp:
            print("RESULT " + json.dumps(measure(*a.one, a.steps, Path(tmp))), flush=True)
        return 0
    rows = []
    for f in a.features:
        for w in (0, 1):
            out = subprocess.run([sys.executable, __file__, "--one", str(f), str(w), "--steps", str(a.steps)],
                                 capture_output=True, text=True)
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
            if out.returncode or not line:
                raise SystemExit(f"F={f} workers={w} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            print(f"F={f} workers={w}: {r}", flush=True)
            rows.append((f, w, r))
    cpu = cpu_model()
    lines = ["# Live activations: SmolLM2-135M (30 layers, D=576), CPU", "",
             f"Machine: {cpu}, {len(os.sched_getaffinity(0))} cores, torch {torch.__version__}. "
             f"`python benchmarks/live.py` ({a.steps} steps of {BATCH} tokens after a warm-up step; windows of "
             f"{WINDOW} tokens; bf16 activations; kernels=auto).", "",
             "| F per layer | generation | data.num_workers | training alone | generation alone | bound 1/(1/g+1/t) | live | live / bound | peak RSS of the training process; generation processes' own memory |",
             "|---|---|---|---|---|---|---|---|---|"]
    # generation and training alone: from the in-process run, where nothing else runs beside each
    gen = {f: r["generation"] for f, w, r in rows if w == 0}
    train = {f: r["training"] for f, w, r in rows if w == 0}
    for f, w, r in rows:
        t, g = train[f], gen[f]
        bound = 1 / (1 / g + 1 / t)
        where = "in the training process" if w == 0 else "in 1 generation process"
        lines.append(f"| {f} | {where} | {w} | {t:.0f} tok/s | {g:.0f} tok/s | {bound:.0f} tok/s | {r['live']:.0f} tok/s | "
                     f"{r['live'] / bound:.2f} | {r['rss_gib']:.2f} GiB; {r['workers_private_gib']:.2f} GiB |")
    lines += ["", NOTE, "", *projection(rows)]
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
