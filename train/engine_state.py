"""A parameter's training state as whole tensors, read from and written to a DeepSpeed engine one
parameter at a time, whatever the ZeRO stage: the fp32 (master) weight and Adam's two moments.

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

import torch

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
