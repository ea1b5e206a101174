"""The rank environment: which process of a job this is, read from the launcher's variables in one place
(torchrun, the deepspeed launcher and accelerate set RANK / WORLD_SIZE / LOCAL_RANK; SLURM sets SLURM_*).
A leaf module (imports nothing of the project)."""
from __future__ import annotations

import os
import re
import subprocess


def dist_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from the launcher's environment. torchrun, the deepspeed launcher
    and accelerate set RANK/WORLD_SIZE/LOCAL_RANK; under a bare `srun` only SLURM_* exist, so map them
    (MASTER_ADDR/MASTER_PORT must then come from the batch script, see launch/slurm.sbatch)."""
    env = os.environ
    if "RANK" not in env and int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env.setdefault("LOCAL_RANK", env.get("SLURM_LOCALID", "0"))
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")).split("(")[0])


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list (node[03-05,7],other -> node03), as `scontrol show hostnames`."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    head = re.split(r",(?![^\[]*\])", nodelist)[0]
    m = re.match(r"([^\[]+)\[([^\]]+)\]", head)
    if not m:
        return head
    first = m.group(2).split(",")[0].split("-")[0]
    return m.group(1) + first


def slurm_rendezvous(env=os.environ):
    """Inside a SLURM job started by submitit (SUBMITIT_EXECUTOR=slurm): the ranks come from this task's
    SLURM_* variables (never from a submitting shell's RANK), the rendezvous from the job's first node
    and a port derived from the job id (every task computes the same one). No-op elsewhere."""
    if env.get("SUBMITIT_EXECUTOR") != "slurm" or "SLURM_PROCID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env.get("SLURM_NTASKS", "1")
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if int(env["WORLD_SIZE"]) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        env["MASTER_ADDR"] = first_host(nodelist)
        env["MASTER_PORT"] = str(20000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
