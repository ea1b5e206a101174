"""How every command ends: exit codes, stop signals, and the one teardown (docs/operations.md, "Exit codes").

    run_command(lambda: train(cfg), "clt-train", bad_input=(ConfigError, ...))   # exits unless 0

`run_command` runs a job inside a `Teardown` and turns how it ended into one exit code and at most one
line on stderr (a traceback only for a bug: exit 1). `Teardown` ends what the job started, in this order:
1. the job's own closers, last started first: the trainer's W&B run and progress bar, its loader's worker
   processes (joined), the DeepSpeed engine. None of them runs a collective, so they are safe on every path,
   and the loader's workers and W&B must be gone before the process group (they hold sockets and threads).
2. a barrier, on the paths where every rank ended the same way (success, an agreed preemption), so no rank
   tears its process group down while another still sends its last collective to it;
3. `destroy_process_group`, which stops gloo's / NCCL's threads in a defined order. Left to the interpreter's
   exit, those threads were destroyed in an undefined order, and a rank sometimes died with SIGABRT
   ("terminate called without an active exception") after it had printed its results.
Only the scope that created the process group ends it: a caller that started its own keeps it.

Signals: SIGTERM, SIGUSR1, SIGUSR2 (preemption, a time limit ahead) and SIGINT (Ctrl-C) all ask the
training loop to finish its step, checkpoint on every rank together and exit 75 (`StopSignals`). A second
SIGINT stops at once (exit 130), without a checkpoint. Every other command stops on Ctrl-C (exit 130);
inside `ctrl_c_at_safe_points()` (the harvest's batch loop) the first one waits for the job's next
`stop_if_ctrl_c()`, because a KeyboardInterrupt raised inside a library can break it: in torch's vmap
(transformers' attention masks) it becomes an internal-assert RuntimeError plus tracebacks printed from
finalizers. An error that follows a Ctrl-C is reported as the interrupt, and those finalizers are silenced.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from cltrain.rank_env import dist_env

log = logging.getLogger(__name__)

# Exit codes, the same for a single process and for every rank (the launch scripts pass them through).
EXIT_OK = 0
EXIT_BUG = 1           # an unexpected error: the only case with a traceback
EXIT_BAD_INPUT = 2     # config, dataset, checkpoint, memory: one line naming what and where
EXIT_RANK_LOST = 3     # a collective timed out, or another rank left the job (hung or dead)
EXIT_PREEMPTED = 75    # stopped by a signal (SIGTERM/SIGUSR1/SIGUSR2/Ctrl-C) and checkpointed: EX_TEMPFAIL
EXIT_INTERRUPTED = 130  # a second Ctrl-C: stopped at once, no checkpoint (128 + SIGINT, as shells report it)

# The launch wrapper (train/launch.py) sets this: each rank writes its exit code there as rank-<RANK>,
# because a launcher that was itself signalled does not learn its workers' codes.
EXIT_DIR_ENV = "CLTRAIN_EXIT_DIR"


class Preempted(Exception):
    """Raised by the training loop after the checkpoint a stop signal asked for."""


class RankLost(RuntimeError):
    """A collective timed out or lost its peer: another rank is hung or dead. The message names this rank
    and where it was."""


class PeerLeft(RankLost):
    """RankLost because another rank's connection closed: a consequence of that rank's own end (the
    launcher reports the other rank's code, not this one's)."""


# ----------------------------------------------------------------------------------------------------
# Ctrl-C outside the training loop


class _CtrlC:
    """Ctrl-C presses during one command (module docstring): counted only while `installed` (a command
    runs), so no press outlives its command; `interrupted`: whether the last command saw one."""

    def __init__(self):
        self.count, self.deferring, self.active, self.interrupted = 0, 0, False, False

    def note(self):
        if not self.active:
            return
        self.count += 1
        # Once interrupted, a library's objects finalized mid-operation ("Exception ignored in: <generator
        # vmap_increment_nesting>") are a consequence of the Ctrl-C, not news: do not print them.
        sys.unraisablehook = _quiet

    def handle(self, signum, frame):
        self.note()
        if not self.deferring or self.count > 1:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        """The command's SIGINT handler, for the duration of one command (main thread only)."""
        self.count, self.interrupted = 0, False
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous, unraisable = signal.signal(signal.SIGINT, self.handle), sys.unraisablehook
        self.active = True
        try:
            yield
        finally:
            self.active, self.interrupted, self.count = False, self.count > 0, 0
            signal.signal(signal.SIGINT, previous)
            if not self.interrupted:  # after a Ctrl-C the finalizers run later, as the exception is freed
                sys.unraisablehook = unraisable


def _quiet(unraisable):
    pass


CTRL_C = _CtrlC()


@contextlib.contextmanager
def ctrl_c_at_safe_points():
    """Inside: the first Ctrl-C only sets a flag, which `stop_if_ctrl_c()` raises as KeyboardInterrupt at the
    job's next safe point (between batches); a second one raises at once."""
    CTRL_C.deferring += 1
    try:
        yield
    finally:
        CTRL_C.deferring -= 1


def stop_if_ctrl_c():
    if CTRL_C.count:
        raise KeyboardInterrupt


# ----------------------------------------------------------------------------------------------------
# Stop signals


class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before killing a job), SIGUSR1/SIGUSR2 (SLURM's and
    submitit's time-limit warnings) and SIGINT (Ctrl-C) set a flag instead of ending the process;
    `requested` (a collective) tells every rank at the same step, so all of them checkpoint together.
    A second SIGINT raises KeyboardInterrupt: stop at once. Active inside `with`."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT)
    # Ranks compare flags about every CHECK_SECONDS of training, in whole steps (at most MAX_EVERY): an
    # all-reduce every step would synchronize a GPU for nothing, but a Ctrl-C must be answered in seconds
    # (torchrun gives its workers --shutdown-timeout, train/launch.py). The next check's step is agreed in
    # the same all-reduce (the slowest rank's seconds per step), so every rank checks at the same steps.
    CHECK_SECONDS = 1.0
    MAX_EVERY = 100

    def __init__(self):
        self.signum, self.previous = None, {}
        self.next_check, self.t_check, self.step_check = 0, None, 0

    @property
    def name(self) -> str:
        if self.signum is None:
            return "no signal"
        return "Ctrl-C (SIGINT)" if self.signum == signal.SIGINT else signal.Signals(self.signum).name

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            CTRL_C.note()
            raise KeyboardInterrupt  # the second Ctrl-C
        if self.signum is None or signum == signal.SIGINT:
            self.signum = signum

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def requested(self, device, step: int) -> bool:
        """True on every rank at the same step once any rank got a stop signal. Collective at the agreed
        check steps (call it after every step on every rank)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum is not None
        if step < self.next_check:
            return False
        now = time.monotonic()
        per_step = (now - self.t_check) / max(step - self.step_check, 1) if self.t_check is not None else 0.0
        agreed = torch.tensor([1.0 if self.signum is not None else 0.0, per_step], dtype=torch.float64,
                              device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        flag, per_step = agreed.tolist()
        every = self.MAX_EVERY if per_step <= 0 else int(min(self.MAX_EVERY, max(1.0, self.CHECK_SECONDS / per_step)))
        self.next_check, self.t_check, self.step_check = step + every, now, step
        if flag and self.signum is None:
            self.signum = signal.SIGTERM  # another rank got it
        return bool(flag)


# ----------------------------------------------------------------------------------------------------
# Teardown


def end_process_group(agreed: bool):
    """Barrier (when every rank ended the same way) and destroy this process's groups."""
    if not dist.is_initialized():
        return
    try:
        if agreed and dist.get_world_size() > 1:
            dist.barrier()
    except Exception as e:  # a rank left after all: destroy ours anyway
        log.warning("teardown: the final barrier failed (%s)", str(e).splitlines()[0][:200])
    dist.destroy_process_group()


class Teardown:
    """`with Teardown() as td: ... td.add(closer)`: on leaving, the closers run in reverse order of
    `add` (each one's failure is logged, the others still run), then the process group ends if it was
    started inside this scope (module docstring)."""

    def __init__(self):
        self.closers = []
        self.owns_group = False

    def add(self, closer):
        self.closers.append(closer)
        return closer

    def __enter__(self):
        self.owns_group = not dist.is_initialized()
        return self

    def __exit__(self, exc_type, exc, tb):
        agreed = exc_type is None or issubclass(exc_type, Preempted)
        for closer in reversed(self.closers):
            try:
                closer()
            except Exception as e:
                log.warning("teardown: %s failed: %s", getattr(closer, "__qualname__", closer), e)
        self.closers = []
        if self.owns_group:
            end_process_group(agreed)
        return False


# ----------------------------------------------------------------------------------------------------
# Commands


def _report_exit(code: int, consequence: bool):
    """rank-R in EXIT_DIR_ENV: "CODE" or "CODE consequence" (this rank ended because another did)."""
    folder = os.environ.get(EXIT_DIR_ENV)
    if not folder:
        return
    try:
        path = Path(folder) / f"rank-{dist_env()[0]}"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"{code}{' consequence' if consequence else ''}\n")
        os.replace(tmp, path)
    except OSError:
        pass  # the launcher then reports the signal it got instead


STOPPED_AT_ONCE = "stopped at once, without a checkpoint (the last one written is kept)"


def outcome(job, prog: str, bad_input: tuple = (), interrupted: str = STOPPED_AT_ONCE) -> tuple[int, bool]:
    """Run job() inside a Teardown; return (its exit code, whether that is a consequence of another rank's
    end), having printed at most one line for it. `interrupted`: what a (second) Ctrl-C leaves, in the
    command's terms."""
    def say(msg):  # one write, so the lines of ranks sharing a terminal do not interleave
        sys.stderr.write(f"{prog}: {msg}\n")
        sys.stderr.flush()

    try:
        with CTRL_C.installed(), Teardown():
            job()
        return EXIT_OK, False
    except SystemExit as e:  # a job's own exit (Hydra's, a skipped sweep run): its code, already reported
        return (e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_BAD_INPUT)), False
    except Preempted:
        return EXIT_PREEMPTED, False  # the loop printed where it checkpointed
    except RankLost as e:
        say(f"error: {e}")
        return EXIT_RANK_LOST, isinstance(e, PeerLeft)
    except KeyboardInterrupt:
        say(f"interrupted: {interrupted}")
        return EXIT_INTERRUPTED, False
    except BaseException as e:
        if CTRL_C.interrupted:  # an error the Ctrl-C caused inside a library (module docstring)
            say(f"interrupted: {interrupted}")
            return EXIT_INTERRUPTED, False
        if isinstance(e, bad_input):
            say(f"error: {e}")
            return EXIT_BAD_INPUT, False
        traceback.print_exc()
        return EXIT_BUG, False


def run_command(job, prog: str, bad_input: tuple = (), interrupted: str = STOPPED_AT_ONCE):
    """The entry points' job: run it, end everything, exit with its code. Success returns (exit 0 at the
    interpreter's end), so a Hydra multirun in one process goes on to its next run."""
    code, consequence = outcome(job, prog, bad_input, interrupted)
    _report_exit(code, consequence)
    sys.stdout.flush()
    if code != EXIT_OK:
        sys.exit(code)
