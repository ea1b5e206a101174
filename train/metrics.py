"""What a run shows (docs/design.md section 6): step timers, dead/dense feature tracking, console + W&B output.

Only rank 0 prints and logs; the statistics that span ranks are reduced by the trainer before they
get here (or by FeatureStats.reduce, a collective).
"""
from __future__ import annotations

import json
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from cltrain.files import atomic_write_bytes

# The step-time split, per optimizer step. "comm" is the feature-parallel partial-sum all-reduce (taken
# out of "decode"); "backward" is its own phase: autograd interleaves the encode's and decode's
# backward, and DeepSpeed's data-parallel gradient reduction runs inside it (engine.backward), so it
# cannot be split further cheaply. "optimizer" is engine.step (clipping, Adam, ZeRO gathers).
PHASES = ("data", "encode", "decode", "comm", "backward", "optimizer")


class StepTimer:
    """Wall time per phase, summed until `take()`, on the steps where `active` is set. The trainer keeps
    it on for every step on CPU (free) and only for reported steps on CUDA, where a phase boundary must
    synchronize the device (which would otherwise serialize every step)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.active = True
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.current: str | None = None  # the phase running now (named when a collective times out)

    @contextmanager
    def phase(self, name: str):
        self.current = name
        if not self.active:
            try:
                yield
            finally:
                self.current = None
            return
        if self.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t
            self.current = None

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return out


class FeatureStats:
    """Per-feature firing statistics for this rank's features [N, F_local].

    - tokens_since_fire: global tokens seen since the feature last fired (each step adds the tokens of
      the whole data-parallel batch; `reduce` takes the minimum over DP replicas, so it reads "fired
      anywhere"). Dead = not fired in `dead_after_tokens` tokens (config key dead_after_tokens).
    - fire counts since the last report: dense = fired on more than `dense_rate` of those tokens
      (config key dense_fire_rate; 0.1 by default -- such features act like biases, not dictionary
      entries).
    """

    def __init__(self, n_layers: int, n_features: int, device, dead_after_tokens: int, dense_rate: float):
        self.tokens_since_fire = torch.zeros(n_layers, n_features, dtype=torch.float64, device=device)
        self.fire_count = torch.zeros(n_layers, n_features, dtype=torch.float64, device=device)
        self.tokens_counted = 0
        self.dead_after_tokens = float(dead_after_tokens)
        self.dense_rate = float(dense_rate)

    @torch.no_grad()
    def update(self, acts: torch.Tensor, global_tokens: int):
        counts = (acts != 0).sum(0)  # [N, F]
        self.fire_count += counts
        self.tokens_counted += acts.shape[0]
        self.tokens_since_fire += global_tokens
        self.tokens_since_fire.masked_fill_(counts > 0, 0)

    def dead_mask(self) -> torch.Tensor:
        return self.tokens_since_fire >= self.dead_after_tokens

    @torch.no_grad()
    def reduce(self, dp_group, fp_group, fp_size: int) -> dict[str, float]:
        """Collective over the world: sync tokens_since_fire across DP, then the dead and dense fractions
        over all features (summed over the FP group). Resets the dense window."""
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(self.tokens_since_fire, op=dist.ReduceOp.MIN, group=dp_group)
            dist.all_reduce(self.fire_count, op=dist.ReduceOp.SUM, group=dp_group)
            tokens = torch.tensor([float(self.tokens_counted)], dtype=torch.float64,
                                  device=self.fire_count.device)
            dist.all_reduce(tokens, group=dp_group)
            n_tokens = float(tokens.item())
        else:
            n_tokens = float(self.tokens_counted)
        dense = (self.fire_count > self.dense_rate * max(n_tokens, 1.0)).sum()
        dead = self.dead_mask().sum()
        counts = torch.stack([dead, dense]).to(torch.float64)
        if fp_size > 1:
            dist.all_reduce(counts, group=fp_group)
        total = self.fire_count.numel() * fp_size
        self.fire_count.zero_()
        self.tokens_counted = 0
        return {"features/dead_fraction": counts[0].item() / total,
                "features/dense_fraction": counts[1].item() / total}

    @torch.no_grad()
    def reduced_copy(self, dp_group) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(tokens_since_fire, fire_count, tokens_counted) as the whole data-parallel group saw them (min,
        sum, sum), without changing this rank's state: what a checkpoint stores for a resume on another
        layout. Collective over the DP group."""
        since, fire = self.tokens_since_fire.clone(), self.fire_count.clone()
        counted = torch.tensor([float(self.tokens_counted)], dtype=torch.float64, device=fire.device)
        if dist.is_initialized() and dist.get_world_size(dp_group) > 1:
            dist.all_reduce(since, op=dist.ReduceOp.MIN, group=dp_group)
            dist.all_reduce(fire, op=dist.ReduceOp.SUM, group=dp_group)
            dist.all_reduce(counted, group=dp_group)
        return since.cpu(), fire.cpu(), int(counted.item())

    def load_reduced(self, tokens_since_fire: torch.Tensor, fire_count: torch.Tensor, tokens_counted: int,
                     keep_counts: bool):
        """Resume from reduced_copy's values on another layout: every replica starts from the group's
        view of tokens_since_fire; the report window's counts (summed over DP at the next report) are
        kept by one replica only (keep_counts), so they are not counted twice."""
        self.tokens_since_fire.copy_(tokens_since_fire)
        self.fire_count.copy_(fire_count if keep_counts else torch.zeros_like(fire_count))
        self.tokens_counted = int(tokens_counted) if keep_counts else 0

    def state_dict(self) -> dict:
        return {"tokens_since_fire": self.tokens_since_fire.cpu(), "fire_count": self.fire_count.cpu(),
                "tokens_counted": self.tokens_counted}

    def load_state_dict(self, state: dict):
        self.tokens_since_fire.copy_(state["tokens_since_fire"])
        self.fire_count.copy_(state["fire_count"])
        self.tokens_counted = int(state["tokens_counted"])


class StepReport:
    """The loss terms and batch metrics of the micro-batches of a reported step, summed, then averaged
    and reduced over ranks into named scalars (`values`, a collective). Feature-local quantities
    (sparsity, pre-activation, L0) are summed over the feature-parallel group; everything is then
    averaged over data-parallel replicas."""

    def __init__(self):
        self.sums = None
        self.count = 0

    def add(self, terms: dict, metrics: dict):
        vals = {k: v.detach().float() for k, v in terms.items()}
        vals.update({k: v.detach().float() for k, v in metrics.items()})
        self.sums = vals if self.sums is None else {k: self.sums[k] + vals[k] for k in self.sums}
        self.count += 1

    def values(self, layout, stats: "FeatureStats", timer: StepTimer, partial_sum, n_steps: int) -> dict:
        sums, accum = self.sums, self.count
        N = sums["nmse"].numel()
        local = torch.cat([sums["sparsity"].view(1), sums["preact"].view(1), sums["l0"]]) / accum
        shared = torch.cat([sums["mse"].view(1), sums["auxk"].view(1), sums["nmse"]]) / accum
        if layout.fp_size > 1:
            dist.all_reduce(local, group=layout.fp_group)
        vec = torch.cat([local, shared])
        if layout.dp_size > 1:
            dist.all_reduce(vec, group=layout.dp_group)
            vec /= layout.dp_size
        vec = vec.cpu().tolist()
        sparsity, preact, l0 = vec[0], vec[1], vec[2:2 + N]
        mse, auxk, nmse = vec[2 + N], vec[3 + N], vec[4 + N:]
        out = {"loss/total": mse + sparsity + preact + auxk, "loss/mse": mse, "loss/sparsity": sparsity,
               "loss/preact": preact, "loss/auxk": auxk, "nmse/mean": sum(nmse) / N, "l0/mean": sum(l0) / N,
               "l0/total": sum(l0)}
        for i in range(N):
            out[f"nmse/layer_{i}"] = nmse[i]
            out[f"explained_variance/layer_{i}"] = 1 - nmse[i]
            out[f"l0/layer_{i}"] = l0[i]
        out.update(stats.reduce(layout.dp_group, layout.fp_group, layout.fp_size))
        seconds = timer.take()
        if partial_sum is not None:
            seconds["comm"] += partial_sum.seconds
            seconds["decode"] -= partial_sum.seconds
            partial_sum.seconds = 0.0
        # Per step, averaged since the last report (timed on every step on CPU; on CUDA only on reported
        # steps, where the device is synchronized -- hence the divisor).
        n_timed = n_steps if not timer.cuda else 1
        out.update({f"time/{k}": v / max(n_timed, 1) for k, v in seconds.items()})
        return out


def _fmt(v: float) -> str:
    if v == 0 or (1e-3 <= abs(v) < 1e5):
        return f"{v:.4g}"
    return f"{v:.3e}"


def start_wandb_run(logger, folder: Path, *, run_id: str | None = None, job_type: str | None = None,
                    config: dict | None = None):
    """The one place a W&B run starts (training runs, clt-eval, sweep reports): from the logger settings
    (config.LoggerSettings: mode offline / online / disabled, project, entity, run name, group, tags),
    writing under `folder`; None when logging is disabled. run_id resumes that run after a restart. Each
    call makes a new run, also several in one process (one per dictionary of a data pass)."""
    if logger is None or logger.mode == "disabled":
        return None
    import wandb

    Path(folder).mkdir(parents=True, exist_ok=True)
    return wandb.init(project=logger.project, entity=logger.entity, name=logger.run_name, group=logger.group,
                      tags=list(logger.tags or []), mode=logger.mode, dir=str(folder), job_type=job_type,
                      id=run_id, resume="allow" if run_id else None, config=config, reinit="create_new",
                      settings=wandb.Settings(quiet=True, console="off", x_disable_stats=True))


class RunLogger:
    """Console (progress bar with ETA + one summary line per report) and W&B, on rank 0 only.

    W&B: mode offline (default; `wandb sync` later), online, or disabled; run name / group / tags from
    the logger config; `run_id` resumes the same W&B run after a restart."""

    def __init__(self, logger_cfg, run_dir: Path, total_steps: int, start_step: int, enabled: bool,
                 run_id: str | None, config: dict | None, progress: bool = True):
        self.enabled = enabled
        self.run = None
        self.bar = None
        self.run_id = run_id
        self.jsonl = Path(run_dir) / "metrics.jsonl"
        # After a resume, the steps between the checkpoint and the interruption are trained again with
        # the same results (the resume is exact): W&B already has them, so they are not sent twice.
        self.logged_until = 0
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if run_id is not None:
            self.logged_until = self._last_step()
        self._truncate_jsonl(start_step)
        # secrets, not random: the id must not consume the RNG state a resumed run restores
        self.run_id = run_id or secrets.token_hex(4)
        self.run = start_wandb_run(logger_cfg, run_dir, run_id=self.run_id, config=config)
        if self.run is None:
            self.run_id = run_id
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            desc="clt-train", smoothing=0.1)

    def _last_step(self) -> int:
        if not self.jsonl.is_file():
            return 0
        steps = [json.loads(line).get("step", 0) for line in self.jsonl.read_text().splitlines() if line.strip()]
        return max(steps, default=0)

    def _truncate_jsonl(self, start_step: int):
        """The local record of reports (metrics.jsonl) keeps no step after the one a run starts from:
        after a resume, the steps redone are logged once."""
        if not self.jsonl.is_file():
            return
        keep = [line for line in self.jsonl.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= start_step]
        atomic_write_bytes(self.jsonl, "".join(k + "\n" for k in keep).encode())

    def print(self, msg: str):
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def advance(self, n: int = 1, **postfix):
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def log(self, step: int, values: dict[str, float], n_layers: int):
        """One report: W&B gets every value; the console gets the headline numbers."""
        if not self.enabled:
            return
        if self.run is not None and step > self.logged_until:
            self.run.log(values, step=step)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        head = (("loss/total", "loss"), ("loss/mse", "mse"), ("loss/sparsity", "sparsity"),
                ("loss/preact", "preact"), ("nmse/mean", "nmse"), ("l0/mean", "l0"),
                ("features/dead_fraction", "dead"), ("features/dense_fraction", "dense"),
                ("lambda_s", "lambda_s"), ("lr", "lr"), ("grad_norm", "gnorm"), ("tokens_per_s", "tok/s"))
        parts = [f"{short}={_fmt(values[k])}" for k, short in head if k in values]
        split = " ".join(f"{p}={values['time/' + p] * 1e3:.0f}ms" for p in PHASES if "time/" + p in values)
        per_layer = " ".join(f"{values[f'nmse/layer_{i}']:.3f}" for i in range(n_layers)
                             if f"nmse/layer_{i}" in values)
        self.print(f"step {step}: " + " ".join(parts) + f" | {split}"
                   + (f" | nmse per layer: {per_layer}" if n_layers <= 16 else ""))

    def close(self):
        if self.bar is not None:
            self.bar.close()
        if self.run is not None:
            self.run.finish()
            self.run = None


def gpu_memory() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    return {"gpu/mem_allocated_gb": torch.cuda.memory_allocated() / 2**30,
            "gpu/mem_max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30}


def peak_flops() -> float | None:
    """Dense bf16 peak of this GPU for MFU, from CLTRAIN_PEAK_FLOPS or a small table; None if unknown."""
    if "CLTRAIN_PEAK_FLOPS" in os.environ:
        return float(os.environ["CLTRAIN_PEAK_FLOPS"])
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, flops in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L40", 181e12), ("A10", 125e12)):
        if key in name:
            return flops
    return None

