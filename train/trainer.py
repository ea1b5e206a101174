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

import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf

from . import checkpoint as ckpt
from .clt import CLT, batch_metrics, loss_terms
from .config import CONFIG_DIR, ConfigError, clt_config, loss_weights, validate_train
from .data import DatasetError, DatasetInfo, loader_from_config
from .metrics import FeatureStats, RunLogger, StepTimer, gpu_memory, peak_flops
from .model_io import replace_dir, save_clt
from .parallel import (Layout, PartialSum, dist_env, gather_clt_state, init_distributed, resolve_device,
                       shard_clt)

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


def deepspeed_config(cfg: DictConfig, layout: Layout) -> dict:
    stage = int(cfg.deepspeed.zero_stage)
    zero = {"stage": stage, "overlap_comm": bool(cfg.deepspeed.overlap_comm)}
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_param_persistence_threshold"):
        if cfg.deepspeed.get(key) is not None:
            zero[key] = cfg.deepspeed[key]
    return {
        # DeepSpeed counts samples; ours are tokens, so a "sample" is a token.
        "train_micro_batch_size_per_gpu": int(cfg.batch_tokens),
        "gradient_accumulation_steps": int(cfg.grad_accum),
        "train_batch_size": int(cfg.batch_tokens) * int(cfg.grad_accum) * layout.dp_size,
        "gradient_clipping": float(cfg.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Ignore"},
    }


def make_optimizer(params, cfg: DictConfig, device: torch.device) -> torch.optim.Optimizer:
    """torch Adam as DeepSpeed's client optimizer: fused=True runs on CPU and CUDA without compiling
    DeepSpeed's C++ ops and reproduces a plain torch run exactly."""
    fused = cfg.optim.get("fused", "auto")
    fused = device.type in ("cpu", "cuda") if fused == "auto" else bool(fused)
    return torch.optim.Adam(params, lr=float(cfg.optim.lr), betas=tuple(float(b) for b in cfg.optim.betas),
                            eps=float(cfg.optim.eps), weight_decay=float(cfg.optim.weight_decay), fused=fused)


def fingerprint(cfg: DictConfig, info: DatasetInfo, layout: Layout) -> dict:
    """What must not change across a resume: the model, the data order, the optimizer, the schedules
    and the layout (a checkpoint resumes bit-for-bit on the same layout only)."""
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("model", OmegaConf.to_container(cfg.model, resolve=True))
    walk("optim", OmegaConf.to_container(cfg.optim, resolve=True))
    for key in ("seed", "steps", "batch_tokens", "grad_accum", "precision", "data.shuffle_buffer",
                "data.heldout_shards", "data.num_workers", "parallel.feature_parallel", "deepspeed.zero_stage"):
        flat[key] = OmegaConf.select(cfg, key)
    flat.update({"world_size": layout.world, "dataset.model": info.model, "dataset.layers": list(info.layers),
                 "dataset.d_model": info.d_model, "dataset.n_tokens": info.n_tokens})
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


def train(cfg: DictConfig) -> Path:
    """Run (or resume) a training job; returns OUT/model, the whole trained CLT (model_io.load_clt)."""
    validate_train(cfg)
    if cfg.data.get("path") is None:
        raise ConfigError("config key 'data.path' = None: expected the dataset folder or URL written by clt-harvest")
    info = DatasetInfo.load(str(cfg.data.path))  # DatasetError names dataset.json when missing/bad
    try:
        full_cfg = clt_config(cfg.model, info.n_layers, info.d_model)
    except ConfigError as e:
        raise ConfigError(f"{e} ({info.json_path})") from None

    device = resolve_device(str(cfg.device), int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = init_distributed(str(cfg.parallel.backend), device)
    layout = Layout.build(int(cfg.parallel.feature_parallel))
    is_main = rank == 0

    deepspeed = _import_deepspeed(device)

    out_dir = Path(str(cfg.out_dir))
    ckpt_root = out_dir / "checkpoints"
    fp_now = fingerprint(cfg, info, layout)
    resume_from = ckpt.resolve_resume(cfg.resume, ckpt_root)
    saved = None
    if resume_from is not None:
        saved = ckpt.read_trainer_state(resume_from)
        ckpt.check_fingerprint(saved.get("fingerprint", {}), fp_now, resume_from)

    # Every rank builds the full CLT from the seed and keeps its slice, so any layout starts from the
    # same weights as FP=1.
    full = CLT(full_cfg, generator=torch.Generator().manual_seed(int(cfg.seed)))
    clt = shard_clt(full, layout).to(device)
    del full
    kernel_impl = _install_kernels(clt, str(cfg.get("kernels", "dense")))
    if device.type == "cpu":  # each step's large temporaries then reuse mapped memory
        from cltrain.kernels import retain_freed_cpu_memory
        retain_freed_cpu_memory()

    loader = loader_from_config(cfg.data, int(cfg.batch_tokens), dp_rank=layout.dp_rank, dp_size=layout.dp_size,
                                seed=int(cfg.seed), device=device)
    first = None
    rate = cfg.model.get("threshold_calibration_rate")
    if saved is None and rate is not None and full_cfg.activation == "jumprelu":
        # Calibrate on the first batch (which step 0 then trains on). FP ranks share the batch, so their
        # slices agree; DP replicas average their estimates so every replica starts identical.
        batches = iter(loader)
        first = next(batches)
        clt.calibrate_thresholds(first.x, float(rate))
        if layout.dp_size > 1:
            dist.all_reduce(clt.log_threshold.data, group=layout.dp_group)
            clt.log_threshold.data.div_(layout.dp_size)

    timer = StepTimer(cuda=device.type == "cuda")
    step_module = TrainStep(clt, cfg.model, timer)
    optimizer = make_optimizer(step_module.parameters(), cfg, device)
    engine, _, _, _ = deepspeed.initialize(model=step_module, optimizer=optimizer, mpu=layout.mpu(),
                                           config=deepspeed_config(cfg, layout), dist_init_required=False)
    zero3 = int(cfg.deepspeed.zero_stage) == 3
    if zero3:
        # TrainStep calls the CLT's pieces, not CLT.forward, so ZeRO-3 must gather the CLT's parameters
        # for TrainStep's forward/backward: register them as its external parameters.
        for p in clt.parameters():
            deepspeed.zero.register_external_parameter(step_module, p)

    stats = FeatureStats(full_cfg.n_layers, clt.cfg.n_features, device, int(cfg.dead_after_tokens),
                         float(cfg.get("dense_fire_rate", 0.1)))
    step, tokens, run_id = 0, 0, None
    if saved is not None:
        rank_state = ckpt.load_checkpoint(resume_from, engine)
        step, tokens, run_id = int(saved["step"]), int(saved["tokens"]), saved.get("wandb_run_id")
        loader.load_state_dict(rank_state["loader"])
        stats.load_state_dict(rank_state["features"])
        ckpt.set_rng_state(rank_state["rng"])
    if first is None:
        batches = iter(loader)

    steps = int(cfg.steps)
    # stop_at_step: end this invocation early (checkpointed) while the schedules still span `steps` --
    # for jobs with a wall-clock limit, resubmitted with resume=true.
    stop = steps if cfg.get("stop_at_step") is None else min(steps, int(cfg.stop_at_step))
    config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    logger = RunLogger(cfg.logger, out_dir, steps, step, is_main, run_id,
                       OmegaConf.to_container(cfg, resolve=True), progress=bool(cfg.get("progress", True)))
    logger.print(f"clt-train: {info.json_path} N={full_cfg.n_layers} D={full_cfg.d_model} F={full_cfg.n_features} "
                 f"world={world} (data x feature parallel = {layout.dp_size} x {layout.fp_size}) "
                 f"ZeRO-{cfg.deepspeed.zero_stage} {cfg.precision} kernels={kernel_impl} device={device}"
                 + (f", resumed from {resume_from} at step {step}" if saved is not None else ""))

    meta_base = {"dataset": _dataset_meta(info)}

    def write_model(folder: Path):
        """Gather the whole CLT (collective) and let rank 0 write it, in fp32 normalized space."""
        if zero3:
            with deepspeed.zero.GatheredParameters(list(clt.parameters())):
                state = {k: v.detach().float().cpu().clone() for k, v in clt.state_dict().items()}
        else:
            state = gather_clt_state({k: v.detach() for k, v in clt.state_dict().items()}, layout)
            state = {k: v.float().cpu() for k, v in state.items()}
        if is_main:
            save_clt(folder, state, full_cfg, dict(meta_base, train={
                "step": step, "tokens": tokens, "config": config_yaml}))

    def save(at_step: int) -> Path:
        trainer_state = {"step": at_step, "tokens": tokens, "fingerprint": fp_now, "wandb_run_id": logger.run_id,
                         "layout": {"world": layout.world, "data_parallel": layout.dp_size,
                                    "feature_parallel": layout.fp_size},
                         "dataset": info.path, "config": config_yaml}
        rank_state = {"loader": loader.state_dict(), "rng": ckpt.rng_state(), "features": stats.state_dict()}
        return ckpt.save_checkpoint(ckpt_root, at_step, engine, trainer_state, rank_state, write_model,
                                    int(cfg.get("keep_checkpoints", 0)), device)

    partial_sum = clt.reduce_partial if isinstance(clt.reduce_partial, PartialSum) else None
    dp, B, accum, log_every = layout.dp_size, int(cfg.batch_tokens), int(cfg.grad_accum), int(cfg.log_every)
    checkpoint_every = int(cfg.checkpoint_every)
    base_lr, warmup, decay = float(cfg.optim.lr), int(cfg.optim.warmup_steps), float(cfg.optim.decay_fraction)
    lam_final, lam_ramp = float(cfg.model.loss.lambda_s), float(cfg.model.loss.lambda_s_ramp_fraction)
    use_dead = float(cfg.model.loss.auxk) > 0
    flops_per_token = 6 * full_cfg.d_model * full_cfg.n_features * full_cfg.n_layers
    peak = peak_flops()
    last_ckpt = None
    t_report, tokens_report, step_report = time.perf_counter(), tokens, step
    try:
        while step < stop:
            lr = lr_at(step, steps, base_lr, warmup, decay)
            lam = lambda_s_at(step, steps, lam_final, lam_ramp)
            for group in optimizer.param_groups:  # ZeRO wrappers step these same groups
                group["lr"] = lr
            report = (step + 1) % log_every == 0 or step + 1 == stop
            timer.active = report or device.type == "cpu"
            if partial_sum is not None:
                partial_sum.timing = timer.active
            sums = None
            for _ in range(accum):
                with timer.phase("data"):
                    if first is not None:
                        batch, first = first, None
                    else:
                        try:
                            batch = next(batches)
                        except StopIteration:
                            raise DatasetError(f"{info.json_path}: the loader ended at step {step}") from None
                loss, terms, enc, y_hat = engine(batch.x, batch.y, lam, stats.dead_mask() if use_dead else None)
                stats.update(enc.acts, B * dp)
                if report:
                    sums = _accumulate(sums, terms, batch_metrics(enc, y_hat, batch.y))
                del enc, y_hat
                with timer.phase("backward"):
                    engine.backward(loss)
                with timer.phase("optimizer"):
                    engine.step()
            step += 1
            tokens += B * accum * dp
            if report:
                values = _report(sums, accum, layout, stats, timer, partial_sum, step - step_report)
                now = time.perf_counter()
                tok_s = (tokens - tokens_report) / max(now - t_report, 1e-9)
                t_report, tokens_report, step_report = now, tokens, step
                grad_norm = engine.get_global_grad_norm()
                values.update({"lr": lr, "lambda_s": lam, "tokens": tokens, "tokens_per_s": tok_s,
                               "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                               "loader/skipped": loader.skipped, **gpu_memory()})
                if peak:
                    values["mfu"] = tok_s * flops_per_token / (peak * world)
                logger.log(step, values, full_cfg.n_layers)
                logger.advance(1, loss=values["loss/total"], nmse=values["nmse/mean"], l0=values["l0/mean"])
            else:
                logger.advance(1)
            if step % checkpoint_every == 0 or step == stop:
                last_ckpt = save(step)
        if last_ckpt is None:  # resumed at (or past) the stop: make sure the final checkpoint exists
            last_ckpt = ckpt.latest_checkpoint(ckpt_root) or save(step)
        final = out_dir / "model"
        if is_main:
            _publish_model(last_ckpt / "model", final)
        if world > 1:
            dist.barrier()
        logger.print(f"clt-train: done at step {step}; model in {final}, checkpoint {last_ckpt}")
        return final
    finally:
        logger.close()
        loader.close()


def _accumulate(sums, terms, metrics):
    vals = {k: v.detach().float() for k, v in terms.items()}
    vals.update({k: v.detach().float() for k, v in metrics.items()})
    if sums is None:
        return vals
    return {k: sums[k] + vals[k] for k in sums}


def _report(sums, accum: int, layout: Layout, stats: FeatureStats, timer: StepTimer, partial_sum,
            n_steps: int) -> dict:
    """Average the micro-batch sums, reduce across ranks, and flatten to named scalars. Collective."""
    N = sums["nmse"].numel()
    # Local-feature quantities are summed over the FP group; then everything is averaged over DP.
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


def _publish_model(src: Path, dst: Path):
    """Copy the final checkpoint's model folder to OUT/model without a moment where OUT/model is half."""
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    replace_dir(tmp, dst)


# ----------------------------------------------------------------------------------------------------
# Console entry point


def _hydra_job(cfg: DictConfig):
    try:
        train(cfg)
    except (ConfigError, DatasetError, ckpt.CheckpointError) as e:
        print(f"clt-train: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def main():
    sys.argv = strip_launcher_args(sys.argv)
    dist_env()  # map SLURM_* to RANK/WORLD_SIZE/LOCAL_RANK now: the Hydra run dir is per ${RANK}
    import hydra

    hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")(_hydra_job)()


if __name__ == "__main__":
    main()
