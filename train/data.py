"""Activation shards (DESIGN section 2): the format, dataset.json, a synthetic writer, and the loader.

Format
------
A dataset is a folder or URL prefix holding `dataset.json` and WebDataset shards NAME-000000.tar, ...
Each tar member `<key>.safetensors` is one sample of T tokens (safetensors keeps bf16):

    x          [T, N, D]  bfloat16 | float16   raw residual stream at each MLP block's input
    y          [T, N, D]  same dtype           raw MLP block output as added to the residual stream
    token_ids  [T]        int64                the token each row belongs to (vocabulary ids)
    doc        [T]        int64                provenance: source document index
    ctx        [T]        int64                provenance: context index (contexts fed to the model, in order)
    pos        [T]        int64                provenance: position of the token in its context

Tokens were shuffled across documents before they were written, so a sample's rows are unrelated
tokens. Activations are stored raw; `DatasetInfo.scale_x/scale_y` normalize them (the loader applies
them), so that E||s_x[l] x_l|| = sqrt(D).

URLs: a local folder, `http(s)://...`, `gs://...` or anything WebDataset's `gopen` opens, or a
`pipe:` command with `{}` where the file name goes, e.g. `pipe:aws s3 cp s3://bucket/acts/{} -`.

Loader order (deterministic given seed, dp_size, num_workers, batch_tokens, shuffle_buffer)
-------------------------------------------------------------------------------------------
1. Epoch e permutes the shards with seed+e; data-parallel rank r takes every dp_size-th shard, and
   worker w of that rank every num_workers-th of those (0 workers reads local files in-process, in the
   same order as 1 worker).
2. The rank's sample stream interleaves its workers round-robin, one sample each. Every sample declared
   in dataset.json is a "slot" of this stream, present or not; a skipped bad sample leaves an empty slot,
   so the schedule never depends on the data.
3. Consecutive windows of ceil(shuffle_buffer / T) slots are loaded, their tokens permuted (seeded by
   seed, epoch, rank and window), and cut into batches of batch_tokens; a batch may span windows and
   epochs. The position is therefore (epoch, window, tokens taken from the window): `state_dict()`
   records it, and a restarted loader re-reads only that window.
   Within a batch, rows are grouped by the sample they came from (a cheaper gather; the set is random).
Across ranks and workers every token of the split is delivered exactly once per epoch. Ranks may hold
different token counts per epoch (whole shards are split); with epochs=None (the default) the stream
continues into the next epoch, so that never starves a rank.

Checks: every sample's shape, dtype and finiteness, each shard's sample count and (when read from its
start) sha256 against dataset.json. A bad sample raises DatasetError naming the shard and what is wrong,
or with on_error="skip" leaves an empty slot, counted in `ActivationLoader.skipped` and logged. Worker
processes read samples straight into shared memory; a worker that dies or a URL that stalls for
`timeout` seconds is an error, never a hang.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import queue as queue_mod
import tarfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch
from safetensors.torch import load as st_load, save as st_save

from .config import ConfigError
from .model_io import atomic_write_bytes

log = logging.getLogger(__name__)

FORMAT = "cltrain-activations/1"
DATASET_JSON = "dataset.json"
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
SAMPLE_EXT = ".safetensors"
SCALE_TOKENS = 4096  # tokens the normalization scales are estimated on (the first harvested ones)


class DatasetError(ValueError):
    """A dataset, shard or sample is missing or malformed; the message names which and what is wrong."""


class SampleError(ValueError):
    """One sample is bad (shape, dtype, NaN/Inf, undecodable); skippable with on_error=skip."""


# ----------------------------------------------------------------------------------------------------
# URLs


def is_url(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def join_url(base: str, name: str) -> str:
    """The URL of file `name` in dataset `base` (folder, URL prefix, or pipe: command with {})."""
    base = str(base)
    if base.startswith("pipe:"):
        if "{}" not in base:
            raise DatasetError(f"dataset URL {base!r}: a pipe: URL needs '{{}}' where the file name goes, "
                               f"e.g. 'pipe:aws s3 cp s3://bucket/acts/{{}} -'")
        return base.replace("{}", name)
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
    return gopen(url, "rb")


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
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

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
        if self.dtype not in DTYPES:
            bad("dtype", self.dtype, f"one of {list(DTYPES)}")
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


def encode_sample(x: torch.Tensor, y: torch.Tensor, token_ids: torch.Tensor, doc: torch.Tensor | None = None,
                  ctx: torch.Tensor | None = None, pos: torch.Tensor | None = None,
                  metadata: dict | None = None) -> bytes:
    t = x.shape[0]
    tensors = {"x": x.contiguous(), "y": y.contiguous(), "token_ids": token_ids.to(torch.int64).contiguous()}
    for key, v in (("doc", doc), ("ctx", ctx), ("pos", pos)):  # provenance; -1 where unknown
        tensors[key] = (v if v is not None else torch.full((t,), -1)).to(torch.int64).contiguous()
    # One metadata key holding sorted JSON: safetensors writes several keys in a random order, and
    # shards must be byte-identical when a harvest is repeated or resumed.
    return st_save(tensors, metadata={"provenance": json.dumps(metadata or {}, sort_keys=True)})


class ShardWriter:
    """Write samples into folder/NAME.tar under a temporary name; `close()` renames it and returns its
    dataset.json record {name, n_tokens, sha256}. Member timestamps are fixed so shards are reproducible."""

    def __init__(self, folder: str | os.PathLike, name: str):
        self.folder, self.name = Path(folder), name
        self.tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        self._f = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self._tar = tarfile.open(fileobj=_HashingWriter(self._f, self._hash), mode="w|", format=tarfile.USTAR_FORMAT)
        self.n_tokens = self.n_samples = self.n_bytes = 0

    def add(self, key: str, x: torch.Tensor, y: torch.Tensor, token_ids: torch.Tensor, **kw):
        data = encode_sample(x, y, token_ids, **kw)
        ti = tarfile.TarInfo(key + SAMPLE_EXT)
        ti.size, ti.mtime, ti.mode = len(data), 0, 0o644
        self._tar.addfile(ti, io.BytesIO(data))
        self.n_tokens += x.shape[0]
        self.n_samples += 1
        self.n_bytes += len(data) + 512

    def close(self) -> dict:
        self._tar.close()
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        os.replace(self.tmp, self.folder / self.name)
        return {"name": self.name, "n_tokens": self.n_tokens, "sha256": self._hash.hexdigest()}

    def abort(self):
        try:
            self._f.close()
        finally:
            self.tmp.unlink(missing_ok=True)


class _HashingWriter:
    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, b):
        self.h.update(b)
        return self.f.write(b)


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def write_synthetic_dataset(path: str | os.PathLike, n_layers: int, d_model: int, n_tokens: int,
                            tokens_per_sample: int = 16, seed: int = 0, shard_tokens: int = 1024,
                            dtype: str = "bfloat16", generator: str | Callable | None = None,
                            n_true_features: int = 64, active: int = 4, name: str = "synthetic") -> DatasetInfo:
    """Write a valid dataset (shards + dataset.json) without a language model, for tests and benchmarks.

    generator:
      None / "sparse": a known sparse CLT generates the data. Per token and layer, `active` of
          `n_true_features` features fire with magnitudes in [0.5, 2]; x_l = a_l E_l * (1 + l) and
          y_l = sum_{s <= l} a_s D_{s,l} (E, D unit-norm random directions). A CLT can fit it exactly; the
          per-layer factor (1 + l) makes normalization matter.
      "gaussian": x, y i.i.d. standard normal (fast; for benchmarks of the loader).
      a callable f(n, torch.Generator) -> (x, y) of shape [n, n_layers, d_model].
    token_ids are 0..n_tokens-1 in the order written (unique, so tests can count them); doc/pos give the
    sample and row. Scales are estimated on the first SCALE_TOKENS tokens, as clt-harvest does.
    """
    T = int(tokens_per_sample)
    if n_tokens <= 0 or n_tokens % T:
        raise ValueError(f"n_tokens={n_tokens} must be a positive multiple of tokens_per_sample={T}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: expected one of {list(DTYPES)}")
    per_shard = max(1, int(shard_tokens) // T) * T
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    if generator in (None, "sparse"):
        n, F = n_layers, n_true_features
        enc = torch.nn.functional.normalize(torch.randn(n, F, d_model, generator=g), dim=-1)
        dec = torch.nn.functional.normalize(torch.randn(n, n, F, d_model, generator=g), dim=-1)

        def make(count, g):
            idx = torch.rand(count, n, F, generator=g).argsort(dim=-1)[..., :active]
            a = torch.zeros(count, n, F).scatter_(-1, idx, 0.5 + 1.5 * torch.rand(count, n, active, generator=g))
            x = torch.einsum("tnf,nfd->tnd", a, enc) * torch.arange(1, n + 1).view(1, n, 1)
            y = torch.zeros(count, n, d_model)
            for s in range(n):
                y[:, s:] += torch.einsum("tf,lfd->tld", a[:, s], dec[s, s:])
            return x, y
    elif generator == "gaussian":
        def make(count, g):
            return (torch.randn(count, n_layers, d_model, generator=g),
                    torch.randn(count, n_layers, d_model, generator=g))
    elif callable(generator):
        make = generator
    else:
        raise ValueError(f"generator={generator!r}: expected None, 'sparse', 'gaussian' or a callable")

    tdt = DTYPES[dtype]
    shards, head_x, head_y, written = [], [], [], 0
    while written < n_tokens:
        count = min(per_shard, n_tokens - written)
        x, y = make(count, g)
        x, y = x.to(tdt), y.to(tdt)
        if sum(h.shape[0] for h in head_x) < SCALE_TOKENS:
            head_x.append(x), head_y.append(y)
        w = ShardWriter(folder, shard_name(name, len(shards)))
        for i in range(0, count, T):
            ids = torch.arange(written + i, written + i + T)
            w.add(f"{len(shards):06d}-{i // T:06d}", x[i:i + T], y[i:i + T], ids,
                  doc=ids // T, ctx=ids // T, pos=ids % T, metadata={"source": "synthetic", "seed": seed})
        shards.append(w.close())
        written += count
    hx, hy = torch.cat(head_x)[:SCALE_TOKENS], torch.cat(head_y)[:SCALE_TOKENS]
    sx, sy = normalization_scales(hx, hy)
    info = DatasetInfo(
        model=f"synthetic:{generator if isinstance(generator, str) else 'sparse' if generator is None else 'custom'}",
        layers=list(range(n_layers)), n_layers=n_layers, d_model=d_model, dtype=dtype,
        tokens_per_sample=T, n_tokens=n_tokens, hooks={"x": "synthetic", "y": "synthetic"},
        scale_x=sx, scale_y=sy, shards=shards, scale_tokens=hx.shape[0],
        scale_source=f"the first {hx.shape[0]} tokens written", harvest={"seed": seed}, path=str(folder))
    info.save(folder)
    return info


# ----------------------------------------------------------------------------------------------------
# Reading shards


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


def decode_sample(data, info: DatasetInfo) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode and check one sample (bytes, or a uint8 tensor it is read into, whose views the result
    shares); raises SampleError saying what is wrong."""
    t = _st_tensors(data if isinstance(data, torch.Tensor) else torch.frombuffer(bytearray(data), dtype=torch.uint8))
    want = (info.tokens_per_sample, info.n_layers, info.d_model)
    for key in ("x", "y", "token_ids"):
        if key not in t:
            raise SampleError(f"no tensor '{key}' (found {sorted(t)})")
    for key in ("x", "y"):
        v = t[key]
        if tuple(v.shape) != want:
            raise SampleError(f"'{key}' has shape {list(v.shape)}, expected [T, N, D] = {list(want)} from dataset.json")
        if v.dtype != info.torch_dtype:
            raise SampleError(f"'{key}' has dtype {v.dtype}, expected {info.torch_dtype} from dataset.json")
        if not all_finite(v):
            raise SampleError(f"'{key}' holds {int((~torch.isfinite(v)).sum())} NaN/Inf value(s)")
    ids = t["token_ids"]
    if tuple(ids.shape) != want[:1] or ids.dtype != torch.int64:
        raise SampleError(f"'token_ids' is {ids.dtype} {list(ids.shape)}, expected int64 [{want[0]}]")
    return t["x"], t["y"], ids


class TarFormatError(ValueError):
    pass


class _TarReader:
    """Sequential reader of the tar members of a stream (local file, pipe, HTTP), hashing every byte.
    Members are read straight into uint8 tensors (in shared memory for loader workers): one copy."""

    def __init__(self, f, hasher=None, shared: bool = False):
        self.f, self.h, self.shared = f, hasher, shared
        self.readinto = getattr(f, "readinto", None)

    def _fill(self, buf: torch.Tensor) -> int:
        mv, got = memoryview(buf.numpy()).cast("B"), 0
        while got < len(mv):
            if self.readinto is not None:
                n = self.readinto(mv[got:])
            else:
                b = self.f.read(len(mv) - got)
                n = len(b)
                mv[got:got + n] = b
            if not n:
                break
            got += n
        if self.h is not None:
            self.h.update(mv[:got])
        return got

    def _read(self, n: int, shared: bool = False) -> torch.Tensor:
        buf = torch.empty(n, dtype=torch.uint8)
        if shared:
            buf.share_memory_()
        got = self._fill(buf)
        if got < n:
            raise TarFormatError(f"unexpected end of data ({got} of {n} bytes)")
        return buf

    def drain(self):
        buf = torch.empty(1 << 20, dtype=torch.uint8)
        while self._fill(buf) == len(buf):
            pass

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        long_name = None
        while True:
            hdr = torch.empty(512, dtype=torch.uint8)
            got = self._fill(hdr)
            if got == 0:
                return  # end of stream without the end-of-archive blocks: a short shard is caught by counting
            if got < 512:
                raise TarFormatError(f"truncated header ({got} of 512 bytes)")
            h = hdr.numpy().tobytes()
            if h == bytes(512):
                self.drain()  # end-of-archive; the rest (padding) still counts in the digest
                return
            try:
                stored = int(h[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
            except ValueError:
                raise TarFormatError("header checksum field is not a number") from None
            if stored != sum(h[:148]) + 8 * 32 + sum(h[156:]):
                raise TarFormatError("header checksum mismatch")
            field = h[124:136]
            size = int.from_bytes(field[1:], "big") if field[0] & 0x80 else int(field.split(b"\0", 1)[0].strip() or b"0", 8)
            name = h[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if h[257:262] == b"ustar" and h[345:500].strip(b"\0"):
                name = h[345:500].split(b"\0", 1)[0].decode("utf-8", "replace") + "/" + name
            kind = h[156:157]
            data = self._read(size, shared=self.shared and kind in (b"0", b"\0"))
            pad = -size % 512
            if pad and self._fill(torch.empty(pad, dtype=torch.uint8)) < pad:
                raise TarFormatError("unexpected end of data in padding")
            if kind == b"L":  # GNU long name of the next member
                long_name = data.numpy().tobytes().split(b"\0", 1)[0].decode("utf-8", "replace")
            elif kind == b"x":  # pax header: only the path matters here
                for rec in data.numpy().tobytes().decode("utf-8", "replace").splitlines():
                    if " path=" in rec:
                        long_name = rec.split(" path=", 1)[1]
            elif kind in (b"0", b"\0"):
                yield (long_name or name), data
                long_name = None


# Items a shard reader yields, one per slot: ("s", x, y, ids) a sample, ("h", message) an empty slot
# (a skipped bad sample). With on_error="raise" a bad sample raises DatasetError instead.

def read_shard(rec: dict, info: DatasetInfo, start: int = 0, on_error: str = "raise",
               verify: bool = True, shared: bool = False) -> Iterator[tuple]:
    """Yield one item per slot start..n-1 of a shard (n = its n_tokens / T from dataset.json)."""
    url, n = rec["url"], rec["n_tokens"] // info.tokens_per_sample
    where = f"shard {rec['name']} ({url})"

    def problem(msg):
        if on_error == "raise":
            raise DatasetError(f"{where}: {msg}")
        return ("h", f"{where}: {msg}")

    try:
        stream = open_url(url)
    except (OSError, ValueError) as e:
        item = problem(f"cannot open ({e})")
        for _ in range(start, n):
            yield item
        return
    h = hashlib.sha256() if verify and start == 0 else None
    i, broken = 0, None
    try:
        reader = _TarReader(stream, h, shared)
        try:
            for name, data in reader:
                if i >= n:
                    broken = (f"holds more samples than dataset.json says ({n} = n_tokens {rec['n_tokens']} / T); "
                              f"the extra ones are ignored")
                    break
                if i < start:  # resuming inside the shard
                    i += 1
                    continue
                if not name.endswith(SAMPLE_EXT):
                    item = problem(f"member {name!r} (sample {i}) is not a {SAMPLE_EXT} sample")
                else:
                    try:
                        item = ("s", *decode_sample(data, info))
                    except SampleError as e:
                        item = problem(f"sample {i} ({name}): {e}")
                i += 1
                yield item
        except DatasetError:
            raise
        except (TarFormatError, OSError, ValueError) as e:
            broken = f"corrupt or truncated tar after {i} sample(s) ({type(e).__name__}: {e})"
        if broken is None and i < n:
            broken = (f"holds {i} sample(s) but dataset.json says {n} (n_tokens {rec['n_tokens']}): "
                      f"truncated, or dataset.json disagrees with the shard")
        if broken is None and h is not None and h.hexdigest() != rec["sha256"]:
            broken = f"sha256 {h.hexdigest()[:16]}... differs from dataset.json's {rec['sha256'][:16]}..."
        if broken is not None:
            if i < n:  # the remaining slots stay empty
                item = problem(broken)
                for _ in range(i, n):
                    yield item
            elif on_error == "raise":
                raise DatasetError(f"{where}: {broken}")
            else:  # every slot was already delivered (they decoded and passed the checks): report only
                log.warning("%s: %s", where, broken)
    finally:
        try:
            stream.close()
        except Exception as e:  # a failed pipe: command reports here; missing data was reported above
            log.warning("%s: closing the stream: %s", where, e)


# ----------------------------------------------------------------------------------------------------
# The schedule: which shards a rank and worker read in an epoch, and where a window starts


def _mix(*xs: int) -> int:
    """A seed from several integers (stable across runs and processes, unlike hash())."""
    h = hashlib.sha256(",".join(str(int(x)) for x in xs).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def epoch_shards(records: list[dict], epoch: int, seed: int, dp_rank: int, dp_size: int) -> list[dict]:
    perm = torch.randperm(len(records), generator=torch.Generator().manual_seed(_mix(seed, epoch, 1))).tolist()
    return [records[i] for i in perm[dp_rank::dp_size]]


def rr_consumed(counts: list[int], m: int) -> list[int]:
    """Slots taken from each worker after m slots of a round-robin over workers with `counts` slots."""
    lo, hi = 0, max(counts, default=0)
    while lo < hi:  # the largest number of full rounds r with sum(min(c, r)) <= m
        mid = (lo + hi + 1) // 2
        if sum(min(c, mid) for c in counts) <= m:
            lo = mid
        else:
            hi = mid - 1
    used = [min(c, lo) for c in counts]
    rest = m - sum(used)
    for w, c in enumerate(counts):
        if rest and c > lo:
            used[w] += 1
            rest -= 1
    return used


class Batch(NamedTuple):
    x: torch.Tensor  # [B, N, D] float32, normalized
    y: torch.Tensor  # [B, N, D] float32, normalized
    token_ids: torch.Tensor  # [B] int64


def _worker_items(info: DatasetInfo, records: list[dict], params: dict, w: int, n_workers: int,
                  start_epoch: int, start_slot: int, shared: bool = False) -> Iterator[tuple]:
    """Worker w's slot stream from (start_epoch, start_slot) on, epoch after epoch."""
    T, epoch = info.tokens_per_sample, start_epoch
    while params["epochs"] is None or epoch < params["epochs"]:
        mine = epoch_shards(records, epoch, params["seed"], params["dp_rank"], params["dp_size"])[w::n_workers]
        skip = start_slot if epoch == start_epoch else 0
        for rec in mine:
            n = rec["n_tokens"] // T
            if skip >= n:
                skip -= n
                continue
            yield from read_shard(rec, info, skip, params["on_error"], params["verify"], shared)
            skip = 0
        epoch += 1


def _worker_main(q, stop, info_doc, base, records, params, w, n_workers, start_epoch, start_slot):
    """A loader worker: samples are read straight into shared memory and passed by handle (no copy)."""
    torch.set_num_threads(1)
    parent = os.getppid()
    try:
        info = DatasetInfo.from_json(info_doc, base)
        for item in _worker_items(info, records, params, w, n_workers, start_epoch, start_slot, shared=True):
            q.put(item)
    except Exception as e:
        q.put(("e", f"{type(e).__name__}: {e}" if not isinstance(e, DatasetError) else str(e)))
    q.put(("end",))
    # Stay alive until the loader is done: the consumer fetches shared-memory handles from this process.
    while not stop.wait(1.0) and os.getppid() == parent:
        pass


class _Sources:
    """Slot streams of the logical workers: generators in-process (0 workers) or worker processes."""

    def __init__(self, loader: "ActivationLoader", epoch: int, starts: list[int]):
        self.loader, self.procs, self.queues = loader, [], []
        L = loader
        # 0 workers reads local files in-process. URLs (pipe:, http, ...) always go through a worker
        # process, whose queue has a timeout: a stalled stream is an error, not a hang. (0 and 1 worker
        # read in the same order.)
        if L.num_workers == 0 and not any(is_url(r["url"]) for r in L.records):
            self.gens = [_worker_items(L.info, L.records, L._params, 0, 1, epoch, starts[0])]
            return
        ctx = torch.multiprocessing.get_context(L.mp_context)
        self.stop = ctx.Event()
        for w in range(L.n_logical_workers):
            q = ctx.Queue(maxsize=L.prefetch)
            p = ctx.Process(target=_worker_main, daemon=True, name=f"cltrain-loader-{L.dp_rank}-{w}",
                            args=(q, self.stop, L.info.to_json(), L.info.path, L.records, L._params, w,
                                  L.n_logical_workers, epoch, starts[w]))
            p.start()
            self.procs.append(p)
            self.queues.append(q)

    def next(self, w: int) -> tuple:
        if not self.procs:
            return next(self.gens[w])
        q, p, t0 = self.queues[w], self.procs[w], time.monotonic()
        while True:
            try:
                item = q.get(timeout=1.0)
                break
            except (ConnectionError, EOFError, OSError) as e:  # a handle of a worker that is gone
                p.join(timeout=5)
                raise DatasetError(f"loader worker {w} (rank {self.loader.dp_rank}) died with exit code "
                                   f"{p.exitcode} before delivering its data ({type(e).__name__})") from None
            except queue_mod.Empty:
                if not p.is_alive() and q.empty():
                    raise DatasetError(f"loader worker {w} (rank {self.loader.dp_rank}) died with exit code "
                                       f"{p.exitcode} before delivering its data") from None
                if time.monotonic() - t0 > self.loader.timeout:
                    raise DatasetError(f"loader worker {w} (rank {self.loader.dp_rank}) delivered nothing for "
                                       f"{self.loader.timeout:.0f} s (a shard URL that never answers?)") from None
        if item[0] == "e":
            raise DatasetError(item[1])
        if item[0] == "end":
            raise DatasetError(f"loader worker {w} stopped before the end of its schedule (internal error)")
        return item

    def close(self):
        if self.procs:
            self.stop.set()
        for q in self.queues:
            q.cancel_join_thread()
            q.close()
        for p in self.procs:  # what they still hold is not needed: no graceful drain
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(timeout=5)
        self.procs, self.queues = [], []


class ActivationLoader:
    """Batches (x, y, token_ids) of normalized activations for one data-parallel rank (module docstring).

    Iterating yields `Batch(x, y, token_ids)`: float32 [batch_tokens, N, D] x and y already multiplied by
    the dataset's scales, on `device`. All ranks of a feature-parallel group must pass the same dp_rank.
    epochs=None iterates forever (each epoch reshuffled); with epochs=k it stops after k epochs, the last
    batch holding the remainder unless drop_last. `state_dict()` is the position after the last batch
    yielded; `load_state_dict()` before iterating continues exactly there (same seed, dp_size,
    num_workers, batch_tokens and shuffle_buffer required); iterating again also continues from there.
    `skipped` counts bad samples skipped (on_error="skip"); each is logged with its shard. `close()` stops
    the worker processes (also done when an iteration ends or the loader is collected).
    Memory: the window being served holds shuffle_buffer x N x D x 4 bytes (x and y, bf16); workers
    prefetch up to `prefetch` samples each (default: the next window's worth), as much again.
    """

    def __init__(self, path_or_info, batch_tokens: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 shuffle_buffer: int = 16384, num_workers: int = 0, split: str = "train",
                 heldout_shards: int = 0, on_error: str = "raise", device="cpu", epochs: int | None = None,
                 drop_last: bool = False, prefetch: int | None = None, timeout: float = 600.0, verify: bool = True,
                 mp_context: str = "fork"):
        self.info = DatasetInfo.load(path_or_info)
        for key, v in (("batch_tokens", batch_tokens), ("dp_size", dp_size), ("prefetch", prefetch or 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"ActivationLoader: {key}={v!r}, expected a positive integer")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"ActivationLoader: dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if on_error not in ("raise", "skip"):
            raise ValueError(f"ActivationLoader: on_error={on_error!r}, expected 'raise' or 'skip'")
        if num_workers < 0 or shuffle_buffer < 0:
            raise ValueError(f"ActivationLoader: num_workers={num_workers}, shuffle_buffer={shuffle_buffer}: expected >= 0")
        self.batch_tokens, self.dp_rank, self.dp_size, self.seed = batch_tokens, dp_rank, dp_size, seed
        self.num_workers, self.split, self.heldout_shards = num_workers, split, heldout_shards
        self.on_error, self.device, self.epochs, self.drop_last = on_error, torch.device(device), epochs, drop_last
        self.timeout, self.mp_context = timeout, mp_context
        self.records = self.info.shard_records(split, heldout_shards)
        if len(self.records) < dp_size:
            raise DatasetError(f"{self.info.json_path}: the {split} split has {len(self.records)} shard(s), fewer "
                               f"than the {dp_size} data-parallel ranks; harvest with a smaller shard size")
        for r in self.records:  # a missing local shard is reported now, not hours into a run
            if not is_url(r["url"]) and not os.path.isfile(r["url"]):
                msg = f"shard {r['name']} ({r['url']}): missing (listed in {self.info.json_path})"
                if on_error == "raise":
                    raise DatasetError(msg)
                log.warning("%s; its samples will be skipped", msg)
        T = self.info.tokens_per_sample
        self.window_slots = max(1, math.ceil(shuffle_buffer / T))
        self.shuffle_buffer = shuffle_buffer
        # Workers read the next window while the current one is served: no stall at window boundaries.
        self.prefetch = prefetch or math.ceil(self.window_slots / self.n_logical_workers) + 1
        self._params = dict(seed=seed, dp_rank=dp_rank, dp_size=dp_size, on_error=on_error, epochs=epochs,
                            verify=verify)
        self.scale_x = torch.tensor(self.info.scale_x, dtype=torch.float32).view(1, -1, 1)
        self.scale_y = torch.tensor(self.info.scale_y, dtype=torch.float32).view(1, -1, 1)
        self.skipped = 0
        self.skip_messages: list[str] = []
        self._pos = (0, 0, 0)  # (epoch, window, tokens taken from the window)
        self._skipped_at_window = 0
        self._sources: _Sources | None = None

    # --- schedule ---

    @property
    def n_logical_workers(self) -> int:
        return max(1, self.num_workers)

    def worker_counts(self, epoch: int) -> list[int]:
        """Slots (samples declared) each worker of this rank reads in an epoch."""
        mine = epoch_shards(self.records, epoch, self.seed, self.dp_rank, self.dp_size)
        W, T = self.n_logical_workers, self.info.tokens_per_sample
        return [sum(r["n_tokens"] // T for r in mine[w::W]) for w in range(W)]

    def epoch_tokens(self, epoch: int = 0) -> int:
        """Tokens this rank sees in an epoch (bad samples skipped excepted)."""
        return sum(self.worker_counts(epoch)) * self.info.tokens_per_sample

    # --- state ---

    def state_dict(self) -> dict:
        e, k, off = self._pos
        return {"version": 1, "epoch": e, "window": k, "offset": off, "skipped": self._skipped_at_window,
                "seed": self.seed, "dp_rank": self.dp_rank, "dp_size": self.dp_size,
                "num_workers": self.n_logical_workers, "batch_tokens": self.batch_tokens,
                "window_slots": self.window_slots, "split": self.split, "heldout_shards": self.heldout_shards,
                "n_tokens": self.info.n_tokens}

    def load_state_dict(self, state: dict):
        mine = self.state_dict()
        for key in ("seed", "dp_rank", "dp_size", "num_workers", "batch_tokens", "window_slots", "split",
                    "heldout_shards", "n_tokens"):
            if state.get(key) != mine[key]:
                raise ValueError(f"ActivationLoader.load_state_dict: saved {key}={state.get(key)!r} but this "
                                 f"loader has {key}={mine[key]!r}; resuming needs the same data layout")
        self.close()
        self._pos = (int(state["epoch"]), int(state["window"]), int(state["offset"]))
        self._skipped_at_window = self.skipped = int(state["skipped"])

    # --- iteration ---

    def close(self):
        if self._sources is not None:
            self._sources.close()
            self._sources = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _skip(self, msg: str):
        self.skipped += 1
        if len(self.skip_messages) < 1000:
            self.skip_messages.append(msg)
        log.warning("skipped a bad sample (%d so far): %s", self.skipped, msg)

    def __iter__(self) -> Iterator[Batch]:
        self.close()
        epoch, k, off = self._pos
        S, T = self.window_slots, self.info.tokens_per_sample
        counts = self.worker_counts(epoch)
        M = sum(counts)
        if k * S >= M:  # a saved position at an epoch's very end
            epoch, k, off, counts = epoch + 1, 0, 0, self.worker_counts(epoch + 1)
            M = sum(counts)
        starts = rr_consumed(counts, k * S)
        self._sources = src = _Sources(self, epoch, starts)
        carry: list[tuple] = []
        have = 0
        # The loader's work is memory-bound: one thread does it as fast as two, and on a busy machine two
        # OpenMP threads contend (measured 3.5x slower). The caller's thread count is restored at each yield.
        caller_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            while self.epochs is None or epoch < self.epochs:
                used = rr_consumed(counts, k * S)
                delivered = 0
                while k * S < M:
                    self._skipped_at_window = self.skipped
                    xs, ys, ids = [], [], []
                    for _ in range(min(S, M - k * S)):
                        # next in round-robin: the worker with the fewest slots taken, lowest index first
                        w = min((u, w) for w, (u, c) in enumerate(zip(used, counts)) if u < c)[1]
                        used[w] += 1
                        item = src.next(w)
                        if item[0] == "h":
                            self._skip(item[1])
                        else:
                            xs.append(item[1]), ys.append(item[2]), ids.append(item[3])
                    n = len(ids) * T
                    delivered += n
                    if n:
                        wid = torch.cat(ids)
                        perm = torch.randperm(n, generator=torch.Generator().manual_seed(
                            _mix(self.seed, epoch, self.dp_rank, k, 2)))
                        while off < n:
                            take = min(self.batch_tokens - have, n - off)
                            idx = perm[off:off + take]
                            carry.append(self._gather(xs, ys, wid, idx))
                            have += take
                            off += take
                            if have == self.batch_tokens:
                                batch = self._make_batch(carry)
                                carry, have = [], 0
                                self._pos = (epoch, k + 1, 0) if off == n else (epoch, k, off)
                                if off == n:
                                    self._skipped_at_window = self.skipped
                                torch.set_num_threads(caller_threads)
                                yield batch
                                caller_threads = torch.get_num_threads()
                                torch.set_num_threads(1)
                    k, off = k + 1, 0
                if not delivered and self.skipped:  # every sample bad: stop rather than spin forever
                    raise DatasetError(f"{self.info.json_path}: rank {self.dp_rank} found no valid sample in a whole "
                                       f"epoch ({self.skipped} skipped; last: {self.skip_messages[-1]})")
                epoch, k, off = epoch + 1, 0, 0
                counts = self.worker_counts(epoch)
                M = sum(counts)
            if carry and not self.drop_last:
                batch = self._make_batch(carry)
                self._pos = (epoch, 0, 0)
                torch.set_num_threads(caller_threads)
                yield batch
        finally:
            torch.set_num_threads(caller_threads)
            self.close()

    def _gather(self, xs: list[torch.Tensor], ys: list[torch.Tensor], wid: torch.Tensor, idx: torch.Tensor):
        """Rows idx of the window (samples xs/ys laid end to end), normalized float32, and their token ids. Rows are
        taken sample by sample (the batch's order is idx stably sorted by sample: still a random set, as
        deterministic as idx), copying through int16 views: index_select on bf16 is ~25x slower here."""
        T = self.info.tokens_per_sample
        sample = idx // T
        idx = idx[torch.argsort(sample, stable=True)]
        sample, row = idx // T, idx % T
        uniq, counts = torch.unique_consecutive(sample, return_counts=True)
        out = []
        for src in (xs, ys):
            shape = src[0].shape
            bits = torch.empty((len(idx), shape[1:].numel()), dtype=torch.int16)  # 2-D: the fast path
            start = 0
            for u, c in zip(uniq.tolist(), counts.tolist()):
                torch.index_select(src[u].view(shape[0], -1).view(torch.int16), 0, row[start:start + c],
                                   out=bits[start:start + c])
                start += c
            raw = bits.view(src[0].dtype).view((len(idx),) + tuple(shape[1:]))
            scale = self.scale_x if src is xs else self.scale_y
            out.append(raw.float().mul_(scale))  # (one mixed-dtype torch.mul is 2x slower here)
        return out[0], out[1], wid[idx]

    def _make_batch(self, parts: list[tuple]) -> Batch:
        x, y, t = (torch.cat(v) if len(parts) > 1 else v[0] for v in zip(*parts))
        if self.device.type == "cuda":  # pinned host memory lets the copy overlap the previous step
            x, y, t = (v.pin_memory().to(self.device, non_blocking=True) for v in (x, y, t))
        elif self.device.type != "cpu":
            x, y, t = x.to(self.device), y.to(self.device), t.to(self.device)
        return Batch(x, y, t)


def loader_from_config(data_cfg, batch_tokens: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                       device="cpu", split: str = "train", **kw) -> ActivationLoader:
    """An ActivationLoader from the `data` config group (configs/data/default.yaml)."""
    if data_cfg.get("path") is None:
        raise ConfigError("config key 'data.path' = None: expected the dataset folder or URL written by clt-harvest")
    return ActivationLoader(
        str(data_cfg.path), batch_tokens, dp_rank=dp_rank, dp_size=dp_size, seed=seed,
        shuffle_buffer=int(data_cfg.shuffle_buffer), num_workers=int(data_cfg.num_workers), split=split,
        heldout_shards=int(data_cfg.heldout_shards), on_error=str(data_cfg.on_error), device=device,
        timeout=float(data_cfg.get("timeout", 600)), verify=bool(data_cfg.get("verify", True)), **kw)


def read_samples(url: str) -> Iterator[tuple[str, dict[str, torch.Tensor], dict]]:
    """(member name, tensors, provenance dict) of every sample of one shard, unchecked: for inspection and tests."""
    with open_url(url) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            if member.isfile():
                data = tf.extractfile(member).read()
                n = int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, data
                meta = json.loads(json.loads(data[8:8 + n]).get("__metadata__", {}).get("provenance", "{}"))
                yield member.name, st_load(data), meta
