"""A training run's folder (out_dir): one run at a time, and no run replacing another's files unasked.

- `RunLock`: OUT/.cltrain.lock, created exclusively (O_EXCL) with the holder's host, PID, process start
  time and command line. A second run into the same folder stops at once, naming the first. A lock left
  by a process that is gone (killed, its node rebooted) is detected on the same host (the PID is not
  running, or is another process now) and replaced with a warning naming it; a lock from another host is
  never guessed at: the message says which file to delete once that run is known to be gone.
- `claim`: a fresh run (resume=false) into a folder that already holds a run (checkpoints, model, metrics)
  stops with exit 2 unless overwrite=true, which first removes the old run's files, so no mix of two runs
  remains. Collective: rank 0 decides, every rank raises the same error.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import torch.distributed as dist

from cltrain.errors import ConfigError

log = logging.getLogger(__name__)

LOCK = ".cltrain.lock"
# What a training run writes into its folder; overwrite=true removes exactly these.
RUN_FILES = ("checkpoints", "model", "metrics.jsonl", "memory", "wandb")


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22); None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19]) if fields[0] != "Z" else None


class RunLock:
    def __init__(self, folder: Path):
        self.folder, self.path, self.held = Path(folder), Path(folder) / LOCK, False

    def _mine(self) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": _start_ticks(os.getpid()),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}

    def _holder(self) -> dict | None:
        for _ in range(20):  # a lock being written right now: its content follows within moments
            try:
                return json.loads(self.path.read_text())
            except FileNotFoundError:
                return None
            except (OSError, json.JSONDecodeError):
                time.sleep(0.05)
        return {}

    def acquire(self):
        """Take the lock or raise ConfigError naming its holder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile
                if not self._stale(holder):
                    raise ConfigError(
                        f"{self.folder}: another run is using this folder (host {holder.get('host', '?')}, PID "
                        f"{holder.get('pid', '?')}, started {holder.get('started', '?')}: "
                        f"{holder.get('command', '?')}); wait for it to end or train into another out_dir. "
                        f"If that run is known to be gone, delete {self.path}")
                # Take a stale lock over by renaming it (only one of two racing runs succeeds).
                try:
                    os.rename(self.path, self.path.with_name(f"{LOCK}.stale-{os.getpid()}"))
                except FileNotFoundError:
                    continue
                self.path.with_name(f"{LOCK}.stale-{os.getpid()}").unlink(missing_ok=True)
                log.warning("%s: replaced a stale lock of PID %s on %s (started %s), which is no longer running",
                            self.path, holder.get("pid"), holder.get("host"), holder.get("started"))
                print(f"clt-train: {self.path}: the run that held it (PID {holder.get('pid')}, started "
                      f"{holder.get('started')}) is gone; lock taken over", flush=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(self._mine()))
            self.held = True
            return
        raise ConfigError(f"{self.path}: could not take the lock (it keeps changing hands)")

    @staticmethod
    def _stale(holder: dict) -> bool:
        if holder.get("host") != socket.gethostname():
            return False
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return False
        ticks = _start_ticks(pid)
        return ticks is None or (holder.get("start_ticks") is not None and ticks != holder["start_ticks"])

    def release(self):
        if self.held:
            self.held = False
            self.path.unlink(missing_ok=True)


def _old_run(folder: Path) -> list[str]:
    return [name for name in RUN_FILES if (folder / name).exists()]


def claim(folder: Path, resume, overwrite: bool, rank: int) -> RunLock | None:
    """Lock `folder` for this run (rank 0) and check that a fresh run does not land on an old one.
    Collective; returns rank 0's lock (release it at the end), None on other ranks."""
    lock, error = None, None
    if rank == 0:
        try:
            lock = RunLock(folder)
            lock.acquire()
            old = _old_run(folder)
            if old and resume in (False, None):
                if not overwrite:
                    raise ConfigError(
                        f"config key 'resume' = false: {folder} holds another run ({', '.join(old)}); pass "
                        f"resume=true to continue it, overwrite=true to replace it (its files are removed "
                        f"first), or train into another out_dir")
                for name in old:
                    p = folder / name
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
                print(f"clt-train: overwrite=true: removed the previous run's {', '.join(old)} from {folder}",
                      flush=True)
        except (ConfigError, OSError) as e:
            if lock is not None:
                lock.release()
            lock, error = None, str(e)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise ConfigError(error)
    return lock
