"""clt-eval: how well a trained CLT reconstructs, how sparse it is, and how well it replaces the MLPs.

Its parts, all written to <out_dir>/metrics.json, PNG plots, and W&B (docs/design.md section 6):

1. On held-out activation shards (normalized, as trained; every metric here is scale-free):
   - NMSE_l = E||y_hat_l - y_l||^2 / E||y_l - mean(y_l)||^2 and explained variance 1 - NMSE_l, per layer;
   - L0 per layer (active features per token);
   - dead features (never fired on the evaluated tokens) and dense ones (fired on more than
     `dense_threshold` of them, 10% by default: such features act like biases, not dictionary entries);
   - the feature-density histogram (log10 of each feature's firing rate).

2. The replacement model (train/replacement.py), modes (a) clean inputs and (b) full replacement: top-1
   agreement, KL and CE recovered against the original model, on held-out text.

3. With graphs.enabled: attribution graphs through circuit-tracer from the model's own export, one per
   prompt, with the mean and spread of the graph replacement and completeness scores (train/graphs.py).

4. With features.enabled: the feature pages, from one pass over held-out text (train/features.py): in
   circuit-tracer's formats beside the graphs and in the export, and in our offline browser.

5. With circuits.enabled: global weights in the feature pages (train/circuits.py) and each graph's
   perturbation checks (train/faithfulness.py).

The PNG plots are train/plots.py's. Every activation rule is the CLT module's inference rule
(clt.inference_forward: a BatchTopK CLT is evaluated with its running threshold, as it is exported).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cltrain.errors import ConfigError
from cltrain.files import atomic_write_bytes

from . import features as feature_pages
from .config import CONFIG_DIR, CircuitSettings, EvalSettings, FeatureSettings, GraphSettings, LoggerSettings
from .eval_metrics import DENSE_THRESHOLD, flat_metrics, shard_metrics
from .export import dataset_scales, export, resolve_model_dir
from .graphs import feature_pages_name
from .graphs import prepare as graph_prepare
from .graphs import require_circuit_tracer
from .graphs import run as graph_run
from .lifecycle import run_command
from .metrics import start_wandb_run
from .model_io import META, load_clt
from .plots import METRICS_FILE, plot_frontier, write_plots
from .replacement import replacement_for
from .sweep_report import log_sweep_wandb, plot_agreement, row_from_metrics, sweep_runs, train_config_of, write_table

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# Inputs: the model and a dataset that matches it


def check_dataset_matches_model(info, meta: dict, source: str):
    """Raise ConfigError naming dataset.json and the key where it differs from what the CLT was trained on."""
    ds = meta.get("dataset") or {}
    for key in ("model", "layers", "d_model"):
        want, found = ds.get(key), getattr(info, key)
        if want is not None and want != found:
            raise ConfigError(f"{info.json_path}: key '{key}' = {found!r} but {source} was trained on "
                              f"dataset.{key} = {want!r} (a checkpoint from another dataset?)")
    for key in ("scale_x", "scale_y"):
        want, found = ds.get(key), getattr(info, key)
        if want is not None and (len(want) != len(found) or not all(
                math.isclose(a, b, rel_tol=1e-4) for a, b in zip(want, found))):
            raise ConfigError(f"{info.json_path}: key '{key}' differs from {source}'s dataset.{key} "
                              f"(activations from another harvest?)")


# ----------------------------------------------------------------------------------------------------
# Part 1: reconstruction and sparsity on held-out shards



def log_wandb(logger: LoggerSettings | None, metrics: dict, plots: list[Path], out_dir: Path,
              config: dict | None = None):
    run = start_wandb_run(logger, out_dir, job_type="eval", config=config)
    if run is None:
        return
    import wandb

    try:
        values = flat_metrics(metrics)
        extra = {f"eval/plots/{p.stem}": wandb.Image(str(p)) for p in plots}
        rows = (metrics.get("graphs") or {}).get("per_prompt")
        if rows:  # one row per prompt's graph, beside the mean and spread in `values`
            cols = ["slug", "kind", "prompt", "tokens", "replacement_score", "completeness_score",
                    "active_features", "feature_nodes", "seconds"]
            extra["eval/graphs/per_prompt"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
        table = (metrics.get("feature_pages") or {}).get("layer_table")
        if table:  # per layer: dead, dense, mean and median firing frequency from the feature-page pass
            cols = list(table[0])
            extra["eval/feature_pages/per_layer"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in table])
        run.log({**values, **extra})
        run.summary.update(values)
    finally:
        run.finish()


# ----------------------------------------------------------------------------------------------------
# The whole evaluation


def evaluate(model_dir: str | os.PathLike, *, dataset: str | os.PathLike | None = None,
             out_dir: str | os.PathLike | None = None, split: str = "heldout", heldout_shards: int = 1,
             max_tokens: int | None = 65536, batch_tokens: int = 4096,
             dense_threshold: float = DENSE_THRESHOLD, replacement: bool = True, lm: str | None = None,
             text: str | os.PathLike | None = None, skip_documents: int = 0, n_sequences: int = 32,
             seq_len: int = 128, lm_batch: int = 8, skip_bos: bool = True, skip_harvested: bool = True,
             device: str = "auto", graphs: GraphSettings | None = None, features: FeatureSettings | None = None,
             circuits: CircuitSettings | None = None, logger_cfg=None, write: bool = True,
             progress: bool = True) -> dict:
    """Evaluate the CLT in model_dir; returns the metrics dict (also written to out_dir/metrics.json,
    default <model_dir>/eval, with the PNG plots, unless write=False).

    dataset: the activation dataset (default: dataset.path recorded in model.json); evaluated on its
      last `heldout_shards` shards (split="heldout") or all of them (split="all"), up to max_tokens.
    replacement: also run the replacement model on `lm` (default: the dataset's base model, via
      train/lm.py's load_lm) over n_sequences x seq_len tokens of `text` (default: the harvest's text
      source) after its first `skip_documents` documents and, with skip_harvested and the harvest's text
      source, after the tokens the harvest fed the model (see eval_token_batches); with skip_bos,
      BOS/separator positions keep the original MLP outputs and are not scored (see replacement_metrics).
    graphs: attribution-graph settings (train/graphs.py); when enabled, the CLT is exported (to
      <out_dir>/circuit_tracer, unless graphs.export names an export) and every input is checked
      before the held-out metrics run; graphs are written to <out_dir>/graphs.
    features: feature-page settings (train/features.py); when enabled (and write), one pass over held-out
      text writes <out_dir>/features (our browser and circuit-tracer's binary layout), the per-feature JSON
      the graphs point to, and the binary layout into the model's own export.
    circuits: global weights (train/circuits.py; with features: each feature's top inputs and outputs by
      TWERA and virtual weight from the same pass) and, with graphs, the perturbation checks of each graph
      (train/faithfulness.py).
    """
    from .data import ActivationLoader, DatasetInfo

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model_dir = resolve_model_dir(model_dir)
    source = str(model_dir / META)
    clt, meta = load_clt(model_dir, map_location=device)
    cfg = clt.cfg
    s_x, s_y = dataset_scales(meta, cfg.n_layers, cfg.d_model, source)
    ds_meta = meta["dataset"]
    dataset = dataset if dataset is not None else ds_meta.get("path")
    if dataset is None:
        raise ConfigError(f"config key 'dataset' = None and {source} records no dataset.path: expected "
                          f"the activation dataset folder to evaluate on")
    info = DatasetInfo.load(dataset)
    check_dataset_matches_model(info, meta, source)
    if info.n_layers != cfg.n_layers or info.d_model != cfg.d_model:
        raise ConfigError(f"{info.json_path}: n_layers={info.n_layers}, d_model={info.d_model} but {source} "
                          f"has a CLT with n_layers={cfg.n_layers}, d_model={cfg.d_model}")
    out_dir = Path(out_dir) if out_dir is not None else model_dir / "eval"
    graph_job, scratch = None, None
    if graphs is not None and graphs.enabled:
        graph_job, scratch = _prepare_graphs(graphs, model_dir, meta, info, out_dir, write, device)

    loader = ActivationLoader(info, batch_tokens, split=split, heldout_shards=heldout_shards,
                              epochs=1, device=device)
    m = shard_metrics(clt, loader, max_tokens, dense_threshold, progress)
    density = m.pop("density")
    metrics = {"model_dir": str(model_dir), "dataset": str(info.path), "split": split,
               "layers": list(info.layers), "n_features": cfg.n_features,
               "activation": cfg.activation, "per_layer": cfg.per_layer, **m}

    if replacement:
        spec = lm or ds_meta.get("model") or info.model
        if str(spec).startswith("synthetic"):
            log.warning("replacement model skipped: the dataset %s has no base model (%s)", info.path, spec)
            metrics["replacement"] = {"skipped": f"no base model for dataset model {spec!r}"}
        else:
            metrics["replacement"] = replacement_for(clt, s_x, s_y, info, spec, text, skip_documents,
                                                     skip_harvested, n_sequences, seq_len, lm_batch,
                                                     skip_bos, device, progress)

    pages = None
    if features is not None and features.enabled:
        pages, metrics["feature_pages"] = _build_pages(features, clt, meta, s_x, s_y, info,
                                                       lm or ds_meta.get("model"), dense_threshold, out_dir, write,
                                                       device, progress, circuits)
    try:
        if graph_job is not None:
            try:
                metrics["graphs"] = graph_run(graph_job, out_dir if write else None, progress,
                                              circuits if circuits is not None and circuits.enabled else None)
            finally:
                if scratch is not None:
                    shutil.rmtree(scratch, ignore_errors=True)
        elif graphs is not None and graphs.enabled:
            metrics["graphs"] = {"skipped": f"no base model for dataset model {info.model!r}"}
        if pages is not None:
            own_export = graph_job.export_dir if graph_job is not None and graphs.export is None else None
            metrics["feature_pages"] = feature_pages.finish(
                pages, metrics["feature_pages"], metrics.get("graphs"), out_dir,
                f"{metrics['feature_pages']['kind']} features: {model_dir}", own_export, features.json)
    finally:
        if pages is not None:
            shutil.rmtree(pages, ignore_errors=True)

    if write:
        out_dir.mkdir(parents=True, exist_ok=True)
        plots = write_plots(metrics, density, out_dir)
        try:
            atomic_write_bytes(out_dir / METRICS_FILE, json.dumps(metrics, indent=2).encode())
        except OSError as e:
            raise OSError(e.errno, f"{out_dir / METRICS_FILE}: write failed ({e.strerror or e})") from e
        log_wandb(logger_cfg, metrics, plots, out_dir, config={
            k: metrics[k] for k in ("model_dir", "dataset", "split", "layers", "n_features", "activation",
                                    "per_layer", "tokens")})
    _print_summary(metrics)
    return metrics


def _prepare_graphs(settings: GraphSettings, model_dir: Path, meta: dict, info, out_dir: Path, write: bool,
                    device: str):
    """(checked GraphJob, scratch folder to delete or None); (None, None) without a base model."""
    spec = settings.model or meta["dataset"].get("model") or info.model
    if str(spec).startswith("synthetic"):
        log.warning("attribution graphs skipped: the dataset %s has no base model (%s)", info.path, spec)
        return None, None
    require_circuit_tracer()
    scratch = None
    if settings.export is not None:
        export_dir = Path(settings.export)
    else:  # the model's own export, made the way clt-export makes it
        if write:
            export_dir = out_dir / "circuit_tracer"
        else:
            scratch = Path(tempfile.mkdtemp(prefix="clt-eval-export-"))
            export_dir = scratch / "circuit_tracer"
        export(model_dir, export_dir, overwrite=True)
    try:
        return graph_prepare(export_dir, spec, settings, info=info, device=device), scratch
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise


def _build_pages(settings: FeatureSettings, clt, meta: dict, s_x, s_y, info, spec, dense_threshold: float,
                 out_dir: Path, write: bool, device: str, progress: bool,
                 circuits: CircuitSettings | None = None) -> tuple[Path | None, dict]:
    """(staging folder or None, the block for metrics.json): the feature-page pass, its binary layout and
    summary written to a staging folder that feature_pages.finish completes and moves into place."""
    spec = spec or info.model
    if str(spec).startswith("synthetic"):
        log.warning("feature pages skipped: the dataset %s has no base model (%s)", info.path, spec)
        return None, {"skipped": f"no base model for dataset model {spec!r}"}
    if not write:
        return None, {"skipped": "write=False (nothing is written)"}
    stage = out_dir / f".features.tmp-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        name = feature_pages_name("transcoder_set" if clt.cfg.per_layer else "cross_layer_transcoder")
        summary = feature_pages.build(clt, s_x, s_y, info, spec, settings, dense_threshold, stage, name,
                                      feature_pages.weights_fingerprint(meta), device, progress, circuits)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage, summary


def _print_summary(metrics: dict):
    lines = [f"clt-eval on {metrics['tokens']} tokens: NMSE mean {metrics['nmse']['mean']:.4f} "
             f"(per layer {' '.join(f'{v:.3f}' for v in metrics['nmse']['per_layer'])}), "
             f"L0 total {metrics['l0']['total']:.1f}, dead {metrics['features']['dead_fraction']:.2%}, "
             f"dense {metrics['features']['dense_fraction']:.2%}"]
    wm = metrics.get("nmse_without_massive")
    if wm and any(wm["massive_tokens_per_layer"]):
        lines.append(f"  without massive activations (||y_l|| > {wm['massive_norm']:g} sqrt(D): "
                     f"{sum(wm['massive_tokens_per_layer'])} token-layers, up to {max(wm['massive_share_per_layer']):.0%} "
                     f"of a layer's sum ||y||^2): NMSE mean {wm['mean']:.4f}")
    rep = metrics.get("replacement") or {}
    for mode in ("mode_a", "mode_b"):
        if mode in rep:
            r = rep[mode]
            lines.append(f"  replacement {mode}: top-1 agreement {r['top1_agreement']:.3f}, KL {r['kl']:.4f}, "
                         f"CE {r['ce']:.3f} (original {rep['ce_original']:.3f}, zero-ablation "
                         f"{rep['ce_zero_ablation']:.3f}), CE recovered "
                         + ("n/a" if r["ce_recovered"] is None else f"{r['ce_recovered']:.3f}"))
    g = metrics.get("graphs") or {}
    if "replacement_score" in g:
        r, c = g["replacement_score"], g["completeness_score"]
        lines.append(f"  attribution graphs ({g['n_prompts']} prompts, circuit-tracer): replacement score "
                     f"{r['mean']:.3f} +- {r['std']:.3f} (min {r['min']:.3f}), completeness score "
                     f"{c['mean']:.3f} +- {c['std']:.3f} (min {c['min']:.3f})")
        if "edges_checked" in g:
            lines.append(f"  perturbation checks: edges verified {g['edges_verified']} of {g['edges_checked']}")
        for key, what in (("output", "influence vs ablation effect on the top logit"),
                          ("downstream", "predicted vs measured downstream changes")):
            rho = g.get(f"faithfulness_spearman_{key}")
            if rho:
                lines.append(f"  faithfulness, {what}: Spearman {rho['mean']:.3f} +- {rho['std']:.3f} "
                             f"(min {rho['min']:.3f})")
        if "open_with" in g:
            lines.append(f"  graphs in {g['graph_dir']}: {g['open_with']}")
    pages = metrics.get("feature_pages") or {}
    if "browser" in pages:
        lines.append(f"  feature pages ({pages['tokens']} held-out tokens, {pages['dead']} dead, {pages['dense']} "
                     f"dense): open {pages['browser']}" + (f"; in circuit-tracer's graphs: {pages['json_dir']}"
                                                           if "json_dir" in pages else ""))
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------------
# Console script


def run(cfg) -> dict:
    """clt-eval from its settings (or composed config, configs/eval.yaml). With `frontier` (a list of
    metrics.json files or eval folders) it also writes frontier.png; with frontier and no model_dir it only
    plots; with sweep_dir it evaluates every run of a sweep."""
    s = EvalSettings.from_config(cfg)
    if s.sweep_dir:
        return evaluate_sweep(s)
    frontier = list(s.frontier or [])
    if frontier and not s.model_dir:
        if not s.out_dir:
            raise ConfigError("config key 'out_dir' = None: expected where to write frontier.png")
        return {"frontier": str(plot_frontier(frontier, Path(s.out_dir) / "frontier.png"))}
    metrics = _evaluate_model(s, s.model_dir, s.out_dir, s.logger)
    if frontier:
        out_dir = Path(s.out_dir) if s.out_dir else resolve_model_dir(s.model_dir) / "eval"
        metrics["frontier"] = str(plot_frontier(frontier + [out_dir], out_dir / "frontier.png"))
    return metrics


def _evaluate_model(s: EvalSettings, model_dir, out_dir, logger: LoggerSettings) -> dict:
    r = s.replacement
    return evaluate(model_dir, dataset=s.dataset, out_dir=out_dir, split=s.split, heldout_shards=s.heldout_shards,
                    max_tokens=s.max_tokens, batch_tokens=s.batch_tokens, dense_threshold=s.dense_threshold,
                    replacement=r.enabled, lm=r.model, text=r.text, skip_documents=r.skip_documents,
                    n_sequences=r.n_sequences, seq_len=r.seq_len, lm_batch=r.batch_size, skip_bos=r.skip_bos,
                    skip_harvested=r.skip_harvested, device=s.device, graphs=s.graphs, features=s.features,
                    circuits=s.circuits, logger_cfg=logger,
                    progress=s.progress)


def evaluate_sweep(s: EvalSettings) -> dict:
    """clt-eval with sweep_dir: every run of the sweep evaluated as one model, then the sweep's table and
    plots (train/sweep_report.py). Returns {"rows", "table", "csv", "plots"}."""
    sweep_dir = Path(str(s.sweep_dir))
    if not sweep_dir.is_dir():
        raise ConfigError(f"config key 'sweep_dir' = {str(sweep_dir)!r}: not a folder (expected a sweep's "
                          f"folder, e.g. runs/dict_sizes)")
    runs = sweep_runs(sweep_dir)
    if not runs:
        raise ConfigError(f"config key 'sweep_dir' = {str(sweep_dir)!r}: no run folders in it (expected "
                          f"sub-folders with model/ or checkpoints/, as clt-train -m writes)")
    out_dir = Path(str(s.out_dir)) if s.out_dir else sweep_dir / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    group = s.logger.group or sweep_dir.name
    rows, ok_dirs = [], []
    for run in tqdm(runs, desc="clt-eval sweep", unit="run", disable=not s.progress):
        model = run / "model"
        if not (model / META).is_file():
            rows.append({"run": run.name, "status": "failed: no model (the run failed or did not finish)"})
            continue
        logger = dataclasses.replace(s.logger, group=group, run_name=f"{run.name}-eval")
        try:
            m = _evaluate_model(s, model, run / "eval", logger)
        except Exception as e:  # one broken run is a row, not the end of the report
            rows.append({"run": run.name, "status": f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}"})
            continue
        rows.append(row_from_metrics(run.name, m, train_config_of(model)))
        ok_dirs.append(run / "eval")
    md, csv_path = write_table(rows, out_dir)
    plots = []
    if ok_dirs:
        plots = [plot_frontier(ok_dirs, out_dir / "frontier.png"), plot_agreement(rows, out_dir / "agreement.png")]
    log_sweep_wandb(s.logger, group, rows, plots, out_dir)
    print(md.read_text(), flush=True)
    print(f"clt-eval: sweep table {md} and {csv_path}; plots {', '.join(str(p) for p in plots)}", flush=True)
    return {"rows": rows, "table": str(md), "csv": str(csv_path), "plots": [str(p) for p in plots]}


def _main(cfg):
    run_command(lambda: run(cfg), "clt-eval", bad_input=(ConfigError, FileNotFoundError, ValueError, OSError),
                interrupted="stopped before metrics.json was written (an earlier one is kept)")


def main():
    import hydra

    return hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
