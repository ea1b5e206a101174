"""`make reference`: the reference CLT and its PLT twin on SmolLM2-135M, end to end (issue 27).

The recipe is configs/reference.yaml: every stage's overrides of the console commands in one file.
Stages, each resumable (a rerun continues where the last stopped; a stage whose result exists is skipped):

  text     the corpus (Python's built-in text, then more docstrings), split by document into training text
           and held-out text that the training never sees ({out}/text, with a manifest)
  train    one clt-train run on live activations: the CLT, its PLT twin and the PLT frontier points are
           `dictionaries` of one data pass; it resumes from its latest checkpoint
  heldout  held-out activation shards (the held-out text through the base model, normalized with the
           training run's scales) for clt-eval
  eval     clt-eval of each model (the CLT with graphs, feature pages and circuits)
  export   clt-export of the CLT for circuit-tracer, its feature pages included
  report   benchmarks/reference.md (tables, the paper's anchors, the learning curves as PNG)

First it measures this machine's rates (the base model's forward, a CLT step and a PLT step at the real
shape; cached in {out}/rates.json) and prints the plan: each stage's estimated wall time, the total, and
the disk needed. `--hours H` ends this sitting's training at a checkpoint when its time is up (the next
`make reference` continues); `--until STAGE` stops after a stage; `--plan-only` measures and plans.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from cltrain.errors import ConfigError
from cltrain.files import atomic_write_bytes
from cltrain.machine import cpu_model

from .config import CONFIG_DIR, compose
from .lifecycle import Preempted, run_command

RECIPE = CONFIG_DIR / "reference.yaml"
STAGES = ("text", "train", "heldout", "eval", "export", "report")
RATES_FILE = "rates.json"
STAGES_FILE = "stages.json"
# Per token: x and y [N, D] of SmolLM2-135M (N=30, D=576) in bfloat16; int8 stores a byte a value plus a
# float32 scale per row (train/data/format.py).
BF16_BYTES_PER_TOKEN = 2 * 30 * 576 * 2
INT8_BYTES_PER_TOKEN = 2 * (30 * 576 + 30 * 4)
# The paper's anchors (Circuit Tracing, Ameisen et al. 2025), shown beside ours.
PAPER = {
    "nmse": "~11.5% normalized reconstruction error at L0 88 (largest 18-layer CLT, 10M features)",
    "top1": "50% top-1 agreement (same CLT)",
    "graphs": "unpruned graphs: replacement 0.61 / completeness 0.80 (CLT), 0.37 / 0.78 (per-layer transcoders)",
}
# `make demo`'s CLT (F = 128, 300 steps, README "The demo"): top-1 agreement, mode (a). The aim is 3x.
DEMO_TOP1_A = 0.096
# Not measured by the plan (a graph needs a trained model): seconds per attribution graph at 30,720
# features, from benchmarks/circuits.md's checks (~5 s a graph at F=128) scaled by the active features.
GRAPH_SECONDS_GUESS = 90.0


def stage_banner(title: str):
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)), flush=True)


def _write_json(path: Path, value):
    atomic_write_bytes(path, json.dumps(value, indent=2).encode())


def _read_json(path: Path, default=None):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return default


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB"


# ----------------------------------------------------------------------------------------------------
# The recipe


class Recipe:
    """configs/reference.yaml, resolved, with `{out}` replaced by the output folder."""

    def __init__(self, path: Path, out: Path, write_through: bool = False, wandb: bool = True):
        try:
            raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
        except Exception as e:  # a YAML or interpolation error, named with its file
            raise ConfigError(f"{path}: cannot read the recipe ({e})") from None
        self.path, self.out = Path(path), Path(out)
        sub = lambda v: v.replace("{out}", str(self.out)) if isinstance(v, str) else v  # noqa: E731
        self.raw = raw
        for key in ("base_model", "text", "train", "dictionaries", "heldout", "eval", "export"):
            if key not in raw:
                raise ConfigError(f"{path}: recipe key '{key}' is missing")
        self.base_model = raw["base_model"]
        self.text = raw["text"]
        self.train_overrides = [sub(v) for v in raw["train"]]
        if write_through:
            self.train_overrides += [f"data.live.write_to={self.out / 'shards'}", "data.live.write_dtype=int8"]
        if not wandb:  # a key, not the group: the recipe's logger.mode would apply to logger=none too
            self.train_overrides = merge_overrides(self.train_overrides, ["logger.mode=disabled"])
        dicts = [dict(d) for d in raw["dictionaries"]]
        for lam in raw.get("plt_frontier_lambda_s") or []:
            dicts.append({"model.per_layer": True, "model.loss.lambda_s": lam})
        self.dictionaries = dicts
        self.heldout = raw["heldout"]
        self.eval = raw["eval"]
        self.export = [sub(v) for v in raw["export"]]
        self.wandb = wandb

    def train_overrides_full(self, extra: list[str] = ()) -> list[str]:
        entries = ", ".join("{" + ", ".join(f"{k}: {json.dumps(v)}" for k, v in d.items()) + "}"
                            for d in self.dictionaries)
        return merge_overrides(self.train_overrides + [f"dictionaries=[{entries}]"], list(extra))

    def train_settings(self, extra: list[str] = ()):
        from .config import TrainSettings
        return TrainSettings.from_config(compose("train", self.train_overrides_full(extra)))

    @property
    def runs(self) -> Path:
        return self.out / "runs"

    @property
    def text_dir(self) -> Path:
        return self.out / "text"


def merge_overrides(base: list[str], extra: list[str]) -> list[str]:
    """base with extra's keys replacing base's (Hydra takes one value per key)."""
    keys = {o.partition("=")[0] for o in extra}
    return [o for o in base if o.partition("=")[0] not in keys] + list(extra)


# ----------------------------------------------------------------------------------------------------
# Stage: text


def _docstring_text(path: Path) -> str | None:
    """A module's docstrings (module, classes, functions) of more than 40 characters, as train/text.py's
    built-in source reads the stdlib's top-level modules."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
        return None
    docs = [ast.get_docstring(node) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
    text = "\n\n".join(d for d in docs if d and len(d) > 40)
    return text or None


SKIP_PARTS = {"test", "tests", "testing", "__pycache__", "site-packages", "dist-packages", "idlelib", "lib2to3",
              "turtledemo", "_vendor", "vendored", "benchmarks"}


def source_documents(source: str):
    """(source, version, documents) of one corpus source: 'builtin' (train/text.py), 'stdlib' (docstrings of
    the stdlib's sub-packages, which `builtin` leaves out) or an installed package's docstrings."""
    from .text import builtin_documents

    if source == "builtin":
        return platform.python_version(), builtin_documents()
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        files = [p for p in sorted(root.rglob("*.py")) if len(p.relative_to(root).parts) > 1
                 and not SKIP_PARTS & set(p.relative_to(root).parts)]
        version = platform.python_version()
    else:
        spec = importlib.util.find_spec(source)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"recipe key 'text.sources': {source!r} is neither builtin, stdlib nor an installed "
                              f"package")
        root = Path(list(spec.submodule_search_locations)[0])
        files = [p for p in sorted(root.rglob("*.py")) if not SKIP_PARTS & set(p.relative_to(root).parts)]
        version = importlib.metadata.version(source)
    return version, (t for t in map(_docstring_text, files) if t)


def split_text(text: str, limit: int) -> list[str]:
    """`text` in consecutive parts of at most `limit` characters, cut at blank lines where it can (a
    paragraph longer than the limit is cut at a space, else at the limit). The parts joined by blank lines
    give back the text's words in order."""
    parts, cur = [], ""
    for para in text.split("\n\n"):
        while len(para) > limit:
            cut = para.rfind(" ", 0, limit + 1)
            cut = cut if cut > 0 else limit
            if cur:
                parts.append(cur)
                cur = ""
            parts.append(para[:cut])
            para = para[cut:].lstrip(" ")
        if cur and len(cur) + 2 + len(para) > limit:
            parts.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        parts.append(cur)
    return parts or [text]


def build_corpus(recipe: Recipe, train_tokens: int, tokenizer, scale_tokens: int = 0) -> dict:
    """Write {out}/text/train.jsonl and heldout.jsonl (documents split by index: i % heldout_every ==
    heldout_every - 1 is held out) until both quotas are met, then manifest.json. Returns the manifest.

    The training documents are cut into parts of at most text.part_chars characters (at blank lines where
    it can) and the parts written in a seeded random order (text.shuffle_seed); the held-out documents,
    whole, in a seeded order too (clt-eval reads the first max_tokens). Why: a live run reads its text once,
    front to back, shuffling only within a window of data.shuffle_buffer tokens, so the text's order is the
    stream's. The first reference run read its sources one after the other and each module's docstrings
    whole: 1,874 of its CLT's features last fired within one 35K-token module (34 steps of numpy's
    function_base docstrings) and never in the rest of training (91% of them never fire on held-out text
    of the same sources either)."""
    t = recipe.text
    every = int(t["heldout_every"])
    # the scale estimate reads the first scale_tokens too: a tiny run's text must hold them without wrapping
    need_train = max(int(math.ceil(float(t["train_margin"]) * train_tokens)), scale_tokens)
    need_held = int(t["heldout_tokens"])
    folder = recipe.text_dir
    folder.mkdir(parents=True, exist_ok=True)
    seed = int(t.get("shuffle_seed", 0))
    part_chars = int(t.get("part_chars", 0)) or None
    files = {"train": folder / "train.jsonl.tmp", "heldout": folder / "heldout.jsonl.tmp"}
    lines = {"train": [], "heldout": []}
    counts = {"train": [0, 0], "heldout": [0, 0]}  # documents, tokens (BOS included, as contexts count them)
    used, i = [], 0
    for source in t["sources"]:
        version, docs = source_documents(source)
        used.append({"source": source, "version": version, "from_document": i})
        for text in docs:
            split = "heldout" if i % every == every - 1 else "train"
            if counts[split][1] < (need_held if split == "heldout" else need_train):
                parts = [text] if split == "heldout" or part_chars is None else split_text(text, part_chars)
                for k, part in enumerate(parts):
                    n = len(tokenizer.encode(part, add_special_tokens=False, verbose=False)) + 1
                    lines[split].append(json.dumps({"text": part, "doc": i, "source": source}
                                                   | ({"part": k} if len(parts) > 1 else {})) + "\n")
                    counts[split][1] += n
                counts[split][0] += 1
            i += 1
            if counts["train"][1] >= need_train and counts["heldout"][1] >= need_held:
                break
        used[-1]["to_document"] = i
        if counts["train"][1] >= need_train and counts["heldout"][1] >= need_held:
            break
    rng = random.Random(seed)
    rng.shuffle(lines["train"])
    rng.shuffle(lines["heldout"])
    for k, p in files.items():
        with open(p, "w", encoding="utf-8") as f:
            f.writelines(lines[k])
    for k, p in files.items():
        os.replace(p, folder / f"{k}.jsonl")
    manifest = {"sources": used, "heldout_every": every, "documents_seen": i,
                "train": {"documents": counts["train"][0], "tokens": counts["train"][1], "parts": len(lines["train"]),
                          "order": (f"documents cut into parts of at most {part_chars:,} characters, " if part_chars
                                    else "documents ") + f"shuffled (seed {seed})",
                          "sha256": _sha256(folder / "train.jsonl")},
                "heldout": {"documents": counts["heldout"][0], "tokens": counts["heldout"][1],
                            "order": f"documents shuffled (seed {seed})",
                            "sha256": _sha256(folder / "heldout.jsonl")},
                "quota": {"train": need_train, "heldout": need_held},
                "enough": counts["train"][1] >= need_train and counts["heldout"][1] >= need_held}
    _write_json(folder / "manifest.json", manifest)
    return manifest


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stage_text(recipe: Recipe, settings) -> dict:
    manifest = _read_json(recipe.text_dir / "manifest.json")
    if manifest is not None:
        print(f"{recipe.text_dir / 'manifest.json'} exists: corpus already built")
        return manifest
    from .lm import load_lm

    _, tok = load_lm(recipe.base_model)
    manifest = build_corpus(recipe, settings.train_tokens or settings.steps * settings.batch_tokens, tok,
                            settings.data.live.scale_tokens)
    _print_corpus(manifest)
    return manifest


def _print_corpus(m: dict):
    print(f"corpus: {m['documents_seen']} documents from "
          + ", ".join(f"{s['source']} {s['version']}" for s in m["sources"])
          + f"; training text {m['train']['tokens']:,} tokens in {m['train']['documents']} documents, held-out text "
          f"{m['heldout']['tokens']:,} tokens in {m['heldout']['documents']} documents (every "
          f"{m['heldout_every']}th document); training text: {m['train'].get('order', 'documents in source order')}")
    if not m["enough"]:
        print(f"WARNING: the sources ran out before the quotas ({m['quota']}): the live stream will wrap around "
              f"the training text (add a source to text.sources)")


# ----------------------------------------------------------------------------------------------------
# Rates and the plan


def measure_rates(recipe: Recipe, steps: int = 2, batch_tokens: int | None = None) -> dict:
    """Time the base model's forward (one live window per batch) and steps of one CLT and one PLT at the
    recipe's shape, through the real trainer (scratch folder, no W&B, nothing saved). Returns rates."""
    from .memory import peak_rss
    from .trainer import Trainer

    scratch = recipe.out / ".measure"
    shutil.rmtree(scratch, ignore_errors=True)
    # batch_tokens below the run's keeps the measurement's memory down (the [B, N, F] step tensors); the
    # optimizer's per-step cost is then spread over fewer tokens, so the plan errs on the slow side
    B = batch_tokens or recipe.train_settings().batch_tokens
    # a window of one batch: each batch's time in the loader is then one window's generation
    s = recipe.train_settings(["logger.mode=disabled", "progress=false", f"out_dir={scratch}", "resume=false",
                               "overwrite=false", f"data.shuffle_buffer={B}", "data.live.write_to=null", f"batch_tokens={B}"])
    t0, cpu0, load0 = time.perf_counter(), time.process_time(), os.getloadavg()[0]
    trainer = Trainer.build(s, s.dictionary_settings()[:2])  # the CLT and its PLT twin
    startup = time.perf_counter() - t0
    gen, times = [], {d.s.model.per_layer: [] for d in trainer.dictionaries}
    try:
        for i in range(steps + 1):  # the first step warms up (allocation, compiled kernels)
            t = time.perf_counter()
            batch = trainer.next_batch()
            x, y = trainer.loader.to_training(batch)
            g = time.perf_counter() - t
            for d in trainer.dictionaries:
                t = time.perf_counter()
                d.begin_step()
                d.micro_step(x, y)
                d.end_step()
                if i:
                    times[d.s.model.per_layer].append(time.perf_counter() - t)
            if i:
                gen.append(g)
        clt_params, plt_params = (sum(p.numel() for p in d.clt.parameters()) for d in trainer.dictionaries)
    finally:
        trainer.close()
        shutil.rmtree(scratch, ignore_errors=True)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    wall = time.perf_counter() - t0
    return {"batch_tokens": B, "steps_timed": steps, "startup_s": startup,
            "cpu_share": (time.process_time() - cpu0) / wall / (os.cpu_count() or 1),
            "load_average": max(load0, os.getloadavg()[0]),
            "generate_tok_s": B / med(gen), "clt_step_s": med(times[False]), "plt_step_s": med(times[True]),
            "clt_params": clt_params, "plt_params": plt_params, "n_layers": trainer.shared.info.n_layers, "peak_rss_bytes": peak_rss(),
            "machine": machine(), "measured_at": time.strftime("%Y-%m-%d %H:%M:%S")}


def rates_for(recipe: Recipe, remeasure: bool = False, batch_tokens: int | None = None) -> dict:
    path = recipe.out / RATES_FILE
    rates = None if remeasure else _read_json(path)
    if rates is not None:
        print(f"rates from {path} (measured {rates.get('measured_at')}; --remeasure to measure again)")
        return rates
    stage_banner("measuring this machine's rates (base model forward, CLT and PLT steps at the real shape)")
    t = time.perf_counter()
    rates = measure_rates(recipe, batch_tokens=batch_tokens)
    rates["measure_s"] = time.perf_counter() - t
    recipe.out.mkdir(parents=True, exist_ok=True)
    _write_json(path, rates)
    return rates


def plan(recipe: Recipe, settings, rates: dict) -> dict:
    """Each stage's estimated seconds and bytes, from the measured rates (and stated guesses)."""
    steps = settings.resolve_steps(1)
    B = settings.batch_tokens
    n_plt = sum(1 for d in recipe.dictionaries if d.get("model.per_layer"))
    per = B / rates["batch_tokens"]  # the rates' batch may be smaller than the run's (measure_rates)
    step_s = B / rates["generate_tok_s"] + per * (rates["clt_step_s"] + n_plt * rates["plt_step_s"])
    ckpt_bytes = 12 * (rates["clt_params"] + n_plt * rates["plt_params"])  # fp32 weights + Adam's 2 moments
    n_ckpt = math.ceil(steps / settings.checkpoint_every)
    ckpt_s = ckpt_bytes / 150e6  # write + sha256 (guess: ~150 MB/s of this disk)
    train_s = rates["startup_s"] + steps * step_s + n_ckpt * ckpt_s
    H = int(recipe.heldout["tokens"])
    heldout_s = H / rates["generate_tok_s"] + 10
    # clt-eval: a no-grad forward costs ~1/3 of a training step's tokens; the replacement model runs the
    # base model and the CLT twice per sequence; the feature-page pass ~ the base model's forward (+ writing)
    e = recipe.eval
    n_feat = settings.model.n_features * rates.get("n_layers", 30)
    fwd_tok_s = lambda step: 3 * rates["batch_tokens"] / step  # noqa: E731
    rep_tokens = _override(e["common"], "replacement.n_sequences", 32) * _override(e["common"], "replacement.seq_len", 128)
    eval_s = {}
    for name, kind, step in (("clt", "clt", rates["clt_step_s"]), ("plt", "plt", rates["plt_step_s"])):
        o = e[kind]
        s_ = H / fwd_tok_s(step) + rep_tokens * (2 / rates["generate_tok_s"] + 2 / fwd_tok_s(step))
        if _override(o, "features.enabled", False):
            s_ += _override(o, "features.n_contexts", 512) * _override(o, "features.context", 64) / rates["generate_tok_s"]
            s_ += 120 * n_feat / 30720  # records, binary layout, JSON, browser: ~120 s at 30,720 (benchmarks/features.md)
        if _override(o, "graphs.enabled", False):
            s_ += _override(o, "graphs.n_prompts", 4) * GRAPH_SECONDS_GUESS
        eval_s[name] = s_
    eval_s["frontier"] = (n_plt - 1) * H / fwd_tok_s(rates["plt_step_s"])
    export_s = 4 * rates["clt_params"] / 100e6 + 30
    disk = {
        "checkpoints": (settings.keep_checkpoints + 1) * ckpt_bytes,  # kept ones + the one being written
        "heldout shards": H * BF16_BYTES_PER_TOKEN,
        "evaluation (exports in eval/, feature pages, graphs)": 4 * rates["clt_params"] + 4 * rates["plt_params"]
        + 1.2e9 * n_feat / 30720,
        "export": 4 * rates["clt_params"] + 0.1e9,
        "text": 10e6,
    }
    if settings.data.live.write_to:
        disk["write-through shards (int8)"] = steps * B * INT8_BYTES_PER_TOKEN
    return {"steps": steps, "step_s": step_s, "startup_s": rates["startup_s"], "checkpoint_s": ckpt_s, "tokens_per_s": B / step_s, "checkpoint_every": settings.checkpoint_every,
            "checkpoint_minutes": settings.checkpoint_every * step_s / 60, "checkpoint_bytes": ckpt_bytes,
            "seconds": {"text": 30, "train": train_s, "heldout": heldout_s, "eval": sum(eval_s.values()),
                        "export": export_s, "report": 10},
            "eval_seconds": eval_s, "disk": disk, "n_plt": n_plt}


def _override(overrides: list[str], key: str, default):
    for o in overrides:
        k, _, v = o.partition("=")
        if k == key:
            return {"true": True, "false": False}.get(v, int(v) if v.lstrip("-").isdigit() else v)
    return default


def print_plan(recipe: Recipe, settings, rates: dict, p: dict, done: dict):
    stage_banner("plan")
    B = settings.batch_tokens
    print(f"machine: {rates['machine']['cpu']}, {rates['machine']['cores']} cores; torch {rates['machine']['torch']}")
    Bm = rates["batch_tokens"]
    print(f"measured ({rates['measured_at']}, {rates['steps_timed']} steps after a warm-up, batch {Bm} tokens): "
          f"base model forward {rates['generate_tok_s']:.0f} tok/s; CLT step {rates['clt_step_s']:.2f} s "
          f"({Bm / rates['clt_step_s']:.0f} tok/s, {rates['clt_params'] / 1e6:.0f}M parameters); PLT step "
          f"{rates['plt_step_s']:.2f} s ({Bm / rates['plt_step_s']:.0f} tok/s, {rates['plt_params'] / 1e6:.0f}M); "
          f"peak memory of the measurement {rates['peak_rss_bytes'] / 2**30:.2f} GiB")
    if rates.get("cpu_share", 1.0) < 0.75 or rates.get("load_average", 0) > rates["machine"]["cores"] + 0.5:
        print(f"WARNING: the machine was busy while measuring (load average {rates.get('load_average', 0):.1f}, this "
              f"process got {rates.get('cpu_share', 0):.0%} of the cores): the estimates are too slow; "
              f"--remeasure on a quiet machine")
    print(f"training: {p['steps']} steps x {B} tokens = {p['steps'] * B:,} tokens per dictionary, "
          f"{len(recipe.dictionaries)} dictionaries on one pass (the CLT, its PLT twin, {p['n_plt'] - 1} frontier PLTs): "
          f"{p['step_s']:.1f} s a step ({p['tokens_per_s']:.0f} tok/s), a checkpoint every {p['checkpoint_every']} steps "
          f"(~{p['checkpoint_minutes']:.0f} min), {_gb(p['checkpoint_bytes'])} each")
    total = 0.0
    print(f"{'stage':10}{'estimate':>10}   status")
    for stage in STAGES:
        s_ = p["seconds"][stage]
        status = done.get(stage, "")
        left = s_
        if stage == "train" and status != "done" and train_step_now(settings):
            now, pace = train_step_now(settings), measured_step_s(settings, B)
            step_s = pace if pace is not None else p["step_s"]
            left = (p["steps"] - now) * step_s + p["startup_s"]
            status = (f"at step {now} of {p['steps']}: {_hms(left)} left at "
                      + (f"{pace:.1f} s a step (the run's last logged steps)" if pace is not None else "the planned step time"))
        if status != "done":
            total += left
        print(f"{stage:10}{_hms(s_):>10}   {status}")
    print(f"{'total':10}{_hms(sum(p['seconds'].values())):>10}   still to run: {_hms(total)} "
          f"(ETA {time.strftime('%Y-%m-%d %H:%M', time.localtime(time.time() + total))})")
    print("  eval: " + ", ".join(f"{k} {_hms(v)}" for k, v in p["eval_seconds"].items())
          + f" (graphs guessed at {GRAPH_SECONDS_GUESS:.0f} s each: not measured before a model exists)")
    need = sum(p["disk"].values())
    free = shutil.disk_usage(recipe.out if recipe.out.exists() else recipe.out.parent).free
    print(f"disk: {_gb(need)} at most (" + ", ".join(f"{k} {_gb(v)}" for k, v in p["disk"].items())
          + f"); {_gb(free)} free")
    if not settings.data.live.write_to:
        print(f"  write-through (--write-through, off): +{_gb(p['steps'] * B * INT8_BYTES_PER_TOKEN)} of int8 shards "
              f"({INT8_BYTES_PER_TOKEN:,} bytes a token; bfloat16 would be {BF16_BYTES_PER_TOKEN:,})")
    if need > free:
        print("WARNING: the plan needs more disk than is free")
    hours_per_sitting = 2.5
    if total > hours_per_sitting * 3600:
        print(f"  more than one sitting of {hours_per_sitting} h: run `make reference HOURS={hours_per_sitting}` "
              f"repeatedly; each ends at a checkpoint and the next continues")


def machine() -> dict:
    import torch

    cpu = cpu_model()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": cores, "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"), "commit": _git_commit()}


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# ----------------------------------------------------------------------------------------------------
# Stage: train


def dictionary_dirs(settings) -> list[Path]:
    return [Path(str(d.out_dir)) for d in settings.dictionary_settings()]


def measured_step_s(settings, batch_tokens: int, last: int = 16) -> float | None:
    """Seconds a step over the training run's last `last` logged steps (median; from the first dictionary's
    metrics.jsonl, whose tokens_per_s is the whole pass's), or None before any: the planned step time is
    measured at initialization, where activations are dense, and is ~2x a trained step's."""
    path = dictionary_dirs(settings)[0] / "metrics.jsonl"
    try:
        rates = [json.loads(line).get("tokens_per_s") for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return None
    rates = sorted(r for r in rates[-last:] if r)
    return batch_tokens / rates[len(rates) // 2] if rates else None


def train_step_now(settings) -> int:
    """The step the training run's latest checkpoint is at (0 before the first)."""
    from . import checkpoint as ckpt

    steps = []
    for d in dictionary_dirs(settings):
        path = ckpt.resolve_resume(True, d / "checkpoints")
        steps.append(int(ckpt.read_trainer_state(path)["step"]) if path is not None else 0)
    return min(steps) if steps else 0


def trained(settings) -> bool:
    """Every dictionary finished: its model published from a checkpoint at the run's last step (a stop at
    stop_at_step publishes OUT/model too, so its presence alone says nothing)."""
    from .sweep import finished_model

    return all(finished_model(d) is not None for d in settings.dictionary_settings())


class SittingDeadline:
    """At `when` (time.time()), SIGUSR1 to this process: clt-train's time-limit signal, on which it checkpoints
    and stops (lifecycle.StopSignals, raising Preempted). Why: the step time varies several-fold over a run
    (dense early activations, a busy machine), so no step planned in advance ends a sitting on time. The signal is sent
    only while clt-train's handler is installed (elsewhere SIGUSR1 would end the process): until then it
    waits, checking every few seconds."""

    RETRY_S = 5.0

    def __init__(self, when: float):
        self.when, self.timer, self.cancelled, self.fired = when, None, False, False
        self._arm(max(when - time.time(), 0.0))

    def _arm(self, seconds: float):
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True
        self.timer.start()

    def _fire(self):
        if self.cancelled:
            return
        if callable(signal.getsignal(signal.SIGUSR1)):  # clt-train's handler (else SIG_DFL: would end us)
            self.fired = True
            os.kill(os.getpid(), signal.SIGUSR1)
        else:
            self._arm(self.RETRY_S)

    def cancel(self):
        self.cancelled = True
        if self.timer is not None:
            self.timer.cancel()


def stage_train(recipe: Recipe, settings, p: dict, deadline: float | None, stop_at_step: int | None) -> bool:
    """Train (or resume) until done, or until this sitting's stop; True when every dictionary is finished."""
    from .trainer import train

    if trained(settings):
        print(f"{recipe.runs}: every dictionary's model exists: training already done")
        return True
    now_step = train_step_now(settings)
    stop = p["steps"] if stop_at_step is None else min(p["steps"], stop_at_step)
    if deadline is not None:
        # the start-up and the checkpoint at the stop come out of the sitting's time too. The sitting is not
        # cut at a step from the planned step time: that is measured at initialization, where activations are
        # dense, and was 2x the trained steps' time (a sitting stopped an hour early). SittingDeadline stops it.
        left = deadline - time.time() - p["startup_s"] - p["checkpoint_s"]
        if left < p["step_s"]:
            print(f"this sitting's time is up (--hours): training stays at step {now_step} of {p['steps']}")
            return False
    overrides = recipe.train_overrides_full() + ([f"stop_at_step={stop}"] if stop < p["steps"] else [])
    print("clt-train " + " ".join(overrides))
    left_s = (p["steps"] - now_step) * p["step_s"]
    print(f"from step {now_step} to {stop} of {p['steps']}: ~{_hms((stop - now_step) * p['step_s'])} at the planned "
          f"step time (whole run left: ~{_hms(left_s)})"
          + ("" if deadline is None else f"; this sitting checkpoints and stops at "
             f"{time.strftime('%H:%M', time.localtime(deadline - p['checkpoint_s']))} if not done"), flush=True)
    watchdog = None if deadline is None else SittingDeadline(deadline - p["checkpoint_s"])
    try:
        train(compose("train", overrides))
    except Preempted:
        why = ("this sitting's time (--hours) is up" if watchdog is not None and watchdog.fired
               else "it was sent a stop signal (SIGTERM or SIGUSR1)")
        print(f"\nclt-train checkpointed and stopped: {why}")
    finally:
        if watchdog is not None:
            watchdog.cancel()
    if trained(settings):
        return True
    print(f"\ntraining stopped at step {train_step_now(settings)} of {p['steps']} (checkpointed): run "
          f"`make reference` again to continue")
    return False


# ----------------------------------------------------------------------------------------------------
# Stage: held-out activations


def heldout_dir(recipe: Recipe) -> Path:
    return recipe.out / "heldout"


def stage_heldout(recipe: Recipe, settings) -> Path:
    """The held-out text through the base model as shards, normalized with the training run's scales
    (train/live.py's write-through, over heldout.jsonl), and the graph prompts file."""
    from .data import DATASET_JSON
    from .live import LiveLoader, scales_of_checkpoint

    out = heldout_dir(recipe)
    prompts = _write_prompts(recipe)
    if (out / DATASET_JSON).is_file():
        print(f"{out / DATASET_JSON} exists: held-out activations already written")
        return out
    shutil.rmtree(out, ignore_errors=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    scales = scales_of_checkpoint(dictionary_dirs(settings)[0])  # reads <run>/model/model.json
    live = _heldout_live(recipe, settings, tmp)
    target = int(recipe.heldout["tokens"])
    loader = LiveLoader.open(live, settings.batch_tokens, int(recipe.heldout["window"]), settings.seed, scales=scales)
    from tqdm.auto import tqdm

    got = 0
    try:
        with tqdm(total=target, desc="held-out activations", unit="tok") as bar:
            for batch in loader:
                n = int(batch.token_ids.shape[0])
                got += n
                bar.update(n)
                if got >= target:
                    break
        loader.finish()
    finally:
        loader.close()
    os.replace(tmp, out)
    print(f"held-out activations: {got:,} tokens of {recipe.text_dir / 'heldout.jsonl'} in {out}; graph prompts {prompts}")
    return out


def _heldout_live(recipe: Recipe, settings, write_to: Path):
    import dataclasses
    live = settings.data.live
    return dataclasses.replace(live, text=dataclasses.replace(live.text, source=str(recipe.text_dir / "heldout.jsonl")),
                               write_to=str(write_to), name="heldout")


def _write_prompts(recipe: Recipe) -> Path:
    """The built-in graph prompts plus windows of held-out text ({out}/text/prompts.jsonl)."""
    from .graphs import BUILTIN_PROMPTS
    from .lm import load_lm
    from .replacement import eval_token_batches

    path = recipe.text_dir / "prompts.jsonl"
    if path.is_file():
        return path
    n = int(recipe.eval.get("heldout_prompts", 0))
    rows = [{"prompt": text, "kind": kind} for kind, text in BUILTIN_PROMPTS]
    if n:
        _, tok = load_lm(recipe.base_model)
        k = int(recipe.eval.get("heldout_prompt_tokens", 16))
        # windows spread over the first 8 n k tokens of held-out text: every 8th of 8 n consecutive windows
        seqs = eval_token_batches(tok, str(recipe.text_dir / "heldout.jsonl"), 16 * n, k, 16 * n, "cpu")[0]
        sep = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        # windows inside one document (no separator after the leading BOS), spread over the text
        inside = [s for s in seqs[::4] if sep not in s[1:].tolist()][:n]
        rows += [{"prompt": tok.decode(s[1:].tolist()), "kind": "heldout"} for s in inside]
    atomic_write_bytes(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
    return path


# ----------------------------------------------------------------------------------------------------
# Stages: eval, export


def models_to_evaluate(recipe: Recipe, settings) -> list[tuple[str, Path, list[str]]]:
    """(role, model dir, clt-eval overrides) for every dictionary: the CLT, the PLT twin, the frontier."""
    out = []
    dirs = dictionary_dirs(settings)
    e = recipe.eval
    for i, d in enumerate(dirs):
        role = "clt" if i == 0 else "plt" if i == 1 else "frontier"
        out.append((role if role != "frontier" else d.name, d / "model", list(e["common"]) + list(e[role])))
    return out


def stage_eval(recipe: Recipe, settings) -> dict:
    from .evaluate import run as clt_eval

    results = {}
    held = heldout_dir(recipe)
    heldout_text = recipe.text_dir / "heldout.jsonl"
    for role, model_dir, overrides in models_to_evaluate(recipe, settings):
        metrics_path = model_dir / "eval" / "metrics.json"
        if metrics_path.is_file():
            print(f"{metrics_path} exists: {role} already evaluated")
            results[role] = _read_json(metrics_path)
            continue
        overrides = [f"model_dir={model_dir}", f"dataset={held}", f"replacement.text={heldout_text}",
                     f"features.text={heldout_text}", f"graphs.prompts={recipe.text_dir / 'prompts.jsonl'}",
                     "logger.group=reference", f"logger.run_name={model_dir.parent.name}-eval"] + overrides
        if not recipe.wandb:
            overrides.append("logger.mode=disabled")
        stage_banner(f"eval {role}: {model_dir}")
        print("clt-eval " + " ".join(overrides), flush=True)
        results[role] = clt_eval(compose("eval", overrides))
    return results


def stage_export(recipe: Recipe, settings) -> Path:
    from .export import run as clt_export

    model_dir = dictionary_dirs(settings)[0] / "model"
    out = recipe.out / "export_clt"
    if (out / "config.yaml").is_file():
        print(f"{out} exists: CLT already exported")
        return out
    pages = model_dir / "eval" / "features"
    overrides = [f"model_dir={model_dir}", f"out_dir={out}"] + recipe.export
    if (pages / "summary.json").is_file():
        overrides.append(f"features={pages}")
    print("clt-export " + " ".join(overrides), flush=True)
    clt_export(compose("export", overrides))
    return out


# ----------------------------------------------------------------------------------------------------
# Stage: report


def curves(run_dirs: list[Path]) -> dict[str, list[dict]]:
    """Each run's metrics.jsonl reports (tokens, NMSE, L0, dead fraction), by run name."""
    out = {}
    for d in run_dirs:
        rows = []
        path = d / "metrics.jsonl"
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if "tokens" in r:
                    rows.append(r)
        out[d.name] = rows
    return out


def plot_curves(series: dict[str, list[dict]], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for key, label, fname in (("nmse/mean", "NMSE (training batches, before their step)", "curve_nmse.png"),
                              ("l0/mean", "L0 per layer", "curve_l0.png"),
                              ("features/dead_fraction", "dead fraction", "curve_dead.png")):
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for name, rows in series.items():
            pts = [(r["tokens"], r[key]) for r in rows if key in r]
            if pts:
                style = "-" if name.startswith("clt") else "--" if name == list(series)[1] else ":"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        if key == "nmse/mean":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(_save_png(fig, folder / fname))
    return paths


def _save_png(fig, path: Path) -> Path:
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def dead_when(run_dirs: list[Path], dead_after_tokens: int) -> dict[str, dict]:
    """For each run, its dead features at its last checkpoint (not fired in dead_after_tokens) and the
    training tokens at which each last fired: a run whose features die in a burst at one point of the
    stream (a change of text, a threshold that jumps) shows it here, where the dead fraction's curve does not
    say which features. Runs without a checkpoint are left out."""
    from .checkpoint import CheckpointError, feature_last_fired, latest_checkpoint

    out = {}
    for d in run_dirs:
        try:
            path = latest_checkpoint(d / "checkpoints")
            if path is None:
                continue
            last, tokens = feature_last_fired(path)
        except CheckpointError as e:
            print(f"report: {d.name}: dead features by when they died left out ({e})")
            continue
        dead = last <= tokens - dead_after_tokens
        out[d.name] = {"tokens": tokens, "features": last.numel(), "last_fired": last[dead].tolist(),
                       "per_layer": dead.double().mean(1).tolist()}
    return out


def plot_dead_when(dead: dict[str, dict], folder: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not dead:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    top = max(v["tokens"] for v in dead.values())
    bins = [top * i / 32 for i in range(33)]
    for name, v in dead.items():
        ax.hist(v["last_fired"], bins=bins, histtype="step", linestyle="-" if name.startswith("clt") else "--",
                label=f"{name}: {len(v['last_fired']) / v['features']:.1%} dead")
    ax.set_xlabel("training tokens when the feature last fired")
    ax.set_ylabel("dead features at the end")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, folder / "dead_last_fired.png")


def _f(v, fmt="{:.3f}") -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else fmt.format(v)


def _spread(g: dict, key: str) -> str:
    s = (g or {}).get(key)
    return "n/a" if not s else f"{s['mean']:.3f} / {s['std']:.3f} / {s['min']:.3f}"


def write_report(recipe: Recipe, settings, report: Path, rates: dict, p: dict, stages: dict) -> Path:
    from .sweep_demo import verdict
    from .sweep_report import row_from_metrics, train_config_of, write_table

    assets = report.with_suffix("")
    assets.mkdir(parents=True, exist_ok=True)
    roles = models_to_evaluate(recipe, settings)
    metrics = {role: _read_json(m / "eval" / "metrics.json") for role, m, _ in roles}
    missing = [r for r, m in metrics.items() if m is None]
    if missing:
        raise ConfigError(f"report: no clt-eval metrics.json for {missing} (run the eval stage first)")
    for role, m, _ in roles:
        shutil.copyfile(m / "eval" / "metrics.json", assets / f"metrics_{m.parent.name}.json")
    rows = [row_from_metrics(m.parent.name, metrics[role], train_config_of(m)) for role, m, _ in roles]
    table_md, _ = write_table(rows, assets)
    lines_eq, better = verdict(rows)
    series = curves([m.parent for _, m, _ in roles])
    pngs = plot_curves(series, assets)
    dead = dead_when([m.parent for _, m, _ in roles], settings.dead_after_tokens)
    dead_png = plot_dead_when(dead, assets)
    clt, plt_ = metrics["clt"], metrics["plt"]
    corpus = _read_json(recipe.text_dir / "manifest.json", {})
    mach = rates["machine"]
    train_s = (stages.get("train") or {}).get("seconds")
    tokens = p["steps"] * settings.batch_tokens
    rel = lambda path: os.path.relpath(path, report.parent)  # noqa: E731

    def rep(m, mode, key):
        return ((m.get("replacement") or {}).get(mode) or {}).get(key)

    def per_layer(m, key):
        if key not in m:
            return "n/a"
        return " ".join(f"{v:.1f}" if key == "l0" else f"{v:.3f}" for v in m[key]["per_layer"])

    def massive(m, key):  # metrics.json of clt-eval before eval_metrics' massive split: None
        return (m.get("nmse_without_massive") or {}).get(key)

    L = [f"# Reference run: {recipe.base_model}, CLT and PLT of {settings.model.n_features:,} features per layer",
         "",
         f"`make reference` (train/reference.py, recipe configs/reference.yaml). Written by the report stage on "
         f"{time.strftime('%Y-%m-%d %H:%M')}; every figure comes from the run's files (metrics.json, metrics.jsonl, "
         f"stages.json, rates.json).",
         "",
         "## Machine and run",
         "",
         f"- machine: {mach['cpu']}, {mach['cores']} cores, {mach['memory_gib']} GiB; Python {mach['python']}, torch "
         f"{mach['torch']}, transformers {mach['transformers']}; cltrain {mach.get('commit')} (at the run's start)",
         f"- base model {recipe.base_model}, layers {clt['layers'][0]}..{clt['layers'][-1]} ({len(clt['layers'])}); "
         f"F = {settings.model.n_features:,} per layer ({settings.model.n_features * len(clt['layers']):,} features); "
         f"{len(rows)} dictionaries trained on one live pass of {tokens:,} tokens each "
         f"({p['steps']} steps x {settings.batch_tokens})",
         f"- training wall time {_hms(train_s) if train_s else 'n/a'}"
         + (f", {tokens / train_s:.0f} tokens/s for all dictionaries together" if train_s else "")
         + "; per stage: " + ", ".join(f"{k} {_hms(v['seconds'])}" for k, v in stages.items() if "seconds" in v),
         f"- measured before the run: base model forward {rates['generate_tok_s']:.0f} tok/s, CLT step "
         f"{rates['clt_step_s']:.2f} s, PLT step {rates['plt_step_s']:.2f} s (batch {rates['batch_tokens']})",
         f"- text: {corpus.get('train', {}).get('tokens', 0):,} training tokens and "
         f"{corpus.get('heldout', {}).get('tokens', 0):,} held-out tokens ("
         + ", ".join(f"{s['source']} {s['version']}" for s in corpus.get("sources", []))
         + f"); held out: every {corpus.get('heldout_every')}th document, never in the training text; training text: "
         + corpus.get("train", {}).get("order", "documents in source order, modules whole (built before the shuffle; "
                                      "clt-eval read the held-out text's first tokens, so its first sources)"),
         "",
         "## Held-out results",
         "",
         f"On {clt['tokens']:,} held-out tokens (NMSE pooled per layer; dense = fires on more than "
         f"{float(_override(recipe.eval['common'], 'dense_threshold', 0.1)):.0%} of the evaluated tokens; dead = "
         f"never fires on them).",
         "",
         "| | NMSE mean | NMSE without massive | L0 per layer (mean) | dead | dense | top-1 (a) | top-1 (b) | KL (a) | "
         "KL (b) | CE recovered (a) | CE recovered (b) | graph replacement (mean / sd / min) | "
         "graph completeness (mean / sd / min) |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in (("CLT", clt), ("PLT", plt_)):
        g = m.get("graphs") or {}
        L.append(f"| {name} | {m['nmse']['mean']:.4f} | {_f(massive(m, 'mean'), '{:.4f}')} | {m['l0']['mean']:.1f} | "
                 f"{m['features']['dead_fraction']:.1%} | "
                 f"{m['features']['dense_fraction']:.1%} | {_f(rep(m, 'mode_a', 'top1_agreement'))} | "
                 f"{_f(rep(m, 'mode_b', 'top1_agreement'))} | {_f(rep(m, 'mode_a', 'kl'))} | {_f(rep(m, 'mode_b', 'kl'))} | "
                 f"{_f(rep(m, 'mode_a', 'ce_recovered'))} | {_f(rep(m, 'mode_b', 'ce_recovered'))} | "
                 f"{_spread(g, 'replacement_score')} | {_spread(g, 'completeness_score')} |")
    shares = massive(clt, "massive_share_per_layer") or []
    L += ["", f"Graphs: {(clt.get('graphs') or {}).get('n_prompts', 0)} prompts per model (built-in prompts and "
          "windows of held-out text).", "",
          "NMSE without massive: the same pooled NMSE over the tokens whose ||y_l|| is at most "
          f"{massive(clt, 'massive_norm') or 10:g} sqrt(D) at that layer (100x the mean energy of normalized "
          "activations; train/eval_metrics.py). SmolLM2-135M gives a few tokens (some first tokens after BOS, "
          "the attention sink) thousands of times a typical token's energy, and pooled, one of them can hold most "
          f"of a layer's variance: here {sum(massive(clt, 'massive_tokens_per_layer') or [0])} token-layers, "
          f"at most {max(shares or [0]):.0%} of a layer's sum ||y||^2.", "", "NMSE per layer:", "",
          f"- CLT: {per_layer(clt, 'nmse')}", f"- PLT: {per_layer(plt_, 'nmse')}", "",
          "NMSE without massive, per layer:", "",
          f"- CLT: {per_layer(clt, 'nmse_without_massive')}", f"- PLT: {per_layer(plt_, 'nmse_without_massive')}", "",
          "L0 per layer:", "",
          f"- CLT: {per_layer(clt, 'l0')}", f"- PLT: {per_layer(plt_, 'l0')}", ""]
    g = clt.get("graphs") or {}
    if "edges_checked" in g:
        L += [f"CLT perturbation checks: edges verified {g['edges_verified']} of {g['edges_checked']}.", ""]
    L += ["## CLT against PLT at equal L0", "", "The PLT frontier (the twin and the extra PLTs) at the CLT's L0, "
          "interpolated in log L0 (train/sweep_demo.py):", ""] + [f"- {x}" for x in lines_eq] + [
          "", f"All dictionaries ({rel(table_md)}):", "", table_md.read_text().strip(), ""]
    a_top1 = rep(clt, "mode_a", "top1_agreement")
    cg, pg = (clt.get("graphs") or {}).get("replacement_score"), (plt_.get("graphs") or {}).get("replacement_score")
    aims = [("held-out NMSE <= 0.25 at mean L0 <= 30 per layer",
             clt["nmse"]["mean"] <= 0.25 and clt["l0"]["mean"] <= 30, f"{clt['nmse']['mean']:.3f} at {clt['l0']['mean']:.1f}"
             + (f" ({massive(clt, 'mean'):.3f} without massive activations)" if massive(clt, "mean") is not None else "")),
            ("dead <= 10%", clt["features"]["dead_fraction"] <= 0.10, f"{clt['features']['dead_fraction']:.1%}"),
            ("dense <= 5%", clt["features"]["dense_fraction"] <= 0.05, f"{clt['features']['dense_fraction']:.1%}"),
            ("CLT below the PLT in NMSE at equal L0", better, "see above"),
            ("CLT above the PLT in graph replacement", None if not (cg and pg) else cg["mean"] > pg["mean"],
             "n/a" if not (cg and pg) else f"{cg['mean']:.3f} vs {pg['mean']:.3f}"),
            ("graph replacement >= 0.6", None if not cg else cg["mean"] >= 0.6, _f(cg and cg["mean"])),
            (f"top-1 agreement (a) >= 3x the demo's ({DEMO_TOP1_A})", None if a_top1 is None else a_top1 >= 3 * DEMO_TOP1_A,
             _f(a_top1))]
    L += ["## Aims", "", "| aim | met | ours |", "|---|---|---|"]
    L += [f"| {a} | {'n/a' if ok is None else 'yes' if ok else 'no'} | {v} |" for a, ok, v in aims]
    L += ["", "## The paper's anchors (Circuit Tracing, 2025) beside ours", "",
          "| | paper | ours (CLT) | ours (PLT) |", "|---|---|---|---|",
          f"| normalized reconstruction error | {PAPER['nmse']} | {clt['nmse']['mean']:.1%} at L0 "
          f"{clt['l0']['total']:.0f} (all layers) | {plt_['nmse']['mean']:.1%} at L0 {plt_['l0']['total']:.0f} |",
          f"| top-1 agreement | {PAPER['top1']} | {_f(rep(clt, 'mode_b', 'top1_agreement'), '{:.1%}')} (b), "
          f"{_f(a_top1, '{:.1%}')} (a) | {_f(rep(plt_, 'mode_b', 'top1_agreement'), '{:.1%}')} (b) |",
          f"| graph replacement / completeness | {PAPER['graphs']} | {_spread(clt.get('graphs'), 'replacement_score').split(' /')[0]} / "
          f"{_spread(clt.get('graphs'), 'completeness_score').split(' /')[0]} | "
          f"{_spread(plt_.get('graphs'), 'replacement_score').split(' /')[0]} / "
          f"{_spread(plt_.get('graphs'), 'completeness_score').split(' /')[0]} |",
          "", "Ours is a 30-layer model with 30,720 features trained on ~1M tokens on a CPU; the paper's CLTs have up to "
          "10M features trained on billions of tokens: the anchors say where the method goes at scale, not what this "
          "run should reach.", "",
          "## Learning curves", "",
          "Reported every log_every steps by clt-train (metrics.jsonl) on the batch about to be trained on: live "
          "activations of text not yet seen, so each point is an estimate on unseen tokens (not the held-out text). "
          "Dead: not fired in the last dead_after_tokens training tokens.", ""]
    L += [f"![{p_.stem}]({rel(p_)})" for p_ in pngs]
    if dead_png is not None:
        L += ["", "### Dead features by when they died", "",
              f"At the last checkpoint, each dead feature (not fired in the last {settings.dead_after_tokens:,} "
              "training tokens) by the training tokens at which it last fired. Features that die together at one "
              "point of the stream mark a change there (of text, of a threshold); a steady trickle is the "
              "sparsity penalty's ramp.", ""]
        for name, v in dead.items():
            q = [sum(1 for t in v["last_fired"] if a * v["tokens"] / 4 < t <= (a + 1) * v["tokens"] / 4)
                 for a in range(4)]
            never = sum(1 for t in v["last_fired"] if t <= 0)
            L.append(f"- {name}: {len(v['last_fired']):,} of {v['features']:,} dead; last fired in the 1st / 2nd / "
                     f"3rd / 4th quarter of training: {q[0]:,} / {q[1]:,} / {q[2]:,} / {q[3]:,}"
                     + (f" ({never:,} never fired)" if never else "") + "; per layer "
                     + " ".join(f"{x:.0%}" for x in v["per_layer"]))
        L += ["", f"![dead_last_fired]({rel(dead_png)})"]
    pages = (clt.get("feature_pages") or {})
    L += ["", "## Files", "",
          "- metrics: " + ", ".join(f"[{f.name}]({rel(f)})" for f in sorted(assets.glob('metrics_*.json'))),
          f"- CLT feature pages: {pages.get('browser', 'n/a')} (not committed; the model is not committed either)",
          f"- circuit-tracer export: {recipe.out / 'export_clt'}", ""]
    atomic_write_bytes(report, "\n".join(L).encode())
    return report


# ----------------------------------------------------------------------------------------------------
# The driver


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reference_out", help="folder for everything the run writes")
    p.add_argument("--recipe", default=str(RECIPE), help="the recipe (default configs/reference.yaml)")
    p.add_argument("--report", default="benchmarks/reference.md", help="the report; its figures go beside it in a "
                   "folder of the same name")
    p.add_argument("--until", choices=STAGES, default=None, help="stop after this stage")
    p.add_argument("--hours", type=float, default=None, help="this sitting's time: training stops at a checkpoint "
                   "before it is up (the next run continues)")
    p.add_argument("--stop-at-step", type=int, default=None, help="end this sitting's training at this step "
                   "(checkpointed)")
    p.add_argument("--plan-only", action="store_true", help="build the corpus, measure the rates, print the plan")
    p.add_argument("--remeasure", action="store_true", help="measure the rates again (else rates.json is reused)")
    p.add_argument("--measure-batch", type=int, default=512, help="batch tokens of the measured steps (below the "
                   "run's 1,024 to keep the measurement under ~8 GiB; the plan scales per token)")
    p.add_argument("--write-through", action="store_true", help="also write the training activations as int8 "
                   "shards in OUT/shards, for later sweeps on the same tokens (see the plan for the disk)")
    p.add_argument("--no-wandb", action="store_true", help="no W&B (default: offline runs in the run folders)")
    args = p.parse_args(argv)

    started = time.time()
    deadline = started + args.hours * 3600 if args.hours is not None else None
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    recipe = Recipe(Path(args.recipe), out, write_through=args.write_through, wandb=not args.no_wandb)
    settings = recipe.train_settings()
    stages = _read_json(out / STAGES_FILE, {})

    def record(stage: str, t0: float, done: bool):
        entry = stages.setdefault(stage, {"seconds": 0.0})
        entry["seconds"] = entry.get("seconds", 0.0) + time.time() - t0
        entry["done"] = entry.get("done", False) or done
        _write_json(out / STAGES_FILE, stages)

    stage_banner(f"1/{len(STAGES)} text: corpus and held-out split ({recipe.text_dir})")
    t0 = time.time()
    stage_text(recipe, settings)
    record("text", t0, True)
    rates = rates_for(recipe, args.remeasure, min(args.measure_batch, settings.batch_tokens))
    pl = plan(recipe, settings, rates)
    print_plan(recipe, settings, rates, pl, {k: "done" if v.get("done") else "" for k, v in stages.items()})
    if args.plan_only or args.until == "text":
        return 0

    stage_banner(f"2/{len(STAGES)} train: {len(recipe.dictionaries)} dictionaries on live activations "
                 f"({pl['steps']} steps, ~{_hms(pl['seconds']['train'])} in all)")
    t0 = time.time()
    done = stage_train(recipe, settings, pl, deadline, args.stop_at_step)
    record("train", t0, done)
    if not done or args.until == "train":
        return 0
    for i, (stage, fn) in enumerate((("heldout", lambda: stage_heldout(recipe, settings)),
                                      ("eval", lambda: stage_eval(recipe, settings)),
                                      ("export", lambda: stage_export(recipe, settings))), start=3):
        stage_banner(f"{i}/{len(STAGES)} {stage} (~{_hms(pl['seconds'][stage])})")
        t0 = time.time()
        fn()
        record(stage, t0, True)
        if args.until == stage:
            return 0
    stage_banner(f"6/{len(STAGES)} report")
    t0 = time.time()
    report = write_report(recipe, settings, Path(args.report).resolve(), rates, pl, stages)
    record("report", t0, True)
    print(f"\nreport {report}\ndone in {_hms(time.time() - started)} (this sitting)")
    return 0


def cli():
    """`make reference`: main() under the console commands' exit handling (lifecycle.run_command): bad input
    (a recipe, a checkpoint of another config, a dataset) is one line and exit 2, not a traceback."""
    from .checkpoint import CheckpointError
    from .data import DatasetError

    def job():
        code = main()
        if code:
            raise SystemExit(code)

    run_command(job, "make reference", bad_input=(ConfigError, DatasetError, CheckpointError))


if __name__ == "__main__":
    cli()
