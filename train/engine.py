"""Everything this project knows about DeepSpeed: importing it, its config, the client optimizer, the
engine around one dictionary's training step, and a parameter's training state read from and written to
the engine. No other module imports deepspeed or reads an engine's internals.

The engine: torch Adam as DeepSpeed's client optimizer (fused where supported: it runs on CPU and CUDA
without compiling DeepSpeed's C++ ops and reproduces a plain torch run exactly); ZeRO buckets sized to
the rank's parameters; under ZeRO-3 the CLT's parameters registered as the step module's external
parameters. The versions this was validated on are pinned in setup.py.

A parameter's training state is read and written as whole tensors, one parameter at a time, whatever the
ZeRO stage: the fp32 (master) weight and Adam's two moments.

This is how checkpoints stay independent of the layout that wrote them: they store, per feature
shard, whole tensors (not DeepSpeed's flat ZeRO partitions), so a run resumes on another data- or
feature-parallel size and another ZeRO stage. DeepSpeed's tensor-fragment API (deepspeed.utils.
safe_get_full_* / safe_set_full_*) maps a parameter to its fragments of the flat partitions; reading
is a collective over the data-parallel group (each replica holds a part), writing is local (each
replica keeps its part of the value it is given).

Adam's state is created lazily by its first step; a checkpoint taken before any step stores zero
moments, and loading into a fresh engine first creates the state (`ensure_adam_state`), which needs
DeepSpeed's private `_lazy_init_hp_params_optimizer_state` (ZeRO-1/2): setup.py pins deepspeed for it.
"""
from __future__ import annotations

import logging
import os
import sys
import warnings

import torch


from .grad_clip import ClippedAdam

# ----------------------------------------------------------------------------------------------------
# Building the engine


def zero_stage(s, dp_size: int, precision: str) -> int:
    """The ZeRO stage the engine runs: the configured one, except where there is nothing to shard.

    With one data-parallel replica (dp_size 1, e.g. pure feature parallelism) ZeRO-1/2/3 shard over one
    rank, yet DeepSpeed's ZeRO optimizer still keeps an fp32 master copy and an fp32 copy of the gradient
    partition beside the fp32 weights and gradients (2 x the parameters: issue 26). In fp32 the run then
    uses stage 0, where the client optimizer updates the weights in place (ClippedAdam), which gives the
    same updates up to the clip's fp32 rounding (tests/test_zero.py). In bf16 the fp32 master copy is the
    point of mixed precision and stage 0 bf16 is refused (config.check_zero_stage_precision), so the
    configured stage stays. The configured stage still applies as soon as there is a second replica."""
    return run_stage(int(s.deepspeed.zero_stage), dp_size, precision)


def run_stage(configured: int, dp_size: int, precision: str) -> int:
    """zero_stage's rule on plain values (train/memory.py's estimate uses it too)."""
    return 0 if dp_size == 1 and precision == "fp32" else configured


def deepspeed_overrides(s, precision: str, stage: int | None = None) -> dict:
    """Entries to merge into the DeepSpeed config the trainer builds (deepspeed_config).

    ZeRO stage 0 with fp32: DeepSpeed 0.19's engine clips with deepspeed.runtime.utils.clip_grad_norm_
    inside DeepSpeedEngine._take_model_step and throws the norm away, so get_global_grad_norm() is None
    (logged as nan), and its clip arithmetic differs from torch's by rounding. There the trainer clips in
    the client optimizer instead (train/grad_clip.py: ClippedAdam, which DeepSpeed reads the norm from),
    so DeepSpeed's own clipping is turned off. `precision` is the resolved one (resolve_precision); stage 0
    in bf16 is refused (config.TrainSettings.check_zero_stage_precision). `stage`: the stage the engine
    runs (zero_stage), default the configured one."""
    stage = s.deepspeed.zero_stage if stage is None else stage
    if stage == 0 and precision == "fp32":
        return {"gradient_clipping": 0.0}
    return {}


def clips_in_optimizer(s, precision: str, stage: int | None = None) -> bool:
    """True where the client optimizer must clip (see deepspeed_overrides)."""
    return "gradient_clipping" in deepspeed_overrides(s, precision, stage)


def bucket_elements(local_params: int, dp_size: int = 2) -> int:
    """Elements per ZeRO gradient-reduction / all-gather bucket. DeepSpeed's default (5e8) allocates
    a 2 GB fp32 buffer per bucket whatever the model's size -- more than a small rank's whole state; an
    eighth of the rank's parameters (at least 1M, at most 5e7 elements) keeps collectives large. With one
    replica (bf16 ZeRO-1/2 at dp_size 1) nothing is communicated: the minimum."""
    if dp_size == 1:
        return int(1e6)
    return int(min(5e7, max(1e6, local_params // 8)))


def deepspeed_config(s, layout, local_params: int = 0, precision: str = "fp32") -> dict:
    stage = zero_stage(s, layout.dp_size, precision)
    zero = {"stage": stage, "overlap_comm": s.deepspeed.overlap_comm}
    if stage in (1, 2):
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = bucket_elements(local_params, layout.dp_size)
    for key in ("reduce_bucket_size", "allgather_bucket_size", "stage3_param_persistence_threshold"):
        if getattr(s.deepspeed, key) is not None and stage >= 1:
            zero[key] = getattr(s.deepspeed, key)
    ds = {
        # DeepSpeed counts samples; ours are tokens, so a "sample" is a token.
        "train_micro_batch_size_per_gpu": int(s.batch_tokens),
        "gradient_accumulation_steps": int(s.grad_accum),
        "train_batch_size": int(s.batch_tokens) * int(s.grad_accum) * layout.dp_size,
        "gradient_clipping": float(s.optim.grad_clip),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Ignore"},
    }
    ds.update(deepspeed_overrides(s, precision, stage))
    return ds


def make_optimizer(params, s, device: torch.device, layout,
                   precision: str) -> torch.optim.Optimizer:
    """torch Adam as DeepSpeed's client optimizer: fused=True runs on CPU and CUDA without compiling
    DeepSpeed's C++ ops and reproduces a plain torch run exactly. At ZeRO-0 in fp32 it also clips
    (ClippedAdam, train/grad_clip.py: DeepSpeed's stage-0 clipping loses the norm)."""
    fused = s.optim.fused
    fused = device.type in ("cpu", "cuda") if fused == "auto" else bool(fused)
    kwargs = dict(lr=float(s.optim.lr), betas=tuple(float(b) for b in s.optim.betas),
                  eps=float(s.optim.eps), weight_decay=float(s.optim.weight_decay), fused=fused)
    if clips_in_optimizer(s, precision, zero_stage(s, layout.dp_size, precision)):
        return ClippedAdam(params, float(s.optim.grad_clip), fp_group=layout.fp_group, **kwargs)
    return torch.optim.Adam(params, **kwargs)


def import_deepspeed(device: torch.device):
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


def build_engine(deepspeed, step_module: torch.nn.Module, clt, s, layout, device: torch.device, precision: str):
    """(engine, client optimizer) for one dictionary's step module (train/dictionary.py's TrainStep)."""
    optimizer = make_optimizer(step_module.parameters(), s, device, layout, precision)
    engine, _, _, _ = deepspeed.initialize(
        model=step_module, optimizer=optimizer, mpu=layout.mpu(),
        config=deepspeed_config(s, layout, sum(p.numel() for p in clt.parameters()), precision),
        dist_init_required=False)
    stage = zero_stage(s, layout.dp_size, precision)
    if stage == 0 and layout.dp_size == 1:
        # Stage 0 all-reduces the gradients over data parallel through flattened copies of them (a whole
        # extra gradient at its default bucket size): with one replica there is no peer, and the
        # average over one replica is the gradient itself (x 1.0), so skip it.
        engine.enable_backward_allreduce = False
    if stage == 3:
        # TrainStep calls the CLT's pieces, not CLT.forward, so ZeRO-3 must gather the CLT's parameters
        # for TrainStep's forward/backward: register them as its external parameters.
        for p in clt.parameters():
            deepspeed.zero.register_external_parameter(step_module, p)
    return engine, optimizer


def state_bytes(engine) -> int:
    """Bytes of parameters and optimizer state this rank holds (measured from the live tensors)."""
    seen, total = set(), 0
    tensors = list(engine.module.parameters())
    for st in base_optimizer(engine).state.values():
        tensors += [v for v in st.values() if torch.is_tensor(v)]
    opt = engine.optimizer
    tensors += list(getattr(opt, "single_partition_of_fp32_groups", []))
    tensors += list(getattr(opt, "fp32_partitioned_groups_flat", []))
    for t in tensors:
        t = t.ds_tensor if hasattr(t, "ds_tensor") else t
        key = (t.data_ptr(), t.numel())
        if t.numel() and key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------------
# A parameter's training state, whole


MOMENTS = ("exp_avg", "exp_avg_sq")


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO and bf16 wrappers keep it as .optimizer)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _has_fragments(p) -> bool:
    # _hp_mapping is None (but present) on a replica whose partition holds none of p: it still takes
    # part in the gathers, contributing nothing.
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def _state_ready(engine) -> bool:
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):  # ZeRO-1/2: fragments linked after the first step
        return bool(opt._hp_optimizer_states_linked)
    return len(base_optimizer(engine).state) > 0


def adam_step(engine) -> int:
    """Adam's step count (the same for every parameter); 0 before the first step."""
    for st in base_optimizer(engine).state.values():
        if "step" in st:
            return int(st["step"])
    return 0


def get_full_state(engine, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
    """{"weight", "exp_avg", "exp_avg_sq"} of p as fp32 tensors of p's full (local-slice) shape.
    A collective over the data-parallel group when DeepSpeed partitions p's state: every DP rank must
    call it for the same parameters in the same order."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    ready = _state_ready(engine)
    if _has_fragments(p):
        out = {"weight": safe_get_full_fp32_param(p)}
        for key in MOMENTS:
            out[key] = safe_get_full_optimizer_state(p, key) if ready else torch.zeros_like(out["weight"])
    else:  # ZeRO-0 in fp32: the client optimizer holds p itself
        state = base_optimizer(engine).state.get(p, {})
        out = {"weight": p.detach().float()}
        for key in MOMENTS:
            out[key] = state[key].detach().float() if key in state else torch.zeros_like(out["weight"])
    return {k: v.detach().float().reshape(p.ds_shape if hasattr(p, "ds_shape") else p.shape).cpu()
            for k, v in out.items()}


@torch.no_grad()
def ensure_adam_state(engine, step: int):
    """Create Adam's state (zero moments) where the first step has not yet done so, and set its step
    count everywhere, so that set_full_state can fill it."""
    opt, base = engine.optimizer, base_optimizer(engine)

    def fresh(like: torch.Tensor) -> dict:
        return {"step": torch.zeros((), dtype=torch.float32, device=like.device),
                "exp_avg": torch.zeros_like(like), "exp_avg_sq": torch.zeros_like(like)}

    if hasattr(opt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        for flat in opt.single_partition_of_fp32_groups:
            if flat not in base.state:
                base.state[flat] = fresh(flat)
        opt._lazy_init_hp_params_optimizer_state()
    elif hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: state made at engine initialization
        for flat in opt.fp32_partitioned_groups_flat:
            if flat not in base.state:
                base.state[flat] = fresh(flat)
    else:
        for group in base.param_groups:
            for q in group["params"]:
                if q not in base.state:
                    base.state[q] = fresh(q)
    for st in base.state.values():
        if "step" in st:
            st["step"].fill_(float(step))


@torch.no_grad()
def set_full_state(engine, p: torch.nn.Parameter, state: dict[str, torch.Tensor]):
    """Load {"weight", "exp_avg", "exp_avg_sq"} (full local-slice tensors) into p, its fp32 master copy
    and Adam's moments. Call ensure_adam_state first. Local (no collective) except under ZeRO-3."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    weight = state["weight"]
    if hasattr(p, "ds_id"):  # ZeRO-3: the module holds a partition; gather, set, re-partition
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            p.data.copy_(weight.to(p.device, p.dtype))
    else:
        p.data.copy_(weight.to(p.device, p.dtype))
    if _has_fragments(p):
        dev = p.device
        safe_set_full_fp32_param(p, weight.to(dev, torch.float32))
        for key in MOMENTS:
            safe_set_full_optimizer_state(p, state[key].to(dev, torch.float32), key)
    else:
        st = base_optimizer(engine).state[p]
        for key in MOMENTS:
            st[key].copy_(state[key].to(st[key].device, st[key].dtype))
