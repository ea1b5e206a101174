"""Atomic, resumable checkpoints.

Layout of OUT/checkpoints:
    latest                 one line: the name of the newest complete checkpoint (replaced atomically)
    step-000500/
        trainer.json       step, tokens, config fingerprint, W&B run id, layout, resolved config (rank 0)
        rank-00000.pt ...  per rank: loader position, RNG states, dead-feature counters
        ds/                DeepSpeed's engine checkpoint (weights, optimizer + ZeRO partitions)
        model/             the whole CLT gathered from feature shards (model_io.save_clt), for eval/export

A checkpoint is written to step-XXXXXX.tmp, renamed when every rank has finished, and only then does
`latest` move; a crash or a full disk mid-write leaves `latest` on the previous good checkpoint, and
a stale .tmp is removed by the next save. Ranks agree on success with one all-reduce, so one rank's
failed write stops every rank with the same message instead of hanging the others.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .config import ConfigError
from .model_io import atomic_write_bytes

LATEST = "latest"
TRAINER = "trainer.json"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit this run; the message names the path."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------------
# Finding a checkpoint


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint "
                              f"(no {TRAINER}); point 'resume' at an earlier step-* folder")
    return path


def resolve_resume(resume, root: Path) -> Path | None:
    """resume = false: start fresh. true: OUT/checkpoints/latest, or fresh if none exists yet (so a
    preempted job can be resubmitted unchanged). A path: a step-* folder, a checkpoints folder, or a run
    folder holding checkpoints/."""
    if resume is None or resume is False:
        return None
    if resume is True:
        return latest_checkpoint(root)
    path = Path(str(resume))
    for candidate in (path, path / "checkpoints"):
        if (candidate / TRAINER).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return latest_checkpoint(candidate)
    raise CheckpointError(f"config key 'resume' = {str(resume)!r}: no checkpoint there (expected a folder "
                          f"with {TRAINER}, or one with a '{LATEST}' file)")


def read_trainer_state(path: Path) -> dict:
    try:
        return json.loads((path / TRAINER).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / TRAINER}: unreadable checkpoint description ({e})") from None


# ----------------------------------------------------------------------------------------------------
# Config fingerprint


def check_fingerprint(saved: dict, current: dict, path: Path):
    """Refuse to resume with a config that changes the model, the data order or the layout."""
    diff = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if diff:
        lines = "; ".join(f"'{k}' = {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in diff[:8])
        raise ConfigError(f"{path}: checkpoint from another config: {lines}. Resume with the checkpoint's "
                          f"values (see {path / TRAINER}) or train into a new out_dir")


# ----------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Save / load


def _all_ok(ok: bool, device) -> bool:
    """True only if every rank's `ok` is True (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save_checkpoint(root: Path, step: int, engine, trainer_state: dict, rank_state: dict,
                    write_model, keep: int, device) -> Path:
    """Collective: every rank calls it. `write_model(folder)` writes the gathered CLT (it is a
    collective over the FP group too; rank 0 writes). Returns the final checkpoint folder."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    final = root / step_name(step)
    tmp = root / (step_name(step) + ".tmp")
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crashed save
            tmp.mkdir()
        except OSError as e:
            error = e
    if not _all_ok(error is None, device):
        raise CheckpointError(f"{tmp}: cannot create the checkpoint folder ({error or 'failed on rank 0'})")
    try:
        engine.save_checkpoint(str(tmp / "ds"), tag="state", save_latest=False)
        torch.save(rank_state, tmp / rank_file(rank))
    except (OSError, RuntimeError) as e:
        error = e
    # write_model is a collective over the FP group: call it on every rank even after a local failure
    # is known only here, so no rank waits forever in an all-gather.
    try:
        write_model(tmp / "model")
        if rank == 0 and error is None:
            state = dict(trainer_state, step=step)
            atomic_write_bytes(tmp / TRAINER, json.dumps(state, indent=2).encode())
    except (OSError, RuntimeError) as e:
        error = error or e
    if not _all_ok(error is None, device):
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        pointer = latest_checkpoint_name(root)
        raise CheckpointError(
            f"{tmp}: writing the checkpoint failed ({error or 'on another rank'}); nothing was published, "
            f"'{root / LATEST}' still names {pointer or 'no checkpoint'}. Free disk space and resume.")
    if rank == 0:
        if final.exists():  # the same step saved again (e.g. after a resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_bytes(root / LATEST, (final.name + "\n").encode())
        _prune(root, keep, final.name)
    _barrier()
    return final


def latest_checkpoint_name(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _prune(root: Path, keep: int, newest: str):
    """Keep the `keep` newest checkpoints (0 keeps all); never the one `latest` names."""
    if keep <= 0:
        return
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
    for p in done[:-keep]:
        if p.name != newest:
            shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path, engine) -> dict:
    """Load the engine state (weights, optimizer) and return this rank's saved state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    rf = path / rank_file(rank)
    if not rf.is_file():
        raise CheckpointError(f"{rf}: missing -- the checkpoint was written by a different number of "
                              "processes (resume on the same layout, or start a new run)")
    load_path, _ = engine.load_checkpoint(str(path / "ds"), tag="state", load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"{path / 'ds'}: DeepSpeed found no engine state there")
    return torch.load(rf, map_location="cpu", weights_only=False)
