"""What the per-file sha256 of checkpoints costs, at the demo's CLT shape (SmolLM2-135M: N=30, D=576,
F=128 per layer), CPU: one training run writes checkpoints, then this times, in one run,
- save: a whole checkpoint written (the hash is computed on the bytes as they are written), and the same
  bytes hashed alone in memory (the share of the save that hashing is);
- load: the sha256 check of every file a resume reads, against reading the files (a resume reads them).

    .venv/bin/python benchmarks/checkpoint_hash.py [--features 128] [--repeats 3]

Writes benchmarks/checkpoint_hash.md.
"""
import argparse
import hashlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from cltrain.train import trainer
from cltrain.train.checkpoint import read_trainer_state, verify_hashes
from cltrain.train.config import compose
from cltrain.machine import cpu_model as cpu_name
from cltrain.train.data import write_synthetic_dataset


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cltrain-hash-") as tmp:
        tmp = Path(tmp)
        write_synthetic_dataset(tmp / "ds", n_layers=30, d_model=576, n_tokens=1024, tokens_per_sample=64,
                                shard_tokens=512, seed=0)
        cfg = compose("train", [f"data.path={tmp / 'ds'}", f"out_dir={tmp / 'run'}", f"model.n_features={a.features}",
                                "steps=2", "batch_tokens=256", "checkpoint_every=1", "keep_checkpoints=0",
                                "logger.mode=disabled", "progress=false", "log_every=100", "data.num_workers=0",
                                "data.shuffle_buffer=256", "data.heldout_shards=0"])
        t = trainer.Trainer.build(cfg)
        try:
            t.fit()
            saves = []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                (path,) = t.save()
                saves.append(time.perf_counter() - t0)
        finally:
            t.close()
        state = read_trainer_state(path)
        names = sorted(state["files"])
        total = sum(int(v["bytes"]) for v in state["files"].values())
        blob = torch.randn(total // 4).numpy().tobytes()
        hash_mem, verify, read = [], [], []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            hashlib.sha256(blob).hexdigest()
            hash_mem.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            verify_hashes(path, state, names)
            verify.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            for n in names:
                (path / n).read_bytes()
            read.append(time.perf_counter() - t0)
    med = statistics.median
    rows = [
        ("checkpoint size", f"{total / 2**20:.0f} MiB in {len(names)} files"),
        ("save (whole checkpoint, hashes included)", f"{med(saves):.2f} s"),
        ("hashing the same bytes in memory", f"{med(hash_mem):.2f} s ({med(hash_mem) / med(saves):.0%} of the save)"),
        ("sha256 check of every file on load", f"{med(verify):.2f} s"),
        ("reading the same files (page cache)", f"{med(read):.2f} s"),
    ]
    text = ["# Checkpoint hashes: what they cost", "",
            f"`benchmarks/checkpoint_hash.py --features {a.features}` on {cpu_name()} ({torch.get_num_threads()} "
            f"threads), torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}. "
            f"The demo's CLT shape: N=30, D=576, F={a.features} per layer; medians of {a.repeats}.", "",
            "| what | figure |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    out = Path(__file__).with_name("checkpoint_hash.md")
    out.write_text("\n".join(text))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
