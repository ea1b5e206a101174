"""`make sweep-demo`: a dictionary-size sweep, CLT against PLT, on SmolLM2-135M, on a 2-core CPU.

1. the demo's harvest (demo_out/activations, shared with `make demo`; skipped when it exists);
2. 3 sizes x CLT/PLT trained in one job on one data pass (`dictionaries`, train/trainer.py) into
   demo_out/sweep/<run name>;
3. `clt-eval sweep_dir=demo_out/sweep`: the sweep table (sweep.md / sweep.csv), frontier.png and
   agreement.png in demo_out/sweep/report (replacement model on a few sequences, graphs off);
4. the paper's claim checked: at equal L0, does the CLT reach lower NMSE than the PLT? For each CLT,
   the PLT frontier's NMSE at the CLT's L0 (interpolated in log L0) is compared with the CLT's.
"""
import argparse
import json
import math
import time
from pathlib import Path


def plt_nmse_at(l0: float, plt_points: list[tuple[float, float]]) -> float | None:
    """The PLT frontier's NMSE at this L0 (linear in log L0 between its two neighbours); an L0 within 5% beyond
    the frontier's ends takes the end's NMSE; None further outside."""
    pts = sorted(plt_points)
    if not pts:
        return None
    if pts[0][0] * 0.95 <= l0 < pts[0][0]:
        return pts[0][1]
    if pts[-1][0] < l0 <= pts[-1][0] * 1.05:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= l0 <= x1:
            if x1 == x0:
                return min(y0, y1)
            t = (math.log(l0) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def verdict(rows: list[dict]) -> tuple[list[str], bool | None]:
    ok = [r for r in rows if r.get("status") == "ok"]
    plt_pts = [(r["l0_total"], r["nmse_mean"]) for r in ok if r["arch"] == "PLT"]
    lines, outcomes = [], []
    for r in sorted((r for r in ok if r["arch"] == "CLT"), key=lambda r: r["n_features"]):
        same = next((p for p in ok if p["arch"] == "PLT" and p["n_features"] == r["n_features"]), None)
        at = plt_nmse_at(r["l0_total"], plt_pts)
        text = (f"F={r['n_features']}: CLT L0 {r['l0_total']:.1f}, NMSE {r['nmse_mean']:.4f}"
                + (f"; PLT of the same size L0 {same['l0_total']:.1f}, NMSE {same['nmse_mean']:.4f}" if same else ""))
        if at is None:
            text += "; the CLT's L0 lies outside the PLT frontier's L0 range: no comparison at equal L0"
        else:
            better = r["nmse_mean"] < at
            outcomes.append(better)
            text += f"; PLT frontier at that L0: NMSE {at:.4f} -> CLT {'lower' if better else 'NOT lower'}"
        lines.append(text)
    return lines, (all(outcomes) if outcomes else None)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="the demo's folder (activations shared with `make demo`)")
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=24576, help="tokens to harvest (as `make demo`)")
    p.add_argument("--features", default="32,64,128", help="dictionary sizes (features per layer)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-tokens", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lambda-s", type=float, default=5.0, help="as `make demo` (see train/demo.py)")
    p.add_argument("--eval-sequences", type=int, default=4, help="replacement-model sequences x 128 tokens")
    p.add_argument("--logger", default="offline", help="W&B mode: offline | online | disabled")
    args = p.parse_args(argv)

    from .config import compose
    from .evaluate import run as eval_run
    from .harvest import harvest
    from .trainer import train

    out = Path(args.out).resolve()
    data_dir, sweep_dir = out / "activations", out / "sweep"
    started = time.time()
    print(f"== 1/3 harvest: {args.model} activations for {args.tokens:,} tokens", flush=True)
    if (data_dir / "dataset.json").exists():
        print(f"{data_dir / 'dataset.json'} exists: harvest already done")
    else:  # the same harvest as `make demo` (train/demo.py)
        harvest(compose("harvest", [f"base_model={args.model}", f"max_tokens={args.tokens}", f"out_dir={data_dir}",
                                    "shard_tokens=4096", "shuffle_buffer=16384"]))
    t_harvest = time.time() - started

    sizes = [int(f) for f in args.features.split(",")]
    dicts = "dictionaries=[" + ", ".join(f"{{model.n_features: {f}, model.per_layer: {str(pl).lower()}}}"
                                         for pl in (False, True) for f in sizes) + "]"
    overrides = [f"data.path={data_dir}", f"out_dir={sweep_dir}", f"steps={args.steps}",
                 f"batch_tokens={args.batch_tokens}", f"optim.lr={args.lr}", f"model.loss.lambda_s={args.lambda_s}",
                 f"checkpoint_every={args.steps}", "log_every=50", "resume=true", f"logger.mode={args.logger}",
                 "data.shuffle_buffer=8192",  # 8k tokens x 30 layers: ~0.3 GiB (the default holds ~2 GiB)
                 "logger.run_name=sweep-demo", "logger.group=sweep-demo", dicts]
    print(f"== 2/3 train {len(sizes)} sizes x CLT/PLT on one data pass ({args.steps} steps x {args.batch_tokens} tokens)")
    print("clt-train " + " ".join(f"'{o}'" if " " in o else o for o in overrides), flush=True)
    t0 = time.time()
    train(compose("train", overrides))
    t_train = time.time() - t0

    print("== 3/3 clt-eval over the sweep folder", flush=True)
    eval_overrides = [f"sweep_dir={sweep_dir}", f"replacement.n_sequences={args.eval_sequences}",
                      f"logger.mode={args.logger}", "logger.group=sweep-demo", "max_tokens=8192"]
    print("clt-eval " + " ".join(eval_overrides), flush=True)
    t0 = time.time()
    report = eval_run(compose("eval", eval_overrides))
    t_eval = time.time() - t0

    lines, claim = verdict(report["rows"])
    answer = {True: "yes, at every size compared", False: "no, not at every size",
              None: "not answerable (no CLT lies inside the PLT frontier's L0 range)"}[claim]
    total = time.time() - started
    text = ("Does the CLT reach lower NMSE than the PLT at equal L0? " + answer + "\n\n"
            + "\n".join(f"- {line}" for line in lines)
            + f"\n\nTime: harvest {t_harvest:.0f} s, training {t_train:.0f} s, evaluation {t_eval:.0f} s, "
              f"total {total:.0f} s\n")
    (sweep_dir / "report" / "verdict.md").write_text(text)
    (sweep_dir / "report" / "timing.json").write_text(json.dumps(
        {"harvest_s": t_harvest, "train_s": t_train, "eval_s": t_eval, "total_s": total}, indent=2))
    print("\n" + text + f"\ntable {report['table']}\nplots {', '.join(report['plots'])}")


if __name__ == "__main__":
    main()
