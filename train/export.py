"""clt-export: a trained CLT as a circuit-tracer folder that runs on raw activations (docs/design.md section 5).

Layout written (matching decoderesearch/circuit-tracer's readers):

  cross-layer transcoder (model_kind: cross_layer_transcoder), for each layer i = 0..N-1:
    W_enc_{i}.safetensors   W_enc_{i} [F, D], b_enc_{i} [F], b_dec_{i} [D], threshold_{i} [F]
    W_dec_{i}.safetensors   W_dec_{i} [F, N - i, D]   (slot j writes layer i + j)
  per-layer transcoder (model_kind: transcoder_set), for each layer i:
    layer_{i}.safetensors   W_enc [F, D], W_dec [F, D], b_enc [F], b_dec [D],
                            activation_function.threshold [F]
  config.yaml               model_kind, model_name, feature_input_hook, feature_output_hook (+ a
                            `cltrain` block with provenance; circuit-tracer ignores unknown keys)
File index i is the CLT's layer i, i.e. model layer dataset.layers[i]; circuit-tracer reads it as model
layer i, so a CLT over a range not starting at layer 0 exports with a warning.

The transcoder_set config carries no `transcoders` list: circuit-tracer then finds layer_{i}.safetensors
by globbing the folder (its hub and local-cache loaders both do), so the folder can be moved or uploaded.
circuit-tracer counts layers by globbing W_enc_*.safetensors / layer_*.safetensors, so the folder must
hold nothing else of that shape: it is written under a temporary name and renamed into place whole.

Normalization folding (training runs on x_norm = s_x * x_raw and predicts y_norm = s_y * y_raw):
  h = W_enc (s_x x_raw) + b_enc            ->  W_enc_raw = W_enc * s_x   (h, hence thresholds, unchanged)
  y_raw_t = (sum_s W_dec_s[:, t - s] a_s + b_dec_t) / s_y[t]
                                           ->  W_dec_raw slot for target t = W_dec / s_y[t], b_dec_raw = b_dec / s_y
JumpReLU convention: circuit-tracer computes x * (x > threshold) (strict >), the same as clt.JumpReLU, so
thresholds are exported as theta = exp(log_theta) without adjustment.

TopK / BatchTopK runs have no per-feature thresholds; they export a per-layer JumpReLU threshold
(the same value for every feature of a layer):
  - BatchTopK: the running average of the batch's cut (CLT.batchtopk_threshold, kept during training),
    the usual inference-time replacement for the batch-dependent rule;
  - TopK: estimated on calibration activations (default: the training dataset recorded in model.json)
    as the average over batches of the (B*k)-th largest pre-activation of the layer, i.e. the BatchTopK
    cut of those batches. This is an approximation: it
    keeps the average L0 near k, but per token the number of active features varies around k instead of
    being exactly k, and a token's k-th feature may fall below the cut (or extra ones rise above it).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .clt import CLT
from .config import CONFIG_DIR, ExportSettings
from .features import SUMMARY_FILE, check_pages, copy_binary

PAGES_DIR = "features"  # the feature pages' binary layout, where circuit-tracer's frontend looks in a repository
from cltrain.errors import ConfigError
from .lifecycle import run_command
from .model_io import META, ModelReader, save_safetensors
from cltrain.files import replace_dir

log = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# circuit-tracer's TransformerLens-style hook names: x is the residual stream before the MLP's norm
# (docs/design.md section 1) unless the dataset was harvested at the norm's output (the normalized MLP input).
RESID_MID_HOOK, MLP_IN_HOOK, OUTPUT_HOOK = "hook_resid_mid", "mlp.hook_in", "hook_mlp_out"
CONFIG_FILE = "config.yaml"


# ----------------------------------------------------------------------------------------------------
# Reading a trained model


def input_hook(dataset_meta: dict) -> str:
    """circuit-tracer's name for where x was read: dataset.json's hooks["x"] is "<module>:input" for the
    residual stream entering the MLP's norm, "<module>:output" for the normalized MLP input."""
    x_hook = str((dataset_meta.get("hooks") or {}).get("x", ""))
    return MLP_IN_HOOK if x_hook.endswith(":output") else RESID_MID_HOOK


def resolve_model_dir(path: str | os.PathLike) -> Path:
    """The folder holding model.json, given that folder, a checkpoint folder (its model/), or a clt-train
    run folder (its final model/, else the checkpoint named by checkpoints/latest)."""
    path = Path(path)
    candidates = [path, path / "model"]
    latest = path / "checkpoints" / "latest"
    if latest.is_file():
        candidates.append(path / "checkpoints" / latest.read_text().strip() / "model")
    for candidate in candidates:
        if (candidate / META).is_file():
            return candidate
    if not path.exists():
        raise FileNotFoundError(f"{path}: model folder not found")
    raise FileNotFoundError(f"{path / META}: not found (expected a CLT folder written by clt-train, "
                            f"holding model.safetensors and model.json, or a run/checkpoint folder with "
                            f"one in model/)")


def dataset_scales(meta: dict, n_layers: int, d_model: int, source: str) -> tuple[torch.Tensor, torch.Tensor]:
    """s_x, s_y from model.json's dataset block, each [N, 1] (one scale per layer) or [N, D]."""
    ds = meta.get("dataset")
    if not isinstance(ds, dict):
        raise ValueError(f"{source}: key 'dataset' missing (needed for the normalization scales)")
    out = []
    for key in ("scale_x", "scale_y"):
        if key not in ds:
            raise ValueError(f"{source}: key 'dataset.{key}' missing")
        try:
            s = torch.as_tensor(ds[key], dtype=torch.float64)
        except (TypeError, ValueError):
            raise ValueError(f"{source}: key 'dataset.{key}' is not a list of numbers") from None
        if s.dim() == 1:
            s = s[:, None]
        if s.dim() != 2 or s.shape[0] != n_layers or s.shape[1] not in (1, d_model):
            raise ValueError(f"{source}: key 'dataset.{key}' has shape {list(s.shape)}; the CLT has "
                             f"n_layers={n_layers}, d_model={d_model} (a checkpoint from another dataset?)")
        if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
            raise ValueError(f"{source}: key 'dataset.{key}' must hold finite positive scales")
        out.append(s)
    return out[0], out[1]


# ----------------------------------------------------------------------------------------------------
# Thresholds


@torch.no_grad()
def topk_thresholds(clt: CLT, batches: Iterable[torch.Tensor], max_tokens: int) -> tuple[torch.Tensor, int]:
    """Per-layer cut [N] for a TopK CLT: the mean over batches (weighted by tokens) of the (B*k)-th
    largest pre-activation of each layer (BatchTopK's cut), on normalized inputs x [B, N, D]; clamped
    at 0 (TopK keeps only positive values). Returns the cut and the number of tokens it was estimated on."""
    k, cuts, seen = clt.cfg.topk, [], 0
    for x in batches:
        x = x[: max_tokens - seen].float()
        if x.shape[0] == 0:
            break
        pre = clt.preactivations(x)  # [B, N, F]
        B, N, F = pre.shape
        flat = pre.transpose(0, 1).reshape(N, B * F)
        cuts.append(flat.topk(min(k * B, B * F), dim=-1).values[:, -1] * B)
        seen += B
        if seen >= max_tokens:
            break
    if not cuts:
        raise ValueError("no calibration activations: the TopK threshold estimate needs some tokens")
    return (torch.stack(cuts).sum(0) / seen).clamp_min(0), seen


def export_thresholds(reader: ModelReader, calibration: Iterable[torch.Tensor] | None = None,
                      calibration_tokens: int = 65536) -> tuple[Callable[[int, dict], torch.Tensor], str]:
    """JumpReLU thresholds for export, as a function (layer, that layer's tensors) -> [F], and a note on
    where they came from. JumpReLU and recorded BatchTopK thresholds stream with the layers; a TopK cut
    is estimated on calibration activations, which needs the encoder in memory."""
    cfg = reader.cfg
    F = cfg.n_features
    if cfg.activation == "jumprelu":
        return (lambda i, w: w["log_threshold"].float().exp()), "jumprelu"
    recorded = reader.tensor("batchtopk_threshold").float()
    if cfg.activation == "batchtopk" and bool((recorded > 0).any()):
        cut = recorded.clamp_min(0)
        return (lambda i, w: cut[i].expand(F).clone()), "batchtopk running threshold (per layer)"
    if calibration is None:
        raise ConfigError(
            f"a {cfg.activation} CLT without a recorded threshold needs calibration activations: "
            f"set config key 'calibration.dataset' (a dataset folder with dataset.json; model.json "
            f"records no dataset.path)")
    cut, seen = topk_thresholds(reader.load(), calibration, calibration_tokens)
    return (lambda i, w: cut[i].expand(F).clone()), f"{cfg.activation} cut estimated on {seen} tokens (per layer)"


def dataset_batches(dataset: str | os.PathLike, batch_tokens: int = 4096) -> Iterator[torch.Tensor]:
    """Normalized x batches from a dataset's training shards (for TopK threshold calibration)."""
    from .data import ActivationLoader  # noqa: PLC0415  (the data pipeline is only needed here)

    for batch in ActivationLoader(str(dataset), batch_tokens=batch_tokens, epochs=1):
        yield batch.x


# ----------------------------------------------------------------------------------------------------
# Folding the normalization into the weights


@torch.no_grad()
def raw_space_layers(reader: ModelReader, s_x: torch.Tensor, s_y: torch.Tensor, thresholds,
                     dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """Per source layer i, read from disk one layer at a time: the weights that run on raw activations
    (see the module docstring). Yields {"W_enc", "b_enc", "b_dec", "threshold", "W_dec"} with W_dec
    [F, S_i, D]; thresholds(i, layer tensors) -> [F]."""
    for i in range(reader.cfg.n_layers):
        w = reader.layer(i)
        w_dec = w["W_dec"].double()  # [F, S, D]
        targets = slice(i, i + w_dec.shape[1])
        yield {
            "W_enc": (w["W_enc"].double() * s_x[i]).to(dtype).contiguous(),
            "b_enc": w["b_enc"].to(dtype).contiguous(),
            "b_dec": (w["b_dec"].double() / s_y[i]).to(dtype).contiguous(),
            "threshold": thresholds(i, w).to(dtype).contiguous(),
            "W_dec": (w_dec / s_y[targets][None]).to(dtype).contiguous(),
        }
        del w, w_dec


def _files_for_layer(i: int, w: dict[str, torch.Tensor], per_layer: bool) -> dict[str, dict[str, torch.Tensor]]:
    if per_layer:
        return {f"layer_{i}.safetensors": {
            "W_enc": w["W_enc"], "W_dec": w["W_dec"][:, 0].contiguous(), "b_enc": w["b_enc"],
            "b_dec": w["b_dec"], "activation_function.threshold": w["threshold"]}}
    return {
        f"W_enc_{i}.safetensors": {f"W_enc_{i}": w["W_enc"], f"b_enc_{i}": w["b_enc"],
                                   f"b_dec_{i}": w["b_dec"], f"threshold_{i}": w["threshold"]},
        f"W_dec_{i}.safetensors": {f"W_dec_{i}": w["W_dec"]},
    }


# ----------------------------------------------------------------------------------------------------
# Writing the folder whole


def _check_free_space(parent: Path, needed: int, out_dir: Path):
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{out_dir}: needs about {needed / 2**20:.1f} MiB, only "
                                    f"{free / 2**20:.1f} MiB free on that disk; nothing was written")


# What a clt-export folder holds (and all it holds): config.yaml with a `cltrain` block, and the layers.
EXPORT_FILE = re.compile(r"(W_enc_\d+|W_dec_\d+|layer_\d+)\.safetensors")


def not_an_export(folder: Path) -> str | None:
    """Why `folder` is not a folder clt-export wrote (None: it is one, and overwrite may replace it)."""
    if not folder.is_dir():
        return "not a folder"
    try:
        config = yaml.safe_load((folder / CONFIG_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return f"no readable {CONFIG_FILE}"
    if not isinstance(config, dict) or "cltrain" not in config or \
            config.get("model_kind") not in ("cross_layer_transcoder", "transcoder_set"):
        return f"its {CONFIG_FILE} was not written by clt-export"
    others = sorted(p.name for p in folder.iterdir()
                    if p.name not in (CONFIG_FILE, PAGES_DIR) and not EXPORT_FILE.fullmatch(p.name))
    return f"it also holds {', '.join(others[:3])}" + (" ..." if len(others) > 3 else "") if others else None


def export(model_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None, *,
           dtype: str = "float32", overwrite: bool = False, model_name: str | None = None,
           feature_input_hook: str | None = None, dataset: str | os.PathLike | None = None,
           calibration: Iterable[torch.Tensor] | None = None, calibration_tokens: int = 65536,
           features: str | os.PathLike | None = None) -> Path:
    """Export the CLT in model_dir to a circuit-tracer folder (default: model_dir/circuit_tracer).

    model_dir: a model folder (model_io: one file or feature shards, read one layer at a time, so a CLT
      larger than memory exports), or a checkpoint / clt-train run folder (see resolve_model_dir).
    dtype: float32 | bfloat16 | float16 for the written tensors.
    model_name / feature_input_hook: default from model.json's dataset block.
    dataset / calibration: only for TopK CLTs (and BatchTopK ones with no recorded threshold): normalized
      x batches [B, N, D] to estimate the per-layer cut, given directly or read from a dataset folder
      (default: the training dataset recorded in model.json, dataset.path).
    features: a features folder clt-eval wrote for this model (features.enabled=true): its circuit-tracer
      binary layout goes to <out_dir>/features, where the frontend reads it from a Hugging Face repository
      holding the export (checked to describe these weights).
    Returns the folder. Raises FileExistsError if it exists and overwrite is false; nothing is left
    half-written on any error (the folder appears whole or not at all).
    """
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"config key 'dtype' = {dtype!r}: expected one of {list(EXPORT_DTYPES)}")
    model_dir = resolve_model_dir(model_dir)
    out_dir = Path(out_dir) if out_dir is not None else model_dir / "circuit_tracer"
    if out_dir.resolve() == model_dir.resolve() or out_dir.resolve() in model_dir.resolve().parents:
        raise ConfigError(f"config key 'out_dir' = {str(out_dir)!r}: would replace the model folder "
                          f"{model_dir} it exports from; choose another folder")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir}: already exists (set overwrite=true to replace it)")
    if out_dir.exists():
        foreign = not_an_export(out_dir)
        if foreign:
            raise FileExistsError(f"config key 'overwrite' = true: {out_dir} is not a clt-export folder ({foreign}); "
                                  f"overwrite replaces only an earlier export. Choose another out_dir")

    reader = ModelReader(model_dir)  # lazy: the weights are read one layer at a time below
    reader.shards.check_files()
    cfg, meta, source = reader.cfg, reader.meta, str(model_dir / META)
    s_x, s_y = dataset_scales(meta, cfg.n_layers, cfg.d_model, source)
    ds = meta["dataset"]
    layers = list(ds.get("layers") or range(cfg.n_layers))
    if len(layers) != cfg.n_layers:
        raise ValueError(f"{source}: key 'dataset.layers' lists {len(layers)} layers; the CLT has "
                         f"n_layers={cfg.n_layers}")
    if layers != list(range(cfg.n_layers)):
        # circuit-tracer numbers transcoder layers 0..N-1 as model layers; a partial range loads there
        # only if the caller maps the indices.
        warnings.warn(f"{source}: the CLT covers model layers {layers}; circuit-tracer will read file "
                      f"index i as model layer i", stacklevel=2)
    needs_calibration = cfg.activation == "topk" or (
        cfg.activation == "batchtopk" and not bool((reader.tensor("batchtopk_threshold") > 0).any()))
    if calibration is None and needs_calibration:
        dataset = dataset if dataset is not None else ds.get("path")  # the training data, by default
        if dataset is not None:
            calibration = dataset_batches(dataset)
    thresholds, threshold_source = export_thresholds(reader, calibration, calibration_tokens)
    pages = None
    if features is not None:
        pages = check_pages(Path(features), meta, source)
        if (pages.get("n_layers"), pages.get("n_features")) != (cfg.n_layers, cfg.n_features):
            raise ValueError(f"{Path(features) / SUMMARY_FILE}: {pages.get('n_layers')} layers x "
                             f"{pages.get('n_features')} features, but {source} has {cfg.n_layers} x {cfg.n_features}")

    if feature_input_hook is None:
        feature_input_hook = input_hook(ds)
    config = {
        "model_kind": "transcoder_set" if cfg.per_layer else "cross_layer_transcoder",
        "model_name": model_name or ds.get("model"),
        "feature_input_hook": feature_input_hook,
        "feature_output_hook": OUTPUT_HOOK,
        "cltrain": {
            "source": str(model_dir.resolve()),
            "layers": layers,
            "n_layers": cfg.n_layers, "d_model": cfg.d_model, "n_features": cfg.n_features,
            "activation": cfg.activation, "topk": cfg.topk,
            "thresholds": threshold_source,
            "normalization": "folded into the weights; the export runs on raw activations",
            "dtype": dtype,
        },
    }
    if config["model_name"] is None:
        raise ValueError(f"{source}: key 'dataset.model' missing (or set config key 'model_name')")

    torch_dtype = EXPORT_DTYPES[dtype]
    N, D, F = cfg.n_layers, cfg.d_model, cfg.n_features
    n_dec = F * D * (N if cfg.per_layer else N * (N + 1) // 2)
    needed = (N * F * D + n_dec + 3 * N * F + N * D) * torch_dtype.itemsize + 2**20
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_free_space(out_dir.parent, needed, out_dir)

    stage = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir()
    try:
        layers_iter = raw_space_layers(reader, s_x, s_y, thresholds, torch_dtype)
        for i, w in enumerate(tqdm(layers_iter, total=cfg.n_layers, desc="export", unit="layer")):
            for name, tensors in _files_for_layer(i, w, cfg.per_layer).items():
                try:
                    save_safetensors(tensors, stage / name, metadata={"format": "pt"})
                except OSError as e:
                    raise OSError(e.errno, f"{out_dir / name}: write failed ({e.strerror or e}); "
                                           f"nothing was exported") from e
        if pages is not None:
            copy_binary(Path(features), stage / PAGES_DIR)
            config["cltrain"]["feature_pages"] = "features/ (circuit-tracer's binary layout, from clt-eval)"
        text = yaml.safe_dump(config, sort_keys=False)
        try:
            (stage / CONFIG_FILE).write_text(text)
            replace_dir(stage, out_dir)
        except OSError as e:
            raise OSError(e.errno, f"{out_dir / CONFIG_FILE}: write failed ({e.strerror or e}); "
                                   f"nothing was exported") from e
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info("exported %s -> %s (%s, thresholds: %s)", model_dir, out_dir, config["model_kind"],
             threshold_source)
    return out_dir


# ----------------------------------------------------------------------------------------------------
# Console script


def run(cfg) -> Path:
    """clt-export from its settings (or composed config, configs/export.yaml)."""
    s = ExportSettings.from_config(cfg)
    return export(s.model_dir, s.out_dir, dtype=s.dtype, overwrite=s.overwrite, model_name=s.model_name,
                  feature_input_hook=s.feature_input_hook, dataset=s.calibration.dataset,
                  calibration_tokens=s.calibration.tokens, features=s.features)


def _main(cfg):
    run_command(lambda: print(json.dumps({"exported": str(run(cfg))})), "clt-export",
                bad_input=(ConfigError, FileNotFoundError, FileExistsError, ValueError, OSError),
                interrupted="stopped; nothing was exported (an earlier export is untouched)")


def main():
    import hydra

    return hydra.main(config_path=str(CONFIG_DIR), config_name="export", version_base="1.3")(_main)()


if __name__ == "__main__":
    main()
