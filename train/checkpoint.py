"""Sharded, atomic, resumable checkpoints that resume on another layout.

Layout of OUT/checkpoints:
    latest                          one line: the newest complete checkpoint (replaced atomically)
    step-000500/
        trainer.json                step, tokens, fingerprint, layout, W&B run id, and the manifest (every
                                    file with its size and sha256); written last, by rank 0: its presence
                                    means complete
        model/model.json            the model (model_io's format): config, dataset metadata, weight index
        model/weights-0000r-of-0000P.safetensors   feature shard r: the fp32 (master) weights
        optim/optim-0000r-of-0000P.safetensors     feature shard r: Adam's moments, feature statistics
        ranks/rank-00000.pt ...     per rank: loader position, RNG states, exact feature statistics (read
                                    with torch.load(weights_only=True): plain types, tensors, and numpy's
                                    RNG array, SAFE_GLOBALS; a file that asks for anything else is refused)

Each feature shard is written by the first data-parallel rank of its feature-parallel group, one tensor
at a time (engine.get_full_state gathers a parameter's ZeRO fragments over the DP group, then it is streamed to
disk), so no rank ever holds more than its own slice plus one tensor. The weights are stored once.

Atomicity: everything goes to step-XXXXXX.tmp; every rank fsyncs its files and reports their sizes;
only when all ranks succeeded does rank 0 write trainer.json, rename the folder and move `latest`.
A crash or full disk mid-write leaves `latest` on the previous good checkpoint (a stale .tmp is removed
by the next save). Ranks agree on success with one all-reduce, so one rank's failure stops every rank
with the same message instead of hanging the others.

Integrity: every file's size is checked before any step, and each rank checks the sha256 of every file it
reads (its rank file, the shards holding its features, the indexes) before reading it; model.json's
index records each weight shard's sha256, so OUT/model (hard links of the final checkpoint's model/) is
checked the same way by whoever reads it (model_io.FeatureShards).

Resume: the fingerprint (model, optimizer, data order, schedules, global batch) must match; the layout
(world size, data- and feature-parallel sizes, ZeRO stage) may change: each rank reads its feature
range of the weights and moments from whichever old shards hold it (model_io.FeatureShards), and the
loader positions of the old data-parallel ranks are mapped onto the new ones.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from cltrain.errors import ConfigError
from .engine import adam_step, ensure_adam_state, get_full_state, set_full_state
from .model_io import META, FeatureShards, StreamingSafetensorsWriter, feature_dim, shard_file, write_model_json
from cltrain.files import atomic_write_bytes, check_sha256

LATEST = "latest"
TRAINER = "trainer.json"
FORMAT = "cltrain-checkpoint-v3"  # v3: the manifest has a sha256 per file; v2 (sizes only) still resumes
READABLE = ("cltrain-checkpoint-v2", FORMAT)
# What a rank file may contain besides plain types and tensors: numpy's RNG state (an array of uint32).
SAFE_GLOBALS = [np.ndarray, np.dtype, (getattr(np, "_core", None) or np.core).multiarray._reconstruct,
                *([np.dtypes.UInt32DType] if hasattr(np, "dtypes") else [])]
# Keys of the fingerprint that may differ on resume: the layout is remapped.
LAYOUT_KEYS = ("world_size", "parallel.feature_parallel", "deepspeed.zero_stage", "batch_tokens",
               "grad_accum", "data.num_workers")
# Fingerprint keys added after checkpoints were first written: compared only where the checkpoint has them.
NEWER_KEYS = ("dataset.digest",)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or does not fit this run; the message names the path."""


def step_name(step: int) -> str:
    return f"step-{step:06d}"


def rank_file(rank: int) -> str:
    return f"ranks/rank-{rank:05d}.pt"


# ----------------------------------------------------------------------------------------------------
# Finding a checkpoint


def latest_checkpoint(root: Path) -> Path | None:
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which is not a complete checkpoint "
                              f"(no {TRAINER}); point 'resume' at an earlier step-* folder")
    return path


def latest_checkpoint_name(root: Path) -> str | None:
    pointer = root / LATEST
    return pointer.read_text().strip() if pointer.is_file() else None


def resolve_resume(resume, root: Path) -> Path | None:
    """resume = false: start fresh. true: OUT/checkpoints/latest, or fresh if none exists yet (so a
    preempted job can be resubmitted unchanged). A path: a step-* folder, a checkpoints folder, or a run
    folder holding checkpoints/."""
    if resume is None or resume is False:
        return None
    if resume is True:
        return latest_checkpoint(root)
    path = Path(str(resume))
    for candidate in (path, path / "checkpoints"):
        if (candidate / TRAINER).is_file():
            return candidate
        if (candidate / LATEST).is_file():
            return latest_checkpoint(candidate)
    raise CheckpointError(f"config key 'resume' = {str(resume)!r}: no checkpoint there (expected a folder "
                          f"with {TRAINER}, or one with a '{LATEST}' file)")


def read_trainer_state(path: Path) -> dict:
    try:
        state = json.loads((path / TRAINER).read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError, UnicodeDecodeError: not what clt-train wrote
        raise CheckpointError(f"{path / TRAINER}: unreadable checkpoint description ({e})") from None
    if state.get("format") not in READABLE:
        raise CheckpointError(f"{path}: written by an older cltrain (format {state.get('format', 'v1')!r}, "
                              f"this version reads {FORMAT!r}); start a new run")
    return state


def feature_last_fired(path: Path) -> tuple[torch.Tensor, int]:
    """(last, tokens) of a checkpoint: last[l, f] = the training tokens seen when feature f of layer l last
    fired (0: not since the run began), over all features of every rank's shards, and the tokens trained on.
    For reading a finished run's dead features by when they died (train/reference.py's report)."""
    state = read_trainer_state(path)
    try:
        index = json.loads((path / "optim" / "index.json").read_text())
        since = FeatureShards(path / "optim", index, str(path / "optim" / "index.json")).read("stats/tokens_since_fire")
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot read the feature statistics ({e})") from None
    tokens = int(state["tokens"])
    return (tokens - since.double()).clamp_(min=0), tokens


def fingerprint_diff(saved: dict, current: dict) -> list[str]:
    """The fingerprint keys that differ, the layout keys (which a resume may change) left out, and keys
    newer than the checkpoint (NEWER_KEYS, absent from what an older version saved) not compared."""
    return [k for k in sorted(set(saved) | set(current))
            if k not in LAYOUT_KEYS and not (k in NEWER_KEYS and k not in saved) and saved.get(k) != current.get(k)]


def check_fingerprint(saved: dict, current: dict, path: Path, allow_dataset_change: bool = False):
    """Refuse to resume with a config that changes the model, the data order or the schedules; the
    layout keys (LAYOUT_KEYS) may change. Another dataset of the same shape (its digest) only with
    data.allow_change_on_resume=true, and then it is said."""
    diff = fingerprint_diff(saved, current)
    if allow_dataset_change and "dataset.digest" in diff:
        diff.remove("dataset.digest")
        print(f"clt-train: resuming {path} on another dataset (digest {saved['dataset.digest'][:12]}... in the "
              f"checkpoint, {current['dataset.digest'][:12]}... now): data.allow_change_on_resume=true", flush=True)
    if diff:
        lines = "; ".join(f"'{k}' = {saved.get(k)!r} in the checkpoint, {current.get(k)!r} now" for k in diff[:8])
        if "dataset.digest" in diff:
            lines += (" (another dataset of the same shape: other shards or scales; data.allow_change_on_resume=true "
                      "resumes on it deliberately)")
        hint = (" (global_batch_tokens = batch_tokens x grad_accum x data-parallel size: adjust batch_tokens "
                "or grad_accum to the new layout)" if "global_batch_tokens" in diff else "")
        raise ConfigError(f"{path}: checkpoint from another config: {lines}{hint}. Resume with the "
                          f"checkpoint's values (see {path / TRAINER}) or train into a new out_dir")


def _entry(value) -> tuple[int, str | None]:
    """A manifest entry: {"bytes", "sha256"} (v3) or a size (v2)."""
    return (int(value["bytes"]), str(value["sha256"])) if isinstance(value, dict) else (int(value), None)


def verify_manifest(path: Path, state: dict):
    """Every file the checkpoint lists is there with its recorded size (a missing or truncated rank
    shard is named before any training step). The hashes are checked where the files are read."""
    for name, value in sorted(state.get("files", {}).items()):
        f = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path / TRAINER}: lists {name!r}, outside the checkpoint folder")
        size, _ = _entry(value)
        if not f.is_file():
            raise CheckpointError(f"{f}: missing from the checkpoint (listed in {path / TRAINER}); resume "
                                  f"from an earlier step-* folder")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, {size} expected (truncated or "
                                  f"overwritten); resume from an earlier step-* folder")


def verify_hashes(path: Path, state: dict, names):
    """The sha256 of each of `names` (paths in the checkpoint) equals the manifest's."""
    files = state.get("files", {})
    for name in sorted(set(names)):
        if name not in files:
            raise CheckpointError(f"{path / name}: not listed in {path / TRAINER}")
        _, digest = _entry(files[name])
        if digest is not None:
            try:
                check_sha256(path / name, digest, f"recorded in {path / TRAINER}")
            except ValueError as e:
                raise CheckpointError(f"{e}; resume from an earlier step-* folder") from None


def load_rank_file(path: Path) -> dict:
    """A rank file, unpickled with weights_only=True (no code runs from it): a file that holds anything
    but plain types, tensors and SAFE_GLOBALS is refused by name."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's UnpicklingError, or garbage
        first = str(e).split("\n")[0][:300]
        if "WeightsUnpickler error" in str(e):
            first = next((x for x in str(e).splitlines() if "WeightsUnpickler error" in x), first).strip()
        raise CheckpointError(f"{path}: not a rank file this version can read safely ({first}); nothing from "
                              f"it was run. Resume from an earlier step-* folder") from None


# ----------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------------
# Collectives that tolerate one rank's failure


def all_ranks_ok(ok: bool, device) -> bool:
    """True only if every rank's `ok` is True (a collective)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return ok
    flag = torch.tensor([0.0 if ok else 1.0], device=device)
    dist.all_reduce(flag)
    return flag.item() == 0


def _gather_objects(obj) -> list:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _fsync_dir(path: Path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _manifest_entry(data: bytes) -> dict:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _atomic_torch_save(obj, path: Path) -> dict:
    """Save `obj` (a rank's small state) atomically; its manifest entry."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return _manifest_entry(data)


# ----------------------------------------------------------------------------------------------------
# The manager


class CheckpointManager:
    """Writes and reads this run's checkpoints (module docstring). Collective methods: every rank calls
    them with the same arguments.

    clt: this rank's CLT slice; engine: the DeepSpeed engine training it; layout: train/parallel.Layout;
    full_cfg: the whole CLT's config; fingerprint: the run's (fingerprint below)."""

    def __init__(self, root: Path, clt, engine, layout, full_cfg, fingerprint: dict, device, keep: int):
        self.root, self.clt, self.engine, self.layout = Path(root), clt, engine, layout
        self.full_cfg, self.fingerprint, self.device, self.keep = full_cfg, fingerprint, device, keep
        self.params = dict(clt.named_parameters())

    # --- save ---

    def save(self, step: int, trainer_state: dict, model_meta: dict, rank_state: dict, stats) -> Path:
        """Write checkpoint `step`; returns its folder. trainer_state: what trainer.json records (rank 0);
        model_meta: model.json's dataset/train blocks; rank_state: this rank's loader/RNG/etc.;
        stats: metrics.FeatureStats (local slice; reduced over DP for the shard files)."""
        rank = self.layout.rank
        final, tmp = self.root / step_name(step), self.root / (step_name(step) + ".tmp")
        error = None
        if rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(tmp, ignore_errors=True)  # a stale one from a crashed save
                for sub in ("model", "optim", "ranks"):
                    (tmp / sub).mkdir(parents=True)
            except OSError as e:
                error = e
        if not all_ranks_ok(error is None, self.device):
            raise CheckpointError(f"{tmp}: cannot create the checkpoint folder ({error or 'failed on rank 0'})")
        files: dict[str, dict] = {}
        try:
            files.update(self._write_shards(tmp, step, stats))
        except (OSError, RuntimeError, ValueError) as e:
            error = e
        try:
            files[rank_file(rank)] = _atomic_torch_save(rank_state, tmp / rank_file(rank))
        except (OSError, RuntimeError) as e:
            error = error or e
        ok = all_ranks_ok(error is None, self.device)
        all_files = _gather_objects(files)
        if ok and rank == 0:
            try:
                manifest = {k: v for f in all_files for k, v in f.items()}
                manifest.update(self._write_indexes(tmp, model_meta, manifest))
                state = dict(trainer_state, format=FORMAT, step=step, fingerprint=self.fingerprint,
                             layout=self._layout_doc(), files=manifest)
                atomic_write_bytes(tmp / TRAINER, json.dumps(state, indent=2).encode())
            except OSError as e:
                error = e
        ok = all_ranks_ok(error is None, self.device) and ok
        if not ok:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            pointer = latest_checkpoint_name(self.root)
            raise CheckpointError(
                f"{tmp}: writing the checkpoint failed ({error or 'on another rank'}); nothing was published, "
                f"'{self.root / LATEST}' still names {pointer or 'no checkpoint'}. Free disk space and resume.")
        if rank == 0:
            for sub in ("model", "optim", "ranks", ""):
                _fsync_dir(tmp / sub)
            if final.exists():  # the same step saved again (e.g. after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            atomic_write_bytes(self.root / LATEST, (final.name + "\n").encode())
            self._prune(final.name)
        _barrier()
        return final

    def _write_indexes(self, tmp: Path, model_meta: dict, manifest: dict) -> dict[str, dict]:
        """model/model.json and optim/index.json (rank 0, once every shard is written): the shard files
        with their feature ranges and sha256. Their own manifest entries."""
        P, n_local = self.layout.fp_size, self.clt.cfg.n_features

        def index(prefix, folder):
            return {"n_features": self.full_cfg.n_features,
                    "shards": [{"file": shard_file(prefix, r, P), "features": [r * n_local, (r + 1) * n_local],
                                "sha256": manifest[f"{folder}/{shard_file(prefix, r, P)}"]["sha256"]}
                               for r in range(P)]}

        model = write_model_json(tmp / "model" / META, self.full_cfg, model_meta, index("weights", "model"))
        optim = json.dumps(index("optim", "optim"), indent=2).encode()
        atomic_write_bytes(tmp / "optim" / "index.json", optim)
        return {f"model/{META}": _manifest_entry(model), "optim/index.json": _manifest_entry(optim)}

    def _layout_doc(self) -> dict:
        L = self.layout
        return {"world": L.world, "data_parallel": L.dp_size, "feature_parallel": L.fp_size,
                "zero_stage": self.fingerprint.get("deepspeed.zero_stage")}

    def _shard_specs(self, prefixes: tuple[str, ...], dtype=torch.float32) -> list:
        """(name, dtype, shape) per parameter, the prefixes interleaved per parameter (the order the
        tensors are produced in, one parameter at a time)."""
        specs = []
        for name, p in self.params.items():
            shape = tuple(p.ds_shape) if hasattr(p, "ds_shape") else tuple(p.shape)
            specs += [(f"{prefix}{name}", dtype, shape) for prefix in prefixes]
        return specs

    def _write_shards(self, tmp: Path, step: int, stats) -> dict[str, dict]:
        """This FP group's weight and optimizer shard, written by its first DP rank while every DP rank
        takes part in the per-parameter gathers. A write error is remembered and raised after the
        gathers, so the other ranks never wait in a collective the writer left. Returns the manifest
        entries ({relative path: {bytes, sha256}}) of what this rank wrote."""
        L = self.layout
        writer = L.dp_rank == 0
        start, n_local = self.clt.feature_start, self.clt.cfg.n_features
        fname, oname = shard_file("weights", L.fp_rank, L.fp_size), shard_file("optim", L.fp_rank, L.fp_size)
        buffers = {"batchtopk_threshold": self.clt.batchtopk_threshold.detach().float().cpu()}
        tokens_since, fire, counted = stats.reduced_copy(L.dp_group)  # collective over DP
        meta = {"features": json.dumps([start, start + n_local]), "adam_step": str(adam_step(self.engine)),
                "stats.tokens_counted": str(counted)}
        files, failure = {}, None

        def attempt(fn):
            nonlocal failure
            if failure is None:
                try:
                    return fn()
                except (OSError, RuntimeError, ValueError) as e:
                    failure = e
            return None

        weights = optim = None
        if writer:
            weights = attempt(lambda: StreamingSafetensorsWriter(
                tmp / "model" / fname,
                self._shard_specs(("",)) + [(k, v.dtype, tuple(v.shape)) for k, v in buffers.items()],
                {"features": meta["features"]}))
            optim = attempt(lambda: StreamingSafetensorsWriter(
                tmp / "optim" / oname,
                self._shard_specs(("exp_avg/", "exp_avg_sq/"))
                + [("stats/tokens_since_fire", torch.float64, tuple(tokens_since.shape)),
                   ("stats/fire_count", torch.float64, tuple(fire.shape))], meta))
        for name, p in self.params.items():
            state = get_full_state(self.engine, p)  # collective over DP: every rank, every parameter
            if writer:
                attempt(lambda s=state: weights.write(name, s["weight"]))
                for key in ("exp_avg", "exp_avg_sq"):
                    attempt(lambda s=state: optim.write(f"{key}/{name}", s[key]))
            del state  # each parameter's full state is freed before the next is gathered
        if writer:
            for k, v in buffers.items():
                attempt(lambda: weights.write(k, v))
            attempt(lambda: optim.write("stats/tokens_since_fire", tokens_since))
            attempt(lambda: optim.write("stats/fire_count", fire))
            for key, w in ((f"model/{fname}", weights), (f"optim/{oname}", optim)):
                size = attempt(w.close) if w is not None else None
                if size is not None:
                    files[key] = {"bytes": size, "sha256": w.sha256}
        if failure is not None:
            for w in (weights, optim):
                if w is not None:
                    w.abort()
            raise failure
        return files

    def _prune(self, newest: str):
        """Keep the `keep` newest checkpoints (0 keeps all); never the one `latest` names."""
        if self.keep <= 0:
            return
        done = sorted(p for p in self.root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp"))
        for p in done[:-self.keep]:
            if p.name != newest:
                shutil.rmtree(p, ignore_errors=True)

    # --- load ---

    def check(self, path: Path) -> dict:
        """Before building anything heavy: the checkpoint's description, fingerprint and files. Every
        rank may call it (it only reads)."""
        state = read_trainer_state(path)
        check_fingerprint(state.get("fingerprint", {}), self.fingerprint, path)
        verify_manifest(path, state)
        return state

    def load(self, path: Path, state: dict, stats) -> dict:
        """Load weights, Adam state and feature statistics for this rank's slice (from whichever old
        shards hold it) and return this rank's loader/RNG state (mapped when the layout changed)."""
        L = self.layout
        old = state["layout"]
        features = slice(self.clt.feature_start, self.clt.feature_start + self.clt.cfg.n_features)
        same_layout = (old["world"], old["data_parallel"], old["feature_parallel"]) == (L.world, L.dp_size, L.fp_size)
        old_fp = int(old["feature_parallel"])
        rank_files = [rank_file(L.rank)] if same_layout else \
            sorted({rank_file(d * old_fp) for d in range(int(old["data_parallel"]))} | {rank_file(0)})
        verify_hashes(path, state, [f"model/{META}", "optim/index.json", *rank_files])
        try:
            weights = FeatureShards(path / "model", json.loads((path / "model" / META).read_text())["weights"],
                                    str(path / "model" / META), check_hashes=False)
            optim = FeatureShards(path / "optim", json.loads((path / "optim" / "index.json").read_text()),
                                  str(path / "optim" / "index.json"), check_hashes=False)
            # only the shards that hold this rank's features (and the first: replicated tensors) are read
            verify_hashes(path, state, [f"{sub}/{file}" for sub, shards in (("model", weights), ("optim", optim))
                                        for i, (file, a, b) in enumerate(shards.shards)
                                        if i == 0 or (a < features.stop and features.start < b)])
            weights.check_files()
            optim.check_files()
        except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: cannot read the checkpoint's shards ({e})") from None
        step = int(optim.metadata().get("adam_step", 0))
        ensure_adam_state(self.engine, step)
        try:
            for name, p in self.params.items():
                sl = features if feature_dim(name) is not None else None
                set_full_state(self.engine, p, {"weight": weights.read(name, sl),
                                                "exp_avg": optim.read(f"exp_avg/{name}", sl),
                                                "exp_avg_sq": optim.read(f"exp_avg_sq/{name}", sl)})
            self.clt.batchtopk_threshold.copy_(weights.read("batchtopk_threshold"))
        except (ValueError, KeyError) as e:  # a non-finite or missing tensor, named
            raise CheckpointError(f"{path}: {e.args[0] if e.args else e}; resume from an earlier step-* folder") from None
        rank_states = {}
        if same_layout:
            mine = load_rank_file(path / rank_file(L.rank))
            stats.load_state_dict(mine["features"])
            rank_states = {"loader": mine["loader"], "rng": mine["rng"]}
        else:
            stats.load_reduced(optim.read("stats/tokens_since_fire", features),
                               optim.read("stats/fire_count", features),
                               int(optim.metadata().get("stats.tokens_counted", 0)), keep_counts=L.dp_rank == 0)
            # every old DP rank's loader position (FP ranks of a group share it)
            loaders = [load_rank_file(path / rank_file(d * old_fp))["loader"] for d in range(int(old["data_parallel"]))]
            first = load_rank_file(path / rank_file(0))
            rank_states = {"loader_states": loaders, "rng": first["rng"]}
        return rank_states


def publish_model(checkpoint: Path, dst: Path, fingerprint: dict):
    """OUT/model from a checkpoint's model folder: hard links (no second copy of the weights; a copy
    where links are impossible), swapped in whole. Refuses a checkpoint of another run."""
    from cltrain.files import replace_dir

    saved = read_trainer_state(checkpoint).get("fingerprint", {})
    diff = fingerprint_diff(saved, fingerprint)
    if diff:
        raise CheckpointError(f"{checkpoint}: not this run's checkpoint ({diff[0]!r} = {saved.get(diff[0])!r} "
                              f"there, {fingerprint.get(diff[0])!r} in this run); not published as {dst}")
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in (checkpoint / "model").iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copy2(f, tmp / f.name)
    replace_dir(tmp, dst)


def fingerprint(s, info, layout, precision: str, steps: int) -> dict:
    """What a resume compares with the checkpoint (s: config.TrainSettings): the model, the data order, the
    optimizer, the schedules and the global batch must match; the layout keys (LAYOUT_KEYS: world size,
    feature parallel size, ZeRO stage, per-replica batch split) may change, the state is remapped."""
    flat = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = node

    walk("model", s.model.to_dict())
    walk("optim", s.optim.to_dict())
    for key in ("seed", "batch_tokens", "grad_accum", "data.shuffle_buffer", "data.heldout_shards",
                "data.num_workers", "parallel.feature_parallel", "deepspeed.zero_stage"):
        flat[key] = s.select(key)
    # resolved values: `precision=auto` and the run length from `train_tokens` compare as what they mean
    flat["precision"], flat["steps"] = precision, steps
    flat.update({"world_size": layout.world, "dataset.model": info.model, "dataset.layers": list(info.layers),
                 "dataset.d_model": info.d_model, "dataset.n_tokens": info.n_tokens,
                 "dataset.digest": info.digest(),
                 "global_batch_tokens": s.batch_tokens * s.grad_accum * layout.dp_size})
    return flat
