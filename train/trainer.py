"""clt-train: train a CLT on activation shards with DeepSpeed (DESIGN sections 1, 3, 6).

    clt-train data.path=DIR model.n_features=4096 steps=20000          # 1 process
    torchrun --nproc_per_node 4 -m cltrain.train.trainer parallel=fp2 ... # DP=2 x FP=2 (see launch/)

`train(cfg)` is the whole job as a function (the demo and the tests call it); `main()` is the Hydra
entry point. The split follows torchtitan's: the model (train/clt.py) is rank-free; the layout
(train/parallel.py) shards it from outside; this file owns the loop, schedules and checkpoints.

One optimizer step = grad_accum micro-batches of batch_tokens tokens per data-parallel replica. All
ranks of a feature-parallel group read the same batches (the loader is keyed by the DP rank).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from . import run_folder
from .clt import CLT, batch_metrics, loss_terms
from .config import CONFIG_DIR, clips_in_optimizer, clt_config, deepspeed_overrides, loss_weights, resolve_precision, resolve_steps, validate_runtime, validate_train
from cltrain.errors import ConfigError
from .grad_clip import ClippedAdam
from .lifecycle import PeerLeft, Preempted, RankLost, StopSignals, Teardown, run_command
from .data import DatasetError, DatasetInfo, loader_from_config, reshard_loader_states, verify_shards
from .memory import MemoryEstimate, estimate_rank_memory, memory_limit, peak_rss, PhasePeaks
from cltrain.rank_env import local_world_size
from cltrain.files import atomic_write_bytes
from .metrics import FeatureStats, RunLogger, StepReport, StepTimer, gpu_memory, peak_flops
from .parallel import Layout, PartialSum, dist_timeout, init_distributed, local_clt, materialize, resolve_device
from cltrain.rank_env import dist_env

log = logging.getLogger(__name__)


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

    def __init__(self, clt: CLT, model_cfg: DictConfig, timer: StepTimer):
        super().__init__()
        self.clt = clt
        self.model_cfg = model_cfg
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
        terms = loss_terms(clt, enc, y_hat, y, loss_weights(self.model_cfg, lambda_s), dead)
        loss = terms["mse"] + terms["sparsity"] + terms["preact"] + terms["auxk"]
        return loss, terms, enc, y_hat


# ----------------------------------------------------------------------------------------------------
# Set-up helpers


def strip_launcher_args(argv: list[str]) -> list[str]:
    """Remove `--local_rank=N` / `--local-rank N` (appended by the deepspeed launcher and old
    torch.distributed.launch) before Hydra parses argv; the value goes to LOCAL_RANK if unset."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in ("--local_rank", "--local-rank"):
            if not eq and i + 1 < len(argv):
                value, i = argv[i + 1], i + 1
            os.environ.setdefault("LOCAL_RANK", value)
        else:
            out.append(a)
        i += 1
    return out


def bucket_elements(cfg: DictConfig, local_params: int) -> int:
    """Elements per ZeRO gradient-reduction / all-gather bucket. DeepSpeed's default (5e8) allocates
    a 2 GB fp32 buffer per bucket whatever the model's size -- more than a small rank's whole state; an
    eighth of the rank's parameters (at least 1M, at most 5e7 elements) keeps collectives large."""
    return int(min(5e7, max(1e6, local_params // 8)))


def deepspeed_config(cfg: DictConfig, layout: Layout, local_params: int = 0, precision: str = "fp32") -> dict:
    stage = int(cfg.deepspeed.zero_stage)
    zero = {"stage": stage, "overlap_comm": bool(cfg.deepspeed.overlap_comm)}
    if stage in (1, 2):
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = bucket_elements(cfg, local_params)
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_param_persistence_threshold"):
        if cfg.deepspeed.get(key) is not None:
            zero[key] = cfg.deepspeed[key]
    ds = {
        # DeepSpeed counts samples; ours are tokens, so a "sample" is a token.
        "train_micro_batch_size_per_gpu": int(cfg.batch_tokens),
        "gradient_accumulation_steps": int(cfg.grad_accum),
        "train_batch_size": int(cfg.batch_tokens) * int(cfg.grad_accum) * layout.dp_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Ignore"},
    }
    ds.update(deepspeed_overrides(cfg, precision))
    return ds


def make_optimizer(params, cfg: DictConfig, device: torch.device, layout: Layout,
                   precision: str) -> torch.optim.Optimizer:
    """torch Adam as DeepSpeed's client optimizer: fused=True runs on CPU and CUDA without compiling
    DeepSpeed's C++ ops and reproduces a plain torch run exactly. At ZeRO-0 in fp32 it also clips
    (ClippedAdam, train/grad_clip.py: DeepSpeed's stage-0 clipping loses the norm)."""
    fused = cfg.optim.get("fused", "auto")
    fused = device.type in ("cpu", "cuda") if fused == "auto" else bool(fused)
    kwargs = dict(lr=float(cfg.optim.lr), betas=tuple(float(b) for b in cfg.optim.betas),
                  eps=float(cfg.optim.eps), weight_decay=float(cfg.optim.weight_decay), fused=fused)
    if clips_in_optimizer(cfg, precision):
        return ClippedAdam(params, float(cfg.optim.grad_clip), fp_group=layout.fp_group, **kwargs)
    return torch.optim.Adam(params, **kwargs)


def fingerprint(cfg: DictConfig, info: DatasetInfo, layout: Layout, precision: str, steps: int) -> dict:
    """What a resume compares with the checkpoint: the model, the data order, the optimizer, the schedules
    and the global batch must match; the layout keys (checkpoint.LAYOUT_KEYS: world size, feature
    parallel size, ZeRO stage, per-replica batch split) may change, the state is remapped."""
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("model", OmegaConf.to_container(cfg.model, resolve=True))
    walk("optim", OmegaConf.to_container(cfg.optim, resolve=True))
    for key in ("seed", "batch_tokens", "grad_accum", "data.shuffle_buffer", "data.heldout_shards",
                "data.num_workers", "parallel.feature_parallel", "deepspeed.zero_stage"):
        flat[key] = OmegaConf.select(cfg, key)
    # resolved values: `precision=auto` and the run length from `train_tokens` compare as what they mean
    flat["precision"], flat["steps"] = precision, steps
    flat.update({"world_size": layout.world, "dataset.model": info.model, "dataset.layers": list(info.layers),
                 "dataset.d_model": info.d_model, "dataset.n_tokens": info.n_tokens,
                 "dataset.digest": info.digest(),
                 "global_batch_tokens": int(cfg.batch_tokens) * int(cfg.grad_accum) * layout.dp_size})
    return flat


def _import_deepspeed(device: torch.device):
    """Import DeepSpeed for this device (DS_ACCELERATOR must be set before the import).

    On CPU, DeepSpeed's comm backend would JIT-compile its shared-memory all-reduce op (30-90 s of C++
    on first use) although training never calls it (only inference_all_reduce does): skip that build,
    gloo does the collectives."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.comm.torch  # noqa: F401  (the name is shadowed by torch in deepspeed.comm)

    if device.type == "cpu":
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
    if not os.environ.get("CLTRAIN_DS_VERBOSE"):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # ZeRO calls these torch collectives every step; their deprecation notice would flood the console
        warnings.filterwarnings("ignore", message=r".*(all_gather_into_tensor|reduce_scatter_tensor).*",
                                category=FutureWarning)
    return deepspeed


def _install_kernels(clt: CLT, impl: str) -> str:
    if impl == "dense":
        return "dense"  # the reference encode/decode the CLT starts with
    try:
        from cltrain.kernels import install
    except ImportError as e:
        raise ConfigError(f"config key 'kernels' = {impl!r}: cltrain.kernels.install is unavailable ({e}); "
                          "use kernels=dense") from None
    return install(clt, impl)


def _dataset_meta(info: DatasetInfo) -> dict:
    return {"path": info.path, "model": info.model, "layers": list(info.layers), "d_model": info.d_model,
            "n_layers": info.n_layers, "scale_x": list(info.scale_x), "scale_y": list(info.scale_y),
            "hooks": info.hooks}


# ----------------------------------------------------------------------------------------------------
# The job


class Trainer:
    """One training run on this rank: `build(cfg)` sets everything up (or resumes), `train_step(batches)`
    is one optimizer step, `save()` / `load(path)` checkpoint, `fit()` runs to the end and publishes
    OUT/model. Components: the CLT slice and its parallel layout (train/parallel.py), the DeepSpeed
    engine, the checkpoint manager (train/checkpoint.py), metrics and logging (train/metrics.py)."""

    # --- build ---

    @classmethod
    def build(cls, cfg: DictConfig, loader=None, first_batch=None) -> "Trainer":
        """loader / first_batch: for several dictionaries trained on one data pass (train/multi.py): a
        loader shared with other Trainers (already verified; this Trainer does not close it), and a
        function(loader) giving the pass's first batch (calibration reads it once for all). A build that
        fails closes what it had started."""
        self = cls()
        try:
            self._build(cfg, loader, first_batch)
        except BaseException:
            self.close()
            raise
        return self

    def _build(self, cfg: DictConfig, loader, first_batch):
        self.cfg = cfg
        self.owns_loader, self._first_batch = loader is None, first_batch
        validate_train(cfg)
        if cfg.data.get("path") is None:
            raise ConfigError("config key 'data.path' = None: expected the dataset folder or URL written by clt-harvest")
        self.info = info = DatasetInfo.load(str(cfg.data.path))  # DatasetError names dataset.json when missing/bad
        try:
            self.full_cfg = clt_config(cfg.model, info.n_layers, info.d_model)
        except ConfigError as e:
            raise ConfigError(f"{e} ({info.json_path})") from None

        _, world, _ = dist_env()
        validate_runtime(cfg, world, torch.cuda.is_available())
        self.device = device = resolve_device(str(cfg.device), int(os.environ.get("LOCAL_RANK", 0)))
        self.precision = resolve_precision(str(cfg.precision), device.type)
        self.rank, self.world = init_distributed(str(cfg.parallel.backend), device)
        try:
            self.layout = layout = Layout.build(int(cfg.parallel.feature_parallel))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.steps = resolve_steps(cfg, layout.dp_size)
        self.deepspeed = _import_deepspeed(device)
        self.out_dir = Path(str(cfg.out_dir))
        # one run per folder, and a fresh run never lands on an old one unasked (collective)
        self.run_lock = run_folder.claim(self.out_dir, cfg.resume, bool(cfg.get("overwrite", False)), self.rank)
        self.fingerprint = fingerprint(cfg, info, layout, self.precision, self.steps)
        self.zero3 = int(cfg.deepspeed.zero_stage) == 3

        # A resume is checked (config, files) before anything heavy is built.
        resume_from = ckpt.resolve_resume(cfg.resume, self.out_dir / "checkpoints")
        saved = None
        if resume_from is not None:
            saved = ckpt.read_trainer_state(resume_from)
            ckpt.check_fingerprint(saved.get("fingerprint", {}), self.fingerprint, resume_from,
                                   allow_dataset_change=bool(cfg.data.get("allow_change_on_resume", False)))
            ckpt.verify_manifest(resume_from, saved)

        # This rank's slice, built on the meta device, sized, then materialized and initialized alone.
        try:
            clt = local_clt(self.full_cfg, layout, int(cfg.seed))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.memory = self._check_memory(clt)
        try:
            materialize(clt, layout, device)
        except (RuntimeError, MemoryError) as e:
            if "alloc" not in str(e).lower() and not isinstance(e, MemoryError):
                raise
            raise OutOfMemory(f"rank {self.rank}: allocating its CLT slice failed ({str(e).splitlines()[0]}); "
                              f"estimated need {self.memory.describe()}") from None
        self.clt = clt
        self.kernel_impl = _install_kernels(clt, str(cfg.get("kernels", "dense")))
        if device.type == "cpu":  # each step's large temporaries then reuse mapped memory
            from cltrain.kernels import retain_freed_cpu_memory
            retain_freed_cpu_memory()

        verified = self._verify_shards() if loader is None else None
        # Batches stay in the shards' dtype (pinned on CUDA); TrainStep normalizes them on the device.
        self.loader = loader if loader is not None else loader_from_config(
            cfg.data, int(cfg.batch_tokens), dp_rank=layout.dp_rank, dp_size=layout.dp_size, seed=int(cfg.seed),
            device=device, normalize=False, verified=verified)
        self.timer = StepTimer(cuda=device.type == "cuda")
        self.step_module = TrainStep(clt, cfg.model, self.timer)
        self.optimizer = make_optimizer(self.step_module.parameters(), cfg, device, layout, self.precision)
        self.engine, _, _, _ = self.deepspeed.initialize(
            model=self.step_module, optimizer=self.optimizer, mpu=layout.mpu(),
            config=deepspeed_config(cfg, layout, sum(p.numel() for p in clt.parameters()), self.precision),
            dist_init_required=False)
        if self.zero3:
            # TrainStep calls the CLT's pieces, not CLT.forward, so ZeRO-3 must gather the CLT's parameters
            # for TrainStep's forward/backward: register them as its external parameters.
            for p in clt.parameters():
                self.deepspeed.zero.register_external_parameter(self.step_module, p)
        self.stats = FeatureStats(self.full_cfg.n_layers, clt.cfg.n_features, device, int(cfg.dead_after_tokens),
                                  float(cfg.get("dense_fire_rate", 0.1)))
        self.checkpoints = ckpt.CheckpointManager(self.out_dir / "checkpoints", clt, self.engine, layout,
                                                  self.full_cfg, self.fingerprint, device,
                                                  int(cfg.get("keep_checkpoints", 0)))
        self.step, self.tokens, run_id = 0, 0, None
        self.pending = None  # a batch read ahead of the loop (calibration's), and the iterator it came from
        self._first_batches = None
        if saved is not None:
            self.load(resume_from, saved)
            self.step, self.tokens, run_id = int(saved["step"]), int(saved["tokens"]), saved.get("wandb_run_id")
        else:
            self._calibrate()
        self.batches = self._first_batches or iter(self.loader)

        # stop_at_step: end this invocation early (checkpointed) while the schedules still span `steps` --
        # for jobs with a wall-clock limit, resubmitted with resume=true.
        self.stop = self.steps if cfg.get("stop_at_step") is None else min(self.steps, int(cfg.stop_at_step))
        self.config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.logger = RunLogger(cfg.logger, self.out_dir, self.steps, self.step, self.rank == 0, run_id,
                                OmegaConf.to_container(cfg, resolve=True), progress=bool(cfg.get("progress", True)))
        f = self.full_cfg
        self.logger.print(
            f"clt-train: {info.json_path} N={f.n_layers} D={f.d_model} F={f.n_features} world={self.world} "
            f"(data x feature parallel = {layout.dp_size} x {layout.fp_size}) ZeRO-{cfg.deepspeed.zero_stage} "
            f"{self.precision} kernels={self.kernel_impl} device={device}"
            + (f", resumed from {resume_from} at step {self.step}" if saved is not None else ""))
        self.logger.print(f"clt-train: memory per rank (estimated): {self.memory.describe()}; "
                          f"parameters + optimizer state on this rank: {self.state_bytes() / 2**30:.3f} GiB")
        self.partial_sum = clt.reduce_partial if isinstance(clt.reduce_partial, PartialSum) else None
        self.report_steps_since, self.t_report, self.tokens_report = 0, time.perf_counter(), self.tokens
        self.peaks = PhasePeaks()
        self.peaks.end("startup")
        self.preemption = StopSignals()

    def _check_memory(self, meta_clt: CLT) -> MemoryEstimate:
        """Estimate this rank's peak before allocating; refuse (on every rank) if it will not fit."""
        cfg, layout = self.cfg, self.layout
        n_local = sum(p.numel() for p in meta_clt.parameters())
        est = estimate_rank_memory(
            n_local, meta_clt.b_dec.numel(), self.full_cfg.n_layers, self.full_cfg.d_model,
            meta_clt.cfg.n_features, layout.dp_size, int(cfg.deepspeed.zero_stage), self.precision,
            int(cfg.batch_tokens), int(cfg.data.shuffle_buffer), int(cfg.data.num_workers),
            self.device.type == "cuda", bucket_elements(cfg, n_local))
        limit, source = memory_limit(self.device, local_world_size())
        fits = limit is None or est.total <= limit or not bool(cfg.get("check_memory", True))
        if not ckpt.all_ranks_ok(fits, self.device):
            where = (f"this rank needs about {est.describe()}, more than its {limit / 2**30:.2f} GiB "
                     f"({source})" if not fits else "another rank does not fit (see its message)")
            raise OutOfMemory(
                f"out of memory before start: {where}. Shard the features over more ranks "
                f"(parallel.feature_parallel), use ZeRO-2 over data parallel, lower batch_tokens or "
                f"data.shuffle_buffer, or set check_memory=false to try anyway")
        return est

    def _verify_shards(self) -> dict | None:
        """Every local shard's sha256 before the first step (data.verify_upfront): rank 0 hashes them
        (shared storage), every rank stops with its message if one is bad. Returns the identities of the
        files hashed (rank 0's, sent to every rank), which spare the loader a second hash of each."""
        if not bool(self.cfg.data.get("verify_upfront", True)):
            return None
        error, identities = None, None
        if self.rank == 0:
            try:
                identities = verify_shards(str(self.cfg.data.path), split="all",
                                           heldout_shards=int(self.cfg.data.heldout_shards),
                                           progress=bool(self.cfg.get("progress", True)))["identities"]
            except DatasetError as e:
                error = e
        if not ckpt.all_ranks_ok(error is None, self.device):
            raise error or DatasetError(f"{self.info.json_path}: a shard failed its sha256 check (see rank 0)")
        if dist.is_initialized() and dist.get_world_size() > 1:
            # another node sees another device number for shared storage: its loader then hashes again
            box = [identities]
            dist.broadcast_object_list(box, src=0)
            identities = box[0]
        return identities

    def batch_tensors(self, batch):
        """Normalized float32 (x, y) on this rank's device from a loader batch (cast and scaled there)."""
        return self.loader.to_training(batch, dtype=torch.float32)

    def _calibrate(self):
        rate = self.cfg.model.get("threshold_calibration_rate")
        if rate is None or self.full_cfg.activation != "jumprelu":
            return
        # Calibrate on the first batch (which step 0 then trains on). FP ranks share the batch, so their
        # slices agree; DP replicas average their estimates so every replica starts identical.
        if self._first_batch is not None:  # shared with other dictionaries of one data pass (train/multi.py)
            self.pending = self._first_batch(self.loader)
        else:
            batches = iter(self.loader)
            self.pending = next(batches)
        self.clt.calibrate_thresholds(self.batch_tensors(self.pending)[0], float(rate))
        if self.layout.dp_size > 1:
            dist.all_reduce(self.clt.log_threshold.data, group=self.layout.dp_group)
            self.clt.log_threshold.data.div_(self.layout.dp_size)
        if self._first_batch is None:
            self._first_batches = batches

    def state_bytes(self) -> int:
        """Bytes of parameters and optimizer state this rank holds (measured from the live tensors)."""
        from .engine_state import base_optimizer

        seen, total = set(), 0
        tensors = list(self.engine.module.parameters())
        for st in base_optimizer(self.engine).state.values():
            tensors += [v for v in st.values() if torch.is_tensor(v)]
        opt = self.engine.optimizer
        tensors += list(getattr(opt, "single_partition_of_fp32_groups", []))
        tensors += list(getattr(opt, "fp32_partitioned_groups_flat", []))
        for t in tensors:
            t = t.ds_tensor if hasattr(t, "ds_tensor") else t
            key = (t.data_ptr(), t.numel())
            if t.numel() and key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
        return total

    def write_memory_report(self):
        """OUT/memory/rank-N.json: this rank's estimate, measured parameter + optimizer bytes and peak RSS."""
        doc = {"rank": self.rank, "layout": {"data_parallel": self.layout.dp_size,
                                             "feature_parallel": self.layout.fp_size},
               "state_bytes": self.state_bytes(), "estimate": dataclasses.asdict(self.memory),
               "estimate_total": self.memory.total, "peak_rss_bytes": peak_rss(),
               "peak_rss_by_phase": self.peaks.peaks}
        if self.device.type == "cuda":
            doc["gpu_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        folder = self.out_dir / "memory"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / f"rank-{self.rank:05d}.json", json.dumps(doc, indent=2).encode())

    # --- one step ---

    def next_batch(self):
        if self.pending is not None:
            batch, self.pending = self.pending, None
            return batch
        try:
            return next(self.batches)
        except StopIteration:
            raise DatasetError(f"{self.info.json_path}: the loader ended at step {self.step}") from None

    def train_step(self, batches: list) -> dict | None:
        """One optimizer step over len(batches) micro-batches (grad_accum of them: loader batches, or
        normalized (x, y) pairs); returns the reported values on report steps (log_every), else None.
        Collective."""
        cfg, layout, timer = self.cfg, self.layout, self.timer
        step, steps = self.step, self.steps
        lr = lr_at(step, steps, float(cfg.optim.lr), int(cfg.optim.warmup_steps), float(cfg.optim.decay_fraction))
        lam = lambda_s_at(step, steps, float(cfg.model.loss.lambda_s), float(cfg.model.loss.lambda_s_ramp_fraction))
        for group in self.optimizer.param_groups:  # ZeRO wrappers step these same groups
            group["lr"] = lr
        report = (step + 1) % int(cfg.log_every) == 0 or step + 1 == self.stop
        timer.active = report or self.device.type == "cpu"
        if self.partial_sum is not None:
            self.partial_sum.timing = timer.active
        use_dead = float(cfg.model.loss.auxk) > 0
        B = int(cfg.batch_tokens)
        acc = StepReport()
        for batch in batches:
            x, y = self.batch_tensors(batch) if hasattr(batch, "token_ids") else batch
            loss, terms, enc, y_hat = self.engine(x, y, lam, self.stats.dead_mask() if use_dead else None)
            self.stats.update(enc.acts, B * layout.dp_size)
            if report:
                acc.add(terms, batch_metrics(enc, y_hat, y))
            del enc, y_hat
            with timer.phase("backward"):
                self.engine.backward(loss)
            with timer.phase("optimizer"):
                self.engine.step()
        self.step += 1
        self.tokens += B * len(batches) * layout.dp_size
        self.report_steps_since += 1
        if not report:
            return None
        values = acc.values(layout, self.stats, timer, self.partial_sum, self.report_steps_since)
        now = time.perf_counter()
        tok_s = (self.tokens - self.tokens_report) / max(now - self.t_report, 1e-9)
        self.t_report, self.tokens_report, self.report_steps_since = now, self.tokens, 0
        grad_norm = self.engine.get_global_grad_norm()
        values.update({"lr": lr, "lambda_s": lam, "tokens": self.tokens, "tokens_per_s": tok_s,
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "loader/skipped": self.loader.skipped, **gpu_memory()})
        peak = peak_flops()
        if peak:
            f = self.full_cfg
            values["mfu"] = tok_s * 6 * f.d_model * f.n_features * f.n_layers / (peak * self.world)
        return values

    # --- checkpoints ---

    def save(self) -> Path:
        """Checkpoint the current step (collective)."""
        trainer_state = {"tokens": self.tokens, "wandb_run_id": self.logger.run_id, "dataset": self.info.path,
                         "config": self.config_yaml}
        model_meta = {"dataset": _dataset_meta(self.info),
                      "train": {"step": self.step, "tokens": self.tokens, "config": self.config_yaml}}
        rank_state = {"loader": self.loader.state_dict(), "rng": ckpt.rng_state(),
                      "features": self.stats.state_dict()}
        return self.checkpoints.save(self.step, trainer_state, model_meta, rank_state, self.stats)

    def load(self, path: Path, saved: dict):
        """Restore weights, optimizer state, statistics, loader position and RNG from a checkpoint written
        on this layout or another one."""
        rank_states = self.checkpoints.load(path, saved, self.stats)
        if "loader" in rank_states:
            self.loader.load_state_dict(rank_states["loader"])
        else:
            olds = rank_states["loader_states"]
            state = olds[self.layout.dp_rank] if len(olds) == self.layout.dp_size else \
                reshard_loader_states(olds, self.layout.dp_size, self.info)[self.layout.dp_rank]
            self.loader.load_state_dict(state)
        ckpt.set_rng_state(rank_states["rng"])

    # --- the loop ---

    def fit(self) -> Path:
        """Train to the stop step, checkpointing every checkpoint_every steps and at the end, then
        publish OUT/model (this run's final model; never another run's). Returns OUT/model. A
        stop signal (SIGTERM, SIGUSR1/2, Ctrl-C; lifecycle.StopSignals) makes every rank finish its step and
        checkpoint together, then raises Preempted (exit code lifecycle.EXIT_PREEMPTED)."""
        every, accum = int(self.cfg.checkpoint_every), int(self.cfg.grad_accum)
        eval_every = int(self.cfg.get("eval_every", 0) or 0)
        last_ckpt = None
        with self.preemption:
            while self.step < self.stop:
                batches = []
                for _ in range(accum):
                    with self.timer.phase("data"):
                        batches.append(self.next_batch())
                values = self.train_step(batches)
                if eval_every and self.step % eval_every == 0:
                    values = dict(values or {}, **self.evaluate())
                if values is not None:
                    values["data/epoch"] = getattr(self.loader, "epoch", 0)
                    self.logger.log(self.step, values, self.full_cfg.n_layers)
                    self.logger.advance(1, **{k: values[v] for k, v in
                                              (("loss", "loss/total"), ("nmse", "nmse/mean"), ("l0", "l0/mean"))
                                              if v in values})
                else:
                    self.logger.advance(1)
                preempted = self.preemption.requested(self.device, self.step)  # every rank agrees
                if self.step % every == 0 or self.step == self.stop or preempted:
                    self.peaks.end("steps")
                    self.timer.current = "checkpoint"
                    last_ckpt = self.save()
                    self.timer.current = None
                    self.peaks.end("checkpoint")
                if preempted and self.step < self.stop:
                    self.write_memory_report()
                    self.logger.print(f"clt-train: {self.preemption.name} received: checkpointed at step "
                                      f"{self.step} ({last_ckpt}); resubmit with resume=true to continue")
                    raise Preempted(last_ckpt)
        if last_ckpt is None:  # nothing trained in this invocation: this run's checkpoint, or a new one
            latest = ckpt.latest_checkpoint(self.checkpoints.root) if self.cfg.resume not in (None, False) else None
            last_ckpt = latest if latest is not None and latest.name == ckpt.step_name(self.step) else self.save()
        final = self.out_dir / "model"
        self.write_memory_report()
        if self.rank == 0:
            ckpt.publish_model(last_ckpt, final, self.fingerprint)
        if self.world > 1:
            dist.barrier()
        self.logger.print(f"clt-train: done at step {self.step}; model in {final}, checkpoint {last_ckpt}")
        return final

    @torch.no_grad()
    def evaluate(self) -> dict:
        """NMSE and L0 on the held-out shards (the first eval_tokens of them; every replica evaluates
        the same tokens, FP ranks together). Collective."""
        from .data import ActivationLoader

        budget = int(self.cfg.get("eval_tokens", 65536))
        loader = ActivationLoader(str(self.cfg.data.path), int(self.cfg.batch_tokens), split="heldout",
                                  heldout_shards=int(self.cfg.data.heldout_shards), epochs=1, shuffle_buffer=0,
                                  device=self.device)
        acc, seen = StepReport(), 0
        self.engine.eval()
        try:
            for batch in loader:
                if seen >= budget:
                    break
                _, terms, enc, y_hat = self.engine(batch.x, batch.y, 0.0, None)
                acc.add(terms, batch_metrics(enc, y_hat, batch.y))
                seen += batch.x.shape[0]
        finally:
            self.engine.train()
            loader.close()
        vec = torch.cat([acc.sums["nmse"], acc.sums["l0"]]) / max(acc.count, 1)
        if self.layout.fp_size > 1:  # L0 is per feature slice: sum it over the group
            l0 = vec[vec.numel() // 2:].clone()
            dist.all_reduce(l0, group=self.layout.fp_group)
            vec[vec.numel() // 2:] = l0
        N = self.full_cfg.n_layers
        nmse, l0 = vec[:N].tolist(), vec[N:].tolist()
        out = {"eval/nmse": sum(nmse) / N, "eval/l0": sum(l0) / N, "eval/tokens": seen}
        out.update({f"eval/nmse/layer_{i}": v for i, v in enumerate(nmse)})
        return out

    def where(self) -> str:
        """What this rank was doing: the step phase (the FP all-reduce runs in decode, DeepSpeed's
        gradient reduction in backward) or the checkpoint."""
        return f"step {self.step + 1}, {self.timer.current or 'between phases'}"

    def close(self):
        """End what this rank started, none of it collective: the W&B run and progress bar, the loader's
        worker processes (joined; a shared loader is its owner's), the DeepSpeed engine, the lock on
        out_dir. Idempotent."""
        for name in ("logger", "loader") if getattr(self, "owns_loader", True) else ("logger",):
            obj = getattr(self, name, None)
            if obj is not None:
                obj.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            self.engine = None
            engine.destroy()
        lock = getattr(self, "run_lock", None)
        if lock is not None:  # last: nothing of this run writes into out_dir after it
            lock.release()


class OutOfMemory(ConfigError):
    """This run will not fit (or did not fit) in a rank's memory; the message has the estimate and limit."""


def _named_failure(e: BaseException, trainer) -> Exception | None:
    """A failed collective or allocation as the error a user can act on (None: a bug, keep the traceback)."""
    text, rank = str(e), dist.get_rank() if dist.is_initialized() else 0
    low = text.lower()
    where = trainer.where() if trainer is not None else "start-up"
    if not isinstance(e, MemoryError) and ("timed out" in low or "timeout" in low) and "connect" not in low:
        return RankLost(
            f"rank {rank}: a collective ({where}) waited longer than CLTRAIN_DIST_TIMEOUT="
            f"{int(dist_timeout().total_seconds())} s for another rank, which is hung or dead; the job "
            f"stops (resume=true continues from the last checkpoint). {text.splitlines()[0][:200]}")
    if any(s in low for s in ("connection closed by peer", "connection reset by peer", "broken pipe")):
        return PeerLeft(f"rank {rank}: another rank left the job during a collective ({where}); look for its "
                        f"own error above. resume=true continues from the last checkpoint")
    if isinstance(e, MemoryError) or "can't allocate memory" in text or "out of memory" in low:
        estimate = f"; estimated need {trainer.memory.describe()}" if trainer is not None else ""
        return OutOfMemory(f"rank {rank} ran out of memory ({text.splitlines()[-1][:200] if text else 'MemoryError'})"
                           f"{estimate}. Use more feature-parallel ranks, a smaller batch_tokens or "
                           f"data.shuffle_buffer")
    return None


def train(cfg: DictConfig) -> Path:
    """Run (or resume) a training job; returns OUT/model, the whole trained CLT (model_io.load_clt).
    Everything it starts (loader workers, W&B, the DeepSpeed engine, a process group it created) has
    ended when it returns or raises (lifecycle.Teardown)."""
    from .sweep import finished_model
    from .multi import train_dictionaries

    validate_train(cfg)
    trainer = None
    with Teardown() as teardown:
        try:
            if cfg.get("dictionaries"):
                return train_dictionaries(cfg, teardown)
            done = finished_model(cfg)  # a resubmitted sweep: this run already finished
            if done is not None:
                print(f"clt-train: {done} is this run's finished model (resume=true): skipped", flush=True)
                return done
            trainer = Trainer.build(cfg)
            teardown.add(trainer.close)
            return trainer.fit()
        except (RuntimeError, MemoryError) as e:
            named = _named_failure(e, trainer)
            if named is None:
                raise
            raise named from None


# ----------------------------------------------------------------------------------------------------
# Console entry point


def _hydra_job(cfg: DictConfig):
    from cltrain.rank_env import slurm_rendezvous

    slurm_rendezvous()  # a SLURM job sent by the submitit launcher: ranks and rendezvous from SLURM_*
    run_command(lambda: train(cfg), "clt-train", bad_input=(ConfigError, DatasetError, ckpt.CheckpointError))


def main():
    sys.argv = strip_launcher_args(sys.argv)
    from .sweep import mark_swept

    mark_swept(sys.argv)  # a multirun: every run is checked before the first starts
    dist_env()  # map SLURM_* to RANK/WORLD_SIZE/LOCAL_RANK now: the Hydra run dir is per ${RANK}
    import hydra

    hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")(_hydra_job)()


if __name__ == "__main__":
    main()
