"""A trained CLT as a self-describing folder: model.json (config + metadata) and its weights in one or
more safetensors files, each holding a contiguous range of features of every layer.

    model.json                          {"clt_config": the whole CLT's config, "dataset": ..., "train": ...,
                                         "weights": {"n_features": F, "shards": [{"file", "features": [a, b]}]}}
    weights-00000-of-00004.safetensors  W_enc [N, F/4, D], b_enc, log_threshold [N, F/4], W_dec.s [F/4, S, D]
    ...                                 (b_dec and batchtopk_threshold, replicated, in every shard)

clt-train writes one shard per feature-parallel rank, each by its own rank (no rank ever holds the whole
model); `save_clt` writes a whole CLT as one shard (model.safetensors). `ModelReader` reads any of them a
tensor, a feature range or a layer at a time (safetensors is memory-mapped, so only what is asked for
is read), which is how clt-export streams a CLT larger than memory and how a run resumes on another
feature-parallel size. The weights are in normalized space; `meta["dataset"]` carries what is needed
to map back to raw activations (per-layer scales) and to find the base model.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from cltrain.files import atomic_write_bytes, check_sha256, file_sha256, umask

from .clt import CLT, CLTConfig

WEIGHTS, META = "model.safetensors", "model.json"


def shard_file(prefix: str, index: int, count: int) -> str:
    return f"{prefix}-{index:05d}-of-{count:05d}.safetensors"


def feature_dim(name: str) -> int | None:
    """The feature dim of a CLT tensor (None: replicated): W_enc [N, F, D], b_enc / log_threshold [N, F],
    W_dec.s [F, S, D]. Optimizer state and statistics use the same names behind a prefix ("exp_avg/W_enc")."""
    base = name.rsplit("/", 1)[-1]
    if base.startswith("W_dec."):
        return 0
    return 1 if base in ("W_enc", "b_enc", "log_threshold", "tokens_since_fire", "fire_count") else None


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None):
    """safetensors' save_file with the file mode every other file gets (it writes 0600: an exported or
    published model would be unreadable to the collaborators a shared folder is for)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~umask())


# ----------------------------------------------------------------------------------------------------
# Writing a safetensors file one tensor at a time

_ST_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class StreamingSafetensorsWriter:
    """A safetensors file written tensor by tensor, so the writer never holds more than one tensor:
    the header (names, dtypes, shapes, offsets) is known up front from `specs`, then `write` is called
    for each tensor in that order. Written to a temporary name, fsynced and renamed by `close`."""

    def __init__(self, path: str | os.PathLike, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        header, offset = {}, 0
        self.order = []
        for name, dtype, shape in specs:
            n = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            self.order.append((name, dtype, tuple(shape)))
            offset += n
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
        self.next = 0
        self.hash = hashlib.sha256()  # of every byte written: the file's sha256 once closed (`sha256`)
        self.f = open(self.tmp, "wb")
        try:
            self._put(len(blob).to_bytes(8, "little") + blob)
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, tensor: torch.Tensor):
        want_name, dtype, shape = self.order[self.next]
        if name != want_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{self.path}: expected tensor {want_name} {dtype} {list(shape)} next, "
                             f"got {name} {tensor.dtype} {list(tensor.shape)}")
        t = tensor.detach().contiguous().cpu()
        self._put(t.view(torch.uint8).reshape(-1).numpy().tobytes() if t.numel() else b"")
        self.next += 1

    def _put(self, data: bytes):
        self.f.write(data)
        self.hash.update(data)

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()

    def close(self) -> int:
        """Finish the file (all tensors written), fsync, rename into place; returns its size in bytes."""
        if self.next != len(self.order):
            self.abort()
            raise ValueError(f"{self.path}: {len(self.order) - self.next} tensor(s) were never written")
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            size = self.f.tell()
            self.f.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        return size

    def abort(self):
        if not self.f.closed:
            self.f.close()
        self.tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------
# Reading tensors that are split by features over several files


class FeatureShards:
    """Tensors stored as feature ranges over several safetensors files (index: {"n_features": F,
    "shards": [{"file": name, "features": [a, b], "sha256": hex}, ...]}, ranges in order and covering
    [0, F)). `read(name, features=slice)` assembles any feature range from the files that hold it;
    replicated tensors (no feature dim, see feature_dim) come from the first file. A file is opened only
    when first read, after its sha256 is checked against the index (check_hashes=False: the caller
    checked it; files written before the hashes existed have none)."""

    def __init__(self, folder: str | os.PathLike, index: dict, source: str, check_hashes: bool = True):
        self.folder, self.source = Path(folder), source
        try:
            self.n_features = int(index["n_features"])
            self.shards = [(str(s["file"]), int(s["features"][0]), int(s["features"][1])) for s in index["shards"]]
            self.hashes = {str(s["file"]): str(s["sha256"]) for s in index["shards"] if "sha256" in s} \
                if check_hashes else {}
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"{source}: malformed weight index ({type(e).__name__}: {e})") from None
        for file, _, _ in self.shards:
            if Path(file).name != file or file.startswith("."):
                raise ValueError(f"{source}: weight shard {file!r} is not a plain file name in {self.folder}")
        edge = 0
        for file, a, b in self.shards:
            if a != edge or b < a:
                raise ValueError(f"{source}: weight shards do not tile the features (at {file}: [{a}, {b}) "
                                 f"after {edge})")
            edge = b
        if edge != self.n_features:
            raise ValueError(f"{source}: weight shards cover {edge} of {self.n_features} features")
        self._open = {}

    def check_files(self):
        """Every shard file present and readable (a missing or truncated one is named)."""
        for file, _, _ in self.shards:
            self._handle(file)

    def _handle(self, file: str):
        if file not in self._open:
            path = self.folder / file
            if not path.is_file():
                raise FileNotFoundError(f"{path}: missing (listed in {self.source})")
            if file in self.hashes:
                check_sha256(path, self.hashes[file], f"recorded in {self.source}")
            try:
                self._open[file] = safe_open(str(path), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise ValueError(f"{path}: unreadable or truncated ({e})") from None
        return self._open[file]

    def names(self) -> list[str]:
        return list(self._handle(self.shards[0][0]).keys())

    def metadata(self, i: int = 0) -> dict:
        return self._handle(self.shards[i][0]).metadata() or {}

    def read(self, name: str, features: slice | None = None, index: int | None = None) -> torch.Tensor:
        """The tensor `name` (over features [start, stop), default all); `index` first selects one entry
        of dim 0 (a layer of W_enc / b_enc / log_threshold / b_dec), reading only that layer."""
        fdim = feature_dim(name)
        if fdim is None:
            return self._finite(self._get(self.shards[0][0], name, index, None, None), name, index)
        start, stop = (0, self.n_features) if features is None else (features.start, features.stop)
        parts = []
        for file, a, b in self.shards:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                parts.append(self._get(file, name, index, fdim, slice(lo - a, hi - a)))
        dim = fdim - 1 if index is not None else fdim
        return self._finite(parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim), name, index)

    def _finite(self, t: torch.Tensor, name: str, index: int | None) -> torch.Tensor:
        """A tensor with NaN or Inf is refused, naming it and its layer (a diverged run's weights would
        otherwise evaluate to 'NMSE nan' and export without a word)."""
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = ~torch.isfinite(t)
            if index is not None:
                layer = f" layer {index}"
            elif name.startswith("W_dec."):
                layer = f" (source layer {name.split('.')[1]})"
            elif t.dim() >= 2 and feature_dim(name) == 1:  # [N, F, ...]: the first dim is the layer
                layer = f" layer {int(bad.reshape(t.shape[0], -1).any(1).nonzero()[0])}"
            else:
                layer = ""
            raise ValueError(f"{self.folder}: tensor {name}{layer} has {int(bad.sum())} non-finite values "
                             f"(NaN or Inf) of {t.numel()}: the run diverged or the file was damaged ({self.source})")
        return t

    def _get(self, file, name, index, fdim, rows):
        handle = self._handle(file)
        if name not in handle.keys():
            raise KeyError(f"{self.folder / file}: no tensor {name!r}")
        sl = handle.get_slice(name)
        key = [slice(None)] * len(sl.get_shape())
        if rows is not None:
            key[fdim] = rows
        if index is not None:
            key[0] = index
        try:
            return sl[tuple(key)]
        except Exception as e:  # a file cut short reads past its end
            raise ValueError(f"{self.folder / file}: cannot read {name} ({e}); truncated?") from None


class ModelReader:
    """A model folder (module docstring), read lazily: `cfg`, `meta`, `tensor(name)`, `layer(i)`, `load()`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        meta_path = self.folder / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path}: not found (expected a CLT written by clt-train)")
        try:
            self.meta = json.loads(meta_path.read_text())
            self.cfg = CLTConfig(**self.meta["clt_config"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{meta_path}: not a cltrain model description ({e})") from None
        index = self.meta.get("weights") or {"n_features": self.cfg.n_features,
                                             "shards": [{"file": WEIGHTS, "features": [0, self.cfg.n_features]}]}
        self.shards = FeatureShards(self.folder, index, str(meta_path))
        if self.shards.n_features != self.cfg.n_features:
            raise ValueError(f"{meta_path}: weights hold {self.shards.n_features} features per layer, "
                             f"clt_config.n_features = {self.cfg.n_features}")

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in CLT(self.cfg, device="meta").state_dict().items()}

    def tensor(self, name: str, features: slice | None = None) -> torch.Tensor:
        return self.shards.read(name, features)

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Source layer i's tensors: W_enc [F, D], b_enc [F], log_threshold [F] (JumpReLU), b_dec [D],
        W_dec [F, S, D]; only layer i is read from disk."""
        out = {"W_enc": self.shards.read("W_enc", index=i), "b_enc": self.shards.read("b_enc", index=i),
               "b_dec": self.shards.read("b_dec", index=i), "W_dec": self.shards.read(f"W_dec.{i}")}
        if self.cfg.activation == "jumprelu":
            out["log_threshold"] = self.shards.read("log_threshold", index=i)
        return out

    def load(self, map_location="cpu") -> CLT:
        """The whole CLT (eval mode), assembled one tensor at a time."""
        self.shards.check_files()
        clt = CLT(self.cfg, device="meta").to_empty(device=map_location)
        expected = self.expected_shapes()
        for name, target in clt.state_dict().items():
            try:
                t = self.shards.read(name)
            except KeyError as e:
                raise ValueError(f"{e.args[0]} (the model in {self.folder / META} needs it)") from None
            if tuple(t.shape) != expected[name]:
                raise ValueError(f"{self.folder}: weight {name} has shape {list(t.shape)}, {META} expects "
                                 f"{list(expected[name])}")
            target.copy_(t)
        return clt.eval()


def clt_state(clt: CLT) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in clt.state_dict().items()}


def save_clt(folder: str | os.PathLike, state: dict[str, torch.Tensor], cfg: CLTConfig, meta: dict):
    """Write model.safetensors and model.json into folder (each atomically; json last)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{WEIGHTS}.tmp-{os.getpid()}"
    save_safetensors({k: v.contiguous() for k, v in state.items()}, tmp)
    index = {"n_features": cfg.n_features,
             "shards": [{"file": WEIGHTS, "features": [0, cfg.n_features], "sha256": file_sha256(tmp)}]}
    os.replace(tmp, folder / WEIGHTS)
    write_model_json(folder / META, cfg, meta, index)


def write_model_json(path: Path, cfg: CLTConfig, meta: dict, index: dict) -> bytes:
    """The one writer of model.json (a saved CLT, a checkpoint's model/): the whole CLT's config, the
    dataset/train blocks of `meta`, and the weights index (shards, feature ranges, sha256). Written
    atomically; returns the bytes written (a checkpoint's manifest records them)."""
    data = json.dumps({"clt_config": dataclasses.asdict(cfg), **meta, "weights": index}, indent=2).encode()
    atomic_write_bytes(path, data)
    return data


def load_clt(folder: str | os.PathLike, map_location="cpu") -> tuple[CLT, dict]:
    """Read a model folder (one file or feature shards); returns the whole CLT (eval mode) and its metadata."""
    reader = ModelReader(folder)
    return reader.load(map_location), reader.meta
