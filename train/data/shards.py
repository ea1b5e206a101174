"""Shards: writing (ShardWriter) and reading (read_shard, read_samples, verify_shards) WebDataset tar files.

Both directions use webdataset's own pieces: `webdataset.TarWriter` writes (fixed mtime, mode and owner,
so a repeated harvest writes byte-identical shards) over a file object that hashes every byte, and
`webdataset.tariterators.tar_file_iterator` reads, over a file object that hashes every byte read; so
`wds.WebDataset(urls)` reads our shards and we read what any WebDataset writer writes in this layout.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
import torch
from safetensors.torch import load as st_load
from tqdm import tqdm

from .format import (SAMPLE_EXT, STORAGE_DTYPES, DatasetError, DatasetInfo, Sample, SampleError, decode_sample,
                     encode_sample, is_url, open_url)

log = logging.getLogger(__name__)

_EXT = SAMPLE_EXT.lstrip(".")  # webdataset names a member KEY.EXT


class _HashingWriter:
    """A write-only file object that hashes what passes through it."""

    def __init__(self, f, h):
        self.f, self.h = f, h

    def write(self, b):
        self.h.update(b)
        return self.f.write(b)


class _HashingReader:
    """A read-only file object that reads its stream in large chunks, hashes each chunk once, and serves
    tarfile's small reads (10 KB) from it: tarfile's own reads would cost one system call and one hash
    update per 10 KB. str() is the URL (webdataset's iterator puts str(fileobj) into its errors)."""

    CHUNK = 4 << 20

    def __init__(self, f, h, url: str):
        self.f, self.h, self.url = f, h, url
        self.buf, self.pos = b"", 0

    def read(self, n: int = -1) -> bytes:
        if self.pos >= len(self.buf):
            self.buf, self.pos = self.f.read(max(n, self.CHUNK) if n >= 0 else -1), 0
            if self.h is not None:
                self.h.update(self.buf)
        if n < 0:
            n = len(self.buf) - self.pos
        out = self.buf[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def drain(self):
        """Read (and hash) what tarfile left after the end-of-archive blocks."""
        while self.read(1 << 20):
            pass

    def __str__(self):
        return self.url


class ShardWriter:
    """Write samples into folder/NAME.tar under a temporary name; `close()` fsyncs and renames it and
    returns its dataset.json record {name, n_tokens, sha256}. dtype="int8" quantizes x and y per row
    (train/data/format.py); None stores them in the dtype they come in."""

    def __init__(self, folder: str | os.PathLike, name: str, dtype: str | None = None):
        import webdataset as wds  # noqa: PLC0415  (webdataset is slow to import; only writers need it here)
        if dtype is not None and dtype not in STORAGE_DTYPES:
            raise ValueError(f"ShardWriter: dtype={dtype!r}, expected one of {list(STORAGE_DTYPES)}")
        self.folder, self.name, self.dtype = Path(folder), name, dtype
        self.tmp = self.folder / f".{name}.tmp-{os.getpid()}"
        self._f = open(self.tmp, "wb")
        self._hash = hashlib.sha256()
        self._tar = wds.TarWriter(_HashingWriter(self._f, self._hash), encoder=False, compress=False, mtime=0.0,
                                  mode=0o444, user="cltrain", group="cltrain")
        self.n_tokens = self.n_samples = self.n_bytes = 0

    def add(self, key: str, x: torch.Tensor, y: torch.Tensor, token_ids: torch.Tensor, **kw):
        data = encode_sample(x, y, token_ids, dtype=self.dtype, **kw)
        self._tar.write({"__key__": key, _EXT: data})
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


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


class EmptySlot(NamedTuple):
    """A slot of the schedule whose sample is missing or bad (skipped with on_error="skip"): why."""
    message: str


def read_shard(rec: dict, info: DatasetInfo, start: int = 0, stop: int | None = None, on_error: str = "raise",
               verify: bool = True, shared: bool = False) -> Iterator[Sample | EmptySlot]:
    """One Sample or EmptySlot per slot start..stop-1 of a shard (stop defaults to its n_tokens / T from
    dataset.json). The sha256 is checked when the whole shard is read. shared=True puts each sample in
    shared memory (loader workers hand them to the training process by handle). With on_error="raise"
    a bad sample raises DatasetError naming the shard."""
    from webdataset.tariterators import tar_file_iterator  # noqa: PLC0415
    url, n = rec["url"], rec["n_tokens"] // info.tokens_per_sample
    stop = n if stop is None else min(stop, n)
    where = f"shard {rec['name']} ({url})"

    def problem(msg):
        if on_error == "raise":
            raise DatasetError(f"{where}: {msg}")
        return EmptySlot(f"{where}: {msg}")

    try:
        stream = open_url(url)
    except (OSError, ValueError) as e:
        item = problem(f"cannot open ({e})")
        for _ in range(start, stop):
            yield item
        return
    whole = start == 0 and stop == n
    reader = _HashingReader(stream, hashlib.sha256() if verify and whole else None, url)
    i, broken = 0, None
    try:
        try:
            for member in tar_file_iterator(reader):
                name, data = member["fname"], member["data"]
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
                        if shared:  # one copy, into memory the training process maps
                            buf = torch.empty(len(data), dtype=torch.uint8).share_memory_()
                            buf.numpy()[:] = np.frombuffer(data, dtype=np.uint8)
                            data = buf
                        item = decode_sample(data, info)
                    except SampleError as e:
                        item = problem(f"sample {i} ({name}): {e}")
                i += 1
                yield item
                if i >= stop and not whole:
                    return
            if whole and broken is None:
                reader.drain()  # the end-of-archive padding counts in the digest
        except DatasetError:
            raise
        except (tarfile.TarError, EOFError, OSError, ValueError) as e:
            broken = f"corrupt or truncated tar after {i} sample(s) ({type(e).__name__}: {e})"
        if broken is None and i < stop:
            broken = (f"holds {i} sample(s) but dataset.json says {n} (n_tokens {rec['n_tokens']}): "
                      f"truncated, or dataset.json disagrees with the shard")
        if broken is None and reader.h is not None and reader.h.hexdigest() != rec["sha256"]:
            broken = f"sha256 {reader.h.hexdigest()[:16]}... differs from dataset.json's {rec['sha256'][:16]}..."
        if broken is not None:
            if i < stop:  # the remaining slots stay empty
                item = problem(broken)
                for _ in range(max(i, start), stop):
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
    from webdataset.tariterators import tar_file_iterator  # noqa: PLC0415
    with open_url(url) as f:
        for member in tar_file_iterator(f):
            data = member["data"]
            n = int.from_bytes(data[:8], "little")  # safetensors: header length, JSON header, data
            meta = json.loads(json.loads(data[8:8 + n]).get("__metadata__", {}).get("provenance", "{}"))
            yield member["fname"], st_load(data), meta


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 22):  # hashlib releases the GIL on large updates: threads run in parallel
            h.update(b)
    return h.hexdigest()


def verify_shards(dataset, split: str = "all", heldout_shards: int = 0, threads: int | None = None,
                  progress: bool = True) -> dict:
    """Check the sha256 of every local shard of a split against dataset.json before training starts, in
    parallel threads with a progress bar. Raises DatasetError naming the first bad shard (missing, or
    expected vs found digest) and how many others are bad. Shards behind URLs are not downloaded for
    this (the loader checks them as it streams them). Returns {"checked": [names], "remote": [names]}."""
    info = DatasetInfo.load(dataset)
    recs = info.shard_records(split, heldout_shards)
    local = [r for r in recs if not is_url(r["url"])]
    remote = [r["name"] for r in recs if is_url(r["url"])]
    threads = threads or min(8, os.cpu_count() or 1)
    bad = []

    def check(r):
        try:
            found = _file_sha256(r["url"])
        except OSError as e:
            return r, f"cannot read ({e.strerror or e})"
        return r, None if found == r["sha256"] else f"sha256 is {found} but dataset.json expects {r['sha256']}"

    total = sum(os.path.getsize(r["url"]) for r in local if os.path.isfile(r["url"]))
    with ThreadPoolExecutor(threads) as pool, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                                   desc=f"sha256 of {len(local)} shard(s)", dynamic_ncols=True) as bar:
        for r, msg in pool.map(check, local):
            if msg:
                bad.append(f"shard {r['name']} ({r['url']}): {msg}")
            bar.update(os.path.getsize(r["url"]) if os.path.isfile(r["url"]) else 0)
    if bad:
        more = f" ({len(bad) - 1} more bad shard(s), e.g. {bad[1]})" if len(bad) > 1 else ""
        raise DatasetError(f"{bad[0]}{more}; listed in {info.json_path}")
    return {"checked": [r["name"] for r in local], "remote": remote}
