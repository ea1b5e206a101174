"""Feature parallelism at scale, measured on this machine and projected to a cluster: writes
benchmarks/parallel.md.

    python benchmarks/parallel.py                 # (make bench-parallel) about 15 minutes on 2 cores

Part 1, "the proof that it is large": a CLT on SmolLM2-135M-shaped activations (N=30, D=576) with
F=1536 features per layer (438M parameters) needs 2.3 times the per-process memory cap we set with
`prlimit --data` (RLIMIT_DATA: the kernel counts every private writable mapping of the process, so torch
gets a clean "cannot allocate memory" instead of the OOM killer; every rank inherits the cap from the
launcher). FP=1 must refuse at start-up with the estimate and the cap named; FP=4 under the same cap
trains 20 steps and checkpoints; FP=2 with 2.5 times the cap resumes it; clt-export streams it under the
first cap. Peak RSS (VmHWM) per rank and phase comes from OUT/memory/rank-N.json.

Part 2: step time, bytes all-reduced per step and peak memory per rank for FP = 1, 2, 4 and ZeRO-3
over DP=2 at a shape that fits one process.

Part 3: a projection (on paper, labelled as such) for a Gemma-2-2B-sized CLT on 8, 64 and 512 H100s.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "parallel.md"
WORK = Path(os.environ.get("CLTRAIN_BENCH_DIR", "/tmp/cltrain-bench-parallel"))
GiB = 2 ** 30
N, D = 30, 576


def sh(cmd: list[str], cap: int | None = None, timeout=1800) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", WANDB_MODE="disabled")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    if cap is not None:
        cmd = ["prlimit", f"--data={cap}", *cmd]
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    proc.seconds = time.perf_counter() - t
    return proc


def train(nproc: int, out: Path, *args, cap=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           "-m", "cltrain.train.trainer", f"data.path={WORK / 'ds'}", f"out_dir={out}", "logger.mode=disabled",
           "progress=false", "data.num_workers=0", "data.heldout_shards=0", "log_every=5", *args]
    return sh(cmd, cap)


def memory_reports(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "memory").glob("rank-*.json"))]


def gib(b) -> str:
    return "-" if b is None else f"{b / GiB:.2f}"


def last_error(proc) -> str:
    text = (proc.stdout + proc.stderr).splitlines()
    ours = [ln for ln in text if "clt-train: error" in ln]
    other = [ln for ln in text if "Error:" in ln and "ChildFailedError" not in ln]
    return (ours or other or text[-1:] or ["?"])[0]


def metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def part1(lines: list[str]):
    # 3.5 GiB: each rank also carries ~0.75 GiB of interpreter, torch and DeepSpeed, and its step's
    # temporaries; four ranks of this size are what the 24 GiB machine holds beside other work
    cap = int(3.5 * GiB)
    F = 1536
    # ZeRO-0: with one data-parallel replica ZeRO-1/2 would only add an fp32 master copy and an fp32
    # gradient copy of every parameter (2 x 4 bytes each); stage 0 keeps weights, gradients and Adam's
    # moments, 16 bytes per parameter
    common = [f"model.n_features={F}", "steps=25", "batch_tokens=256", "checkpoint_every=20",
              "data.shuffle_buffer=1024", "deepspeed=zero0"]
    params = F * D * N + F * D * N * (N + 1) // 2 + 3 * N * F + N * D
    lines += ["## 1. A CLT larger than the per-process memory cap", "",
              f"CLT: N={N}, D={D}, F={F} per layer: {params / 1e6:.0f}M parameters ({params * 4 / GiB:.2f} GiB "
              f"in fp32); weights + gradients + two Adam moments (ZeRO-0, fp32): "
              f"{params * 16 / GiB:.1f} GiB, plus the step's activations. Cap: `prlimit --data={cap}` ({cap / GiB:.1f} GiB) on every process "
              f"(RLIMIT_DATA counts all private writable memory: heap, anonymous mmaps, torch's allocations; "
              f"file-backed read-only mappings such as safetensors reads do not count).", ""]
    shutil.rmtree(WORK / "fp1", ignore_errors=True)
    p = train(1, WORK / "fp1", *common, cap=cap)
    lines += [f"- FP=1 under the cap: exit code {p.returncode} after {p.seconds:.1f} s: `{last_error(p)}`"]
    shutil.rmtree(WORK / "fp4", ignore_errors=True)
    p = train(4, WORK / "fp4", *common, "parallel.feature_parallel=4", "stop_at_step=20", cap=cap)
    ok4 = p.returncode == 0
    lines += [f"- FP=4 under the same cap: exit code {p.returncode}, 20 steps + checkpoint in {p.seconds:.0f} s"
              + ("" if ok4 else f": `{last_error(p)}`")]
    rows = [("FP=4, cap 3.5 GiB", r) for r in memory_reports(WORK / "fp4")] if ok4 else []
    if ok4:
        shutil.rmtree(WORK / "fp2", ignore_errors=True)
        ckpt = WORK / "fp4" / "checkpoints" / "step-000020"
        p = train(2, WORK / "fp2", *common, f"resume={ckpt}", "parallel.feature_parallel=2", cap=int(2.5 * cap))
        lines += [f"- FP=2 with 2.5 times the cap resumes the FP=4 checkpoint and trains steps 21 to 25: exit code "
                  f"{p.returncode} in {p.seconds:.0f} s" + ("" if p.returncode == 0 else f": `{last_error(p)}`")]
        rows += [("FP=2, cap 8.75 GiB (resumed)", r) for r in memory_reports(WORK / "fp2")]
        shutil.rmtree(WORK / "export", ignore_errors=True)
        t0 = time.perf_counter()
        p = sh(["/usr/bin/time", "-v", sys.executable, "-m", "cltrain.train.export",
                f"model_dir={WORK / 'fp4' / 'model'}", f"out_dir={WORK / 'export'}"], cap)
        hwm = [ln for ln in p.stderr.splitlines() if "Maximum resident" in ln]
        peak = int(hwm[0].split()[-1]) * 1024 if hwm else None
        lines += [f"- clt-export of the FP=4 model under the 3.5 GiB cap: exit code {p.returncode} in "
                  f"{time.perf_counter() - t0:.0f} s, peak RSS {gib(peak)} GiB (it reads one layer at a time)"]
    lines += ["", "Peak RSS per rank (VmHWM, GiB) by phase, and what the rank holds:", "",
              "| run | rank | start-up | steps | checkpoint | params + optimizer state | estimate |",
              "|---|---|---|---|---|---|---|"]
    for name, r in rows:
        ph = r.get("peak_rss_by_phase", {})
        lines.append(f"| {name} | {r['rank']} | {gib(ph.get('startup'))} | {gib(ph.get('steps'))} | "
                     f"{gib(ph.get('checkpoint'))} | {gib(r['state_bytes'])} | {gib(r['estimate_total'])} |")
    lines.append("")


def part2(lines: list[str]):
    F, B = 256, 512
    common = [f"model.n_features={F}", "steps=15", f"batch_tokens={B}", "checkpoint_every=100",
              "data.shuffle_buffer=1024"]
    runs = [("FP=1", 1, ["deepspeed=zero1"]), ("FP=2", 2, ["parallel.feature_parallel=2", "deepspeed=zero1"]),
            ("FP=4", 4, ["parallel.feature_parallel=4", "deepspeed=zero1"]),
            ("ZeRO-3, DP=2", 2, ["deepspeed=zero3"])]
    lines += ["## 2. Step time, communication and memory per rank by layout", "",
              f"N={N}, D={D}, F={F}, {B} tokens per step per replica, fp32, 2 cores shared by all ranks (so "
              f"step time grows with ranks here: the point is memory and bytes, not speed). All-reduce per step "
              f"(FP): the partial reconstruction, B*N*D fp32 = {B * N * D * 4 / 2**20:.1f} MiB, whatever F.", "",
              "| layout | ranks | s/step (last 10 steps) | all-reduced per step | peak RSS per rank (GiB) | "
              "params + optimizer per rank (GiB) |", "|---|---|---|---|---|---|"]
    for name, nproc, extra in runs:
        out = WORK / f"layout-{nproc}-{extra[-1].replace('=', '-')}"  # no '=' in a Hydra override's value
        shutil.rmtree(out, ignore_errors=True)
        p = train(nproc, out, *common, *extra)
        if p.returncode:
            lines.append(f"| {name} | {nproc} | failed: `{last_error(p)}` | | | |")
            continue
        m = metrics(out)
        per_step = sum(r["time/" + k] for r in m[-2:] for k in
                       ("data", "encode", "decode", "comm", "backward", "optimizer")) / 2
        reps = memory_reports(out)
        comm = f"{B * N * D * 4 / 2**20:.1f} MiB" if "feature_parallel" in extra[0] else (
            "gradients + parameters (ZeRO-3)" if "zero3" in extra[-1] else "none")
        lines.append(f"| {name} | {nproc} | {per_step:.2f} | {comm} | "
                     f"{max(r['peak_rss_bytes'] for r in reps) / GiB:.2f} | "
                     f"{max(r['state_bytes'] for r in reps) / GiB:.3f} |")
    lines.append("")


def part3(lines: list[str]):
    """On paper: Gemma-2-2B-sized CLT, H100s. Compute from the encoder floor (6 B D F N FLOPs per step,
    sparse decode ~1% of dense) at an assumed MFU; FP all-reduce over NVLink; DP gradient all-reduce and
    ZeRO-3 gathers over InfiniBand."""
    n, d = 26, 2304
    flops = 800e12 * 0.5  # bf16 dense peak ~800 TFLOP/s (measured on this project's lent H100s), 50% MFU assumed
    nvlink = 450e9  # bytes/s per GPU per direction (H100 SXM NVLink 4: 900 GB/s bidirectional)
    ib = 50e9  # bytes/s per GPU (400 Gb/s NDR InfiniBand per GPU)
    batches = (8192, 65536)  # tokens per step per data-parallel replica
    lines += ["## 3. Projection: a Gemma-2-2B-sized CLT on H100s (on paper, not measured)", "",
              f"N={n}, D={d}, bf16 weights and activations, B tokens per step per data-parallel replica (each "
              f"FP group, or each GPU under ZeRO-3). Compute: the encoder floor 6*B*D*F*N FLOPs per step (the "
              f"sparse decode adds ~2% at 1% firing) at 50% of 800 TFLOP/s; FP all-reduce of B*N*D bf16 values "
              f"inside a node over NVLink ({nvlink / 1e9:.0f} GB/s, ring: 2(P-1)/P of the data); DP gradient "
              f"all-reduce of each rank's parameters (bf16) over InfiniBand ({ib / 1e9:.0f} GB/s per GPU), "
              f"overlapped with the backward pass (only the excess counts); ZeRO-3: all-gather the parameters "
              f"twice and reduce-scatter the gradients every step, 3x the parameters in bf16 over InfiniBand "
              f"(each GPU moves (G-1)/G of it; its 8-GPU case runs over NVLink). State per GPU: bf16 weights and "
              f"gradients plus fp32 master and Adam moments, the latter sharded over data parallel (ZeRO-1).", "",
              "Each cell: step time, compute / (compute + exposed communication), and tokens per second per "
              "GPU (the fair comparison: an FP group of 8 GPUs shares one batch, a ZeRO-3 GPU has its own).", "",
              "| F per layer | GPUs | layout | params/GPU | state/GPU | B=8k per replica | B=64k per replica |",
              "|---|---|---|---|---|---|---|"]
    for F in (16384, 65536):
        params = n * F * d * 2 + F * d * n * (n + 1) // 2
        for gpus in (8, 64, 512):
            for mode in ("FP=8 x DP", "ZeRO-3"):
                cells = []
                for tokens in batches:
                    if mode.startswith("FP"):
                        P, dp = min(8, gpus), gpus // min(8, gpus)
                        p_gpu = params / P
                        compute = 6 * tokens * d * F * n / P / flops
                        fp_comm = 2 * (P - 1) / P * tokens * n * d * 2 / nvlink
                        dp_comm = (2 * (dp - 1) / dp * p_gpu * 2 / ib) if dp > 1 else 0.0
                        comm = fp_comm + max(0.0, dp_comm - compute)
                        state = p_gpu * 4 + p_gpu * 12 / dp
                    else:
                        p_gpu = params / gpus
                        compute = 6 * tokens * d * F * n / flops
                        link = nvlink if gpus <= 8 else ib
                        comm = 3 * (gpus - 1) / gpus * params * 2 / link
                        state = params * 16 / gpus
                    step = compute + comm
                    per_gpu = tokens / (min(8, gpus) if mode.startswith("FP") else 1) / step
                    cells.append(f"{step:.3f} s, {compute / step:.0%}, {per_gpu / 1e3:.0f}k tok/s")
                fits = "" if state < 75 * GiB else " (over an H100's 80 GB)"
                lines.append(f"| {F} | {gpus} | {mode} | {p_gpu / 1e9:.2f} B | {state / GiB:.1f} GiB{fits} | "
                             + " | ".join(cells) + " |")
    lines += ["", "Reading: feature parallelism communicates B*N*D values per step whatever F is, so a "
              "large dictionary costs it nothing extra in communication; ZeRO-3 moves the whole parameter "
              "set over the slower inter-node network every step, which dominates as soon as F is large "
              "(it only wins for CLTs that nearly fit one GPU, where FP's all-reduce is not needed at all). "
              "Past one node, FP=8 x DP adds the data-parallel gradient all-reduce of each rank's slice, "
              "which hides behind the backward pass once the batch per replica is large enough (B=64k); at "
              "B=8k it dominates past one node. Efficiency here is compute / (compute + exposed communication).", ""]


def main():
    WORK.mkdir(parents=True, exist_ok=True)
    if not (WORK / "ds" / "dataset.json").is_file():
        sys.path.insert(0, str(REPO))
        from cltrain.train.data import write_synthetic_dataset
        write_synthetic_dataset(WORK / "ds", n_layers=N, d_model=D, n_tokens=16384, tokens_per_sample=64,
                                shard_tokens=2048, seed=0)
    lines = ["# Feature parallelism: memory and scale", "",
             f"Measured by `python benchmarks/parallel.py` on {time.strftime('%Y-%m-%d')}, {platform.node()}: "
             f"{os.cpu_count()} cores, Python {platform.python_version()}, torch "
             f"{__import__('torch').__version__} (CPU), gloo; synthetic activations of SmolLM2-135M's shape. "
             f"Other processes may have been running: timings are indicative, memory figures are per process.", ""]
    for part in (part1, part2, part3):
        part(lines)
        OUT.write_text("\n".join(lines) + "\n")
        print(f"wrote {OUT} ({part.__name__})", flush=True)


if __name__ == "__main__":
    main()
