"""Shards: writing (ShardWriter) and reading (read_shard, read_samples) WebDataset tar files."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load as st_load

from .format import (SAMPLE_EXT, DatasetError, DatasetInfo, SampleError, decode_sample, encode_sample,
                     open_url)

log = logging.getLogger(__name__)


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



def read_samples(url: str) -> Iterator[tuple[str, dict[str, torch.Tensor], dict]]:
    """(member name, tensors, provenance dict) of every sample of one shard, unchecked: for inspection and tests."""
    with open_url(url) as f, tarfile.open(fileobj=f, mode="r|") as tf:
        for member in tf:
            if member.isfile():
                data = tf.extractfile(member).read()
                n = int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, data
                meta = json.loads(json.loads(data[8:8 + n]).get("__metadata__", {}).get("provenance", "{}"))
                yield member.name, st_load(data), meta

