"""A trained CLT as one self-describing file pair: weights (safetensors) + metadata (JSON).

clt-train writes it (whole, gathered from feature shards) next to every checkpoint; clt-eval and
clt-export read it. The weights are in normalized space; `meta["dataset"]` carries what is needed to
map back to raw activations (per-layer scales) and to find the base model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .clt import CLT, CLTConfig

WEIGHTS, META = "model.safetensors", "model.json"


def atomic_write_bytes(path: Path, data: bytes):
    """Write to a temporary name in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a failed write (e.g. disk full) leaves nothing behind
        raise


def replace_dir(stage: Path, dst: Path):
    """Move a finished folder `stage` to `dst`, replacing an older `dst` only at the very end, so
    readers see the old folder or the new one, never half of either."""
    stage, dst = Path(stage), Path(dst)
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, old)
    try:
        os.replace(stage, dst)
    except OSError:
        if old is not None:
            os.replace(old, dst)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def clt_state(clt: CLT) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in clt.state_dict().items()}


def save_clt(folder: str | os.PathLike, state: dict[str, torch.Tensor], cfg: CLTConfig, meta: dict):
    """Write model.safetensors and model.json into folder (each atomically; json last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, folder / WEIGHTS)
    doc = {"clt_config": dataclasses.asdict(cfg), **meta}
    atomic_write_bytes(folder / META, json.dumps(doc, indent=2).encode())


def load_clt(folder: str | os.PathLike, map_location="cpu") -> tuple[CLT, dict]:
    """Read a folder written by save_clt; returns the CLT (eval mode) and its metadata."""
    folder = Path(folder)
    for name in (WEIGHTS, META):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name}: not found (expected a CLT written by clt-train)")
    try:
        meta = json.loads((folder / META).read_text())
        cfg = CLTConfig(**meta["clt_config"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / META}: not a cltrain model description ({e})") from None
    clt = CLT(cfg)
    state = load_file(str(folder / WEIGHTS), device=str(map_location))
    expected = {k: tuple(v.shape) for k, v in clt.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))
        raise ValueError(f"{folder / WEIGHTS}: weights do not match {folder / META} "
                         f"(expected vs found differ in {diff[:4]})")
    clt.load_state_dict(state)
    return clt.eval(), meta
