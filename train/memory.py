"""How much memory a rank of a run will need, and how much it has: checked before anything is allocated,
so a CLT that does not fit stops at start-up with the estimate and the limit named, instead of being
killed by the kernel's out-of-memory killer hours later (or silently at start).

The estimate counts what the layout leaves on one rank (docs/design.md section 3): this rank's feature slice of
the parameters, their gradients, DeepSpeed's fp32 master partition and Adam's two moments (ZeRO shards
the last ones over the data-parallel group), the step's activations ([B, N, F/P] tensors and [B, N, D]
ones) and the loader's shuffle window. benchmarks/parallel.md compares it with measured peaks.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from .engine import bucket_elements as _bucket_elements
from .engine import run_stage

GiB = 2 ** 30
# Interpreter, torch, DeepSpeed and their allocator pools before any tensor of ours (measured on CPU).
RUNTIME_BYTES = int(0.75 * GiB)
# Live [B, N, F_local] float tensors at the peak of a step: pre-activations, activations and their
# gradients, the straight-through window's terms and the backward's temporaries (measured: the peak
# of a CPU step at default settings, benchmarks/parallel.md).
STEP_FEATURE_TENSORS = 12


@dataclass
class MemoryEstimate:
    params: int
    grads: int
    master: int
    moments: int
    activations: int
    loader: int
    runtime: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.master + self.moments + self.activations + self.loader + self.runtime

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GiB:.2f}" for k in
                          ("params", "grads", "master", "moments", "activations", "loader", "runtime"))
        return f"{self.total / GiB:.2f} GiB ({parts} GiB)"


def estimate_rank_memory(local_params: int, replicated_params: int, n_layers: int, d_model: int,
                         local_features: int, dp_size: int, zero_stage: int, precision: str,
                         batch_tokens: int, window_tokens: int, n_workers: int, on_gpu: bool,
                         bucket_elements: int | None = None, generator_bytes: int = 0,
                         window_parts: int = 1, live: bool = False) -> MemoryEstimate:
    """Bytes one rank needs. local_params: elements of this rank's slice (sharded + replicated);
    replicated_params: the part every rank holds whole (b_dec); zero_stage: the configured stage (the
    engine runs engine.run_stage of it: 0 in fp32 with one replica); generator_bytes: live activations'
    base model copies (train/live.py: one per generation process, or one in the training process);
    window_parts: how many ranks share one shuffle window (a feature-parallel group reading shards holds
    1/P of it per rank, train/data/loader.py; live windows are whole on every rank, and each generation
    process hands over a prefetched one)."""
    bf16 = precision == "bf16"
    zero_stage = run_stage(zero_stage, dp_size, precision)
    if bucket_elements is None:
        bucket_elements = _bucket_elements(local_params, dp_size)
    weight_bytes = 2 if bf16 else 4
    p = local_params
    shard = lambda n, stage: n / dp_size if zero_stage >= stage else n  # noqa: E731
    params = shard(p, 3) * weight_bytes
    # ZeRO-1/2 reduce gradients through two bucket buffers (config: deepspeed.reduce_bucket_size) and
    # step the optimizer on an fp32 copy of this replica's gradient partition
    grads = shard(p, 2) * weight_bytes
    if zero_stage in (1, 2):
        grads += 2 * bucket_elements * 4 + shard(p, 1) * 4
    elif zero_stage == 0 and dp_size > 1:
        grads += p * weight_bytes  # the flattened copy DeepSpeed all-reduces over data parallel
    # DeepSpeed keeps an fp32 master partition beside the module's weights whenever it wraps the
    # optimizer (ZeRO >= 1, or bf16); plain fp32 at ZeRO-0 updates the weights in place.
    master = shard(p, 1) * 4 if (zero_stage >= 1 or bf16) else 0
    moments = shard(p, 1) * 8
    B, N, D, F = batch_tokens, n_layers, d_model, local_features
    act_bytes = 2 if bf16 else 4
    activations = STEP_FEATURE_TENSORS * B * N * F * act_bytes + 8 * B * N * D * 4
    # The window being served, x and y in bf16 (on the host even for GPU runs): this rank's 1/window_parts
    # of it (each sample mapped on its own), plus the batch being assembled and the one being trained on.
    # Shard workers read ahead by reference (SampleRef): the next window's pages are mapped in their own
    # processes (page cache, shared by the group's workers), not in this one. Live generation processes
    # hand over whole windows: one prefetched per process.
    window = window_tokens * N * D * 2 * 2
    loader = window / max(window_parts, 1) * (2 if live and n_workers > 0 else 1) + 2 * B * N * D * 2 * 2
    if on_gpu:
        loader = 0  # host memory, not the device's
        # live generation in the training process puts the base model on the device
        activations += generator_bytes if n_workers == 0 else 0
    else:
        loader += generator_bytes
    return MemoryEstimate(int(params), int(grads), int(master), int(moments), int(activations), int(loader),
                          0 if on_gpu else RUNTIME_BYTES)


def ideal_share(local_params: int, n_layers: int, d_model: int, local_features: int, batch_tokens: int,
                precision: str) -> int:
    """Issue 26's yardstick: this rank's parameters, gradients and optimizer state (Adam's two moments,
    and the fp32 master copy in bf16) -- the whole CLT's divided by the feature-parallel size -- plus
    the step's activations. No runtime, no loader."""
    bf16 = precision == "bf16"
    w = 2 if bf16 else 4
    state = local_params * (w + w + 8 + (4 if bf16 else 0))
    act = STEP_FEATURE_TENSORS * batch_tokens * n_layers * local_features * w + 8 * batch_tokens * n_layers * d_model * 4
    return int(state + act)


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 1 << 60:
            return int(text)
    return None


def _proc_kib(path: str, key: str) -> int | None:
    """A "Key:  N kB" line of a /proc file, in bytes; None where it cannot be read."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_available() -> int | None:
    return _proc_kib("/proc/meminfo", "MemAvailable")


def memory_limit(device: torch.device, local_ranks: int) -> tuple[int | None, str]:
    """(bytes this process may use, where that limit comes from). CPU: the smallest of this process's
    address-space / data rlimit, the cgroup limit and the machine's available memory, the shared ones
    split between the ranks on this machine; CUDA: the device's free memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    limits = []
    for name, which in (("RLIMIT_AS", resource.RLIMIT_AS), ("RLIMIT_DATA", resource.RLIMIT_DATA)):
        soft, _ = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY:
            limits.append((soft, f"{name} of this process (prlimit/ulimit)"))
    cg = _cgroup_limit()
    if cg is not None:
        limits.append((cg // max(local_ranks, 1), f"cgroup memory limit / {local_ranks} local rank(s)"))
    avail = _mem_available()
    if avail is not None:
        limits.append((avail // max(local_ranks, 1), f"available memory / {local_ranks} local rank(s)"))
    if not limits:
        return None, "unknown"
    return min(limits)


def peak_rss() -> int | None:
    """This process's peak resident memory (VmHWM), in bytes; None where /proc is not available."""
    return _proc_kib("/proc/self/status", "VmHWM")


def reset_peak_rss():
    """Start a new VmHWM window (Linux: writing 5 to /proc/self/clear_refs), so each phase's peak can be
    read on its own; a no-op where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


class PhasePeaks:
    """Peak RSS per phase of a run (start-up, steps, checkpoint), for OUT/memory/rank-N.json."""

    def __init__(self):
        self.peaks: dict[str, int] = {}

    def end(self, phase: str):
        rss = peak_rss()
        if rss is not None:
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
        reset_peak_rss()
