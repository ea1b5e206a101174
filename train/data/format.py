"""The activation format: dataset.json (DatasetInfo), URLs, and encoding/decoding one sample.

Storage dtypes: bfloat16 / float16 store x and y as they are. int8 stores each row (one token, one
layer: D values) as round(v / s) with its own scale s = max|v| / 127, in float32 tensors `x_scale` and
`y_scale` of shape [T, N] beside `x` and `y`: half of bf16's bytes, and an error of at most s / 2 per
value (measured cost in benchmarks/data.md)."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shlex
import signal
import warnings
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save as st_save

from cltrain.errors import ConfigError
from cltrain.files import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "cltrain-activations/1"
DATASET_JSON = "dataset.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}  # float storage: values as they are
QUANTIZED_DTYPES = {"int8": torch.int8}  # per-row scaled storage (module docstring)
STORAGE_DTYPES = {**DTYPES, **QUANTIZED_DTYPES}
SAMPLE_EXT = ".safetensors"
SCALE_TOKENS = 4096  # tokens the normalization scales are estimated on (the first harvested ones)


class DatasetError(ValueError):
    """A dataset, shard or sample is missing or malformed; the message names which and what is wrong."""


class SampleError(ValueError):
    """One sample is bad (shape, dtype, NaN/Inf, undecodable); skippable with on_error=skip."""


# ----------------------------------------------------------------------------------------------------
# URLs


# A shard's name in dataset.json: a file in the dataset's folder, nothing a path or a shell could read
# differently (checked before any shard is opened; `pipe:` commands get it shell-quoted as well).
SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,250}\.tar")


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def join_url(base: str, name: str) -> str:
    """The URL of file `name` in dataset `base` (folder, URL prefix, or pipe: command with {})."""
    base = str(base)
    if base.startswith("pipe:"):
        if "{}" not in base:
            raise DatasetError(f"dataset URL {base!r}: a pipe: URL needs '{{}}' where the file name goes, "
                               f"e.g. 'pipe:aws s3 cp s3://bucket/acts/{{}} -'")
        return base.replace("{}", shlex.quote(name))
    if "://" in base:
        return base.rstrip("/") + "/" + name
    return str(Path(base) / name)


def open_url(url: str):
    """A binary stream for a local path or any URL WebDataset's gopen understands."""
    from webdataset.gopen import gopen
    if not is_url(url):
        if not os.path.isfile(url):
            raise FileNotFoundError(f"{url}: no such file")
        return open(url, "rb")
    if url.startswith("pipe:"):
        return _open_pipe(url[len("pipe:"):])
    return gopen(url, "rb")


# The pipe: commands this process started; each runs in its own process group (see _open_pipe).
_PIPES = weakref.WeakSet()


def _open_pipe(cmd: str):
    """WebDataset's Pipe (its exit-status checks, as gopen opens pipe: URLs), with the command started
    in a process group of its own, so that a loader worker that is stopped mid-read ends the whole
    command (kill_pipes) instead of leaving the shell and its children behind."""
    from webdataset import utils
    from webdataset.gopen import Pipe
    if utils.enforce_security:
        raise ValueError("gopen_pipe: unsafe_gopen is False, cannot open pipe URLs")
    pipe = Pipe(cmd, mode="rb", shell=True, bufsize=8192, ignore_status=[141], start_new_session=True)
    _PIPES.add(pipe.proc)
    return pipe


def kill_pipes():
    """SIGKILL the process group of every pipe: command this process started that is still running."""
    for proc in list(_PIPES):
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ----------------------------------------------------------------------------------------------------
# dataset.json


@dataclass
class DatasetInfo:
    """dataset.json: what was harvested, how, and the shard list. Validated by `load`."""
    model: str
    layers: list[int]  # base-model layer indices, contiguous; position i in x/y is layers[i]
    n_layers: int
    d_model: int
    dtype: str  # "bfloat16" | "float16"
    tokens_per_sample: int  # T
    n_tokens: int
    hooks: dict  # how x and y were read, e.g. {"x": "model.layers.{l}.post_attention_layernorm:input", ...}
    scale_x: list[float]  # multiply raw x_l by scale_x[l] to normalize (E||s x|| = sqrt(D))
    scale_y: list[float]
    shards: list[dict]  # [{name, n_tokens, sha256}, ...] in order
    scale_tokens: int = 0  # how many tokens the scales were estimated on
    scale_source: str = ""  # which tokens (e.g. "the first 4096 tokens harvested by rank 0")
    harvest: dict = field(default_factory=dict)  # the harvest settings: text source, context, BOS, seed...
    format: str = FORMAT
    path: str | None = None  # where it was loaded from (folder or URL prefix); not written

    REQUIRED = ("model", "layers", "n_layers", "d_model", "dtype", "tokens_per_sample", "n_tokens",
                "hooks", "scale_x", "scale_y", "shards")

    @property
    def json_path(self) -> str:
        return join_url(self.path, DATASET_JSON) if self.path else DATASET_JSON

    @property
    def source(self) -> str:
        """Where the activations come from, for messages: dataset.json's path, or the live base model."""
        if "live" in self.harvest and not self.shards:
            return f"live activations of {self.model}"
        return self.json_path

    @property
    def torch_dtype(self) -> torch.dtype:
        return STORAGE_DTYPES[self.dtype]

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED_DTYPES

    def to_json(self) -> dict:
        doc = asdict(self)
        doc.pop("path")
        return doc

    def save(self, folder: str | os.PathLike):
        """Write dataset.json atomically into a local folder."""
        atomic_write_bytes(Path(folder) / DATASET_JSON, json.dumps(self.to_json(), indent=1).encode())

    @classmethod
    def load(cls, path_or_url: str | os.PathLike) -> "DatasetInfo":
        """Read and validate dataset.json from a dataset folder/URL (or the dataset.json path itself)."""
        if isinstance(path_or_url, DatasetInfo):
            return path_or_url
        p = str(path_or_url)
        if p.endswith(".json") and not p.startswith("pipe:"):
            url, base = p, (p.rsplit("/", 1)[0] if is_url(p) else str(Path(p).parent))
        else:
            url, base = join_url(p, DATASET_JSON), p
        try:
            with open_url(url) as f:
                raw = f.read()
        except (OSError, ValueError) as e:
            raise DatasetError(f"{url}: cannot read dataset description ({e}); expected a folder or URL "
                               f"written by clt-harvest") from None
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{url}: not valid JSON ({e})") from None
        return cls.from_json(doc, base, url)

    @classmethod
    def from_json(cls, doc: dict, base: str | None = None, where: str = DATASET_JSON) -> "DatasetInfo":
        if not isinstance(doc, dict):
            raise DatasetError(f"{where}: expected a JSON object, found {type(doc).__name__}")
        missing = [k for k in cls.REQUIRED if k not in doc]
        if missing:
            raise DatasetError(f"{where}: missing key(s) {missing}")
        known = {f for f in cls.__dataclass_fields__ if f != "path"}
        info = cls(**{k: v for k, v in doc.items() if k in known}, path=base)
        info.validate(where)
        return info

    def validate(self, where: str | None = None):
        where = where or self.json_path

        def bad(key, value, expected):
            raise DatasetError(f"{where}: key '{key}' = {value!r}: expected {expected}")

        def pos_int(key):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                bad(key, v, "a positive integer")

        for key in ("n_layers", "d_model", "tokens_per_sample", "n_tokens"):
            pos_int(key)
        if self.format != FORMAT:
            bad("format", self.format, repr(FORMAT))
        if self.dtype not in STORAGE_DTYPES:
            bad("dtype", self.dtype, f"one of {list(STORAGE_DTYPES)}")
        if not isinstance(self.layers, list) or len(self.layers) != self.n_layers or \
                not all(isinstance(l, int) and l >= 0 for l in self.layers):
            bad("layers", self.layers, f"a list of n_layers={self.n_layers} layer indices")
        if self.layers != list(range(self.layers[0], self.layers[0] + self.n_layers)):
            bad("layers", self.layers, "a contiguous range of layers")
        for key in ("scale_x", "scale_y"):
            v = getattr(self, key)
            if not isinstance(v, list) or len(v) != self.n_layers or not all(
                    isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
                    for s in v):
                bad(key, v, f"a list of n_layers={self.n_layers} finite positive numbers")
        if not isinstance(self.hooks, dict):
            bad("hooks", self.hooks, "an object")
        if not isinstance(self.shards, list) or not self.shards:
            bad("shards", self.shards, "a non-empty list of {name, n_tokens, sha256}")
        names = set()
        for i, s in enumerate(self.shards):
            if not isinstance(s, dict) or not isinstance(s.get("name"), str) or not s["name"]:
                bad(f"shards[{i}]", s, "an object with a 'name'")
            if not SHARD_NAME.fullmatch(s["name"]):
                bad(f"shards[{i}].name", s["name"], "a plain file name ending in .tar (letters, digits, '.', '_', "
                    "'-'; no folder, no shell characters): shards are read from the dataset's own folder")
            n = s.get("n_tokens")
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0 or n % self.tokens_per_sample:
                bad(f"shards[{i}].n_tokens", n,
                    f"a positive multiple of tokens_per_sample={self.tokens_per_sample} ({s['name']})")
            if not isinstance(s.get("sha256"), str) or len(s["sha256"]) != 64:
                bad(f"shards[{i}].sha256", s.get("sha256"), f"a 64-digit hex digest ({s['name']})")
            if s["name"] in names:
                bad(f"shards[{i}].name", s["name"], "a name not listed twice")
            names.add(s["name"])
        total = sum(s["n_tokens"] for s in self.shards)
        if total != self.n_tokens:
            bad("n_tokens", self.n_tokens, f"the sum of the shards' n_tokens, {total}")

    # --- shards ---

    def digest(self) -> str:
        """The dataset's identity: a sha256 over its shards (names, token counts, sha256) and its
        normalization scales. Another harvest, even of the same shape, has another digest."""
        ident = {"shards": [[s["name"], s["n_tokens"], s["sha256"]] for s in self.shards],
                 "scale_x": self.scale_x, "scale_y": self.scale_y}
        if "live" in self.harvest and not self.shards:  # live activations: the stream's description
            ident["live"] = self.harvest["live"]
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()

    def shard_records(self, split: str = "train", heldout_shards: int = 0) -> list[dict]:
        """The shards of a split, each {name, n_tokens, sha256, url}: the last `heldout_shards` are held out."""
        if split not in ("train", "heldout", "all"):
            raise DatasetError(f"split {split!r}: expected 'train', 'heldout' or 'all'")
        k = int(heldout_shards)
        n = len(self.shards)
        if split == "all":
            recs = self.shards
        elif not 0 <= k < n or (split == "heldout" and k == 0):
            raise DatasetError(
                f"{self.json_path}: {n} shard(s), so data.heldout_shards={k} leaves "
                + ("no shard for training" if split == "train" else "nothing held out")
                + f" (expected 0 <= heldout_shards < {n}" + (", > 0 for the heldout split)" if split == "heldout" else ")"))
        else:
            recs = self.shards[:n - k] if split == "train" else self.shards[n - k:]
        return [dict(s, url=join_url(self.path or ".", s["name"])) for s in recs]

    def shard_urls(self, split: str = "train", heldout_shards: int = 0) -> list[str]:
        return [r["url"] for r in self.shard_records(split, heldout_shards)]

    def split_tokens(self, split: str = "train", heldout_shards: int = 0) -> int:
        return sum(r["n_tokens"] for r in self.shard_records(split, heldout_shards))


def check_dataset_matches(info: DatasetInfo, n_layers: int | None = None, d_model: int | None = None,
                          layers: list[int] | None = None, dtype: str | None = None,
                          tokens_per_sample: int | None = None, source: str = "the training config"):
    """Raise ConfigError naming dataset.json and the key where the dataset disagrees with a config."""
    for key, want in (("n_layers", n_layers), ("d_model", d_model), ("layers", layers), ("dtype", dtype),
                      ("tokens_per_sample", tokens_per_sample)):
        if want is None:
            continue
        found = getattr(info, key)
        if (list(want) if key == "layers" else want) != found:
            raise ConfigError(f"{info.json_path}: key '{key}' = {found!r} but {source} expects {want!r}")


# ----------------------------------------------------------------------------------------------------
# Writing shards


def normalization_scales(x: torch.Tensor, y: torch.Tensor) -> tuple[list[float], list[float]]:
    """s[l] = sqrt(D) / mean_t ||v_t,l|| for x, y of shape [tokens, N, D]."""
    d = x.shape[-1]

    def scales(v):
        norms = v.float().norm(dim=-1).mean(dim=0)  # [N]
        return [float(math.sqrt(d) / max(n, 1e-12)) for n in norms.tolist()]

    return scales(x), scales(y)


def quantize_rows(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values and float32 per-row scales of v [..., D]: v ~ q * scale[..., None] (module docstring)."""
    v = v.float().contiguous()
    scale = v.abs().amax(dim=-1) / 127.0
    q = torch.round(v / torch.where(scale > 0, scale, 1.0).unsqueeze(-1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def encode_sample(x: torch.Tensor, y: torch.Tensor, token_ids: torch.Tensor, doc: torch.Tensor | None = None,
                  ctx: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                  metadata: dict | None = None, dtype: str | None = None) -> bytes:
    """One sample's safetensors bytes. dtype="int8" quantizes x and y per row; otherwise they are stored
    in the dtype they come in."""
    t = x.shape[0]
    tensors = {"token_ids": token_ids.to(torch.int64).contiguous()}
    if dtype in QUANTIZED_DTYPES:
        (tensors["x"], tensors["x_scale"]), (tensors["y"], tensors["y_scale"]) = quantize_rows(x), quantize_rows(y)
    elif dtype is None or dtype in DTYPES:
        tensors["x"], tensors["y"] = (v.to(DTYPES[dtype]) if dtype else v for v in (x.contiguous(), y.contiguous()))
    else:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(STORAGE_DTYPES)}")
    for key, v in (("doc", doc), ("ctx", ctx), ("pos", pos)):  # provenance; -1 where unknown
        tensors[key] = (v if v is not None else torch.full((t,), -1)).to(torch.int64).contiguous()
    # One metadata key holding sorted JSON: safetensors writes several keys in a random order, and
    # shards must be byte-identical when a harvest is repeated or resumed.
    return st_save(tensors, metadata={"provenance": json.dumps(metadata or {}, sort_keys=True)})


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def _st_tensors(buf: torch.Tensor) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors blob held in a uint8 tensor, as views of it (no copy)."""
    total = buf.numel()
    if total < 8:
        raise SampleError(f"cannot decode safetensors ({total} bytes)")
    n = int.from_bytes(buf[:8].numpy().tobytes(), "little")
    if n <= 0 or 8 + n > total:
        raise SampleError(f"cannot decode safetensors (header length {n}, blob {total} bytes)")
    try:
        header = json.loads(buf[8:8 + n].numpy().tobytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SampleError(f"cannot decode safetensors header ({e})") from None
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = _ST_DTYPES[meta["dtype"]], meta["shape"], meta["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SampleError(f"cannot decode safetensors entry {key!r}: {meta!r}") from None
        count = math.prod(shape)
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= lo <= hi <= total - 8 - n or hi - lo != count * itemsize:
            raise SampleError(f"safetensors entry {key!r}: offsets [{lo}, {hi}) do not fit {meta['dtype']} {shape} "
                              f"in a blob of {total} bytes")
        start = 8 + n + lo
        raw = buf[start:start + count * itemsize]
        out[key] = (raw.view(dtype) if start % itemsize == 0 else raw.clone().view(dtype)).view(shape)
    return out


def all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in t: NaN and Inf propagate through aminmax, one pass, 5x faster than isfinite on bf16."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


class Sample(NamedTuple):
    """One decoded, checked sample: x, y [T, N, D] in the stored dtype; x_scale, y_scale [T, N] float32
    for int8 storage (None otherwise)."""
    x: torch.Tensor
    y: torch.Tensor
    token_ids: torch.Tensor
    x_scale: torch.Tensor | None = None
    y_scale: torch.Tensor | None = None


def decode_sample(data, info: DatasetInfo) -> Sample:
    """Decode and check one sample (bytes, or a uint8 tensor whose views the result shares); raises
    SampleError saying what is wrong."""
    if not isinstance(data, torch.Tensor):
        with warnings.catch_warnings():  # a read-only buffer: only ever read from, never written
            warnings.simplefilter("ignore")
            data = torch.frombuffer(data, dtype=torch.uint8) if len(data) else torch.empty(0, dtype=torch.uint8)
    t = _st_tensors(data)
    want = (info.tokens_per_sample, info.n_layers, info.d_model)
    keys = ("x", "y", "token_ids") + (("x_scale", "y_scale") if info.quantized else ())
    for key in keys:
        if key not in t:
            raise SampleError(f"no tensor '{key}' (found {sorted(t)})")
    for key in ("x", "y"):
        v = t[key]
        if tuple(v.shape) != want:
            raise SampleError(f"'{key}' has shape {list(v.shape)}, expected [T, N, D] = {list(want)} from dataset.json")
        if v.dtype != info.torch_dtype:
            raise SampleError(f"'{key}' has dtype {v.dtype}, expected {info.torch_dtype} from dataset.json")
        if not info.quantized and not all_finite(v):
            raise SampleError(f"'{key}' holds {int((~torch.isfinite(v)).sum())} NaN/Inf value(s)")
    scales = [None, None]
    if info.quantized:
        for i, key in enumerate(("x_scale", "y_scale")):
            s = t[key]
            if tuple(s.shape) != want[:2] or s.dtype != torch.float32:
                raise SampleError(f"'{key}' is {s.dtype} {list(s.shape)}, expected float32 [T, N] = {list(want[:2])}")
            if not all_finite(s) or bool((s < 0).any()):
                raise SampleError(f"'{key}' holds {int((~torch.isfinite(s) | (s < 0)).sum())} NaN/Inf/negative value(s)")
            scales[i] = s
    ids = t["token_ids"]
    if tuple(ids.shape) != want[:1] or ids.dtype != torch.int64:
        raise SampleError(f"'token_ids' is {ids.dtype} {list(ids.shape)}, expected int64 [{want[0]}]")
    return Sample(t["x"], t["y"], ids, *scales)


def seed_mix(*xs: int) -> int:
    """A seed from several integers (stable across runs and processes, unlike hash())."""
    h = hashlib.sha256(",".join(str(int(x)) for x in xs).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)
