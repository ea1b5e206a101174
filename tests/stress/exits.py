"""Stress: two-rank feature-parallel and data-parallel runs, N times each, every rank's exit code checked.

    .venv/bin/python tests/stress/exits.py [--runs 20] [--steps 10]

Not part of `make test` (about 5 minutes on the 2-core machine). A third case runs the feature-slice
worker of tests/test_parallel.py the same way: a process group with no trainer around it. Each run is two real processes over gloo
(tests/ranks.py), a short training run with a checkpoint and a published model; a run counts only if every
rank exited 0 and no rank printed an abort, a core dump or a traceback. Prints "N of 20 exit 0 on every rank"
per layout, and the first failures' output.
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for ranks.py

from ranks import Ranks, describe  # noqa: E402

from cltrain.train.data import write_synthetic_dataset  # noqa: E402

LAYOUTS = {"feature-parallel (fp2)": ["parallel=fp2"], "data-parallel (dp2)": ["parallel=single"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=10)
    a = ap.parse_args()
    failed_any = False
    with tempfile.TemporaryDirectory(prefix="cltrain-stress-") as tmp:
        tmp = Path(tmp)
        data = tmp / "ds"
        write_synthetic_dataset(data, n_layers=3, d_model=8, n_tokens=4096, tokens_per_sample=16, shard_tokens=256,
                                seed=4)
        for name, layout in LAYOUTS.items():
            ok, t0, shown = 0, time.monotonic(), 0
            for i in range(a.runs):
                run = tmp / f"{name.split()[0]}-{i}"
                args = [f"data.path={data}", f"out_dir={run / 'out'}", "model.n_features=16", "batch_tokens=64",
                        "log_every=5", "logger.mode=disabled", "progress=false", "data.num_workers=0",
                        "data.shuffle_buffer=256", "data.heldout_shards=1", f"steps={a.steps}",
                        f"checkpoint_every={max(a.steps // 2, 1)}", *layout]
                ended = Ranks(2, args, run / "logs").finish(300)
                if all(e.code == 0 and not e.crashed() for e in ended):
                    ok += 1
                elif shown < 3:
                    shown += 1
                    print(f"run {i} of {name}:\n{describe(ended)}", flush=True)
            failed_any |= ok < a.runs
            print(f"{name}: {ok} of {a.runs} exit 0 on every rank ({time.monotonic() - t0:.0f} s)", flush=True)
        # a process group without a trainer: tests/fp_equivalence_worker.py (ends it through lifecycle.Teardown)
        worker = str(Path(__file__).resolve().parents[1] / "fp_equivalence_worker.py")
        ok, t0 = 0, time.monotonic()
        for i in range(a.runs):
            ended = Ranks(2, ["2"], tmp / f"worker-{i}", module=worker).finish(300)
            ok += all(e.code == 0 and not e.crashed() and e.stdout.startswith("OK ") for e in ended)
        failed_any |= ok < a.runs
        print(f"feature-slice worker (fp2, no trainer): {ok} of {a.runs} exit 0 on every rank "
              f"({time.monotonic() - t0:.0f} s)", flush=True)
    return 1 if failed_any else 0


if __name__ == "__main__":
    sys.exit(main())
