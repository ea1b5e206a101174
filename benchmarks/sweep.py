"""K dictionaries on one data pass (train/trainer.py) against K sequential runs, on the demo's activations
(demo_out/activations, written by `make demo` or `make sweep-demo`). Writes benchmarks/sweep.md.

    .venv/bin/python benchmarks/sweep.py [--data demo_out/activations] [--steps 60]

Measured: wall time (build included), training tokens/s (tokens each dictionary trains on, summed over
dictionaries, per second), and the shard bytes the loader decoded (every sample's tensors, counted
around the loader's read_shard; with 0 workers it runs in this process) -- what the shared loader
saves. (Local shards are mapped, not read(), so /proc/self/io rchar no longer counts them.)
"""
import argparse
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch


DECODED = [0]  # bytes of the samples the loader's read_shard handed out


def count_decoded_bytes():
    """Wrap the loader's read_shard so every sample it yields adds its tensors' bytes to DECODED."""
    from cltrain.train.data import loader
    from cltrain.train.data.shards import EmptySlot
    read_shard = loader.read_shard

    def counting(*args, **kwargs):
        for item in read_shard(*args, **kwargs):
            if not isinstance(item, EmptySlot):
                DECODED[0] += sum(t.nbytes for t in item if t is not None)
            yield item
    loader.read_shard = counting


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", default="demo_out/activations")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--features", default="128,256,512")
    p.add_argument("--out", default="benchmarks/sweep.md")
    args = p.parse_args()

    from cltrain.train.config import compose
    from cltrain.train.data import DatasetInfo
    from cltrain.train.trainer import train

    info = DatasetInfo.load(args.data)
    count_decoded_bytes()
    sizes = [int(f) for f in args.features.split(",")]
    common = [f"data.path={Path(args.data).resolve()}", f"steps={args.steps}", f"batch_tokens={args.batch_tokens}",
              "logger.mode=disabled", "progress=false", f"checkpoint_every={args.steps}", "log_every=20",
              "model.loss.lambda_s=5", "optim.lr=1e-3", "data.verify_upfront=false",
              "data.shuffle_buffer=4096", "data.num_workers=0"]  # small: the machine is shared
    work = Path(tempfile.mkdtemp(prefix="sweep-bench-"))
    results = {}
    try:
        dicts = "dictionaries=[" + ", ".join(f"{{model.n_features: {f}}}" for f in sizes) + "]"
        r0, t0 = DECODED[0], time.perf_counter()
        train(compose("train", common + [f"out_dir={work / 'multi'}", dicts]))
        results["one job, K dictionaries"] = (time.perf_counter() - t0, DECODED[0] - r0)
        r0, t0 = DECODED[0], time.perf_counter()
        for f in sizes:
            train(compose("train", common + [f"out_dir={work / f'seq{f}'}", f"model.n_features={f}"]))
        results["K sequential runs"] = (time.perf_counter() - t0, DECODED[0] - r0)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(results, flush=True)
    tokens = len(sizes) * args.steps * args.batch_tokens
    bytes_per_token = 2 * info.n_layers * info.d_model * torch.empty(0, dtype=info.torch_dtype).element_size()
    lines = [
        "# Several dictionaries per data pass",
        "",
        f"`benchmarks/sweep.py`: K={len(sizes)} CLTs (F = {', '.join(map(str, sizes))}) on "
        f"{Path(str(info.json_path)).parent.name} ({info.model}, N={info.n_layers}, D={info.d_model}, {info.dtype}), "
        f"{args.steps} steps x {args.batch_tokens} tokens each, lambda_s=5, CPU "
        f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}).",
        f"Data each dictionary trains on: {args.steps * args.batch_tokens * bytes_per_token / 2**20:.1f} MiB "
        f"of (x, y) activations.",
        "",
        "| mode | wall s | training tokens/s (all dictionaries) | shard bytes decoded |",
        "|---|---|---|---|",
    ]
    for mode, (sec, nbytes) in results.items():
        lines.append(f"| {mode} | {sec:.1f} | {tokens / sec:.0f} | {nbytes / 2**20:.1f} MiB |")
    (a, ra), (b, rb) = results.values()
    lines += ["", f"One job: {b / a:.2f}x the throughput of sequential runs; it decoded {ra / 2**20:.1f} MiB "
                  f"of shards against {rb / 2**20:.1f} MiB ({(1 - ra / max(rb, 1)):.0%} less)."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
