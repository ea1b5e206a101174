"""Attribution graphs of a trained CLT or PLT through circuit-tracer, and their graph-level scores.

A CLT is trained to build attribution graphs; this module measures how good those graphs are. For each
prompt, circuit-tracer builds the attribution graph of its local replacement model (`attribute`) from
the base model (a transformers folder) and the CLT's own export (clt-export's folder, read by
circuit-tracer's own loaders: a cross-layer transcoder through `load_clt`, a per-layer transcoder
through the transcoder-set path), and scores it with `compute_graph_scores`:
  - graph replacement score: the fraction of the input tokens' end-to-end influence on the output
    logits that flows through features rather than error nodes;
  - graph completeness score: the influence-weighted fraction of the nodes' inputs that come from
    features or tokens rather than error nodes.
Both are 1 for a transcoder that reproduces every MLP exactly. Every number comes from circuit-tracer;
nothing of its math is repeated here.

Prompts: the built-in short prompts (several kinds: facts, arithmetic, code, grammar, lists, ...), a
file (.txt: one prompt per line; .jsonl: a "prompt" or "text" field per line), or "heldout": windows
of the held-out text clt-eval's replacement model reads.

Graphs are saved in circuit-tracer's own formats: <slug>.pt (Graph.to_pt, the whole graph) and the
frontend's pruned <slug>.json with graph-metadata.json, which its server opens:

    circuit-tracer start-server --graph_file_dir <out_dir>/graphs

Each graph's scan is ./data/features/cltrain-clt (or -plt): the frontend reads a feature node's page from
<out_dir>/graphs/features/cltrain-clt/<index>.json, which clt-eval writes with features.enabled
(train/features.py).

Everything that can be wrong with the inputs (the export missing or from another model, layer counts,
widths, hook names, a prompt longer than the model's context) is checked before any graph is built.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from cltrain.errors import ConfigError

from .config import GraphSettings

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'cltrain[graphs]' (make install does)"
SERVER_COMMAND = "circuit-tracer start-server --graph_file_dir {dir}"
# A graph whose scan starts with "./" has the frontend load <scan>/<feature index>.json, and its local server
# serves /data/ from --graph_file_dir: so the feature pages sit in <graph dir>/features/<name>/.
FEATURE_SCAN = "./data/features/{name}"


def feature_pages_name(kind: str) -> str:
    """The name under <graph dir>/features/ of a model's per-feature JSON (and its records' transcoder_id)."""
    return "cltrain-plt" if kind == "transcoder_set" else "cltrain-clt"

# (kind, prompt): short prompts of several kinds, so a score is not one kind of computation's.
BUILTIN_PROMPTS = (
    ("fact", "The capital of France is"),
    ("code", "def add(a, b):\n    return a +"),
    ("arithmetic", "3 + 4 ="),
    ("grammar", "The keys to the cabinet"),
    ("list", "Monday, Tuesday, Wednesday,"),
    ("antonym", "The opposite of hot is"),
    ("docs", "To open a file in Python, call the built-in function"),
    ("fact", "The Eiffel Tower is in the city of"),
    ("code", "for i in range(10):\n    print("),
    ("arithmetic", "The sum of 12 and 30 is"),
    ("grammar", "She gave the book to"),
    ("list", "one, two, three, four,"),
)



@dataclass
class Prompt:
    kind: str
    text: str
    ids: list[int] | None = None  # token ids, when the prompt is given as tokens (held-out text)
    n_tokens: int = 0  # as the graph sees it, with the leading BOS circuit-tracer adds
    slug: str = ""


def require_circuit_tracer():
    """Import circuit-tracer, or say how to install it."""
    try:
        import circuit_tracer  # noqa: F401
        from circuit_tracer.replacement_model import replacement_model_nnsight  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"attribution graphs (config key 'graphs.enabled' = true) need circuit-tracer "
                          f"and nnsight, which failed to import ({e}); {INSTALL_HINT}") from None


# ----------------------------------------------------------------------------------------------------
# Prompts


def load_prompts(source: str, n: int, *, tokenizer=None, info=None, heldout_tokens: int = 16,
                 device="cpu") -> list[Prompt]:
    """Up to n prompts from `source` (module docstring); "heldout" needs the dataset `info` and the
    tokenizer."""
    source = str(source)
    if source == "builtin":
        prompts = [Prompt(k, t) for k, t in BUILTIN_PROMPTS[:n]]
    elif source == "heldout":
        from .replacement import eval_token_batches, heldout_text

        if info is None or tokenizer is None:
            raise ConfigError("config key 'graphs.prompts' = 'heldout' needs the activation dataset "
                              "(its text source and how much of it the harvest used)")
        text, skip = heldout_text(info, None, True)
        seqs = torch.cat(eval_token_batches(tokenizer, text, n, heldout_tokens, n, "cpu", 0, skip))
        prompts = [Prompt("heldout", tokenizer.decode(s), s.tolist()) for s in seqs]
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: prompt file not found (config key 'graphs.prompts': "
                                    f"'builtin', 'heldout', or a .txt/.jsonl file)")
        prompts = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            if path.suffix == ".jsonl":
                try:
                    row = json.loads(line)
                    text = row.get("prompt", row.get("text"))
                except (json.JSONDecodeError, AttributeError):
                    text = None
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{i}: expected a JSON object with a 'prompt' or 'text' string")
            else:
                text = line.replace("\\n", "\n")  # one prompt per line; "\n" inside one is a newline
            prompts.append(Prompt(path.stem, text))
            if len(prompts) == n:
                break
    if not prompts:
        raise ValueError(f"prompt source {source!r} holds no prompts")
    for i, p in enumerate(prompts):
        if not p.text.strip() and not p.ids:
            raise ValueError(f"prompt {i} of {source!r} is empty")
        p.slug = f"prompt-{i:02d}-{p.kind}"
    return prompts


def count_tokens(prompts: list[Prompt], tokenizer):
    """Set each prompt's token count as circuit-tracer will see it (it prepends BOS unless the first
    token is a special one)."""
    specials = set(tokenizer.all_special_ids)
    for p in prompts:
        ids = p.ids if p.ids is not None else tokenizer(p.text, add_special_tokens=False).input_ids
        p.n_tokens = len(ids) + (0 if ids and ids[0] in specials else 1)


# ----------------------------------------------------------------------------------------------------
# Checks: the export against the model, the prompts against the context


def read_export(export_dir: str | os.PathLike) -> tuple[dict, dict]:
    """(config.yaml, shapes) of a clt-export folder, from the safetensors headers (no weights read):
    shapes = {"kind", "n_layers", "d_model", "n_features", "files"}."""
    from safetensors import safe_open

    export_dir = Path(export_dir)
    cfg_path = export_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path}: not found (expected a folder written by clt-export; "
                                f"config key 'graphs.export')")
    try:
        cfg = yaml.safe_load(cfg_path.read_text())
        kind = cfg["model_kind"]
    except (yaml.YAMLError, TypeError, KeyError) as e:
        raise ValueError(f"{cfg_path}: not a circuit-tracer transcoder config ({e})") from None
    if kind == "cross_layer_transcoder":
        pattern, key = "W_enc_{}.safetensors", "W_enc_{}"
    elif kind == "transcoder_set":
        pattern, key = "layer_{}.safetensors", "W_enc"
    else:
        raise ValueError(f"{cfg_path}: key 'model_kind' = {kind!r}; expected cross_layer_transcoder or "
                         f"transcoder_set")
    glob = pattern.replace("{}", "*")
    n = len(list(export_dir.glob(glob)))
    if n == 0:
        raise FileNotFoundError(f"{export_dir}: no {glob} files (an incomplete export?)")
    widths = []
    for i in range(n):
        path = export_dir / pattern.format(i)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing ({n} files match {glob}; expected layers 0..{n - 1})")
        with safe_open(str(path), framework="pt") as f:
            if key.format(i) not in f.keys():
                raise ValueError(f"{path}: has no tensor {key.format(i)!r}")
            widths.append(tuple(f.get_slice(key.format(i)).get_shape()))
        if kind == "cross_layer_transcoder":
            dec = export_dir / f"W_dec_{i}.safetensors"
            if not dec.is_file():
                raise FileNotFoundError(f"{dec}: missing (the encoder file of layer {i} is there)")
    if len(set(widths)) != 1:
        raise ValueError(f"{export_dir}: layers differ in encoder shape [F, D]: "
                         f"{ {i: list(w) for i, w in enumerate(widths)} }")
    F, D = widths[0]
    return cfg, {"kind": kind, "n_layers": n, "d_model": D, "n_features": F, "files": glob}


def check_export_matches_model(export_dir: Path, cfg: dict, shapes: dict, model_cfg, model: str):
    """ConfigError naming what does not match between the export and the base model: architecture (one
    circuit-tracer's nnsight backend knows), hook names, layer count, width."""
    from circuit_tracer.utils.tl_nnsight_mapping import get_mapping, get_supported_architectures

    src = f"{export_dir / 'config.yaml'}"
    arch = (getattr(model_cfg, "architectures", None) or ["?"])[0]
    if arch not in get_supported_architectures():
        raise ConfigError(f"model {model!r} is a {arch}; circuit-tracer's nnsight backend supports "
                          f"{get_supported_architectures()} (config key 'graphs.model')")
    mapping = get_mapping(arch).feature_hook_mapping
    for key in ("feature_input_hook", "feature_output_hook"):
        if cfg.get(key) not in mapping:
            raise ConfigError(f"{src}: key '{key}' = {cfg.get(key)!r}, a hook circuit-tracer does not "
                              f"define for {arch} (it has {sorted(mapping)})")
    n_model = getattr(model_cfg, "num_hidden_layers", None)
    d_model = getattr(model_cfg, "hidden_size", None)
    if shapes["n_layers"] != n_model:
        raise ConfigError(f"{export_dir}: {shapes['n_layers']} layers ({shapes['files']}) but model {model!r} "
                          f"has num_hidden_layers = {n_model}: circuit-tracer needs a transcoder for every layer")
    layers = (cfg.get("cltrain") or {}).get("layers")
    if layers is not None and list(layers) != list(range(n_model)):
        raise ConfigError(f"{src}: key 'cltrain.layers' = {layers}: the CLT covers part of the model; "
                          f"circuit-tracer reads file i as model layer i and needs layers 0..{n_model - 1}")
    if shapes["d_model"] != d_model:
        raise ConfigError(f"{export_dir}: encoder width D = {shapes['d_model']} but model {model!r} has "
                          f"hidden_size = {d_model}")
    recorded = (cfg.get("cltrain") or {}).get("n_features")
    if recorded is not None and recorded != shapes["n_features"]:
        raise ConfigError(f"{src}: key 'cltrain.n_features' = {recorded} but the files hold "
                          f"{shapes['n_features']} features per layer")


def check_prompt_lengths(prompts: list[Prompt], model_cfg, model: str):
    limit = getattr(model_cfg, "max_position_embeddings", None) or getattr(model_cfg, "n_positions", None)
    if limit is None:
        return
    for i, p in enumerate(prompts):
        if p.n_tokens > limit:
            raise ConfigError(f"prompt {i} ({p.text[:40]!r}...) is {p.n_tokens} tokens with BOS; model "
                              f"{model!r} has a context of {limit} (max_position_embeddings)")


# ----------------------------------------------------------------------------------------------------
# Building the graphs


def load_transcoders(export_dir: Path, cfg: dict, shapes: dict, device, scan: str):
    """The export as circuit-tracer's own transcoder object (its loaders, float32)."""
    common = dict(feature_input_hook=cfg["feature_input_hook"], feature_output_hook=cfg["feature_output_hook"],
                  scan=scan, device=torch.device(device), dtype=torch.float32, lazy_encoder=False,
                  lazy_decoder=False)
    if shapes["kind"] == "cross_layer_transcoder":
        from circuit_tracer.transcoder.cross_layer_transcoder import load_clt

        return load_clt(str(export_dir), **common)
    from circuit_tracer.transcoder import load_transcoder_set

    paths = {i: str(export_dir / f"layer_{i}.safetensors") for i in range(shapes["n_layers"])}
    return load_transcoder_set(paths, **common)


@dataclass
class GraphJob:
    """Checked inputs of one model's graphs: built by prepare(), run by run()."""
    export_dir: Path
    model_folder: str
    model_name: str
    prompts: list[Prompt]
    settings: GraphSettings
    export_cfg: dict
    shapes: dict
    device: str = "cpu"
    extra: dict = field(default_factory=dict)


def prepare(export_dir: str | os.PathLike, model: str, settings: GraphSettings, *, info=None,
            device: str = "cpu") -> GraphJob:
    """Everything checked, nothing built: the export read, the model's config and tokenizer loaded, the
    prompts tokenized and measured against the context."""
    from transformers import AutoConfig, AutoTokenizer

    from .lm import hf_folder

    require_circuit_tracer()
    export_dir = Path(export_dir)
    cfg, shapes = read_export(export_dir)
    folder = hf_folder(model)
    model_cfg = AutoConfig.from_pretrained(folder)
    check_export_matches_model(export_dir, cfg, shapes, model_cfg, model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompts = load_prompts(settings.prompts, settings.n_prompts, tokenizer=tokenizer, info=info,
                           heldout_tokens=settings.heldout_tokens)
    count_tokens(prompts, tokenizer)
    check_prompt_lengths(prompts, model_cfg, model)
    return GraphJob(export_dir, folder, str(model), prompts, settings, cfg, shapes, device)


def _spread(values: list[float]) -> dict:
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values)}


def run(job: GraphJob, out_dir: str | os.PathLike | None = None, progress: bool = True, checks=None) -> dict:
    """Build and score one graph per prompt; with out_dir and settings.save, write them to
    <out_dir>/graphs (whole, replacing an older one); with `checks` (config.CircuitSettings), each graph's
    perturbation checks (train/faithfulness.py). Returns the block clt-eval records."""
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.graph import compute_graph_scores
    from circuit_tracer.utils.create_graph_files import create_graph_files

    from cltrain.files import replace_dir

    s = job.settings
    scan = f"cltrain-{job.shapes['kind']}-{job.export_dir.name}"
    page_scan = FEATURE_SCAN.format(name=feature_pages_name(job.shapes["kind"]))
    t0 = time.monotonic()
    transcoders = load_transcoders(job.export_dir, job.export_cfg, job.shapes, job.device, scan)
    rm = ReplacementModel.from_pretrained_and_transcoders(job.model_folder, transcoders, backend="nnsight",
                                                          device=torch.device(job.device), dtype=torch.float32)
    load_s = time.monotonic() - t0
    save = s.save and out_dir is not None
    graph_dir = Path(out_dir) / "graphs" if save else None
    stage = graph_dir.with_name(f".graphs.tmp-{os.getpid()}") if save else None
    if save:
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    rows = []
    try:
        for p in tqdm(job.prompts, desc=f"attribution graphs ({job.shapes['kind']})", unit="graph",
                      disable=not progress):
            t = time.monotonic()
            inputs = torch.tensor(p.ids) if p.ids is not None else p.text
            graph = attribute(inputs, rm,
                              max_n_logits=s.max_n_logits, desired_logit_prob=s.desired_logit_prob,
                              batch_size=s.batch_size, max_feature_nodes=s.max_feature_nodes)
            replacement, completeness = compute_graph_scores(graph)
            top = graph.logit_targets[0] if len(graph.logit_targets) else None
            rows.append({"slug": p.slug, "kind": p.kind, "prompt": p.text, "tokens": len(graph.input_tokens),
                         "replacement_score": replacement, "completeness_score": completeness,
                         "active_features": int(graph.active_features.shape[0]),
                         "feature_nodes": int(graph.selected_features.shape[0]),
                         "top_logit": None if top is None else {"token": str(top[0]),
                                                               "prob": float(graph.logit_probabilities[0])},
                         "seconds": round(time.monotonic() - t, 2)})
            if checks is not None:
                rows[-1].update(_perturbation_checks(rm, graph, inputs, checks))
            if save:
                graph.to_pt(str(stage / f"{p.slug}.pt"))
                create_graph_files(graph, p.slug, str(stage), scan=page_scan, node_threshold=s.node_threshold,
                                   edge_threshold=s.edge_threshold)
        if save:
            replace_dir(stage, graph_dir)
    finally:
        if save:
            shutil.rmtree(stage, ignore_errors=True)
    out = {
        **(_check_summary(rows) if checks is not None else {}),
        "n_prompts": len(rows),
        "replacement_score": _spread([r["replacement_score"] for r in rows]),
        "completeness_score": _spread([r["completeness_score"] for r in rows]),
        "model": job.model_name,
        "export": str(job.export_dir),
        "model_kind": job.shapes["kind"],
        "prompts_source": s.prompts,
        "settings": {k: v for k, v in asdict(s).items() if k not in ("enabled", "model", "export")},
        "load_seconds": round(load_s, 2),
        "per_prompt": rows,
    }
    if save:
        out["graph_dir"] = str(graph_dir)
        out["feature_scan"] = page_scan
        out["open_with"] = SERVER_COMMAND.format(dir=graph_dir)
    return out


def _perturbation_checks(rm, graph, inputs, checks) -> dict:
    """One graph's checks: its edges against constrained interventions, its influence against ablations."""
    from .faithfulness import ablation_faithfulness, check_edges

    t = time.monotonic()
    out = {}
    if checks.check_nodes:
        edges = check_edges(rm, graph, inputs, n_nodes=checks.check_nodes)
        out["edges"] = {k: edges.get(k) for k in ("checked", "verified", "max_abs_error", "skipped") if k in edges}
    if checks.ablate:
        faith = ablation_faithfulness(rm, graph, inputs, n_features=checks.ablate)
        out["faithfulness"] = {k: faith.get(k) for k in ("n_features", "spearman_output", "spearman_downstream",
                                                         "measure", "skipped") if k in faith}
    out["check_seconds"] = round(time.monotonic() - t, 2)
    return out


def _check_summary(rows: list[dict]) -> dict:
    """Over the graphs: edges verified k of n, and the mean and spread of the faithfulness correlations."""
    out = {}
    edges = [r["edges"] for r in rows if "edges" in r]
    if edges:
        out["edges_checked"] = sum(e.get("checked") or 0 for e in edges)
        out["edges_verified"] = sum(e.get("verified") or 0 for e in edges)
    for key in ("spearman_output", "spearman_downstream"):
        vals = [r["faithfulness"][key] for r in rows if r.get("faithfulness", {}).get(key) is not None]
        if vals:
            out[f"faithfulness_{key}"] = _spread(vals)
    return out


# ----------------------------------------------------------------------------------------------------
# Rows for a sweep table


def graph_score_rows(sources) -> list[dict]:
    """One row per evaluated model (a metrics.json, or a folder holding one) with its graph scores and
    what a sweep table compares them against: arch (CLT/PLT), F, activation, L0, NMSE. Models evaluated
    without graphs get None scores."""
    from .plots import read_metrics

    rows = []
    for src in sources:
        path, m = read_metrics(src)
        try:
            g = m.get("graphs") or {}
            row = {"source": str(path), "arch": "PLT" if m["per_layer"] else "CLT",
                   "n_features": m["n_features"], "activation": m.get("activation"),
                   "l0_total": m["l0"]["total"], "nmse_mean": m["nmse"]["mean"],
                   "graph_prompts": g.get("n_prompts", 0)}
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a clt-eval metrics.json ({e})") from None
        for score in ("replacement_score", "completeness_score"):
            spread = g.get(score) or {}
            name = "graph_" + score.split("_")[0]
            row[f"{name}_mean"], row[f"{name}_std"] = spread.get("mean"), spread.get("std")
        rows.append(row)
    return rows
