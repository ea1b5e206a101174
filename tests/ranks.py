"""Start a job's ranks as separate processes with the launcher's environment (RANK, WORLD_SIZE, ...), so a test
sees every rank's own exit code and stderr, which torchrun folds into one. Used by tests/test_exits.py and the
stress script tests/stress/exits.py."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

# What no rank may print on a path that its exit code calls clean.
CRASH_MARKS = ("terminate called", "Abort", "Traceback", "core dumped", "Segmentation fault")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(**extra) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CLTRAIN_EXIT_DIR"):
        env.pop(key, None)
    return dict(env, **extra)


@dataclass
class Ended:
    rank: int
    code: int
    stdout: str
    stderr: str

    def crashed(self) -> list[str]:
        return [m for m in CRASH_MARKS if m in self.stderr or m in self.stdout]


class Ranks:
    """`Ranks(n, args, logs)`: n processes of `python -m module args` (or `python script.py args`), rank r
    with RANK=r."""

    def __init__(self, n: int, args: list[str], logs: Path, module: str = "cltrain.train.trainer", **env):
        port = free_port()
        logs.mkdir(parents=True, exist_ok=True)
        self.procs, self.files = [], []
        for r in range(n):
            e = rank_env(RANK=str(r), WORLD_SIZE=str(n), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port), **env)
            out, err = open(logs / f"rank{r}.out", "w+"), open(logs / f"rank{r}.err", "w+")
            self.files.append((out, err))
            cmd = [module] if module.endswith(".py") else ["-m", module]  # a script, or a module
            self.procs.append(subprocess.Popen([sys.executable, *cmd, *args], env=e, stdout=out, stderr=err))

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def finish(self, timeout: float) -> list[Ended]:
        """Wait for every rank (killing all after `timeout` s); each one's code and output."""
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            for p in self.procs:
                p.kill()
                p.wait()
            raise AssertionError(f"ranks still running after {timeout} s:\n" + self._text())
        ended = []
        for r, (p, (out, err)) in enumerate(zip(self.procs, self.files)):
            out.seek(0), err.seek(0)
            ended.append(Ended(r, p.returncode, out.read(), err.read()))
            out.close(), err.close()
        return ended

    def _text(self) -> str:
        parts = []
        for r, (out, err) in enumerate(self.files):
            out.seek(0), err.seek(0)
            parts.append(f"--- rank {r} stdout\n{out.read()[-2000:]}\n--- rank {r} stderr\n{err.read()[-3000:]}")
        return "\n".join(parts)


def wait_for_step(out: Path, step: int, running, timeout: float = 120):
    """Until OUT/metrics.jsonl has a step >= `step`; `running()` False means the job ended early."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        f = out / "metrics.jsonl"
        # only whole lines: the trainer may be half-way through appending the last one
        lines = f.read_text().split("\n")[:-1] if f.is_file() else []
        if any(json.loads(x)["step"] >= step for x in lines if x.strip()):
            return
        assert running(), f"the job ended before step {step}"
        time.sleep(0.1)
    raise AssertionError(f"no step {step} within {timeout} s")


def describe(ended: list[Ended]) -> str:
    return "\n".join(f"--- rank {e.rank}: exit {e.code}\nstdout: {e.stdout[-1500:]}\nstderr: {e.stderr[-3000:]}"
                     for e in ended)
