"""clt-eval's PNG plots (docs/design.md section 6): NMSE and L0 per layer, the feature-density histogram, and
for a sweep the L0-vs-NMSE frontier across dictionary sizes, CLT against PLT. Written atomically."""
from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable
from pathlib import Path

import torch

from cltrain.files import atomic_write_bytes

METRICS_FILE = "metrics.json"
PLOTS = ("nmse_per_layer.png", "l0_per_layer.png", "feature_density.png")


def _save_figure(fig, path: Path):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise OSError(e.errno, f"{path}: write failed ({e.strerror or e})") from e


def write_plots(metrics: dict, density: torch.Tensor, out_dir: Path, title: str = "") -> list[Path]:
    """NMSE per layer, L0 per layer, and the log10 feature-density histogram, as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = metrics["layers"]
    paths = []
    for name, key, ylabel in (("nmse_per_layer.png", "nmse", "NMSE (held-out)"),
                              ("l0_per_layer.png", "l0", "L0 (active features / token)")):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(layers)), metrics[key]["per_layer"], color="tab:blue")
        ax.set_xticks(range(len(layers)), [str(l) for l in layers])
        ax.set_xlabel("layer")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title} {key.upper()} per layer (mean {metrics[key]['mean']:.4g})".strip())
        paths.append(out_dir / name)
        _save_figure(fig, paths[-1])
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    rate = density.flatten().double()
    alive = rate[rate > 0]
    n_tok = metrics["tokens"]
    if alive.numel():
        lo = math.floor(math.log10(1 / n_tok))
        ax.hist(alive.log10().numpy(), bins=50, range=(lo, 0), color="tab:blue")
    dead, dense = metrics["features"]["dead_count"], metrics["features"]["dense_count"]
    ax.axvline(math.log10(metrics["features"]["dense_threshold"]), color="tab:red", ls="--",
               label=f"dense > {metrics['features']['dense_threshold']:g} ({dense})")
    ax.set_xlabel("log10 firing rate")
    ax.set_ylabel("features")
    ax.set_title(f"{title} feature density ({dead} dead of {rate.numel()}, {n_tok} tokens)".strip())
    ax.legend()
    paths.append(out_dir / "feature_density.png")
    _save_figure(fig, paths[-1])
    plt.close(fig)
    pages = metrics.get("feature_pages") or {}
    if "frequency_histogram" in pages:
        paths.append(out_dir / "feature_frequency.png")
        plot_feature_frequency(pages, paths[-1], title)
    return paths


def plot_feature_frequency(pages: dict, path: Path, title: str = ""):
    """The feature pages' firing frequencies: per layer (rows), how many features fire at each log10
    frequency (columns), dead features in a column of their own."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = pages["frequency_histogram"]
    edges = hist["log10_edges"]
    dead = [r["dead"] for r in pages["layer_table"]]
    grid = torch.tensor([[d] + row for d, row in zip(dead, hist["counts_per_layer"])], dtype=torch.float32)
    fig, ax = plt.subplots(figsize=(7, 0.5 + 0.18 * len(dead) + 1.5))
    im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    labels = ["dead"] + [f"{a:g}" for a in edges[:-1]]
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_xlabel("log10 firing frequency (bin start)")
    ax.set_ylabel("layer")
    ax.set_title(f"{title} features per frequency, {pages['tokens']} held-out tokens".strip(), fontsize=9)
    fig.colorbar(im, ax=ax, label="features")
    _save_figure(fig, path)
    plt.close(fig)


def read_metrics(src) -> tuple[Path, dict]:
    """(path, contents) of a clt-eval metrics.json, given the file or the eval folder holding it."""
    path = Path(src)
    path = path / METRICS_FILE if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found (expected a metrics.json written by clt-eval)")
    try:
        return path, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a clt-eval metrics.json ({e})") from None


def plot_frontier(sources: Iterable[str | os.PathLike], out_path: str | os.PathLike) -> Path:
    """The L0-vs-NMSE frontier of several evaluations (a sweep over dictionary sizes), CLT against PLT:
    one point per metrics.json (a file, or a folder holding one), x = total L0 per token, y = mean NMSE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = {False: [], True: []}
    for src in sources:
        path, m = read_metrics(src)
        try:
            points[bool(m["per_layer"])].append((m["l0"]["total"], m["nmse"]["mean"], m["n_features"]))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a clt-eval metrics.json ({e})") from None
    fig, ax = plt.subplots(figsize=(6, 4))
    for per_layer, style in ((False, "o-"), (True, "s--")):
        pts = sorted(points[per_layer])
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label="PLT" if per_layer else "CLT")
        for l0, nmse, n_features in pts:
            ax.annotate(f"F={n_features}", (l0, nmse), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("L0 (active features per token, all layers)")
    ax.set_ylabel("NMSE (mean over layers, held-out)")
    ax.set_title("L0 vs NMSE frontier")
    ax.legend()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _save_figure(fig, out_path)
    plt.close(fig)
    return out_path
