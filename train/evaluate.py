"""clt-eval: how well a trained CLT reconstructs, how sparse it is, and how well it replaces the MLPs.

Two parts, both written to <out_dir>/metrics.json, PNG plots, and W&B (DESIGN section 6):

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

The PNG plots are train/plots.py's. Every activation rule is the CLT module's inference rule
(clt.inference_forward: a BatchTopK CLT is evaluated with its running threshold, as it is exported).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .clt import CLT, inference_forward
from .config import CONFIG_DIR
from cltrain.errors import ConfigError
from .export import dataset_scales, export, resolve_model_dir
from .lifecycle import run_command
from .graphs import GraphSettings, require_circuit_tracer
from .graphs import prepare as graph_prepare
from .graphs import run as graph_run
from .model_io import META, load_clt
from cltrain.files import atomic_write_bytes
from .plots import METRICS_FILE, plot_frontier, write_plots
from .replacement import replacement_for

log = logging.getLogger(__name__)

DENSE_THRESHOLD = 0.1  # a feature firing on more than this fraction of tokens counts as dense


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


@torch.no_grad()
def shard_metrics(clt: CLT, batches: Iterable, max_tokens: int | None = None,
                  dense_threshold: float = DENSE_THRESHOLD, progress: bool = True) -> dict:
    """Accumulate NMSE, explained variance, L0 and firing counts over batches with .x, .y [B, N, D]
    (normalized). Returns the metrics plus "density" [N, F] (firing rate per feature, a tensor)."""
    N, F, D = clt.cfg.n_layers, clt.cfg.n_features, clt.cfg.d_model
    dev = clt.b_dec.device
    sse = torch.zeros(N, dtype=torch.float64, device=dev)
    sum_y = torch.zeros(N, D, dtype=torch.float64, device=dev)
    sum_y2 = torch.zeros(N, dtype=torch.float64, device=dev)
    fired = torch.zeros(N, F, dtype=torch.float64, device=dev)
    n = 0
    bar = tqdm(total=max_tokens, unit="tok", desc="eval shards", disable=not progress)
    for batch in batches:
        x, y = batch.x.to(dev), batch.y.to(dev)
        if max_tokens is not None:
            x, y = x[: max_tokens - n], y[: max_tokens - n]
        if x.shape[0] == 0:
            break
        acts, y_hat = inference_forward(clt, x)
        sse += (y_hat - y).double().pow(2).sum(-1).sum(0)
        sum_y += y.double().sum(0)
        sum_y2 += y.double().pow(2).sum(-1).sum(0)
        fired += (acts != 0).sum(0).double()
        n += x.shape[0]
        bar.update(x.shape[0])
        if max_tokens is not None and n >= max_tokens:
            break
    bar.close()
    if n == 0:
        raise ValueError("no evaluation tokens: the held-out split is empty")
    var = (sum_y2 / n - (sum_y / n).pow(2).sum(-1)).clamp_min(1e-12)  # E||y - mean(y)||^2
    nmse = (sse / n) / var
    density = fired / n
    l0 = fired.sum(-1) / n
    dead = int((fired == 0).sum())
    dense = int((density > dense_threshold).sum())
    return {
        "tokens": n,
        "nmse": {"per_layer": nmse.tolist(), "mean": float(nmse.mean())},
        "explained_variance": {"per_layer": (1 - nmse).tolist(), "mean": float((1 - nmse).mean())},
        "l0": {"per_layer": l0.tolist(), "total": float(l0.sum()), "mean": float(l0.mean())},
        "features": {"total": N * F, "dead_count": dead, "dead_fraction": dead / (N * F),
                     "dense_count": dense, "dense_fraction": dense / (N * F),
                     "dense_threshold": dense_threshold,
                     "dead_per_layer": (fired == 0).sum(-1).tolist(),
                     "dense_per_layer": (density > dense_threshold).sum(-1).tolist()},
        "density": density.cpu(),
    }


def flat_metrics(metrics: dict, prefix: str = "eval/") -> dict[str, float]:
    """metrics.json flattened to scalar W&B keys, e.g. eval/nmse/layer_3, eval/replacement/mode_b/kl."""
    out = {}

    def walk(d, key):
        for k, v in d.items():
            name = f"{key}{k}"
            if isinstance(v, dict):
                walk(v, name + "/")
            elif isinstance(v, list) and k == "per_layer":
                out.update({f"{key}layer_{i}": float(x) for i, x in enumerate(v)})
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                out[name] = float(v)

    walk({k: v for k, v in metrics.items() if k not in ("layers",)}, prefix)
    return out


def log_wandb(logger_cfg, metrics: dict, plots: list[Path], out_dir: Path, config: dict | None = None):
    if logger_cfg is None or logger_cfg.get("mode", "disabled") == "disabled":
        return
    import wandb

    run = wandb.init(project=logger_cfg.get("project"), entity=logger_cfg.get("entity"),
                     name=logger_cfg.get("run_name"), group=logger_cfg.get("group"),
                     tags=list(logger_cfg.get("tags") or []), mode=logger_cfg.mode, dir=str(out_dir),
                     job_type="eval", config=config,
                     settings=wandb.Settings(quiet=True, console="off", x_disable_stats=True))
    try:
        values = flat_metrics(metrics)
        extra = {f"eval/plots/{p.stem}": wandb.Image(str(p)) for p in plots}
        rows = (metrics.get("graphs") or {}).get("per_prompt")
        if rows:  # one row per prompt's graph, beside the mean and spread in `values`
            cols = ["slug", "kind", "prompt", "tokens", "replacement_score", "completeness_score",
                    "active_features", "feature_nodes", "seconds"]
            extra["eval/graphs/per_prompt"] = wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
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
             device: str = "auto", graphs: GraphSettings | None = None,
             logger_cfg=None, write: bool = True, progress: bool = True) -> dict:
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

    if graph_job is not None:
        try:
            metrics["graphs"] = graph_run(graph_job, out_dir if write else None, progress)
        finally:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
    elif graphs is not None and graphs.enabled:
        metrics["graphs"] = {"skipped": f"no base model for dataset model {info.model!r}"}

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
    settings.validate()
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


def _print_summary(metrics: dict):
    lines = [f"clt-eval on {metrics['tokens']} tokens: NMSE mean {metrics['nmse']['mean']:.4f} "
             f"(per layer {' '.join(f'{v:.3f}' for v in metrics['nmse']['per_layer'])}), "
             f"L0 total {metrics['l0']['total']:.1f}, dead {metrics['features']['dead_fraction']:.2%}, "
             f"dense {metrics['features']['dense_fraction']:.2%}"]
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
        if "open_with" in g:
            lines.append(f"  graphs in {g['graph_dir']}: {g['open_with']}")
    print("\n".join(lines), flush=True)


# ----------------------------------------------------------------------------------------------------
# Console script


def _validate(cfg):
    from .config import require_choice, require_number, require_positive_int, validate_eval

    validate_eval(cfg)
    if not cfg.get("model_dir"):
        raise ConfigError("config key 'model_dir' = None: expected the folder of a trained CLT "
                          "(model.safetensors + model.json) or a clt-train run folder, e.g. clt-eval model_dir=runs/clt")
    require_choice(cfg, "split", ("heldout", "all"))
    require_positive_int(cfg, "heldout_shards")
    require_positive_int(cfg, "max_tokens", allow_none=True)
    require_positive_int(cfg, "batch_tokens")
    require_number(cfg, "dense_threshold", lo=0, hi=1, lo_open=True)
    require_choice(cfg, "device", ("auto", "cpu", "cuda"))
    for key in ("n_sequences", "seq_len", "batch_size"):
        require_positive_int(cfg, f"replacement.{key}")
    skip = cfg.replacement.get("skip_documents", 0)
    if isinstance(skip, bool) or not isinstance(skip, int) or skip < 0:
        raise ConfigError(f"config key 'replacement.skip_documents' = {skip!r}: expected an integer >= 0")
    require_choice(cfg, "logger.mode", ("offline", "online", "disabled"))
    graphs = GraphSettings.from_config(cfg.get("graphs"))
    if graphs.enabled:
        graphs.validate()
    return graphs


def run(cfg) -> dict:
    """clt-eval with a composed config (configs/eval.yaml). With `frontier` (a list of metrics.json files
    or eval folders) it also writes frontier.png; with frontier and no model_dir it only plots."""
    if cfg.get("sweep_dir"):  # every run of a sweep, one table and the sweep plots (train/sweep_report.py)
        from .config import validate_eval
        from .sweep_report import evaluate_sweep

        validate_eval(cfg)
        graphs = GraphSettings.from_config(cfg.get("graphs"))
        if graphs.enabled:
            graphs.validate()
        return evaluate_sweep(cfg, graphs)
    frontier = list(cfg.get("frontier") or [])
    if frontier and not cfg.get("model_dir"):
        if not cfg.get("out_dir"):
            raise ConfigError("config key 'out_dir' = None: expected where to write frontier.png")
        return {"frontier": str(plot_frontier(frontier, Path(cfg.out_dir) / "frontier.png"))}
    graphs = _validate(cfg)
    metrics = _evaluate_from_config(cfg, graphs)
    if frontier:
        out_dir = Path(cfg.out_dir) if cfg.get("out_dir") else resolve_model_dir(cfg.model_dir) / "eval"
        metrics["frontier"] = str(plot_frontier(frontier + [out_dir], out_dir / "frontier.png"))
    return metrics


def _evaluate_from_config(cfg, graphs: GraphSettings) -> dict:
    r = cfg.replacement
    return evaluate(cfg.model_dir, dataset=cfg.get("dataset"), out_dir=cfg.get("out_dir"), split=cfg.split,
                    heldout_shards=int(cfg.heldout_shards), max_tokens=cfg.get("max_tokens"),
                    batch_tokens=int(cfg.batch_tokens), dense_threshold=float(cfg.dense_threshold),
                    replacement=bool(r.enabled), lm=r.get("model"), text=r.get("text"),
                    skip_documents=int(r.get("skip_documents", 0)),
                    n_sequences=int(r.n_sequences), seq_len=int(r.seq_len), lm_batch=int(r.batch_size),
                    skip_bos=bool(r.get("skip_bos", True)), skip_harvested=bool(r.get("skip_harvested", True)),
                    device=cfg.device, graphs=graphs, logger_cfg=cfg.logger,
                    progress=bool(cfg.get("progress", True)))


def _main(cfg):
    run_command(lambda: run(cfg), "clt-eval", bad_input=(ConfigError, FileNotFoundError, ValueError, OSError),
                interrupted="stopped before metrics.json was written (an earlier one is kept)")


def main():
    import hydra

    return hydra.main(config_path=str(CONFIG_DIR), config_name="eval", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
