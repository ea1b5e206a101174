"""How runs end (train/lifecycle.py, docs/operations.md "Exit codes"): every rank's own exit code on every
path, one line and no traceback or abort where the code says the run ended as planned, and Ctrl-C keeps
the work. Ranks are separate real processes (tests/ranks.py), so each one's code is seen, not torchrun's
summary; the launcher's own pass-through is tested through launch/torchrun.sh.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from cltrain.train import lifecycle
from cltrain.train.data import write_synthetic_dataset
from ranks import Ranks, describe, rank_env, wait_for_step

pytestmark = pytest.mark.timeout(600)
ROOT = Path(__file__).resolve().parents[1]

COMMON = ["model.n_features=16", "batch_tokens=64", "log_every=1", "logger.mode=disabled", "progress=false",
          "data.num_workers=0", "data.shuffle_buffer=256", "data.heldout_shards=1", "optim.lr=0.01"]
LAYOUTS = {"fp2": ["parallel=fp2"], "dp2": ["parallel=single"]}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("exits") / "ds"
    write_synthetic_dataset(path, n_layers=3, d_model=8, n_tokens=4096, tokens_per_sample=16, shard_tokens=256,
                            seed=3)
    return path


def _latest(out: Path) -> int:
    return int((out / "checkpoints" / "latest").read_text().strip().split("-")[1])


def _clean(ended, code):
    assert [e.code for e in ended] == [code] * len(ended), describe(ended)
    assert not any(e.crashed() for e in ended), describe(ended)


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_success_exits_0_on_every_rank_with_nothing_on_stderr(data, tmp_path, layout):
    out = tmp_path / "run"
    ranks = Ranks(2, [f"data.path={data}", f"out_dir={out}", *COMMON, *LAYOUTS[layout], "steps=6",
                      "checkpoint_every=3"], tmp_path / "logs")
    ended = ranks.finish(120)
    _clean(ended, 0)
    assert (out / "model" / "model.json").is_file()
    assert all(e.stderr.strip() == "" for e in ended), describe(ended)


def test_bad_input_after_the_process_group_exits_2_on_every_rank(data, tmp_path):
    """A resume that does not match its checkpoint fails after the group started: one line each, exit 2."""
    out = tmp_path / "run"
    _clean(Ranks(2, [f"data.path={data}", f"out_dir={out}", *COMMON, "parallel=fp2", "steps=3"],
                 tmp_path / "a").finish(120), 0)
    ended = Ranks(2, [f"data.path={data}", f"out_dir={out}", *COMMON, "parallel=fp2", "steps=3", "resume=true",
                      "model.n_features=32"], tmp_path / "b").finish(120)
    _clean(ended, lifecycle.EXIT_BAD_INPUT)
    for e in ended:
        lines = e.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("clt-train: error: ") and "model.n_features" in lines[0], \
            describe(ended)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_checkpoints_and_exits_75_on_every_rank(data, tmp_path, sig):
    """SIGTERM (preemption) and SIGINT (Ctrl-C in a terminal, which signals every process of the job): the
    ranks agree on a step, checkpoint there and exit 75, with one line and no traceback."""
    out = tmp_path / "run"
    ranks = Ranks(2, [f"data.path={data}", f"out_dir={out}", *COMMON, "parallel=fp2", "steps=100000",
                      "checkpoint_every=1000000"], tmp_path / "logs")
    wait_for_step(out, 5, ranks.alive)
    for pid in ranks.pids:
        os.kill(pid, sig)
    ended = ranks.finish(120)
    _clean(ended, lifecycle.EXIT_PREEMPTED)
    step = _latest(out)
    assert step >= 5 and not (out / "model").exists()
    name = "Ctrl-C (SIGINT)" if sig == signal.SIGINT else "SIGTERM"
    assert f"clt-train: {name} received: checkpointed at step {step} " in ended[0].stdout, describe(ended)
    assert sorted(p.name for p in (out / "checkpoints" / f"step-{step:06d}" / "ranks").iterdir()) == \
        ["rank-00000.pt", "rank-00001.pt"]


def test_a_hung_rank_ends_the_others_with_exit_3(data, tmp_path):
    """A rank stopped (SIGSTOP) mid-run: the other waits out CLTRAIN_DIST_TIMEOUT and exits 3 with one line
    naming itself and the phase; the stopped rank, continued, finds its peer gone and exits 3 as well."""
    out = tmp_path / "run"
    ranks = Ranks(2, [f"data.path={data}", f"out_dir={out}", *COMMON, "parallel=fp2", "steps=100000",
                      "checkpoint_every=1000000"], tmp_path / "logs", CLTRAIN_DIST_TIMEOUT="8")
    wait_for_step(out, 3, ranks.alive)
    os.kill(ranks.pids[1], signal.SIGSTOP)
    t0 = time.monotonic()
    ranks.procs[0].wait(timeout=60)
    assert time.monotonic() - t0 < 40
    os.kill(ranks.pids[1], signal.SIGCONT)
    ended = ranks.finish(60)
    _clean(ended, lifecycle.EXIT_RANK_LOST)
    assert "clt-train: error: rank 0: a collective (step" in ended[0].stderr, describe(ended)
    assert "CLTRAIN_DIST_TIMEOUT=8" in ended[0].stderr
    assert "clt-train: error: rank 1: " in ended[1].stderr, describe(ended)


def test_ctrl_c_to_one_process_checkpoints_and_a_second_stops_at_once(data, tmp_path):
    """The single process: Ctrl-C after step N checkpoints at the current step and exits 75 (one line, no
    KeyboardInterrupt); the resumed run goes on from there."""
    out = tmp_path / "run"
    args = [f"data.path={data}", f"out_dir={out}", *COMMON, "checkpoint_every=1000000"]
    ranks = Ranks(1, args + ["steps=100000"], tmp_path / "logs")
    wait_for_step(out, 25, ranks.alive)
    os.kill(ranks.pids[0], signal.SIGINT)
    [ended] = ranks.finish(60)
    _clean([ended], lifecycle.EXIT_PREEMPTED)
    step = _latest(out)  # the only checkpoint is the one Ctrl-C asked for
    assert step >= 25 and ended.stderr.strip() == "", ended.stderr
    assert f"clt-train: Ctrl-C (SIGINT) received: checkpointed at step {step} " in ended.stdout
    resumed = Ranks(1, args + ["steps=100000", f"stop_at_step={step + 2}", "resume=true"],
                    tmp_path / "resumed").finish(60)
    _clean(resumed, 0)
    assert f"resumed from {out / 'checkpoints' / f'step-{step:06d}'} at step {step}" in resumed[0].stdout


def test_a_second_ctrl_c_raises_and_the_command_exits_130_with_one_line(capsys):
    with lifecycle.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        assert stop.signum == signal.SIGINT and stop.requested("cpu", 1)
        os.kill(os.getpid(), signal.SIGTERM)  # another signal meanwhile keeps the Ctrl-C
        time.sleep(0.05)
        assert stop.name == "Ctrl-C (SIGINT)"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    assert lifecycle.CTRL_C.count == 0  # outside a command no press is kept (it would stop a later harvest)

    def interrupted():
        raise KeyboardInterrupt

    assert lifecycle.outcome(interrupted, "clt-x") == (lifecycle.EXIT_INTERRUPTED, False)
    err = capsys.readouterr().err
    assert err.splitlines() == ["clt-x: interrupted: stopped at once, without a checkpoint (the last one "
                                "written is kept)"]


def test_an_error_a_ctrl_c_caused_inside_a_library_is_reported_as_the_interrupt(capsys, monkeypatch):
    """torch's vmap turns a KeyboardInterrupt raised inside it into an internal-assert RuntimeError and prints
    tracebacks from finalizers (seen in CI, in clt-harvest): the command still says it was interrupted, in
    one line, and exits 130."""
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)  # the command silences it after a Ctrl-C

    def broken_by_the_interrupt():
        try:
            yield
        finally:
            raise RuntimeError("!dynamicLayerStack.empty() INTERNAL ASSERT FAILED")  # printed at its finalization

    def job():
        pending = broken_by_the_interrupt()
        next(pending)
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            raise RuntimeError("layerId == dynamic_layer.layerId() INTERNAL ASSERT FAILED") from None

    assert signal.getsignal(signal.SIGINT) is not lifecycle.CTRL_C.handle
    assert lifecycle.outcome(job, "clt-x") == (lifecycle.EXIT_INTERRUPTED, False)
    assert signal.getsignal(signal.SIGINT) is not lifecycle.CTRL_C.handle  # restored
    assert capsys.readouterr().err.splitlines() == [f"clt-x: interrupted: {lifecycle.STOPPED_AT_ONCE}"]

    def bug():
        raise RuntimeError("a bug")

    assert lifecycle.outcome(bug, "clt-x") == (lifecycle.EXIT_BUG, False)  # without a Ctrl-C: a traceback
    assert "Traceback" in capsys.readouterr().err


def test_the_harvests_first_ctrl_c_waits_for_the_forward_to_end(tmp_path, monkeypatch, capsys):
    """A Ctrl-C that lands in the model's forward does not interrupt it (that is what breaks torch's vmap):
    the batch completes and the harvest stops before the next one, keeping the shards it recorded."""
    from cltrain.train import harvest as harvest_mod
    from cltrain.train.capture import Capture
    from cltrain.train.config import compose

    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    real, calls = Capture.__call__, []

    def forward_hit_by_ctrl_c(self, batch):
        calls.append("start")
        if len(calls) == 5:  # the third batch
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        rows = real(self, batch)
        calls.append("end")
        return rows

    monkeypatch.setattr(Capture, "__call__", forward_hit_by_ctrl_c)
    cfg = compose("harvest", ["base_model=tiny-gpt2", "max_tokens=4096", "context=64", "batch_size=4",
                              "tokens_per_sample=16", "shard_tokens=256", "shuffle_buffer=512", "threads=1",
                              f"out_dir={tmp_path / 'acts'}"])
    said = "stopped; the shards it recorded are kept"
    assert lifecycle.outcome(lambda: harvest_mod.harvest(cfg), "clt-harvest", interrupted=said) == (
        lifecycle.EXIT_INTERRUPTED, False)
    assert calls == ["start", "end"] * 3
    assert capsys.readouterr().err.splitlines()[-1] == f"clt-harvest: interrupted: {said}"
    assert harvest_mod.read_progress(tmp_path / "acts", 0)["shards"]  # the flush after batch 2 is kept
    # the press ended with its command: the same harvest called again (no command around it) runs to its end
    assert lifecycle.CTRL_C.count == 0 and harvest_mod.harvest(cfg).n_tokens > 0


def test_teardown_ends_in_reverse_order_and_only_the_group_it_started(tmp_path, monkeypatch):
    from cltrain.train.parallel import init_distributed

    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    order = []
    with pytest.raises(ValueError):
        with lifecycle.Teardown() as td:
            init_distributed("gloo")
            td.add(lambda: order.append("loader"))
            td.add(lambda: 1 / 0)  # a failing closer does not stop the others
            td.add(lambda: order.append("wandb"))
            raise ValueError("the job failed")
    assert order == ["wandb", "loader"] and not dist.is_initialized()
    init_distributed("gloo")  # a caller's own group outlives the scope
    try:
        with lifecycle.Teardown():
            pass
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def _launcher(nproc: int, args: list[str], log: Path, **env) -> subprocess.Popen:
    e = rank_env(NPROC=str(nproc), PYTHON=sys.executable, **env)
    e["PATH"] = f"{Path(sys.executable).parent}:{e['PATH']}"
    return subprocess.Popen(["bash", str(ROOT / "launch" / "torchrun.sh"), *args], env=e, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def test_the_launcher_passes_a_ranks_code_and_line_through_without_torchruns_traceback(data, tmp_path):
    out = tmp_path / "run"
    with open(tmp_path / "a.log", "w+") as log:
        p = _launcher(2, [f"data.path={data}", f"out_dir={out}", *COMMON, "parallel=fp2", "steps=3"], log)
        assert p.wait(120) == 0
    with open(tmp_path / "b.log", "w+") as log:
        p = _launcher(2, [f"data.path={data}", f"out_dir={out}", *COMMON, "parallel=fp2", "steps=3",
                          "resume=true", "model.n_features=32"], log)
        code = p.wait(120)
        log.seek(0)
        text = log.read()
    assert code == lifecycle.EXIT_BAD_INPUT, text
    assert text.count("clt-train: error: ") == 2 and "Traceback" not in text and "ChildFailedError" not in text, text
    assert all(line.startswith("clt-train: error: ") for line in text.strip().splitlines()), text


def test_ctrl_c_to_the_launcher_checkpoints_every_rank_and_exits_75(data, tmp_path):
    """Ctrl-C in a terminal signals torchrun alone (it starts each rank in its own session); torchrun
    forwards it once to every rank, which checkpoint together; the launcher exits 75 like one process."""
    out = tmp_path / "run"
    with open(tmp_path / "job.log", "w+") as log:
        p = _launcher(2, [f"data.path={data}", f"out_dir={out}", *COMMON, "parallel=fp2", "steps=100000",
                          "checkpoint_every=1000000"], log)
        wait_for_step(out, 5, lambda: p.poll() is None)
        p.send_signal(signal.SIGINT)
        code = p.wait(120)
        log.seek(0)
        text = log.read()
    assert code == lifecycle.EXIT_PREEMPTED, text
    step = _latest(out)
    lines = [x for x in text.splitlines() if not x.startswith(("step ", "clt-train: /", "clt-train: memory"))]
    assert lines == [f"clt-train: Ctrl-C (SIGINT) received: checkpointed at step {step} "
                     f"({out / 'checkpoints' / f'step-{step:06d}'}); resubmit with resume=true to continue"], text


def test_ctrl_c_to_clt_harvest_keeps_its_shards_and_the_rerun_continues(tmp_path):
    out = tmp_path / "acts"
    args = ["base_model=tiny-llama", "max_tokens=400000", "shard_tokens=1024", "tokens_per_sample=128",
            "context=128", f"out_dir={out}"]
    with open(tmp_path / "harvest.log", "w+") as log:
        p = subprocess.Popen([sys.executable, "-m", "cltrain.train.harvest", *args], env=rank_env(), stdout=log,
                             stderr=subprocess.STDOUT, text=True)
        t0, record = time.monotonic(), out / ".progress-rank0000.json"
        while not (record.is_file() and json.loads(record.read_text())["shards"]):  # its first flush
            assert p.poll() is None and time.monotonic() - t0 < 120, "the harvest ended before its first flush"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        code = p.wait(60)
        log.seek(0)
        text = log.read()
    assert code == lifecycle.EXIT_INTERRUPTED, text[-2000:]
    assert text.rstrip().endswith("clt-harvest: interrupted: stopped; the shards it recorded are kept: rerun the "
                                  "same command to continue") and "Traceback" not in text, text[-2000:]
    kept = json.loads(record.read_text())["shards"]
    assert all((out / r["name"]).is_file() for r in kept) and not (out / "dataset.json").exists()
    rerun = subprocess.run([sys.executable, "-m", "cltrain.train.harvest", *args], env=rank_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"with {len(kept)} shard(s) written" in rerun.stdout + rerun.stderr, (kept, rerun.stderr[-3000:])
    assert (out / "dataset.json").is_file()


def test_a_killed_rank_is_the_launchers_exit_code_and_one_line(data, tmp_path):
    """A rank killed by SIGKILL (what the OOM killer does): the launcher exits 128 + 9 with one line naming
    that rank; the other rank, which lost its peer mid-collective, says so in one line (exit 3)."""
    out = tmp_path / "run"
    with open(tmp_path / "job.log", "w+") as log:
        p = _launcher(2, [f"data.path={data}", f"out_dir={out}", *COMMON, "parallel=fp2", "steps=100000",
                          "checkpoint_every=1000000"], log)
        wait_for_step(out, 3, lambda: p.poll() is None)
        kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(p.pid)], capture_output=True, text=True).stdout
        ranks = sorted(int(x) for x in kids.split())
        assert len(ranks) == 2, kids
        os.kill(ranks[1], signal.SIGKILL)
        code = p.wait(120)
        log.seek(0)
        text = log.read()
    assert code == 128 + signal.SIGKILL, text[-3000:]
    assert "clt-train: rank 1 ended with exit code 137" in text and "Traceback" not in text, text[-3000:]
    assert "clt-train: error: rank 0: another rank left the job during a collective" in text, text[-3000:]
