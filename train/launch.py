"""torchrun with clt-train's exit codes: `python -m cltrain.train.launch [torchrun options] -m MODULE ARGS`.

launch/torchrun.sh runs clt-train through this. It is torchrun (torch.distributed.run, same options)
with three differences, so that a multi-rank run ends as a single process would:
- the exit code is the ranks' (2 bad input, 3 a lost rank, 75 preempted or Ctrl-C, 130 a second Ctrl-C),
  not torchrun's 1, and torchrun's ChildFailedError traceback and log lines are not printed: each rank
  already printed its one line;
- SIGUSR1/SIGUSR2 (SLURM's and submitit's time-limit warnings) are forwarded to the ranks as SIGTERM and
  SIGINT are (`--signals-to-handle`), and the ranks get `--shutdown-timeout` (CLTRAIN_SHUTDOWN_TIMEOUT,
  default 600 s) to finish their step and checkpoint before torchrun kills them;
- a second Ctrl-C reaches the ranks (torchrun itself stops waiting for them on it): they stop at once.

Uses torchrun's --signals-to-handle and --shutdown-timeout where the installed torch has them (2.9 and
later; tested with 2.13): with an older torch the exit codes still pass through, but SIGUSR1/2 are not
forwarded and torchrun kills the ranks 30 s after a Ctrl-C.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from .lifecycle import EXIT_BUG, EXIT_DIR_ENV, EXIT_OK

FORWARDED = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


def _children() -> list[int]:
    """This process's live child processes (the ranks torchrun started), from /proc."""
    me, kids = os.getpid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state, ppid, ...
        if int(fields[1]) == me and fields[0] != "Z":
            kids.append(int(d.name))
    return kids


def _reported(folder: Path) -> dict[int, tuple[int, bool]]:
    """rank -> (exit code, a consequence of another rank's end) as each rank wrote it (lifecycle)."""
    out = {}
    for f in folder.glob("rank-*"):
        try:
            words = f.read_text().split()
            out[int(f.name.split("-")[1])] = (int(words[0]), "consequence" in words[1:])
        except (OSError, ValueError, IndexError):
            continue
    return out


def _ranks_code(folder: Path, fallback: int) -> int:
    """The code the ranks reported: the first non-zero by rank (they usually agree), else 0."""
    codes = [code for _, (code, _) in sorted(_reported(folder).items())]
    if not codes:
        return fallback
    return next((c for c in codes if c != EXIT_OK), EXIT_OK)


def _signal_code(code: int) -> int:
    return 128 - code if code < 0 else code  # a rank killed by signal S: 128 + S, as a shell reports it


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, parse_args, run

    argv = list(sys.argv[1:] if argv is None else argv)
    timeout = os.environ.get("CLTRAIN_SHUTDOWN_TIMEOUT", "600")
    # ours first: the user's own --signals-to-handle / --shutdown-timeout later on the line win. Older
    # torchruns lack the options (added in torch 2.9): there SIGUSR1/2 are not forwarded and ranks get 30 s.
    known = {opt for action in get_args_parser()._actions for opt in action.option_strings}
    ours = [f"--signals-to-handle={FORWARDED}"] if "--signals-to-handle" in known else []
    ours += [f"--shutdown-timeout={timeout}"] if "--shutdown-timeout" in known else []
    args = parse_args([*ours, *argv])
    # torchrun's own log lines ("Received 2 death signal, shutting down workers", "failed (exitcode: 2)
    # local_rank: 0 ..."): the ranks said it already. Each of torchrun's modules
    # sets its logger's level itself, so quiet them one by one
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    with tempfile.TemporaryDirectory(prefix="cltrain-exit-") as folder:
        os.environ[EXIT_DIR_ENV] = folder
        try:
            run(args)
            return EXIT_OK
        except ChildFailedError as e:
            # The job's code is its root cause's. Each rank that ended by itself reported its code
            # (lifecycle.run_command); in order: a rank's own code, then a rank killed by a signal (SIGKILL:
            # the OOM killer), then "another rank left the job" (a consequence), last the ranks torchrun
            # itself stopped (SIGTERM/SIGINT) once one had failed. (torchrun's failure times are whole
            # seconds: they cannot order ranks that fail together.)
            # (a rank that reported 0 and still failed died at exit, e.g. an abort: its own code is the signal)
            reported = {r: v for r, v in _reported(Path(folder)).items() if v[0] != EXIT_OK}

            def root_cause_first(item):
                r, f = item
                if r in reported:
                    return (2 if reported[r][1] else 0, r)
                return (3 if f.exitcode in (-signal.SIGTERM, -signal.SIGINT) else 1, r)

            rank, failure = min(e.failures.items(), key=root_cause_first)
            code = reported[rank][0] if rank in reported else _signal_code(int(failure.exitcode))
            if code not in (2, 3, 75, 130):
                print(f"clt-train: rank {rank} ended with exit code {code} ({failure.message or 'see its output above'})",
                      file=sys.stderr, flush=True)
            return code
        except SignalException as e:
            # torchrun got a signal, forwarded it to every rank and waited for them. A second Ctrl-C cuts
            # that wait short: pass it on (the ranks then stop at once), then wait for them ourselves.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            live = _children()
            if live:
                for pid in live:
                    try:
                        os.kill(pid, e.sigval)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 30
                while _children() and time.monotonic() < deadline:
                    time.sleep(0.1)
                for pid in _children():
                    os.killpg(pid, signal.SIGKILL)
            return _ranks_code(Path(folder), 128 + int(e.sigval))
        except Exception as e:  # torchrun's own failure (rendezvous, bad options): its message, one line
            print(f"clt-train: torchrun failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                  file=sys.stderr, flush=True)
            return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
