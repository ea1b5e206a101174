"""One dictionary being trained on this rank: its CLT slice, the DeepSpeed engine around its training step,
its schedules, feature statistics, checkpoints, memory report and log. The training loop
(train/trainer.py) steps K >= 1 of these on one batch stream; everything a dictionary does in a step or a
run is here, once, whatever K is.

One optimizer step = grad_accum micro-batches of batch_tokens tokens per data-parallel replica:
`begin_step`, `micro_step` per micro-batch, then `end_step` (the report values on report steps).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from cltrain.errors import ConfigError
from cltrain.files import atomic_write_bytes
from cltrain.rank_env import local_world_size

from . import checkpoint as ckpt
from . import run_folder
from .clt import CLT, batch_metrics, loss_terms
from .config import ModelSettings, TrainSettings
from .data import ActivationLoader, DatasetInfo, reshard_loader_states
from .engine import bucket_elements, build_engine, state_bytes, zero_stage
from .eval_metrics import PooledMetrics
from .memory import MemoryEstimate, PhasePeaks, estimate_rank_memory, memory_limit, peak_rss
from .metrics import FeatureStats, RunLogger, StepReport, StepTimer, gpu_memory, peak_flops
from .parallel import PartialSum, local_clt, materialize

# ----------------------------------------------------------------------------------------------------
# Schedules (pure functions of the step, so a resumed run recomputes them exactly)


def lr_at(step: int, steps: int, base: float, warmup: int, decay_fraction: float) -> float:
    """Linear warm-up over `warmup` steps, constant, then linear decay to 0 over the last
    `decay_fraction` of the steps (the step after the last would have lr 0)."""
    f = (step + 1) / warmup if step < warmup else 1.0
    decay_steps = int(round(decay_fraction * steps))
    start = steps - decay_steps
    if decay_steps > 0 and step >= start:
        f = min(f, (steps - step) / decay_steps)
    return base * f


def lambda_s_at(step: int, steps: int, final: float, ramp_fraction: float) -> float:
    """lambda_s ramped linearly from 0 (at step 0) to `final` over the first ramp_fraction of the run."""
    ramp = ramp_fraction * steps
    return final if ramp <= 0 else final * min(1.0, step / ramp)


# ----------------------------------------------------------------------------------------------------
# The per-micro-batch computation, as the module DeepSpeed wraps


class TrainStep(nn.Module):
    """Encode, decode (partial sum over the FP group inside CLT.decode) and the loss terms, in one
    forward, so that under ZeRO-3 every use of a CLT parameter (the loss reads decoder norms and
    thresholds too) happens inside the forward DeepSpeed gathers parameters for."""

    def __init__(self, clt: CLT, model: ModelSettings, timer: StepTimer):
        super().__init__()
        self.clt = clt
        self.model_settings = model
        self.timer = timer

    def forward(self, x, y, lambda_s: float, dead=None):
        clt = self.clt
        x = x.to(clt.W_enc.dtype)
        if getattr(clt, "encode_decode_impl", None) is not None and clt.cfg.activation == "jumprelu":
            # One fused Function (kernels/fused.py): its backward skips the activation gradients that
            # only feed the straight-through window's threshold sums. Timed as one phase, "decode".
            with self.timer.phase("decode"):
                enc, y_hat = clt.encode_decode(x)
            y_hat = y_hat.float()
        else:
            with self.timer.phase("encode"):
                enc = clt.encode(x)
            with self.timer.phase("decode"):  # includes the partial-sum all-reduce; the report subtracts it
                y_hat = clt.decode(enc.acts, enc.grad_mask).float()
        terms = loss_terms(clt, enc, y_hat, y, self.model_settings.loss_weights(lambda_s), dead)
        loss = terms["mse"] + terms["sparsity"] + terms["preact"] + terms["auxk"]
        return loss, terms, enc, y_hat


# ----------------------------------------------------------------------------------------------------
# What the dictionaries of one run share


@dataclass
class Shared:
    """The run's pieces every dictionary uses: the dataset (or the live stream's description), the device,
    the layout, the run length, the DeepSpeed module, and (once built) the loader and the phase peaks."""
    info: DatasetInfo
    device: torch.device
    precision: str
    layout: object  # parallel.Layout
    rank: int
    world: int
    steps: int
    stop: int
    deepspeed: object
    loader: ActivationLoader | None = None  # or live.LiveLoader
    peaks: PhasePeaks | None = None
    generator_bytes: int = 0  # live activations: the base model copies this rank holds


class OutOfMemory(ConfigError):
    """This run will not fit (or did not fit) in a rank's memory; the message has the estimate and limit."""


def _dataset_meta(info: DatasetInfo) -> dict:
    return {"path": info.path, "model": info.model, "layers": list(info.layers), "d_model": info.d_model,
            "n_layers": info.n_layers, "scale_x": list(info.scale_x), "scale_y": list(info.scale_y),
            "hooks": info.hooks}


class Dictionary:
    """One dictionary of a run, on this rank. `claim` takes its folder and checks a resume; `allocate`
    sizes and builds its CLT slice; `start` builds the engine and restores or initializes its state.
    A Dictionary that fails part-way is closed by its Trainer (`close` ends what was started)."""

    def __init__(self, s: TrainSettings, shared: Shared):
        self.s, self.shared = s, shared
        self.out_dir = Path(str(s.out_dir))
        self.full_cfg = None
        self.run_lock = self.engine = self.logger = None
        self.saved = self.resume_from = None
        self.step, self.tokens = 0, 0

    # --- build ---

    def claim(self):
        """Lock the run folder (a fresh run never lands on an old one unasked; collective) and check a
        resume (config, files) before anything heavy is built."""
        s, sh = self.s, self.shared
        try:
            self.full_cfg = s.model.clt_config(sh.info.n_layers, sh.info.d_model)
        except ConfigError as e:
            raise ConfigError(f"{e} ({sh.info.source})") from None
        self.run_lock = run_folder.claim(self.out_dir, s.resume, s.overwrite, sh.rank)
        self.fingerprint = ckpt.fingerprint(s, sh.info, sh.layout, sh.precision, sh.steps)
        self.resume_from = ckpt.resolve_resume(s.resume, self.out_dir / "checkpoints")
        if self.resume_from is not None:
            self.saved = ckpt.read_trainer_state(self.resume_from)
            ckpt.check_fingerprint(self.saved.get("fingerprint", {}), self.fingerprint, self.resume_from,
                                   allow_dataset_change=s.data.allow_change_on_resume)
            ckpt.verify_manifest(self.resume_from, self.saved)

    def allocate(self, install_kernels):
        """This rank's slice, built on the meta device, sized, then materialized and initialized alone."""
        sh = self.shared
        try:
            clt = local_clt(self.full_cfg, sh.layout, self.s.seed)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.memory = self._check_memory(clt)
        try:
            materialize(clt, sh.layout, sh.device)
        except (RuntimeError, MemoryError) as e:
            if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            raise OutOfMemory(f"rank {sh.rank}: allocating its CLT slice failed ({str(e).splitlines()[0]}); "
                              f"estimated need {self.memory.describe()}") from None
        self.clt = clt
        self.kernel_impl = install_kernels(clt, self.s.kernels)

    def _check_memory(self, meta_clt: CLT) -> MemoryEstimate:
        """Estimate this rank's peak before allocating; refuse (on every rank) if it will not fit."""
        s, sh = self.s, self.shared
        n_local = sum(p.numel() for p in meta_clt.parameters())
        est = estimate_rank_memory(
            n_local, meta_clt.b_dec.numel(), self.full_cfg.n_layers, self.full_cfg.d_model,
            meta_clt.cfg.n_features, sh.layout.dp_size, s.deepspeed.zero_stage, sh.precision,
            s.batch_tokens, s.data.shuffle_buffer, s.data.num_workers,
            sh.device.type == "cuda", bucket_elements(n_local, sh.layout.dp_size), sh.generator_bytes,
            # shards: one window per FP group, 1/P per rank (data/loader.py); live (loader built already): whole
            window_parts=sh.layout.fp_size if sh.loader is None else 1, live=sh.loader is not None)
        limit, source = memory_limit(sh.device, local_world_size())
        fits = limit is None or est.total <= limit or not s.check_memory
        if not ckpt.all_ranks_ok(fits, sh.device):
            where = (f"this rank needs about {est.describe()}, more than its {limit / 2**30:.2f} GiB "
                     f"({source})" if not fits else "another rank does not fit (see its message)")
            raise OutOfMemory(
                f"out of memory before start: {where}. Shard the features over more ranks "
                f"(parallel.feature_parallel), use ZeRO-2 over data parallel, lower batch_tokens or "
                f"data.shuffle_buffer, or set check_memory=false to try anyway")
        return est

    def start(self, progress: bool):
        """The engine, statistics and checkpoints; the saved state restored when resuming; the log."""
        s, sh = self.s, self.shared
        self.timer = StepTimer(cuda=sh.device.type == "cuda")
        self.step_module = TrainStep(self.clt, s.model, self.timer)
        self.engine, self.optimizer = build_engine(sh.deepspeed, self.step_module, self.clt, s, sh.layout,
                                                   sh.device, sh.precision)
        self.stats = FeatureStats(self.full_cfg.n_layers, self.clt.cfg.n_features, sh.device, s.dead_after_tokens,
                                  s.dense_fire_rate)
        self.checkpoints = ckpt.CheckpointManager(self.out_dir / "checkpoints", self.clt, self.engine, sh.layout,
                                                  self.full_cfg, self.fingerprint, sh.device, s.keep_checkpoints)
        run_id = None
        if self.saved is not None:
            self.load(self.resume_from, self.saved)
            self.step, self.tokens = int(self.saved["step"]), int(self.saved["tokens"])
            run_id = self.saved.get("wandb_run_id")
        self.config_yaml = s.to_yaml()
        self.logger = RunLogger(s.logger, self.out_dir, sh.steps, self.step, sh.rank == 0, run_id, s.to_dict(),
                                progress=progress)
        f, layout = self.full_cfg, sh.layout
        self.logger.print(
            f"clt-train: {sh.info.source} N={f.n_layers} D={f.d_model} F={f.n_features} world={sh.world} "
            f"(data x feature parallel = {layout.dp_size} x {layout.fp_size}) ZeRO-{s.deepspeed.zero_stage} "
            + (f"(runs as ZeRO-{run} with one data-parallel replica: nothing to shard) "
               if (run := zero_stage(s, layout.dp_size, sh.precision)) != s.deepspeed.zero_stage else "")
            + f"{sh.precision} kernels={self.kernel_impl} device={sh.device}"
            + (f", resumed from {self.resume_from} at step {self.step}" if self.saved is not None else ""))
        self.logger.print(f"clt-train: memory per rank (estimated): {self.memory.describe()}; "
                          f"parameters + optimizer state on this rank: {state_bytes(self.engine) / 2**30:.3f} GiB")
        self.partial_sum = self.clt.reduce_partial if isinstance(self.clt.reduce_partial, PartialSum) else None
        self.report_steps_since, self.t_report, self.tokens_report = 0, time.perf_counter(), self.tokens

    def calibrate(self, x: torch.Tensor):
        """Thresholds from the first batch (which step 0 then trains on). FP ranks share the batch, so
        their slices agree; DP replicas average their estimates so every replica starts identical."""
        rate = self.s.model.threshold_calibration_rate
        if rate is None or self.full_cfg.activation != "jumprelu":
            return
        layout = self.shared.layout
        self.clt.calibrate_thresholds(x, float(rate))
        if layout.dp_size > 1:
            dist.all_reduce(self.clt.log_threshold.data, group=layout.dp_group)
            self.clt.log_threshold.data.div_(layout.dp_size)

    # --- one step ---

    def begin_step(self):
        s, sh = self.s, self.shared
        step, steps = self.step, sh.steps
        self.lr = lr_at(step, steps, s.optim.lr, s.optim.warmup_steps, s.optim.decay_fraction)
        self.lam = lambda_s_at(step, steps, s.model.loss.lambda_s, s.model.loss.lambda_s_ramp_fraction)
        for group in self.optimizer.param_groups:  # ZeRO wrappers step these same groups
            group["lr"] = self.lr
        self.report = (step + 1) % s.log_every == 0 or step + 1 == sh.stop
        self.timer.active = self.report or sh.device.type == "cpu"
        if self.partial_sum is not None:
            self.partial_sum.timing = self.timer.active
        self.acc = StepReport()
        self.micro_batches = 0

    def micro_step(self, x: torch.Tensor, y: torch.Tensor):
        """One micro-batch of normalized float32 (x, y): forward, backward and DeepSpeed's step (which
        applies the update at the accumulation boundary). Collective."""
        use_dead = self.s.model.loss.auxk > 0
        loss, terms, enc, y_hat = self.engine(x, y, self.lam, self.stats.dead_mask() if use_dead else None)
        self.stats.update(enc.acts, self.s.batch_tokens * self.shared.layout.dp_size)
        if self.report:
            self.acc.add(terms, batch_metrics(enc, y_hat, y))
        del enc, y_hat
        with self.timer.phase("backward"):
            self.engine.backward(loss)
        with self.timer.phase("optimizer"):
            self.engine.step()
        self.micro_batches += 1

    def end_step(self) -> dict | None:
        """Count the step; the reported values on report steps (log_every), else None. Collective."""
        sh = self.shared
        self.step += 1
        self.tokens += self.s.batch_tokens * self.micro_batches * sh.layout.dp_size
        self.report_steps_since += 1
        if not self.report:
            return None
        values = self.acc.values(sh.layout, self.stats, self.timer, self.partial_sum, self.report_steps_since)
        now = time.perf_counter()
        tok_s = (self.tokens - self.tokens_report) / max(now - self.t_report, 1e-9)
        self.t_report, self.tokens_report, self.report_steps_since = now, self.tokens, 0
        grad_norm = self.engine.get_global_grad_norm()
        values.update({"lr": self.lr, "lambda_s": self.lam, "tokens": self.tokens, "tokens_per_s": tok_s,
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "loader/skipped": sh.loader.skipped, **gpu_memory()})
        peak = peak_flops()
        if peak:
            f = self.full_cfg
            values["mfu"] = tok_s * 6 * f.d_model * f.n_features * f.n_layers / (peak * sh.world)
        return values

    def log(self, values: dict | None, extra: dict):
        """One step's line: the report (with `extra`) on report steps, and the progress bar."""
        if values is None:
            self.logger.advance(1)
            return
        values.update(extra)
        self.logger.log(self.step, values, self.full_cfg.n_layers)
        self.logger.advance(1, **{k: values[v] for k, v in
                                  (("loss", "loss/total"), ("nmse", "nmse/mean"), ("l0", "l0/mean")) if v in values})

    @torch.no_grad()
    def evaluate(self) -> dict:
        """eval_metrics.PooledMetrics on the held-out shards (the first eval_tokens of them; every replica
        evaluates the same tokens, FP ranks together): eval/nmse is the number clt-eval reports. Collective."""
        s, sh = self.s, self.shared
        loader = ActivationLoader(str(s.data.path), s.batch_tokens, split="heldout",
                                  heldout_shards=s.data.heldout_shards, epochs=1, shuffle_buffer=0, device=sh.device)
        f = self.full_cfg
        pooled = PooledMetrics(f.n_layers, self.clt.cfg.n_features, f.d_model, sh.device)
        self.engine.eval()
        try:
            for batch in loader:
                if pooled.tokens >= s.eval_tokens:
                    break
                _, _, enc, y_hat = self.engine(batch.x, batch.y, 0.0, None)
                pooled.add(y_hat, batch.y, enc.acts)
        finally:
            self.engine.train()
            loader.close()
        m = pooled.summary(s.dense_fire_rate, sh.layout.fp_group if sh.layout.fp_size > 1 else None)
        out = {"eval/nmse": m["nmse"]["mean"], "eval/l0": m["l0"]["mean"], "eval/tokens": m["tokens"]}
        out.update({f"eval/nmse/layer_{i}": v for i, v in enumerate(m["nmse"]["per_layer"])})
        return out

    # --- checkpoints ---

    def save(self) -> Path:
        """Checkpoint the current step (collective)."""
        info = self.shared.info
        trainer_state = {"tokens": self.tokens, "wandb_run_id": self.logger.run_id, "dataset": info.path,
                         "config": self.config_yaml}
        model_meta = {"dataset": _dataset_meta(info),
                      "train": {"step": self.step, "tokens": self.tokens, "config": self.config_yaml}}
        rank_state = {"loader": self.shared.loader.state_dict(), "rng": ckpt.rng_state(),
                      "features": self.stats.state_dict()}
        return self.checkpoints.save(self.step, trainer_state, model_meta, rank_state, self.stats)

    def load(self, path: Path, saved: dict):
        """Restore weights, optimizer state, statistics, loader position and RNG from a checkpoint written
        on this layout or another one."""
        sh = self.shared
        rank_states = self.checkpoints.load(path, saved, self.stats)
        if "loader" in rank_states:
            state = rank_states["loader"]
        else:
            olds = rank_states["loader_states"]
            state = olds[sh.layout.dp_rank] if len(olds) == sh.layout.dp_size else \
                reshard_loader_states(olds, sh.layout.dp_size, sh.info)[sh.layout.dp_rank]
        sh.loader.load_state_dict(state)
        ckpt.set_rng_state(rank_states["rng"])

    def finish(self, last_ckpt: Path | None) -> Path:
        """Publish OUT/model from this run's final checkpoint (never another run's); returns OUT/model."""
        if last_ckpt is None:  # nothing trained in this invocation: this run's checkpoint, or a new one
            latest = ckpt.latest_checkpoint(self.checkpoints.root) if self.s.resume not in (None, False) else None
            last_ckpt = latest if latest is not None and latest.name == ckpt.step_name(self.step) else self.save()
        final = self.out_dir / "model"
        self.write_memory_report()
        if self.shared.rank == 0:
            ckpt.publish_model(last_ckpt, final, self.fingerprint)
        self.last_ckpt = last_ckpt
        return final

    def write_memory_report(self):
        """OUT/memory/rank-N.json: this rank's estimate, measured parameter + optimizer bytes and peak RSS."""
        sh = self.shared
        doc = {"rank": sh.rank, "layout": {"data_parallel": sh.layout.dp_size,
                                           "feature_parallel": sh.layout.fp_size},
               "state_bytes": state_bytes(self.engine), "estimate": dataclasses.asdict(self.memory),
               "estimate_total": self.memory.total, "peak_rss_bytes": peak_rss(),
               "peak_rss_by_phase": sh.peaks.peaks}
        if sh.device.type == "cuda":
            doc["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated(sh.device)
        folder = self.out_dir / "memory"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"rank-{sh.rank:05d}.json", json.dumps(doc, indent=2).encode())

    def close(self):
        """End what this dictionary started, none of it collective: the W&B run and progress bar, the
        DeepSpeed engine, the lock on its folder (last). Idempotent."""
        if self.logger is not None:
            self.logger.close()
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.destroy()
        lock, self.run_lock = self.run_lock, None
        if lock is not None:  # last: nothing of this run writes into its folder after it
            lock.release()

