"""Gradient-norm clipping in the client optimizer, for DeepSpeed ZeRO stage 0 in fp32.

At stage 0 without fp16/bf16, DeepSpeed 0.19 (runtime/engine.py, DeepSpeedEngine._take_model_step)
clips with its own deepspeed.runtime.utils.clip_grad_norm_ through clip_fp32_gradients() and drops the
norm it computed: `_global_grad_norm` is only copied from the optimizer's attribute of that name, which a
torch optimizer lacks, so get_global_grad_norm() is None. ClippedAdam clips where torch does (before
Adam's update, with torch's own clip arithmetic) and keeps the norm in `_global_grad_norm`, which the
engine then reports; the DeepSpeed config turns the engine's clipping off (engine.deepspeed_overrides).

Feature-parallel ranks hold disjoint slices of the parameters marked `model_parallel` (docs/design.md section 3)
and identical copies of the others, so the global norm sums the sharded squares over the FP group and
counts the replicated ones once. At stage 0 DeepSpeed has already averaged the gradients over the
data-parallel group before step(), so every DP replica computes the same norm without communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def global_grad_norm(params, fp_group=None) -> torch.Tensor:
    """The 2-norm of all gradients of the whole (unsharded) model."""
    params = [p for p in params if p.grad is not None]
    if fp_group is None or dist.get_world_size(fp_group) == 1:
        # torch.nn.utils.clip_grad_norm_'s own arithmetic, so one rank reproduces a plain torch run
        return torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
    sharded = [p.grad for p in params if getattr(p, "model_parallel", False)]
    replicated = [p.grad for p in params if not getattr(p, "model_parallel", False)]
    device = params[0].grad.device
    sq = torch.zeros((), dtype=torch.float32, device=device)
    if sharded:
        sq = torch.nn.utils.get_total_norm(sharded, 2.0).float().square()
    dist.all_reduce(sq, group=fp_group)
    if replicated:
        sq = sq + torch.nn.utils.get_total_norm(replicated, 2.0).float().square()
    return sq.sqrt()


class ClippedAdam(torch.optim.Adam):
    """torch.optim.Adam that first clips the global gradient norm to `max_norm` (0: no clipping) and keeps
    the norm before clipping in `_global_grad_norm` (the attribute DeepSpeed's engine reads)."""

    def __init__(self, params, max_norm: float, fp_group=None, **adam_kwargs):
        super().__init__(params, **adam_kwargs)
        self.max_norm, self.fp_group = float(max_norm), fp_group
        self._global_grad_norm = None

    @torch.no_grad()
    def step(self, closure=None):
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if params:
            norm = global_grad_norm(params, self.fp_group)
            if self.max_norm > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_norm, norm)
            self._global_grad_norm = norm
        return super().step(closure)
