"""The parallel layout (docs/design.md section 3): world = data_parallel x feature_parallel.

Applied to a CLT from outside; the CLT module itself stays rank-free:
- `init_distributed` starts (or joins) the process group from the launcher's environment variables
  (torchrun, the deepspeed launcher, accelerate, or SLURM's srun);
- `Layout` builds the feature-parallel (FP) and data-parallel (DP) groups and hands DeepSpeed its
  `mpu` view of them;
- `local_clt` builds this rank's slice of the CLT (features [r*F/P, (r+1)*F/P) of every layer) on the
  meta device, materializes and initializes only that slice (the CLT's keyed init gives every P the
  same weights), and `parallelize` installs the collectives (partial-sum all-reduce, feature gather)
  and marks the sharded parameters for DeepSpeed. The whole CLT is never built on one rank;
  checkpoints are written and read per feature shard (train/checkpoint.py).

Rank placement: rank = dp_rank * P + fp_rank, so an FP group is P consecutive ranks (one node, where
its per-step all-reduce of B*N*D values is cheapest); a DP group takes one rank from each FP group.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from cltrain.rank_env import dist_env

from .clt import CLT, CLTConfig

# ----------------------------------------------------------------------------------------------------
# Process group


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dist_timeout() -> datetime.timedelta:
    """How long a collective may wait for a missing rank (CLTRAIN_DIST_TIMEOUT seconds, default 600);
    given to every process group, so a dead or hung rank ends the job instead of hanging it."""
    return datetime.timedelta(seconds=int(os.environ.get("CLTRAIN_DIST_TIMEOUT", "600")))


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("config key 'device' = 'cuda' but torch sees no CUDA device")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(backend: str = "auto", device: torch.device | None = None) -> tuple[int, int]:
    """Join the process group the launcher set up (idempotent); returns (rank, world_size).

    A single process without launcher variables gets a 1-process group on a free local port, so the
    code path (DeepSpeed included) is the same for 1 and many processes."""
    rank, world, local_rank = dist_env()
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("LOCAL_RANK", str(local_rank))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if key not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but the environment variable {key} is not set: "
                               "launch with torchrun / deepspeed / accelerate, or export it (see launch/README.md)")
    if backend == "auto":
        backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if backend == "nccl" else "cpu")
    kwargs = {}
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if restart is not None and world > 1:
        # Under torchrun every round of a restarted group meets in the same key-value store; keys of this
        # round get their own prefix, so no rank reads the dead round's gloo addresses ("connectFullMesh
        # ... Connection refused" after --max-restarts, torch 2.13).
        agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "False") == "True"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                              is_master=rank == 0 and not agent_store, timeout=dist_timeout(),
                              wait_for_workers=False)
        kwargs["store"] = dist.PrefixStore(f"cltrain/round-{restart}", store)
    dist.init_process_group(backend=backend, rank=rank, world_size=world, timeout=dist_timeout(),
                            device_id=device if backend == "nccl" else None, **kwargs)
    return rank, world


# ----------------------------------------------------------------------------------------------------
# Layout and DeepSpeed's mpu view


@dataclass
class Layout:
    world: int
    rank: int
    fp_size: int
    dp_size: int
    fp_rank: int
    dp_rank: int
    fp_group: object
    dp_group: object
    fp_ranks: list[int]
    dp_ranks: list[int]

    @classmethod
    def build(cls, feature_parallel: int) -> "Layout":
        """Create the groups (collective: every rank calls it with the same argument)."""
        world, rank = dist.get_world_size(), dist.get_rank()
        P = int(feature_parallel)
        if world % P:
            raise ValueError(f"config key 'parallel.feature_parallel' = {P} does not divide the world size "
                             f"{world} (world = data_parallel x feature_parallel)")
        dp = world // P
        fp_group = dp_group = None
        fp_ranks = dp_ranks = None
        # new_group is collective over the whole world: every rank creates every group, in order.
        for d in range(dp):
            ranks = list(range(d * P, (d + 1) * P))
            g = dist.new_group(ranks, timeout=dist_timeout())
            if rank in ranks:
                fp_group, fp_ranks = g, ranks
        for f in range(P):
            ranks = list(range(f, world, P))
            g = dist.new_group(ranks, timeout=dist_timeout())
            if rank in ranks:
                dp_group, dp_ranks = g, ranks
        return cls(world, rank, P, dp, rank % P, rank // P, fp_group, dp_group, fp_ranks, dp_ranks)

    def mpu(self) -> "MPU":
        return MPU(self)


class MPU:
    """DeepSpeed's model-parallel-unit interface: feature parallelism plays the model-parallel role, so
    DeepSpeed all-reduces gradients and shards optimizer state over the DP group only and counts
    feature-sharded parameters (p.model_parallel) once in the global grad norm."""

    def __init__(self, layout: Layout):
        self.layout = layout

    def get_model_parallel_rank(self):
        return self.layout.fp_rank

    def get_model_parallel_world_size(self):
        return self.layout.fp_size

    def get_model_parallel_group(self):
        return self.layout.fp_group

    def get_data_parallel_rank(self):
        return self.layout.dp_rank

    def get_data_parallel_world_size(self):
        return self.layout.dp_size

    def get_data_parallel_group(self):
        return self.layout.dp_group

    def get_data_parallel_group_ranks(self):
        return list(self.layout.dp_ranks)


# ----------------------------------------------------------------------------------------------------
# The partial-reconstruction all-reduce


class _SumOverGroup(torch.autograd.Function):
    """Forward: all-reduce(sum) over the FP group. Backward: identity -- the loss, hence d loss / d y_hat,
    is identical on every rank of the group, and d y_hat / d partial_r = I."""

    @staticmethod
    def forward(ctx, partial, group):
        out = partial.contiguous().clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class PartialSum:
    """CLT.reduce_partial for a feature-sharded CLT. While `timing` is set it adds its wall time to
    `seconds` (the step-time split's "communication"), synchronizing CUDA around the collective so the
    time is the collective's, not the queue's."""

    def __init__(self, group):
        self.group = group
        self.seconds = 0.0
        self.timing = False

    def __call__(self, partial: torch.Tensor) -> torch.Tensor:
        if not self.timing:
            return _SumOverGroup.apply(partial, self.group)
        if partial.is_cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = _SumOverGroup.apply(partial, self.group)
        if partial.is_cuda:
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t
        return out


# ----------------------------------------------------------------------------------------------------
# The feature-gather (for top-k cuts over the whole dictionary)


class _GatherLastDim(torch.autograd.Function):
    """Concatenate each rank's t [..., k] along the last dim, in rank order (no gradient: only used on
    detached values to find top-k cuts)."""

    @staticmethod
    def forward(ctx, t, group, size):
        parts = [torch.empty_like(t) for _ in range(size)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=-1)


class FeatureGather:
    """CLT.gather_features for a feature-sharded CLT."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return _GatherLastDim.apply(t.detach(), self.group, self.size)


# ----------------------------------------------------------------------------------------------------
# This rank's slice of the CLT

# Parameters whose feature dim is sharded, and which dim: W_enc [N, F, D], b_enc / log_threshold [N, F]
# (dim 1), each W_dec.s [F, S, D] (dim 0). b_dec [N, D] and the batchtopk_threshold buffer are replicated.
def shard_dim(name: str) -> int | None:
    if name.startswith("W_dec."):
        return 0
    return {"W_enc": 1, "b_enc": 1, "log_threshold": 1}.get(name)


def feature_slice(n_features: int, fp_size: int, fp_rank: int) -> slice:
    per = n_features // fp_size
    return slice(fp_rank * per, (fp_rank + 1) * per)


def local_config(cfg: CLTConfig, fp_size: int) -> CLTConfig:
    """The config of one rank's slice; refuses a feature count the FP size does not divide."""
    if cfg.n_features % fp_size:
        raise ValueError(f"config key 'model.n_features' = {cfg.n_features}: expected a multiple of "
                         f"parallel.feature_parallel={fp_size} (each rank holds n_features / "
                         f"feature_parallel features of every layer)")
    return dataclasses.replace(cfg, n_features=cfg.n_features // fp_size)


def local_clt(cfg: CLTConfig, layout: "Layout", seed: int, device="meta") -> CLT:
    """This rank's slice of the CLT, on `device` (meta: no memory yet; see materialize)."""
    sl = feature_slice(cfg.n_features, layout.fp_size, layout.fp_rank)
    return CLT(local_config(cfg, layout.fp_size), seed=seed, feature_range=(sl.start, cfg.n_features),
               device=device)


def materialize(clt: CLT, layout: "Layout", device: torch.device) -> CLT:
    """Allocate a meta-built slice on `device`, install the layout, initialize it (keyed: only this
    slice's rows are drawn)."""
    clt.to_empty(device=device)
    parallelize(clt, layout)
    clt.reset_parameters()
    return clt


def parallelize(clt: CLT, layout: "Layout") -> CLT:
    """Install the feature-parallel collectives and mark the sharded parameters (DeepSpeed counts
    p.model_parallel parameters once in the global grad norm). P = 1: nothing to do."""
    for name, p in clt.named_parameters():
        p.model_parallel = layout.fp_size > 1 and shard_dim(name) is not None
    if layout.fp_size > 1:
        clt.reduce_partial = PartialSum(layout.fp_group)
        clt.gather_features = FeatureGather(layout.fp_group, layout.fp_size)
    return clt
