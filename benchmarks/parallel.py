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

Part 0 (issue 26; `python benchmarks/parallel.py --memory`, which rewrites only that section): per-rank
memory against the ideal share (the rank's parameters, gradients and Adam state -- the whole CLT's / FP --
plus the step's activations) for FP = 1, 2, 4 x DP = 1, 2 with default settings (ZeRO-1, one loader
worker), and the headline case N=30, D=576, F=2048, FP=4, batch_tokens=128 with every other setting
at its default under a 4 GiB cap per process (`--headline`: run it alone, it needs 4 x 4 GiB). Section 0 is
rewritten with what this invocation measured: `--memory --headline` for both parts (either flag alone leaves
the other part out of the section).
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


def _params(F: int) -> int:
    return F * D * N + F * D * N * (N + 1) // 2 + 2 * N * F + N * D


def _ideal(F: int, fp: int, batch_tokens: int) -> int:
    sys.path.insert(0, str(REPO))
    from cltrain.train.memory import ideal_share

    local = (_params(F) - N * D) // fp + N * D
    return ideal_share(local, N, D, F // fp, batch_tokens, "fp32")


def _memory_row(name: str, out: Path, proc, F: int, fp: int, B: int) -> str:
    if proc.returncode:
        return f"| {name} | failed (exit {proc.returncode}): `{last_error(proc)}` | | | | | | |"
    reps = memory_reports(out)
    ideal = _ideal(F, fp, B)
    est = max(r["estimate_total"] for r in reps)
    hwm = max(r["peak_rss_bytes"] for r in reps)
    state = max(r["state_bytes"] for r in reps)
    act = max(r["estimate"]["activations"] for r in reps)
    loader = max(r["estimate"]["loader"] for r in reps)
    grads = ((_params(F) - N * D) // fp + N * D) * 4  # fp32 gradients of the slice (freed after each step)
    return (f"| {name} | {gib(est)} | {gib(hwm)} | {gib(ideal)} | {hwm / ideal:.2f} | "
            f"{(state + grads + act) / ideal:.2f} | {gib(loader)} | {est / ideal:.2f} |")


MEMORY_HEADER = ["| layout (ranks) | estimate per rank | measured VmHWM per rank (max) | ideal share | "
                 "VmHWM / ideal | (measured params + optimizer state, + gradients and activations) / ideal | "
                 "loader (estimate) | estimate / ideal |", "|---|---|---|---|---|---|---|---|"]


def part0(lines: list[str]):
    F, B = 256, 128
    data = WORK / "ds-mem"
    if not (data / "dataset.json").is_file():
        sys.path.insert(0, str(REPO))
        from cltrain.train.data import write_synthetic_dataset
        write_synthetic_dataset(data, n_layers=N, d_model=D, n_tokens=16384, tokens_per_sample=64,
                                shard_tokens=2048, seed=0)
    # default settings except the data set, its 4096-token window (the dataset holds 16384 tokens) and a
    # short run; data.num_workers stays at its default (1)
    common = [f"data.path={data}", f"model.n_features={F}", "steps=6", f"batch_tokens={B}", "checkpoint_every=100",
              "data.shuffle_buffer=4096", "data.num_workers=1"]
    lines += ["## 0. Memory per rank against the ideal share (issue 26)", "",
              f"Ideal share: the rank's parameters, gradients and Adam's two moments (the whole CLT's divided by "
              f"FP; fp32) plus the step's activations (memory.py's activation term). Each row trains 6 steps of a "
              f"CLT of N={N}, D={D}, F={F} ({_params(F) / 1e6:.0f}M parameters), batch_tokens={B}, "
              f"data.shuffle_buffer=4096 (a 0.26 GiB window), otherwise default settings: `deepspeed=zero1` (run "
              f"as stage 0 with one replica), `data.num_workers=1`; DP=2 rows with ZeRO-1 and ZeRO-2. VmHWM "
              f"includes the interpreter, torch and DeepSpeed (~0.6-0.75 GiB per process, not in the ideal) "
              f"and the rank's part of the shuffle window; the column after the ratio leaves both out.", "",
              *MEMORY_HEADER]
    grid = [("FP=1 x DP=1 (1)", 1, 1, []), ("FP=2 x DP=1 (2)", 2, 2, ["parallel.feature_parallel=2"]),
            ("FP=4 x DP=1 (4)", 4, 4, ["parallel.feature_parallel=4"]),
            ("FP=1 x DP=2, ZeRO-1 (2)", 2, 1, []), ("FP=1 x DP=2, ZeRO-2 (2)", 2, 1, ["deepspeed=zero2"]),
            ("FP=2 x DP=2, ZeRO-1 (4)", 4, 2, ["parallel.feature_parallel=2"]),
            ("FP=2 x DP=2, ZeRO-2 (4)", 4, 2, ["parallel.feature_parallel=2", "deepspeed=zero2"]),
            ("FP=4 x DP=2, ZeRO-1 (8)", 8, 4, ["parallel.feature_parallel=4"])]
    for name, nproc, fp, extra in grid:
        out = WORK / f"mem-{nproc}-{fp}-{len(extra)}"
        shutil.rmtree(out, ignore_errors=True)
        p = train(nproc, out, *common, *extra)
        lines.append(_memory_row(name, out, p, F, fp, B))
        print(lines[-1], flush=True)
    lines.append("")


def headline(lines: list[str]):
    F, B, cap = 2048, 128, 4 * GiB
    data = WORK / "ds-head"
    if not (data / "dataset.json").is_file():
        sys.path.insert(0, str(REPO))
        from cltrain.train.data import write_synthetic_dataset
        write_synthetic_dataset(data, n_layers=N, d_model=D, n_tokens=2 * 16384, tokens_per_sample=64,
                                shard_tokens=8192, seed=0)
    out = WORK / "headline"
    shutil.rmtree(out, ignore_errors=True)
    p = train(4, out, f"data.path={data}", f"model.n_features={F}", "steps=4", f"batch_tokens={B}",
              "parallel.feature_parallel=4", "log_every=1", cap=cap)
    lines += [f"Headline: N={N}, D={D}, F={F} ({_params(F) / 1e6:.0f}M parameters), FP=4, batch_tokens={B}, "
              f"every other setting at its default (ZeRO-1 configured, data.shuffle_buffer=16384, "
              f"data.num_workers=1), `prlimit --data={cap}` (4 GiB) on every process, 4 steps: exit code "
              f"{p.returncode} in {p.seconds:.0f} s.", "", *MEMORY_HEADER, _memory_row("FP=4 x DP=1 (4)", out, p, F, 4, B),
              ""]


def gpu_estimates(lines: list[str], F: int = 2048, B: int = 128):
    """The start-up estimate on a GPU (bf16, device memory: no loader, no host runtime) against the ideal
    share in bf16 (weights and gradients in bf16, fp32 master and two moments), on paper."""
    sys.path.insert(0, str(REPO))
    from cltrain.train.memory import estimate_rank_memory, ideal_share

    lines += [f"GPU estimate (train/memory.py with on_gpu=True, precision=bf16; not measured here), N={N}, D={D}, "
              f"F={F}, batch_tokens={B}: in bf16 the fp32 master copy is part of the ideal optimizer state, and "
              f"one replica keeps ZeRO-1 (stage 0 bf16 is refused), whose fp32 gradient partition is the excess.", "",
              "| layout | ZeRO | estimate per GPU (GiB) | ideal share (GiB) | estimate / ideal |", "|---|---|---|---|---|"]
    for fp in (1, 2, 4):
        for dp, stage in ((1, 1), (2, 1), (2, 2)):
            local = (_params(F) - N * D) // fp + N * D
            est = estimate_rank_memory(local, N * D, N, D, F // fp, dp, stage, "bf16", B, 16384, 1, True,
                                       window_parts=fp)
            ideal = ideal_share(local, N, D, F // fp, B, "bf16")
            lines.append(f"| FP={fp} x DP={dp} | {stage} | {gib(est.total)} | {gib(ideal)} | {est.total / ideal:.2f} |")
    lines.append("")


def splice(section: list[str]):
    """Replace (or insert before section 1) the "## 0." section of benchmarks/parallel.md."""
    text = OUT.read_text() if OUT.exists() else "# Feature parallelism: memory and scale\n\n"
    head, sep, rest = text.partition("## 0. ")
    if sep:
        rest = rest[rest.index("\n## 1. ") + 1:] if "\n## 1. " in rest else ""
    else:
        head, sep1, rest = text.partition("## 1. ")
        rest = sep1 + rest
    OUT.write_text(head + "\n".join(section) + "\n" + rest)


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
    if "--memory" in sys.argv or "--headline" in sys.argv:
        stamp = (f"Measured by `python benchmarks/parallel.py {' '.join(sys.argv[1:])}` on "
                 f"{time.strftime('%Y-%m-%d')}, {platform.node()}: {os.cpu_count()} cores, torch "
                 f"{__import__('torch').__version__} (CPU), gloo; other agents' processes shared the machine.")
        section = []
        if "--memory" in sys.argv:
            part0(section)
        if "--headline" in sys.argv:
            headline(section)
        gpu_estimates(section)
        section.insert(2, stamp + "\n") if section and section[0].startswith("## 0.") else \
            section.insert(0, stamp + "\n")
        if not section[0].startswith("## 0."):
            section.insert(0, "## 0. Memory per rank against the ideal share (issue 26)\n")
        splice(section)
        print(f"wrote {OUT} (section 0)", flush=True)
        return
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
    for part in (part0, headline, gpu_estimates, part1, part2, part3):
        part(lines)
        OUT.write_text("\n".join(lines) + "\n")
        print(f"wrote {OUT} ({part.__name__})", flush=True)


if __name__ == "__main__":
    main()
