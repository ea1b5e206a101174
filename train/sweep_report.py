"""clt-eval over a sweep folder (`clt-eval sweep_dir=runs/dict_sizes`): every run in it is evaluated (its
eval/ folder, as `clt-eval model_dir=RUN`), then one table (sweep.md, sweep.csv) and the sweep plots
(frontier.png: L0 vs NMSE; agreement.png: replacement top-1 agreement vs dictionary size; CLT against
PLT) are written to <sweep_dir>/report and logged to the sweep's W&B group. A run that failed (no
model, or its evaluation failed) is a row marked failed; the others go on.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
from pathlib import Path

import yaml

from cltrain.files import atomic_write_bytes

from .metrics import start_wandb_run
from .model_io import META

COLUMNS = [
    ("run", "run"), ("status", "status"), ("arch", "arch"), ("n_features", "F"), ("lambda_s", "lambda_s"),
    ("activation", "activation"), ("l0_total", "L0"), ("nmse_mean", "NMSE"), ("explained_variance", "EV"),
    ("dead_fraction", "dead"), ("top1_a", "top-1 (a)"), ("top1_b", "top-1 (b)"), ("kl_a", "KL (a)"),
    ("kl_b", "KL (b)"), ("ce_recovered_a", "CE rec. (a)"), ("ce_recovered_b", "CE rec. (b)"),
    ("graph_replacement_mean", "graph replacement"), ("graph_completeness_mean", "graph completeness"),
    ("edges_verified", "edges verified"), ("faithfulness_output", "influence~ablation (Spearman)"),
    ("faithfulness_downstream", "downstream (Spearman)"),
]


def sweep_runs(sweep_dir: Path) -> list[Path]:
    """The run folders of a sweep: sub-folders with a model, checkpoints, metrics or a Hydra record."""
    marks = ("model", "checkpoints", "metrics.jsonl", ".hydra")
    return sorted(p for p in sweep_dir.iterdir()
                  if p.is_dir() and not p.name.startswith(".") and p.name != "report"
                  and any((p / m).exists() for m in marks))


def train_config_of(model_dir: Path) -> dict:
    try:
        meta = json.loads((model_dir / META).read_text())
        return yaml.safe_load(meta.get("train", {}).get("config") or "") or {}
    except (OSError, json.JSONDecodeError, yaml.YAMLError):
        return {}


def row_from_metrics(name: str, metrics: dict, train_cfg: dict) -> dict:
    rep = metrics.get("replacement") or {}
    row = {"run": name, "status": "ok", "arch": "PLT" if metrics["per_layer"] else "CLT",
           "n_features": metrics["n_features"], "activation": metrics.get("activation"),
           "lambda_s": ((train_cfg.get("model") or {}).get("loss") or {}).get("lambda_s"),
           "l0_total": metrics["l0"]["total"], "nmse_mean": metrics["nmse"]["mean"],
           "explained_variance": metrics["explained_variance"]["mean"],
           "dead_fraction": metrics["features"]["dead_fraction"]}
    for mode, tag in (("mode_a", "a"), ("mode_b", "b")):
        r = rep.get(mode) or {}
        row[f"top1_{tag}"], row[f"kl_{tag}"], row[f"ce_recovered_{tag}"] = (
            r.get("top1_agreement"), r.get("kl"), r.get("ce_recovered"))
    g = metrics.get("graphs") or {}
    for score in ("replacement_score", "completeness_score"):
        row[f"graph_{score.split('_')[0]}_mean"] = (g.get(score) or {}).get("mean")
    # the perturbation checks (train/faithfulness.py), where clt-eval ran them (circuits.enabled)
    row["edges_verified"] = f"{g['edges_verified']}/{g['edges_checked']}" if "edges_checked" in g else None
    for key in ("output", "downstream"):
        row[f"faithfulness_{key}"] = (g.get(f"faithfulness_spearman_{key}") or {}).get("mean")
    return row


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v).replace("|", "/")


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    keys = [k for k, _ in COLUMNS]
    md = ["| " + " | ".join(h for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    md += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in keys})
    md_path, csv_path = out_dir / "sweep.md", out_dir / "sweep.csv"
    atomic_write_bytes(md_path, ("\n".join(md) + "\n").encode())
    atomic_write_bytes(csv_path, buf.getvalue().encode())
    return md_path, csv_path


def plot_agreement(rows: list[dict], out_path: Path) -> Path:
    """Replacement top-1 agreement (modes a and b) against dictionary size, CLT against PLT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for arch, color in (("CLT", "C0"), ("PLT", "C1")):
        for mode, style in (("a", "o-"), ("b", "s--")):
            pts = sorted((r["n_features"], r[f"top1_{mode}"]) for r in rows
                         if r["status"] == "ok" and r["arch"] == arch and r.get(f"top1_{mode}") is not None)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"{arch} ({mode})")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("features per layer (F)")
    ax.set_ylabel("top-1 agreement with the base model")
    ax.set_title("replacement model: (a) per-layer, (b) full")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(out_path)
    return out_path


def log_sweep_wandb(logger, group: str, rows: list[dict], plots: list[Path], out_dir: Path):
    run = start_wandb_run(dataclasses.replace(logger, group=group, run_name=f"{group}-report", tags=[]), out_dir,
                          job_type="sweep-report")
    if run is None:
        return
    import wandb

    keys = [k for k, _ in COLUMNS]
    run.log({"sweep/table": wandb.Table(columns=keys, data=[[r.get(k) for k in keys] for r in rows]),
             **{f"sweep/{p.stem}": wandb.Image(str(p)) for p in plots}})
    run.finish()
