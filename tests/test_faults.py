"""A cluster day: preemption, killed and hung ranks, another run's checkpoint, W&B after a resume.

Real processes (the clt-train entry point, torchrun, gloo on CPU, fp32); weights compared exactly.
docs/operations.md names each test here beside the failure it covers.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cltrain.train import lifecycle, trainer
from cltrain.train.checkpoint import CheckpointError
from cltrain.train.config import compose
from cltrain.train.data import write_synthetic_dataset
from cltrain.train.model_io import ModelReader

pytestmark = pytest.mark.timeout(600)

COMMON = ["model.n_features=16", "batch_tokens=64", "log_every=1", "logger.mode=disabled", "progress=false",
          "data.num_workers=0", "data.shuffle_buffer=256", "data.heldout_shards=1", "optim.lr=0.01"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "ds"
    write_synthetic_dataset(path, n_layers=3, d_model=8, n_tokens=4096, tokens_per_sample=16,
                            shard_tokens=256, seed=2)
    return path


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def _weights(model_dir):
    reader = ModelReader(model_dir)
    return {k: reader.tensor(k) for k in reader.expected_shapes()}


def _start(cmd, tmp_path: Path, **env):
    """Popen with output to files (a pipe nobody reads while waiting would fill and block the job)."""
    log = open(tmp_path / f"job-{len(list(tmp_path.glob('job-*')))}.log", "w+")
    proc = subprocess.Popen(cmd, env=_env(**env), stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def _finish(proc, timeout) -> str:
    """Wait for the job; its whole output."""
    try:
        proc.wait(timeout=timeout)
    finally:
        proc.log.seek(0)
        text = proc.log.read()
        proc.log.close()
    return text


def _wait_for_step(out: Path, step: int, proc, timeout=120):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        f = out / "metrics.jsonl"
        if f.is_file() and any(json.loads(x)["step"] >= step for x in f.read_text().splitlines() if x.strip()):
            return
        assert proc.poll() is None, _finish(proc, 1)[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_preemption_checkpoints_and_the_resumed_run_equals_an_uninterrupted_one(data, tmp_path, sig):
    args = [f"data.path={data}", *COMMON, "steps=400", "checkpoint_every=1000"]
    out = tmp_path / "pre"
    proc = _start([sys.executable, "-m", "cltrain.train.trainer", f"out_dir={out}", *args], tmp_path)
    _wait_for_step(out, 3, proc)
    proc.send_signal(sig)
    text = _finish(proc, 120)
    assert proc.returncode == lifecycle.EXIT_PREEMPTED, text[-3000:]
    assert f"{signal.Signals(sig).name} received: checkpointed at step" in text
    saved = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert saved >= 3 and not (out / "model").exists()  # checkpointed, not finished
    cut = compose("train", [f"out_dir={out}", *args, "resume=true", f"stop_at_step={saved + 3}"])
    resumed = trainer.train(cut)
    straight = trainer.train(compose("train", [f"out_dir={tmp_path / 'straight'}", *args,
                                               f"stop_at_step={saved + 3}"]))
    a, b = _weights(straight), _weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().split()[2] != "Z"


def test_a_killed_rank_is_relaunched_by_torchrun_and_resumes_by_itself(data, tmp_path):
    """torchrun --max-restarts=1 with resume=true: SIGKILL one rank after the first checkpoint; its
    loader worker dies with it, torchrun restarts the group, and the run resumes from the checkpoint and
    ends where an uninterrupted run ends."""
    out = tmp_path / "relaunch"
    args = [f"data.path={data}", *COMMON, "steps=40", "checkpoint_every=5", "resume=true", "parallel=fp2",
            "data.num_workers=1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--max-restarts", "1", "-m", "cltrain.train.trainer", f"out_dir={out}", *args]
    proc = _start(cmd, tmp_path)
    _wait_for_step(out, 7, proc)
    workers = _children(proc.pid)
    assert len(workers) == 2
    victim = workers[1]
    loader_workers = _children(victim)
    assert loader_workers, "the rank has a loader worker process"
    os.kill(victim, signal.SIGKILL)
    t0 = time.monotonic()
    while any(_alive(p) for p in loader_workers) and time.monotonic() - t0 < 10:
        time.sleep(0.2)
    assert not any(_alive(p) for p in loader_workers), "orphaned loader worker"
    text = _finish(proc, 300)
    assert proc.returncode == 0, text[-3000:]
    assert "resumed from" in text
    ref = trainer.train(compose("train", [f"out_dir={tmp_path / 'ref'}", *[a for a in args if a != "parallel=fp2"]]))
    a, b = _weights(ref), _weights(out / "model")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)


def test_a_hung_rank_ends_the_job_within_the_timeout(data, tmp_path):
    out = tmp_path / "hung"
    cmd = [sys.executable, "-m", "cltrain.train.launch", "--standalone", "--nproc_per_node", "2",
           "-m", "cltrain.train.trainer", f"out_dir={out}", f"data.path={data}", *COMMON, "steps=400",
           "checkpoint_every=1000", "parallel=fp2"]
    proc = _start(cmd, tmp_path, CLTRAIN_DIST_TIMEOUT="10")
    _wait_for_step(out, 3, proc)
    hung = _children(proc.pid)[1]
    os.kill(hung, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        stderr = _finish(proc, 90)
    finally:
        for p in _children(proc.pid) + [hung]:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert proc.returncode == lifecycle.EXIT_RANK_LOST and time.monotonic() - t0 < 60, stderr[-3000:]
    assert "rank 0: a collective (step" in stderr and "CLTRAIN_DIST_TIMEOUT=10" in stderr, stderr[-3000:]


def test_a_run_never_publishes_another_runs_model(data, tmp_path):
    out = tmp_path / "r"
    trainer.train(compose("train", [f"data.path={data}", f"out_dir={out}", *COMMON, "steps=2",
                                    "checkpoint_every=1"]))
    old = _weights(out / "model")
    # a new run (another size) replacing it (overwrite=true), stopped before its first step
    new = trainer.train(compose("train", [f"data.path={data}", f"out_dir={out}", *COMMON, "steps=2",
                                          "model.n_features=32", "stop_at_step=0", "overwrite=true"]))
    assert ModelReader(new).cfg.n_features == 32 and _weights(new)["W_enc"].shape[1] == 32
    assert old["W_enc"].shape[1] == 16
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["latest", "step-000000"]
    # and a checkpoint of another run is refused by name
    from cltrain.train.checkpoint import publish_model, read_trainer_state
    other = out / "checkpoints" / "step-000000"
    fp = dict(read_trainer_state(other)["fingerprint"], **{"model.n_features": 64})
    with pytest.raises(CheckpointError, match="not this run's checkpoint"):
        publish_model(other, tmp_path / "elsewhere", fp)


def test_wandb_after_a_resume_logs_each_step_once(data, tmp_path, monkeypatch):
    import wandb

    logged = []

    class Run:
        def log(self, values, step):
            logged.append(step)

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: Run())
    args = [f"data.path={data}", f"out_dir={tmp_path}", *COMMON, "steps=8", "checkpoint_every=4",
            "logger.mode=offline"]
    trainer.train(compose("train", args + ["stop_at_step=6"]))
    # killed after step 6, last good checkpoint at step 4
    root = tmp_path / "checkpoints"
    (root / "latest").write_text("step-000004\n")
    import shutil
    shutil.rmtree(root / "step-000006")
    trainer.train(compose("train", args + ["resume=true"]))
    assert logged == list(range(1, 9)), logged
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_a_signal_to_one_rank_checkpoints_every_rank_at_the_same_step(data, tmp_path):
    """SLURM signals every task, but a signal reaching one rank alone must stop them all together: the
    ranks compare flags at agreed steps (lifecycle.StopSignals) and write one checkpoint."""
    out = tmp_path / "one"
    cmd = [sys.executable, "-m", "cltrain.train.launch", "--standalone", "--nproc_per_node", "2",
           "-m", "cltrain.train.trainer", f"out_dir={out}", f"data.path={data}", *COMMON, "steps=400",
           "checkpoint_every=1000", "parallel=fp2"]
    proc = _start(cmd, tmp_path)
    _wait_for_step(out, 3, proc)
    os.kill(_children(proc.pid)[1], signal.SIGUSR1)
    text = _finish(proc, 120)
    assert proc.returncode == lifecycle.EXIT_PREEMPTED, text[-3000:]
    assert text.count("SIGUSR1 received") + text.count("SIGTERM received") == 1, text[-3000:]
    step = int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])
    assert f"received: checkpointed at step {step} " in text and step < 400
    ranks = sorted(p.name for p in (out / "checkpoints" / f"step-{step:06d}" / "ranks").iterdir())
    assert ranks == ["rank-00000.pt", "rank-00001.pt"]
